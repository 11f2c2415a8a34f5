"""MQTT client set-up (paho-mqtt 2.x): settings, credentials, TLS. Connecting is `link.Link`'s job.

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
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from edge_ad.ops.config import PASSWORD_ENV
from edge_ad.errors import ConfigError

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
    version: str = "5"  # the broker says in each PUBACK whether it accepted the message (ACLs); 3.1.1 cannot

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def read_secret(password_file: str | None, *, env: str, credential: str, username: str | None,
                option: str) -> str | None:
    """A password from a file (first line), $env, or the systemd credential `credential`; never logged.

    The one mechanism for every connection that needs a password (MQTT, OPC UA); `option` names the
    file option in messages.
    """
    if password_file:
        path = Path(password_file)
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read {option} {path}: {exc.strerror or exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("password file %s is readable by other users; chmod 600 it", path)
        lines = text.splitlines()
        return lines[0] if lines else ""
    password = os.environ.get(env)
    if password is not None and not username:
        log.warning("$%s is set but no user name is given; connecting without credentials", env)
        return None
    if password is None and username and os.environ.get("CREDENTIALS_DIRECTORY"):
        path = Path(os.environ["CREDENTIALS_DIRECTORY"]) / credential
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            return lines[0] if lines else ""
        except OSError:
            return None
    return password


def read_password(settings: MqttSettings) -> str | None:
    """The broker password (file, $EDGE_AD_MQTT_PASSWORD or systemd credential mqtt-password)."""
    return read_secret(settings.password_file, env=PASSWORD_ENV, credential=CREDENTIAL_NAME,
                       username=settings.username, option="--mqtt-password-file")


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
    client.max_queued_messages_set(10000)  # bounded memory while the broker is away
    client.on_socket_open = _no_delay
    return client


def _no_delay(client, userdata, sock) -> None:
    """TCP_NODELAY: without it a verdict sent right after the PUBACK of its trigger waits for the broker's
    delayed ACK (Nagle): +40 ms per part, measured (benchmarks/trigger_latency.py)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (e.g. a websocket wrapper)
        pass
