"""Unit tests of the delivery window / rewind (edge_ad/deliver/delivery.py) and the connection keeper
(edge_ad/deliver/link.py), with a fake paho client and no broker: the cases a fault test only reaches by
luck (a full window, a reconnect with rows in flight, a refused PUBACK, a reconnection that fails twice).

Only public methods are used (Delivery.up/down/acked/wake/wait_idle, Link.start/close), so a refactoring
of the internals keeps these tests. The outbox is the real SQLite one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edge_ad.deliver.delivery import Delivery
from edge_ad.deliver.link import Link
from edge_ad.deliver.mqtt import MqttSettings
from edge_ad.deliver.outbox import Outbox
from edge_ad.errors import BrokerError


def eventually(predicate, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def settle(seconds: float = 0.3) -> None:
    """Give the delivery thread time to do something it must not do."""
    time.sleep(seconds)


# -- Delivery -------------------------------------------------------------------------------------

@dataclass
class Info:
    rc: int
    mid: int


class PublishingClient:
    """paho's publish(): hands out message ids; `full` makes it refuse like a full paho queue."""

    def __init__(self):
        self.lock = threading.Lock()
        self.published: list[tuple[int, str, str]] = []  # (mid, topic, payload)
        self.full = False
        self._mid = 0

    def publish(self, topic, payload, qos=0, retain=False):
        with self.lock:
            if self.full:
                return Info(mqtt.MQTT_ERR_QUEUE_SIZE, 0)
            self._mid += 1
            self.published.append((self._mid, topic, payload))
            return Info(mqtt.MQTT_ERR_SUCCESS, self._mid)

    def sent(self) -> list[tuple[int, str, str]]:
        with self.lock:
            return list(self.published)


OK = None  # MQTT 3.1.1: a PUBACK carries no reason code
NOT_AUTHORIZED = ReasonCode(PacketTypes.PUBACK, "Not authorized")


@pytest.fixture
def outbox(tmp_path):
    box = Outbox(tmp_path / "outbox.sqlite", 10000)
    yield box
    box.close()


@pytest.fixture
def client():
    return PublishingClient()


def fill(outbox, n: int, start: int = 0) -> list[str]:
    payloads = [f'{{"n":{i}}}' for i in range(start, start + n)]
    for i, payload in zip(range(start, start + n), payloads):
        outbox.add("edge-ad/d/c/alert", payload, f"id-{i}")
    return payloads


def test_nothing_is_published_while_down_then_the_window_fills_in_outbox_order(client, outbox):
    payloads = fill(outbox, 40)
    delivery = Delivery(client, outbox, window=16)
    try:
        delivery.wake()
        settle()
        assert client.sent() == []  # not connected: the rows wait on disk
        delivery.up()
        eventually(lambda: len(client.sent()) == 16, what="a full window")
        settle()
        assert len(client.sent()) == 16  # never more than the window in flight
        assert [p for _, _, p in client.sent()] == payloads[:16]
        for mid, _, _ in client.sent()[:4]:
            delivery.acked(mid, OK)
        eventually(lambda: len(client.sent()) == 20, what="4 acks -> 4 more rows")
        settle()
        assert len(client.sent()) == 20 and len(outbox) == 36
    finally:
        delivery.close()


def test_every_row_leaves_the_outbox_only_on_its_ack(client, outbox):
    payloads = fill(outbox, 30)
    delivery = Delivery(client, outbox, window=8)
    try:
        delivery.up()
        acked = 0
        while acked < 30:
            eventually(lambda: len(client.sent()) > acked, what="next row")
            for mid, _, _ in client.sent()[acked:]:
                delivery.acked(mid, OK)
                acked += 1
        assert delivery.wait_idle(5)
        assert [p for _, _, p in client.sent()] == payloads  # each once, in order
        assert len(outbox) == 0 and delivery.delivered == 30 and delivery.idle
    finally:
        delivery.close()


def test_after_a_reconnect_new_rows_wait_for_the_resent_ones(client, outbox):
    """paho re-sends the unacknowledged rows itself (DUP); publishing newer rows first would reorder them."""
    fill(outbox, 12)
    delivery = Delivery(client, outbox, window=4)
    try:
        delivery.up()
        eventually(lambda: len(client.sent()) == 4, what="window")
        delivery.down()
        delivery.up()
        delivery.wake()
        settle()
        assert len(client.sent()) == 4  # held: the 4 in flight are paho's to re-send
        for mid, _, _ in client.sent():
            delivery.acked(mid, OK)
        eventually(lambda: len(client.sent()) == 8, what="the next rows after the re-sent ones")
        assert [p for _, _, p in client.sent()] == [f'{{"n":{i}}}' for i in range(8)]
    finally:
        delivery.close()


def test_unknown_and_repeated_acks_change_nothing(client, outbox):
    fill(outbox, 2)
    delivery = Delivery(client, outbox, window=4)
    try:
        delivery.up()
        eventually(lambda: len(client.sent()) == 2, what="both rows")
        first = client.sent()[0][0]
        delivery.acked(first, OK)
        delivery.acked(first, OK)  # duplicate PUBACK
        delivery.acked(999, OK)  # not ours
        eventually(lambda: len(outbox) == 1, what="one row removed")
        settle()
        assert len(outbox) == 1 and delivery.delivered == 1
    finally:
        delivery.close()


def test_a_refused_row_stays_and_is_retried_from_the_head_after_a_pause(client, outbox):
    payloads = fill(outbox, 3)
    health: list[str | None] = []
    delivery = Delivery(client, outbox, window=8, on_refused=health.append, retry_delay=1.0,
                             retry_max_delay=1.0)
    try:
        delivery.up()
        eventually(lambda: len(client.sent()) == 3, what="3 rows")
        first, second, third = (mid for mid, _, _ in client.sent())
        delivery.acked(first, NOT_AUTHORIZED)  # e.g. the broker ACL denies the topic (MQTT v5)
        eventually(lambda: delivery.refusing, what="refusing")
        started = time.monotonic()
        assert not delivery.wait_idle(5) and time.monotonic() - started < 1  # at once: waiting cannot help
        assert health == ["MQTT broker refuses alerts: Not authorized"]
        delivery.acked(second, OK)
        delivery.acked(third, OK)
        eventually(lambda: len(outbox) == 1, what="the accepted rows removed")
        assert [row.payload for row in outbox.head(10)] == [payloads[0]]  # the refused one is kept
        sent_before = len(client.sent())
        settle(0.1)
        assert len(client.sent()) == sent_before  # paused (back-off), not hammering the broker
        eventually(lambda: len(client.sent()) == sent_before + 1, timeout=3, what="the retry from the head")
        retry_mid, _, retry_payload = client.sent()[-1]
        assert retry_payload == payloads[0] and delivery.refused == 1
        delivery.acked(retry_mid, OK)  # the ACL was fixed
        assert delivery.wait_idle(5)
        assert health[-1] is None and not delivery.refusing and len(outbox) == 0
    finally:
        delivery.close()


def test_a_full_paho_queue_is_retried_on_the_next_event(client, outbox):
    fill(outbox, 3)
    client.full = True
    delivery = Delivery(client, outbox, window=8)
    try:
        delivery.up()
        settle()
        assert client.sent() == [] and len(outbox) == 3
        client.full = False
        delivery.wake()
        eventually(lambda: len(client.sent()) == 3, what="rows once paho has room")
    finally:
        delivery.close()


# -- Link -------------------------------------------------------------------------------------------

SUCCESS = ReasonCode(PacketTypes.CONNACK, "Success")
BAD_CREDENTIALS = ReasonCode(PacketTypes.CONNACK, "Bad user name or password")


class ConnectingClient:
    """paho's connect/reconnect/loop: `plan` says what each attempt does (an exception, or a CONNACK code)."""

    def __init__(self, plan):
        self.plan = list(plan)
        self.lock = threading.Lock()
        self.attempts = 0
        self.credentials: list[tuple[str, str | None]] = []
        self._connack: ReasonCode | None = None
        self._connected = False
        self._dropped = False
        self.on_connect = self.on_disconnect = self.on_log = self.on_socket_register_write = None

    def username_pw_set(self, username, password=None):
        self.credentials.append((username, password))

    def _try(self):
        with self.lock:
            self.attempts += 1
            step = self.plan.pop(0) if self.plan else SUCCESS
        if isinstance(step, Exception):
            raise step
        self._connack = step

    def connect(self, host, port, keepalive=60):
        self._try()

    def reconnect(self):
        self._try()

    def loop(self, timeout=1.0):
        time.sleep(min(timeout, 0.01))
        if self._connack is not None:
            code, self._connack = self._connack, None
            self._connected = not code.is_failure
            self.on_connect(self, None, {}, code, None)
            return mqtt.MQTT_ERR_SUCCESS
        if self._dropped:
            self._dropped = False
            self._connected = False
            self.on_disconnect(self, None, {}, ReasonCode(PacketTypes.DISCONNECT, "Unspecified error"), None)
            return mqtt.MQTT_ERR_CONN_LOST
        return mqtt.MQTT_ERR_SUCCESS if self._connected else mqtt.MQTT_ERR_NO_CONN

    def is_connected(self):
        return self._connected

    def drop(self):
        """The broker went away (TCP reset)."""
        self._dropped = True

    def disconnect(self):
        self._connected = False


def settings(**kwargs) -> MqttSettings:
    return MqttSettings(host="broker.test", port=1883, retries=kwargs.pop("retries", 3), retry_delay=0.01,
                        retry_max_delay=0.02, **kwargs)


class Events:
    def __init__(self):
        self.ups = 0
        self.downs: list[str] = []

    def up(self):
        self.ups += 1

    def down(self, reason):
        self.downs.append(reason)


def test_start_retries_an_unreachable_broker_then_connects():
    fake, events = ConnectingClient([ConnectionRefusedError(111, "Connection refused")] * 2), Events()
    link = Link(fake, settings(), events.up, events.down, connack_timeout=1.0)
    try:
        link.start()
        assert fake.attempts == 3 and events.ups == 1 and link.connected
    finally:
        link.close()


def test_start_gives_up_after_the_retries_with_exit_code_1():
    fake, events = ConnectingClient([ConnectionRefusedError(111, "Connection refused")] * 10), Events()
    link = Link(fake, settings(retries=2), events.up, events.down, connack_timeout=1.0)
    with pytest.raises(BrokerError, match=r"cannot reach MQTT broker at broker.test:1883 \(Connection refused; "
                                          r"gave up after 3 attempts\)") as info:
        link.start()
    assert info.value.exit_code == 1 and fake.attempts == 3 and events.ups == 0


def test_bad_credentials_at_start_up_are_exit_code_2_without_retrying():
    fake, events = ConnectingClient([BAD_CREDENTIALS]), Events()
    link = Link(fake, settings(username="line3"), events.up, events.down, connack_timeout=1.0)
    with pytest.raises(BrokerError, match="refused the connection: Bad user name or password") as info:
        link.start()
    assert info.value.exit_code == 2 and fake.attempts == 1


def test_a_lost_connection_is_reported_and_reconnected_rereading_the_password(tmp_path):
    secret = tmp_path / "pass"
    secret.write_text("old\n")
    secret.chmod(0o600)
    fake, events = ConnectingClient([]), Events()
    link = Link(fake, settings(username="line3", password_file=str(secret)), events.up, events.down,
                connack_timeout=1.0)
    try:
        link.start()
        assert fake.credentials == [("line3", "old")]
        fake.plan = [OSError(113, "No route to host"), OSError(113, "No route to host")]
        secret.write_text("new\n")  # the operator fixes the password while the broker is away
        fake.drop()
        eventually(lambda: link.reconnects == 1, what="the reconnection")
        assert events.ups == 2
        assert events.downs[0].startswith("connection lost")
        assert events.downs[1:] == ["MQTT broker unreachable: No route to host"] * 2
        assert fake.attempts == 4 and fake.credentials[-1] == ("line3", "new")  # re-read before each attempt
    finally:
        link.close()
