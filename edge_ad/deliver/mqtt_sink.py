"""Alerts over MQTT: QoS 1 events through a durable outbox, retained device status with an `offline` last will.

Alerts and all-clears are written to the outbox (SQLite, fsync'ed) before they
are published and leave it only on the broker's PUBACK, so a broker outage, a
network cut or a crash of edge-ad loses none of them (see `outbox.py`,
`delivery.py`). The status topic always tells the truth: the current state is
retained on every (re)connect, the broker publishes the last will `offline` if
the process dies, and a clean shutdown publishes `offline` itself. Heartbeats
are QoS 0 and only sent while connected: a stale heartbeat is worthless.
An alert the outbox cannot store (disk full, I/O error) is still published from
memory, without a delivery guarantee, and publish() raises OutboxError so that
`Sinks` counts it (`alerts_unstored` in heartbeats): never a silent loss.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable

import paho.mqtt.client as mqtt

from edge_ad.deliver.delivery import Delivery
from edge_ad.deliver.events import Topics, status_payload
from edge_ad.deliver.link import Link
from edge_ad.deliver.mqtt import MqttSettings, make_client
from edge_ad.deliver.outbox import Outbox, OutboxError
from edge_ad.deliver.sinks import Sink

log = logging.getLogger("edge_ad.mqtt")

DURABLE = ("alert", "clear", "verdict")  # through the outbox
FLUSH_TIMEOUT = 10.0


def _dumps(payload: dict) -> str:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False)


class MqttSink(Sink):
    def __init__(self, settings: MqttSettings, topics: Topics, outbox: Outbox, model: dict | None = None,
                 stop: threading.Event | None = None, on_health: Callable[[str | None], None] | None = None):
        """Connects (BrokerError when impossible) and starts delivering what the outbox already holds.

        on_health(reason) is called with a reason while the broker is away or refusing, None when it is back.
        """
        self.settings, self.topics, self.outbox, self.model = settings, topics, outbox, model
        self.on_health = on_health or (lambda reason: None)
        self._status = status_payload("online", device=topics.device, camera=topics.camera, model=model)
        self._status_info: mqtt.MQTTMessageInfo | None = None
        self._lock = threading.Lock()
        self.client = make_client(settings)
        will = status_payload("offline", device=topics.device, camera=topics.camera,
                              reason="connection lost", timestamp=False)
        self.client.will_set(topics.status, _dumps(will), qos=1, retain=True)
        self.delivery = Delivery(self.client, outbox, on_refused=self.on_health,
                                 retry_delay=settings.retry_delay, retry_max_delay=max(settings.retry_max_delay, 60.0))
        self.client.on_publish = self._on_publish
        self._ever_connected = False
        self._subscriptions: dict[str, Callable[[bytes], None]] = {}  # topic -> handler(payload)
        self.client.on_message = self._on_message
        self.link = Link(self.client, settings, on_up=self._on_up, on_down=self._on_down)
        if settings.version != "5":
            log.warning("MQTT %s: a broker that denies a publish (ACL) still acknowledges it, so refused alerts "
                        "cannot be detected and leave the outbox as if delivered; use --mqtt-version 5 (the default)",
                        settings.version)
        waiting = len(outbox)
        if waiting:
            log.warning("outbox %s holds %d undelivered alert(s) from an earlier run; they are sent first",
                        outbox.path, waiting)
        try:
            self.link.start(stop)
        except Exception:
            self.delivery.close()
            raise
        log.info("connected to MQTT broker %s; status on %s; outbox %s", settings.address, topics.status, outbox.path)

    # -- connection events (network thread) ---------------------------------------------------
    def _on_up(self) -> None:
        if self._ever_connected:  # the first status is published by the caller
            with self._lock:
                status = self._status
            self._publish_status(status)  # the broker may have published our will meanwhile
            self.on_health(None)
        self._ever_connected = True
        for topic in list(self._subscriptions):  # clean session: subscriptions end with each connection
            self.client.subscribe(topic, qos=1)
        self.delivery.up()

    def subscribe(self, topic: str, handler: Callable[[bytes], None]) -> None:
        """Deliver messages on `topic` to handler(payload) (network thread), now and after every reconnect."""
        self._subscriptions[topic] = handler
        if self.link.connected:
            self.client.subscribe(topic, qos=1)

    def _on_message(self, client, userdata, message) -> None:
        handler = self._subscriptions.get(message.topic)
        if handler is None:
            return
        try:
            handler(message.payload)
        except Exception as exc:  # noqa: BLE001  a bad message must never stop the network thread
            log.error("message on %s: %s: %s", message.topic, type(exc).__name__, exc)

    def _on_down(self, reason: str) -> None:
        self.delivery.down()
        pending = len(self.outbox)
        if reason.startswith("connection lost"):
            log.warning("lost MQTT broker %s (%s); reconnecting, alerts wait in the outbox (%d pending)",
                        self.settings.address, reason, pending)
            self.on_health(f"MQTT broker {self.settings.address} {reason}")
        else:
            self.on_health(reason)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.delivery.acked(mid, reason_code if self.settings.version == "5" else None)

    # -- publishing (any thread) ------------------------------------------------------------
    def _publish_status(self, payload: dict) -> None:
        info = self.client.publish(self.topics.status, _dumps(payload), qos=1, retain=True)
        with self._lock:
            self._status_info = info

    def publish(self, event: str, payload: dict) -> None:
        if event in DURABLE:
            text = _dumps(payload)
            try:
                self.outbox.add(self.topics.for_event(event), text, str(payload.get("event_id", "")))
            except Exception as exc:  # disk full, I/O error: still try to deliver, from memory, and say so
                self.client.publish(self.topics.for_event(event), text, qos=1)
                raise OutboxError(f"{event} {payload.get('event_id')} NOT stored ({exc}); published from memory "
                                  f"without a delivery guarantee") from None
            self.delivery.wake()
        elif event == "status":
            with self._lock:
                self._status = payload  # re-published (retained) on every reconnect
            if self.link.connected:
                self._publish_status(payload)
        elif self.link.connected:  # heartbeats: QoS 0, now or never
            self.client.publish(self.topics.for_event(event), _dumps(payload), qos=0)

    def health(self) -> dict:
        """Heartbeat fields: what waits in the outbox and what was dropped from it."""
        return {"outbox_pending": len(self.outbox), "outbox_dropped": self.outbox.dropped,
                "outbox_refused": self.delivery.refused_rows, "broker_connected": self.link.connected}

    def close(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Wait (up to `timeout`) until the broker acknowledged every alert and the last status; disconnect."""
        if not self.link.connected:  # the alerts are safe on disk; the next start sends them
            timeout = min(timeout, 1.0)
        deadline = time.monotonic() + timeout
        delivered = self.delivery.wait_idle(timeout)
        with self._lock:
            info = self._status_info
        if info is not None and info.rc == mqtt.MQTT_ERR_SUCCESS:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                pass
        self.delivery.close()
        self.link.close()
        pending = len(self.outbox)
        if not delivered or pending:
            log.warning("%d alert(s) not yet acknowledged by %s; kept in the outbox %s and sent at the next start",
                        pending, self.settings.address, self.outbox.path)
        self.outbox.close()
