"""Where events go: MQTT, JSON lines, or both; the pipeline talks to one `Sinks` fan-out.

An output that fails must not stop inspection, nor hide a loss: an alert or
all-clear that any output could not store is counted (`unstored`, heartbeat
field `alerts_unstored`) and logged with its event id.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("edge_ad.sinks")


class Sink:
    """Receives every event payload (alert, clear, status, heartbeat), from several threads."""

    def publish(self, event: str, payload: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush what was published; called once at shutdown."""


DURABLE = ("alert", "clear", "verdict")  # events that must be stored (outbox, JSON-lines file), never only attempted


class Sinks(Sink):
    """Fan-out in order (the outbox first): one failing sink is logged and counted, and does not stop the others."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = list(sinks)
        self.unstored = 0  # alerts and all-clears some output could not store
        self._lock = threading.Lock()

    def publish(self, event: str, payload: dict) -> None:
        failed = False
        for sink in self.sinks:
            try:
                sink.publish(event, payload)
            except Exception as exc:  # an output must never stop inspection
                failed = True
                log.error("%s could not publish %s %s: %s", type(sink).__name__, event,
                          payload.get("event_id", ""), exc)
        if failed and event in DURABLE:
            with self._lock:
                self.unstored += 1
                count = self.unstored
            log.error("%d alert(s)/all-clear(s) not stored so far (heartbeat alerts_unstored)", count)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                log.error("%s did not close cleanly: %s", type(sink).__name__, exc)
