"""One MQTT connection kept alive by edge-ad's own network thread.

paho's loop_start() would reconnect too, but without jitter, reading the
password only once, and waiting for a CONNACK forever. This loop reconnects
with exponential back-off and jitter (a plant full of devices does not hammer a
broker that just came back all at the same second), re-reads the password before
every attempt (fixing the password file heals a running service), and gives up
on a silent connection after a CONNACK timeout; MQTT keepalive detects a network
cut. At start-up, credentials or a protocol the broker rejects are a configuration
error (exit 2, systemd does not restart); a broker that is unreachable or
refuses for its own reasons (server unavailable, busy, quota) is retried and
then exit 1, which systemd restarts. A refused *re*connection is reported and
retried, alerts waiting. This is the only MQTT connect path (`edge-ad listen`
uses it too).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Callable

import paho.mqtt.client as mqtt

from edge_ad.backoff import Backoff
from edge_ad.errors import EXIT_USAGE, BrokerError, ConfigError
from edge_ad.deliver.mqtt import CONNACK_TIMEOUT, MqttSettings, set_credentials

log = logging.getLogger("edge_ad.mqtt")

# CONNACK refusals that are the broker's own state, not our configuration: waiting can cure them.
# (paho maps MQTT 3.1.1 return codes to these v5 names too: 3 -> "Server unavailable".)
TEMPORARY_REFUSALS = frozenset({"Server unavailable", "Server busy", "Server shutting down", "Quota exceeded",
                                "Connection rate exceeded", "Use another server", "Server moved",
                                "Unspecified error", "Implementation specific error"})


def is_temporary_refusal(reason: str) -> bool:
    """A CONNACK refusal (its reason name) that a retry, or a restart, may cure."""
    return reason in TEMPORARY_REFUSALS


def _network_thread_writes(client, userdata, sock) -> None:
    """paho's "socket wants writing" hook: nothing to do, Link's own loop() writes (see Link.__init__)."""


class Link:
    """Connects, then keeps `client` connected until close(); reports up/down through callbacks.

    on_up() runs in the network thread after a successful CONNACK, on_down(reason)
    when the connection is lost or an attempt fails. Callers may publish from
    any thread; only this thread calls client.loop().
    """

    def __init__(self, client: mqtt.Client, settings: MqttSettings, on_up: Callable[[], None],
                 on_down: Callable[[str], None], connack_timeout: float = CONNACK_TIMEOUT):
        self.client, self.settings = client, settings
        self.on_up, self.on_down = on_up, on_down
        self.connack_timeout = connack_timeout
        self._closing = threading.Event()
        self._connack = threading.Event()
        self._refusal: str | None = None
        self.backoff = Backoff(settings.retries, settings.retry_delay, settings.retry_max_delay)
        self._thread: threading.Thread | None = None
        self.reconnects = 0
        self._last_error: str | None = None
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_log = self._on_log
        # Without loop_start(), paho's publish() writes to the socket from the calling thread while
        # this thread reads it: harmless on TCP, but an SSL connection must not be used by two threads
        # at once (under load it broke TLS links). With a write hook registered, publish() only queues
        # the packet and wakes this thread's select(), which then writes it.
        client.on_socket_register_write = _network_thread_writes

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    # -- paho callbacks (network thread) -------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refusal = str(reason_code)
        else:
            self._refusal = None
        self._connack.set()
        if not reason_code.is_failure:
            self.on_up()

    def _on_log(self, client, userdata, level, message) -> None:
        # The first error of an attempt, e.g. "failed to receive on socket: [SSL: ...] ..." (never credentials);
        # later ones ("Client is not connected") only echo it.
        if level == mqtt.MQTT_LOG_ERR and self._last_error is None:
            self._last_error = message

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if not self._closing.is_set() and self._connack.is_set() and self._refusal is None:
            self.on_down(f"connection lost ({reason_code})")

    # -- one attempt ---------------------------------------------------------------------
    def _attempt(self, first: bool) -> tuple[str, bool] | None:
        """Connect once and wait for the CONNACK: None, or (why not, refused for a reason only a change of
        configuration fixes?)."""
        self._connack.clear()
        self._refusal = None
        self._last_error = None
        try:
            set_credentials(self.client, self.settings)
        except ConfigError as exc:
            if first:
                raise
            log.warning("%s; trying with the credentials read before", exc)
        try:
            if first:
                self.client.connect(self.settings.host, self.settings.port, keepalive=self.settings.keepalive)
            else:
                self.client.reconnect()
        except ssl.SSLError as exc:
            return f"TLS error: {exc.reason or exc}", False
        except socket.gaierror as exc:
            return f"unknown host ({exc.strerror or exc})", False
        except (OSError, TimeoutError) as exc:
            return exc.strerror or str(exc) or type(exc).__name__, False
        deadline = time.monotonic() + self.connack_timeout
        closed = False
        while not self._connack.is_set() and time.monotonic() < deadline and not self._closing.is_set():
            if self.client.loop(timeout=0.2) != mqtt.MQTT_ERR_SUCCESS:
                closed = True
                break
        if self._refusal is not None:
            return f"refused the connection: {self._refusal}", not is_temporary_refusal(self._refusal)
        if self._connack.is_set():
            return None
        if closed:
            detail = self._last_error or "closed"
            if "ssl" in detail.lower():  # the broker rejected us after the handshake, e.g. no client certificate
                detail = "TLS error: " + detail.split("] ", 1)[-1].split(": ", 1)[-1].split(" (_ssl.c")[0]
                if not self.settings.cert:
                    detail += " (does the broker require a client certificate? see --mqtt-cert)"
            return f"connection ended before CONNACK: {detail}" if not detail.startswith("TLS") else detail, False
        return f"no CONNACK within {self.connack_timeout:.0f} s", False

    # -- start-up ------------------------------------------------------------------------
    def start(self, stop: threading.Event | None = None) -> None:
        """First connection, with `settings.retries` retries; then the network thread takes over.

        Raises BrokerError: exit code 2 when the broker rejects our configuration (credentials,
        client id, protocol), since restarting cannot fix that; 1 when it stays unreachable or
        unavailable through the retries (a restart later may well succeed).
        """
        attempts = self.settings.retries + 1
        for attempt in range(1, attempts + 1):
            outcome = self._attempt(first=attempt == 1)
            if outcome is None:
                break
            reason, refused = outcome
            if refused:
                raise BrokerError(f"MQTT broker at {self.settings.address} {reason} (fix the credentials, "
                                  f"client id or --mqtt-version)", exit_code=EXIT_USAGE)
            if attempt == attempts:
                plural = "attempt" if attempts == 1 else "attempts"
                raise BrokerError(f"cannot reach MQTT broker at {self.settings.address} ({reason}; "
                                  f"gave up after {attempts} {plural})")
            delay = self.backoff.delay(attempt - 1)
            log.warning("cannot reach MQTT broker at %s (%s); retry %d/%d in %.1f s", self.settings.address, reason,
                        attempt, self.settings.retries, delay)
            if (stop or self._closing).wait(delay):
                raise BrokerError(f"stopped while connecting to MQTT broker at {self.settings.address}")
        self._thread = threading.Thread(target=self._run, name="edge-ad-mqtt", daemon=True)
        self._thread.start()

    # -- network thread --------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closing.is_set():
            if self.client.loop(timeout=0.5) == mqtt.MQTT_ERR_SUCCESS:
                continue  # (a keepalive timeout closes the socket; the next loop() then says NO_CONN)
            if self._closing.is_set():
                break
            self._reconnect()

    def _reconnect(self) -> None:
        """Until connected or closing: wait (back-off with jitter), re-read credentials, try."""
        failures = 0
        last_reason = ""
        while not self._closing.is_set():
            delay = self.backoff.delay(failures)
            if self._closing.wait(delay):
                return
            outcome = self._attempt(first=False)
            if outcome is None:
                self.reconnects += 1
                log.info("reconnected to MQTT broker %s", self.settings.address)
                return
            reason, refused = outcome
            failures += 1
            if reason != last_reason or failures % 10 == 0:
                hint = " (fix the credentials; they are re-read before every attempt)" if refused else ""
                log.warning("MQTT broker %s %s%s; retrying with back-off (attempt %d)", self.settings.address,
                            reason if refused else f"unreachable: {reason}", hint, failures)
            last_reason = reason
            self.on_down(f"MQTT broker {reason}" if refused else f"MQTT broker unreachable: {reason}")

    def close(self, timeout: float = 5.0) -> None:
        """Send DISCONNECT (no last will) and stop the network thread."""
        self._closing.set()
        try:
            self.client.disconnect()
        except Exception:  # noqa: BLE001  the socket may already be gone
            pass
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("MQTT network thread did not stop within %.0f s", timeout)
                return  # still using the socket: leave it alone
        self.client.loop(timeout=0.1)  # flush the DISCONNECT if the thread stopped before writing it
