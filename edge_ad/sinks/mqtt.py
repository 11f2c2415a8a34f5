"""Alerts over MQTT: QoS 1 events, retained device status with an `offline` last will.

The status topic always tells the truth: `online` (or `degraded` while a
camera is being reconnected) is retained on every (re)connect, the broker
publishes the last will `offline` if the process dies, and a clean shutdown
publishes `offline` itself and waits until every alert has been acknowledged.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import paho.mqtt.client as mqtt

from edge_ad.events import Topics, status_payload
from edge_ad.mqtt import MqttSettings, connect, make_client
from edge_ad.sinks import Sink

log = logging.getLogger("edge_ad.mqtt")

MAX_PENDING = 10000
QOS = {"alert": 1, "clear": 1, "status": 1, "heartbeat": 0}


def _dumps(payload: dict) -> str:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False)


class MqttSink(Sink):
    def __init__(self, settings: MqttSettings, topics: Topics, model: dict | None = None,
                 stop: threading.Event | None = None):
        self.settings = settings
        self.topics = topics
        self.model = model
        self._status = status_payload("online", device=topics.device, camera=topics.camera, model=model)
        self._pending: list[mqtt.MQTTMessageInfo] = []
        self._lock = threading.Lock()
        # PUBACKs by message id: messages published while disconnected are re-sent by paho after
        # reconnecting, but their MQTTMessageInfo keeps rc=NO_CONN; on_publish tells us they arrived.
        self._acked: set[int] = set()
        self._acked_cond = threading.Condition()
        self._closed = False
        self.client = make_client(settings)
        will = status_payload("offline", device=topics.device, camera=topics.camera,
                              reason="connection lost", timestamp=False)
        self.client.will_set(topics.status, _dumps(will), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self._ever_connected = False
        connect(self.client, settings, stop)
        log.info("connected to MQTT broker %s; status on %s", settings.address, topics.status)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT broker %s refused reconnection: %s", self.settings.address, reason_code)
            return
        if self._ever_connected:  # the first status is published by the caller
            log.info("reconnected to MQTT broker %s", self.settings.address)
            self._send(self.topics.status, self._status, qos=1, retain=True)  # the broker may have sent our will
        self._ever_connected = True

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if not self._closed:
            log.warning("lost MQTT broker %s (%s); reconnecting, alerts are queued", self.settings.address, reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._acked_cond:
            if len(self._acked) > 4 * MAX_PENDING:
                self._acked.clear()
            self._acked.add(mid)
            self._acked_cond.notify_all()

    def _send(self, topic: str, payload: dict, qos: int, retain: bool = False) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, _dumps(payload), qos=qos, retain=retain)
        if qos > 0:
            with self._lock:
                self._pending = [i for i in self._pending if not self._settled(i)]
                self._pending.append(info)
                del self._pending[:-MAX_PENDING]
        return info

    def publish(self, event: str, payload: dict) -> None:
        if event == "status":
            self._status = payload  # re-published (retained) on every reconnect
            self._send(self.topics.status, payload, qos=1, retain=True)
        else:
            self._send(self.topics.for_event(event), payload, qos=QOS.get(event, 1))

    def _settled(self, info: mqtt.MQTTMessageInfo) -> bool:
        """Acknowledged by the broker (QoS 1 PUBACK)."""
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            return info.is_published()
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            with self._acked_cond:
                return info.mid in self._acked
        return False  # refused by paho (queue full): never coming

    def close(self, timeout: float = 10.0) -> None:
        """Wait until the broker acknowledged everything (the caller published `offline` last), disconnect."""
        deadline = time.monotonic() + timeout
        with self._lock:
            pending = list(self._pending)
        unconfirmed = 0
        for info in pending:
            remaining = max(0.0, deadline - time.monotonic())
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                try:
                    info.wait_for_publish(remaining)
                except (RuntimeError, ValueError):
                    pass
            elif info.rc == mqtt.MQTT_ERR_NO_CONN:  # queued while disconnected: PUBACK comes after reconnecting
                with self._acked_cond:
                    self._acked_cond.wait_for(lambda: info.mid in self._acked, remaining)
            unconfirmed += not self._settled(info)
        if unconfirmed:
            log.warning("%d MQTT message(s) were not confirmed by %s before shutdown", unconfirmed,
                        self.settings.address)
        self._closed = True
        self.client.disconnect()
        self.client.loop_stop()
