"""Where events go: MQTT, JSON lines, or both; the pipeline talks to one `Sinks` fan-out."""

from __future__ import annotations

import logging

log = logging.getLogger("edge_ad.sinks")


class Sink:
    """Receives every event payload (alert, clear, status, heartbeat), from several threads."""

    def publish(self, event: str, payload: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush what was published; called once at shutdown."""


class Sinks(Sink):
    """Fan-out: one failing sink is logged, and does not stop the others."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = list(sinks)

    def publish(self, event: str, payload: dict) -> None:
        for sink in self.sinks:
            try:
                sink.publish(event, payload)
            except Exception as exc:  # an output must never stop inspection
                log.error("%s could not publish %s: %s", type(sink).__name__, event, exc)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                log.error("%s did not close cleanly: %s", type(sink).__name__, exc)
