"""Connecting to an MQTT broker (paho-mqtt 2.x): credentials, TLS, retries at start-up.

Shared by the alert sink and `edge-ad listen`. The password is read from a
file, $EDGE_AD_MQTT_PASSWORD, or a systemd credential ($CREDENTIALS_DIRECTORY/
mqtt-password) and handed to paho only: it is never logged, echoed or accepted
on the command line. TLS always verifies the broker's certificate and host name.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from edge_ad.ops.config import PASSWORD_ENV
from edge_ad.errors import BrokerError, ConfigError

log = logging.getLogger("edge_ad.mqtt")

CONNACK_TIMEOUT = 10.0
CREDENTIAL_NAME = "mqtt-password"  # systemd LoadCredential=mqtt-password:/etc/edge-ad/mqtt.pass
VERSIONS = {"3.1.1": mqtt.MQTTv311, "5": mqtt.MQTTv5}


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int = 1883
    client_id: str = ""
    username: str | None = None
    password_file: str | None = None
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    keepalive: int = 60
    retries: int = 5
    retry_delay: float = 1.0
    retry_max_delay: float = 30.0
    version: str = "3.1.1"  # "5": the broker says in each PUBACK whether it accepted the message (ACLs)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def read_password(settings: MqttSettings) -> str | None:
    """Password from the file (first line), the environment, or a systemd credential; never logged."""
    if settings.password_file:
        path = Path(settings.password_file)
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read --mqtt-password-file {path}: {exc.strerror or exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("password file %s is readable by other users; chmod 600 it", path)
        lines = text.splitlines()
        return lines[0] if lines else ""
    password = os.environ.get(PASSWORD_ENV)
    if password is not None and not settings.username:
        log.warning("$%s is set but no --mqtt-username is given; connecting without credentials", PASSWORD_ENV)
        return None
    if password is None and settings.username and os.environ.get("CREDENTIALS_DIRECTORY"):
        credential = Path(os.environ["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME
        try:
            lines = credential.read_text(encoding="utf-8").splitlines()
            return lines[0] if lines else ""
        except OSError:
            return None
    return password


def set_credentials(client: mqtt.Client, settings: MqttSettings) -> None:
    """(Re)read the password: called before every connection attempt, so fixing the file fixes a running service."""
    if settings.username:
        client.username_pw_set(settings.username, read_password(settings))


def make_client(settings: MqttSettings) -> mqtt.Client:
    """A configured, not yet connected paho client (callback API v2, MQTT 3.1.1 or 5)."""
    protocol = VERSIONS[settings.version]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=settings.client_id, protocol=protocol,
                         clean_session=True if protocol != mqtt.MQTTv5 else None)
    set_credentials(client, settings)
    if settings.tls or settings.ca or settings.cert:
        try:
            client.tls_set(ca_certs=settings.ca, certfile=settings.cert, keyfile=settings.key,
                           cert_reqs=ssl.CERT_REQUIRED)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot set up TLS for MQTT: {exc}") from None
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    client.max_queued_messages_set(10000)  # bounded memory while the broker is away
    return client


def connect(client: mqtt.Client, settings: MqttSettings, stop: threading.Event | None = None) -> None:
    """Connect and start paho's network thread; retry with back-off, then fail naming host:port.

    Raises BrokerError: exit code 1 when unreachable, 2 when the broker refuses
    us (bad credentials or client id), since retrying cannot fix that.
    """
    connected = threading.Event()
    outcome: dict = {}

    previous = client.on_connect

    def on_connect(cl, userdata, flags, reason_code, properties):
        outcome["reason"] = reason_code
        connected.set()
        if previous is not None and not reason_code.is_failure:
            previous(cl, userdata, flags, reason_code, properties)

    client.on_connect = on_connect
    attempts = settings.retries + 1
    delay = settings.retry_delay
    last = "no answer"
    try:
        for attempt in range(1, attempts + 1):
            try:
                client.connect(settings.host, settings.port, keepalive=settings.keepalive)
                client.loop_start()
                if not connected.wait(CONNACK_TIMEOUT):
                    client.loop_stop()
                    last = f"no CONNACK within {CONNACK_TIMEOUT:.0f} s"
                else:
                    reason = outcome["reason"]
                    if reason.is_failure:
                        client.loop_stop()
                        client.disconnect()
                        raise BrokerError(f"MQTT broker at {settings.address} refused the connection: {reason}",
                                          exit_code=2)
                    return
            except ssl.SSLError as exc:
                last = f"TLS error: {exc.reason or exc}"
            except socket.gaierror as exc:
                last = f"unknown host ({exc.strerror or exc})"
            except (OSError, TimeoutError) as exc:
                last = exc.strerror or str(exc) or type(exc).__name__
            if attempt < attempts:
                log.warning("cannot reach MQTT broker at %s (%s); retry %d/%d in %.1f s",
                            settings.address, last, attempt, settings.retries, delay)
                if stop is not None and stop.wait(delay):
                    break
                if stop is None:
                    time.sleep(delay)
                delay = min(delay * 2.0, 30.0)
    finally:
        client.on_connect = previous
    plural = "attempt" if attempts == 1 else "attempts"
    raise BrokerError(f"cannot reach MQTT broker at {settings.address} ({last}; gave up after {attempts} {plural})")
