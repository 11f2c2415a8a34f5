"""OPC UA sink against a real asyncua server in its own process, SIGKILLed and restarted mid-run; every value
is read back with an asyncua client. And `edge-ad` itself: a dead OPC UA server stops neither inspection nor
MQTT alerts, a live one ends up holding the run's last event and counts."""

from __future__ import annotations

import asyncio
import math
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from runtime_helpers import (  # noqa: F401  (fixtures)
    Subscriber, broker, bundle_dir, free_port, jsonl, make_frame, mosquitto, run_cli, wait_until, write_video,
)

from prerequisites import missing

try:
    import asyncua
except ImportError:
    asyncua = None

from edge_ad.deliver.events import verdict_payload  # noqa: E402
from edge_ad.deliver.opcua_sink import OpcUaSettings, OpcUaSink  # noqa: E402

SERVER = Path(__file__).with_name("opcua_server.py")


@pytest.fixture(autouse=True)
def _needs_asyncua():
    """Skipped on a laptop without the extra; a failure in CI (EDGE_AD_REQUIRE=...,opcua)."""
    if asyncua is None:
        missing("opcua", 'OPC UA tests need asyncua (pip install "edge-ad[opcua]")')


NAMES = ("state", "score", "part_id", "event_id", "timestamp", "alerts", "clears", "parts_ok", "parts_nok",
         "parts_error", "frames_processed", "status")


class OpcServer:
    """tests/opcua_server.py as a process on a fixed port, so it can be killed and started again there."""

    def __init__(self, port: int, *extra: str):
        self.port, self.extra, self.proc = port, extra, None
        self.url = f"opc.tcp://127.0.0.1:{port}/edge-ad/"

    def start(self) -> "OpcServer":
        self.proc = subprocess.Popen([sys.executable, str(SERVER), "--port", str(self.port), *self.extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        ready = threading.Event()
        threading.Thread(target=lambda: self.proc.stdout.readline() == "ready\n" and ready.set(), daemon=True).start()
        if not ready.wait(30):
            self.kill()
            raise AssertionError("OPC UA test server did not start")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def server():
    srv = OpcServer(free_port()).start()
    yield srv
    srv.kill()


def read_back(url: str, user: str | None = None, password: str | None = None) -> dict:
    """Every test variable, read by a separate asyncua client (as a PLC or SCADA would)."""

    async def read() -> dict:
        client = asyncua.Client(url, timeout=4)
        if user:
            client.set_user(user)
            client.set_password(password)
        async with client:
            index = await client.get_namespace_index("urn:edge-ad")
            nodes = [client.get_node(asyncua.ua.NodeId(f"edge-ad.{name}", index)) for name in NAMES]
            return dict(zip(NAMES, await client.read_values(nodes)))

    return asyncio.run(read())


def wait_values(url: str, predicate, timeout: float = 20.0, **login) -> dict:
    last: dict = {}

    def check():
        nonlocal last
        try:
            last = read_back(url, **login)
        except (OSError, asyncio.TimeoutError, asyncua.ua.UaError):
            return None
        return last if predicate(last) else None

    try:
        return wait_until(check, timeout=timeout, what="OPC UA values", interval=0.2)
    except AssertionError:
        raise AssertionError(f"OPC UA values never matched; last read {last}") from None


def alert(score: float, when: datetime) -> dict:
    return {"event": "alert", "event_id": str(uuid.uuid4()), "score": score, "timestamp": when.isoformat()}


def verdict(verdict_: str, part: str, score: float | None) -> dict:
    return verdict_payload(event_id=str(uuid.uuid4()), device="d", camera="c", part_id=part, verdict=verdict_,
                           utc=datetime.now(timezone.utc), score=score, raw_score=score, threshold={}, regions=[],
                           regions_total=0, latency_ms=3.0, model={}, trigger="stdin",
                           error="unreadable" if score is None else None)


def fast(url: str, **kw) -> OpcUaSettings:
    return OpcUaSettings(url, retry_delay=0.1, retry_max_delay=0.5, timeout=2.0, **kw)


def test_latest_values_written_and_rewritten_after_a_server_restart(server):
    health: list[str | None] = []
    sink = OpcUaSink(fast(server.url), on_health=health.append)
    try:
        first = alert(0.91, datetime(2026, 11, 30, 8, 15, 0, 250000, tzinfo=timezone.utc))
        sink.publish("alert", first)
        sink.publish("heartbeat", {"event": "heartbeat", "processed": 120, "anomalous": 7})
        values = wait_values(server.url, lambda v: v["event_id"] == first["event_id"])
        assert values["state"] == "alert" and values["score"] == pytest.approx(0.91) and values["part_id"] == ""
        assert values["timestamp"].replace(tzinfo=timezone.utc) == datetime(2026, 11, 30, 8, 15, 0, 250000,
                                                                            tzinfo=timezone.utc)
        assert (values["alerts"], values["clears"], values["frames_processed"]) == (1, 0, 120)
        assert wait_until(lambda: sink.connected, what="connected") and health[-1] is None

        server.kill()  # mid-run: the PLC goes away, inspection goes on
        wait_until(lambda: not sink.connected, timeout=10, what="sink notices the dead server")
        assert health[-1] and "unavailable" in health[-1]
        started = time.perf_counter()
        for part, result, score in (("P-16", "OK", 0.2), ("P-17", "NOK", 0.97)):
            sink.publish("verdict", verdict(result, part, score))
        sink.publish("clear", {"event": "clear", "event_id": "c1", "score": 0.1, "timestamp": first["timestamp"]})
        last = verdict("ERROR", "P-18", None)
        sink.publish("verdict", last)
        sink.publish("status", {"event": "status", "state": "degraded"})
        assert time.perf_counter() - started < 0.5  # publish() only records: a dead server costs nothing

        server.start()  # a fresh server: every value it had is gone, the sink writes them all again
        values = wait_values(server.url, lambda v: v["event_id"] == last["event_id"])
        assert (values["state"], values["part_id"], values["status"]) == ("ERROR", "P-18", "degraded")
        assert math.isnan(values["score"])  # not inspected
        assert (values["alerts"], values["clears"], values["parts_ok"], values["parts_nok"], values["parts_error"],
                values["frames_processed"]) == (1, 1, 1, 1, 1, 120)
        wait_until(lambda: health[-1] is None, timeout=10, what="healthy again")
        assert sink.reconnects >= 1

        sink.publish("status", {"event": "status", "state": "offline"})
    finally:
        sink.close()
    assert read_back(server.url)["status"] == "offline"  # close() writes what is pending before it disconnects


def test_password_from_a_file_and_a_wrong_one_reported(tmp_path):
    srv = OpcServer(free_port(), "--user", "line3", "--password", "s3cret").start()
    try:
        good, bad = tmp_path / "good.pass", tmp_path / "bad.pass"
        good.write_text("s3cret\n")
        bad.write_text("nope\n")
        good.chmod(0o600)
        bad.chmod(0o600)
        refused: list[str | None] = []
        wrong = OpcUaSink(fast(srv.url, username="line3", password_file=str(bad)), on_health=refused.append)
        right = OpcUaSink(fast(srv.url, username="line3", password_file=str(good)))
        try:
            event = alert(0.8, datetime.now(timezone.utc))
            wrong.publish("alert", event)
            right.publish("alert", event)
            values = wait_values(srv.url, lambda v: v["event_id"] == event["event_id"], user="line3", password="s3cret")
            assert values["alerts"] == 1  # only the sink with the right password wrote
            wait_until(lambda: refused, what="refusal reported")
            assert not wrong.connected and "s3cret" not in refused[0] and "nope" not in refused[0]
        finally:
            wrong.close()
            right.close()
    finally:
        srv.kill()


def test_a_variable_of_the_wrong_type_does_not_block_the_others():
    srv = OpcServer(free_port(), "--score-as-text").start()
    sink = OpcUaSink(fast(srv.url))
    try:
        event = alert(0.7, datetime.now(timezone.utc))
        sink.publish("alert", event)
        values = wait_values(srv.url, lambda v: v["event_id"] == event["event_id"])
        assert (values["state"], values["alerts"], values["score"]) == ("alert", 1, "")  # score left untouched
        later = alert(0.8, datetime.now(timezone.utc))
        sink.publish("alert", later)
        assert wait_values(srv.url, lambda v: v["event_id"] == later["event_id"])["alerts"] == 2
        assert sink.connected and sink.reconnects == 0
    finally:
        sink.close()
        srv.kill()


BOX = (64, 48, 64, 48)


@pytest.fixture(scope="module")
def defect_video(tmp_path_factory) -> Path:
    frames = [make_frame([BOX] if i in range(10, 16) or i in range(30, 36) else []) for i in range(46)]
    return write_video(tmp_path_factory.mktemp("opcua") / "line.avi", frames, fps=25)


POLICY = ("--alert-n", 3, "--alert-m", 5, "--cooldown", "10f", "--heartbeat", 60)


@pytest.mark.mosquitto
@pytest.mark.parametrize("fault", ["refused", "silent"])
def test_dead_opcua_server_stops_neither_inspection_nor_mqtt(mosquitto, bundle_dir, defect_video, fault):
    """refused: nothing listens on the port; silent: a port that accepts connections and never answers
    (a hung PLC, a firewall that drops): every request can only time out."""
    host, port = mosquitto
    sub = Subscriber(host, port, f"edge-ad/opc-{fault}/#")
    listener = socket.socket()
    try:
        if fault == "silent":
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
        opc_port = listener.getsockname()[1] if fault == "silent" else free_port()
        started = time.monotonic()
        proc = run_cli("--video", defect_video, "--model", bundle_dir, "--mqtt-host", host, "--mqtt-port", port,
                       "--device-id", f"opc-{fault}", "--camera-id", "cam", *POLICY,
                       "--opcua-url", f"opc.tcp://127.0.0.1:{opc_port}/nothing/", timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "OPC UA server" in proc.stderr and "unavailable" in proc.stderr
        assert "Traceback" not in proc.stderr
        sub.wait_for(lambda msgs: len([p for _, p in msgs if p.get("event") == "alert"]) == 2, what="2 alerts")
        assert time.monotonic() - started < 60  # shutdown waits for the OPC UA writer a bounded time only
    finally:
        listener.close()
        sub.close()


def test_edge_ad_leaves_its_last_event_in_the_server(server, bundle_dir, defect_video, tmp_path):
    lines = tmp_path / "events.jsonl"
    proc = run_cli("--video", defect_video, "--model", bundle_dir, "--jsonl", lines, "--device-id", "opc",
                   *POLICY, "--opcua-url", server.url, timeout=120)
    assert proc.returncode == 0, proc.stderr
    events = jsonl(lines, "alert", "clear")
    assert [e["event"] for e in events] == ["alert", "clear", "alert", "clear"]
    values = read_back(server.url)
    assert (values["state"], values["event_id"]) == ("clear", events[-1]["event_id"])
    assert values["score"] == pytest.approx(events[-1]["score"])
    assert (values["alerts"], values["clears"], values["status"]) == (2, 2, "offline")


def test_bad_opcua_options_are_one_line(bundle_dir, defect_video, tmp_path):
    for args, message in ((("--opcua-url", "http://plc:4840"), "--opcua-url must look like opc.tcp://"),
                          (("--opcua-username", "u"), "OPC UA options given without --opcua-url"),
                          (("--opcua-url", "opc.tcp://plc:4840", "--opcua-password-file", tmp_path / "none"),
                           "--opcua-password-file")):
        proc = run_cli("--video", defect_video, "--model", bundle_dir, *args)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
