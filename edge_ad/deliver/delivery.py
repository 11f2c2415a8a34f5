"""Moves the outbox to the broker in order, deleting each row only on its PUBACK.

One thread owns the delivery state (which message id carries which row). paho's
callbacks only post events to a queue: paho holds its own lock while it calls
on_publish, so taking ours there while another thread is inside publish() would
deadlock. Rows are published only while connected, at most `window` at a time.
After a reconnection paho itself re-sends the unacknowledged ones (DUP flag)
first; new rows wait until those are acknowledged, so the broker receives rows
in outbox order. A PUBACK that carries a failure (MQTT v5, e.g. "Not
authorized" from an ACL) leaves the row in the outbox and is retried later.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

import paho.mqtt.client as mqtt

from edge_ad.backoff import Backoff
from edge_ad.deliver.outbox import Outbox

log = logging.getLogger("edge_ad.delivery")

WINDOW = 16  # below paho's max_inflight_messages (20), so paho never holds rows back in its own queue
STUCK_AFTER = 60.0  # seconds of connection without the resent rows being acknowledged: start over from the head


class Delivery:
    def __init__(self, client: mqtt.Client, outbox: Outbox, window: int = WINDOW,
                 on_refused: Callable[[str | None], None] | None = None, retry_delay: float = 1.0,
                 retry_max_delay: float = 60.0):
        self.client, self.outbox, self.window = client, outbox, window
        self.on_refused = on_refused or (lambda reason: None)
        self.backoff = Backoff(0, retry_delay, retry_max_delay)  # retried for ever: only the delays
        self.delivered = 0  # acknowledged by the broker, this process
        self.refused = 0  # PUBACKs with a failure reason (MQTT v5)
        self._refused_seqs: set[int] = set()  # rows the broker refused and has not accepted since
        self._events: queue.Queue = queue.Queue()
        self._inflight: dict[int, int] = {}  # mid -> seq, in publish order
        self._cursor = 0  # highest seq handed to paho
        self._connected = False
        self._hold_since: float | None = None  # reconnected: waiting for paho's re-sends
        self._paused_until = 0.0
        self._refusals = 0  # consecutive
        self._rewind = False
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="edge-ad-delivery", daemon=True)
        self._thread.start()

    # -- from any thread -----------------------------------------------------------------------
    def up(self) -> None:
        self._events.put(("up",))

    def down(self) -> None:
        self._events.put(("down",))

    def acked(self, mid: int, reason_code) -> None:
        failure = str(reason_code) if reason_code is not None and reason_code.is_failure else None
        self._events.put(("ack", mid, failure))

    def wake(self) -> None:
        self._events.put(("wake",))

    @property
    def idle(self) -> bool:
        return len(self.outbox) == 0 and not self._inflight

    @property
    def refused_rows(self) -> int:
        """Outbox rows the broker refused (kept, retried) and has not accepted since (heartbeat `outbox_refused`)."""
        return len(self._refused_seqs)

    @property
    def refusing(self) -> bool:
        """The broker refuses our publishes (MQTT v5 reason codes): waiting will not help."""
        return self._refusals > 0

    def wait_idle(self, timeout: float) -> bool:
        """True once every row is delivered; False after `timeout` or as soon as the broker refuses them."""
        with self._idle:
            self._idle.wait_for(lambda: self.idle or self.refusing, timeout)
        return self.idle

    def close(self, timeout: float = 2.0) -> None:
        self._events.put(("stop",))
        self._thread.join(timeout)

    # -- delivery thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            timeout = 1.0
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                event = ("tick",)
            while True:
                if event[0] == "stop":
                    return
                try:
                    self._handle(event)
                except Exception as exc:  # noqa: BLE001  never let delivery die; the rows stay on disk
                    log.error("alert delivery: %s: %s", type(exc).__name__, exc)
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    break
            try:
                self._fill()
            except Exception as exc:  # noqa: BLE001
                log.error("alert delivery: %s: %s", type(exc).__name__, exc)
            with self._idle:
                self._idle.notify_all()

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "up":
            self._connected = True
            self._hold_since = time.monotonic() if self._inflight else None
        elif kind == "down":
            self._connected = False
        elif kind == "ack":
            _, mid, failure = event
            seq = self._inflight.pop(mid, None)
            if seq is None:
                return
            if failure is None:
                self.outbox.remove(seq)
                self.delivered += 1
                self._refused_seqs.discard(seq)
                if self._refusals:
                    self._refusals = 0
                    log.info("MQTT broker accepts alerts again")
                    self.on_refused(None)
            else:
                self._refused(seq, failure)
            if not self._inflight:
                self._hold_since = None
                if self._rewind:
                    self._rewind = False
                    self._cursor = 0  # retry the refused rows from the head, once the pause is over

    def _refused(self, seq: int, failure: str) -> None:
        self.refused += 1
        self._refusals += 1
        self._refused_seqs.add(seq)
        self._rewind = True
        delay = self.backoff.delay(self._refusals - 1)
        self._paused_until = time.monotonic() + delay
        if self._refusals == 1 or self._refusals % 10 == 0:
            log.error("MQTT broker refused an alert (outbox row %d): %s; it stays in the outbox, retrying in %.0f s "
                      "(check the broker ACL for this device's topics)", seq, failure, delay)
        self.on_refused(f"MQTT broker refuses alerts: {failure}")

    def _fill(self) -> None:
        """Publish the next rows while connected and the window has room."""
        if not self._connected or time.monotonic() < self._paused_until:
            return
        if self._hold_since is not None:
            if time.monotonic() - self._hold_since < STUCK_AFTER:
                return
            log.warning("unacknowledged alerts were not re-sent within %.0f s of reconnecting; sending the outbox "
                        "again from its oldest row", STUCK_AFTER)
            self._inflight.clear()
            self._cursor = 0
            self._hold_since = None
        room = self.window - len(self._inflight)
        if room <= 0:
            return
        for row in self.outbox.head(room, after=self._cursor):
            info = self.client.publish(row.topic, row.payload, qos=1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                break  # paho refused to queue it (full): try again on the next event
            # NO_CONN: paho keeps the message and sends it right after the next CONNACK
            self._inflight[info.mid] = row.seq
            self._cursor = row.seq
