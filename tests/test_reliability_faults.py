"""No alert lost: a real mosquitto is killed, the network is cut, edge-ad itself is killed -9.

Every test compares two exact sets: the events edge-ad raised (its JSON-lines
mirror, written after the event is committed to the outbox) and the events an
independent subscriber received. The subscriber holds a persistent session on a
broker that saves it to disk after every change, so it also gets what arrived
while it was itself reconnecting to a restarted broker.
"""

from __future__ import annotations

import signal
import time
from datetime import datetime
from pathlib import Path

import pytest
from runtime_helpers import (  # noqa: F401  (fixtures)
    needs_mosquitto, Broker, Subscriber, TcpProxy, bundle_dir, jsonl, make_frame, outbox_rows, start_cli, wait_until,
    write_video,
)

pytestmark = [pytest.mark.mosquitto, pytest.mark.usefixtures("needs_mosquitto")]
BOX = (64, 48, 64, 48)


def defect_video(path: Path, starts=(25, 70, 115), length: int = 10, total: int = 150) -> Path:
    """25 fps; with N=3 of M=5 each defect block gives one alert and, 5 normal frames later, one all-clear."""
    frames = [make_frame([BOX] if any(s <= i < s + length for s in starts) else []) for i in range(total)]
    return write_video(path, frames, fps=25)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return defect_video(tmp_path_factory.mktemp("faults") / "line.avi")


@pytest.fixture(scope="module")
def quiet_video(tmp_path_factory) -> Path:
    """One defect, played without --realtime: a short second run."""
    return defect_video(tmp_path_factory.mktemp("quiet") / "short.avi", starts=(5,), total=20)


def args(port: int, bundle: Path, video: Path, device: str, folder: Path, *extra, realtime: bool = True) -> list:
    return ["--video", video, *(["--realtime"] if realtime else []), "--model", bundle, "--mqtt-host", "127.0.0.1",
            "--mqtt-port", port, "--device-id", device, "--camera-id", "cam", "--alert-n", 3, "--alert-m", 5,
            "--cooldown", "10f", "--heartbeat", 0.5, "--jsonl", folder / "raised.jsonl", "--outbox",
            folder / "outbox.sqlite", "--mqtt-retry-delay", 0.2, "--mqtt-retry-max-delay", 1, "--mqtt-keepalive", 5,
            *extra]


def epoch(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def figures(name: str, ids: list[str], sub: Subscriber, **extra) -> None:
    """One line for docs/RELIABILITY.md (shown with pytest -s)."""
    copies = len(sub.events("alert", "clear"))
    more = "".join(f", {k.replace('_', ' ')} {v}" for k, v in extra.items())
    print(f"\nFIGURES {name}: raised {len(ids)}, delivered {len(set(ids) & set(sub.event_ids()))}, "
          f"copies received {copies}{more}")


def first_payloads(sub: Subscriber) -> dict[str, dict]:
    """The first copy of each event the subscriber received, by event id."""
    seen: dict[str, dict] = {}
    for payload in sub.events("alert", "clear"):
        seen.setdefault(payload["event_id"], payload)
    return seen


def test_broker_killed_while_alerting_then_restarted_every_alert_arrives_in_order(tmp_path, bundle_dir, video):
    broker = Broker(tmp_path, persistent=True)
    broker.start()
    sub = Subscriber(broker.host, broker.port, "edge-ad/bkill/#", client_id="sub-bkill")
    proc = start_cli(*args(broker.port, bundle_dir, video, "bkill", tmp_path))
    try:
        sub.wait_for(lambda m: any(p["event"] == "alert" for _, p in m), timeout=40, what="the first alert")
        broker.kill()
        down = time.time()
        time.sleep(2.5)
        broker.start()
        up = time.time()
        _, err = proc.communicate(timeout=45)
        raised = jsonl(tmp_path / "raised.jsonl", "alert", "clear")
        ids = [e["event_id"] for e in raised]
        wait_until(lambda: set(sub.event_ids()) >= set(ids), timeout=15, what="every raised event at the subscriber")
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
        broker.stop()
    figures("broker SIGKILL 2.5 s", ids, sub, raised_while_down=sum(down <= epoch(e) <= up for e in raised))
    assert proc.returncode == 0, err
    assert len(raised) >= 4
    assert sub.event_ids() == ids  # exactly the raised events, each (first copy) in the order raised
    assert any(down <= epoch(e) <= up for e in raised), "no event was raised while the broker was down"
    received = first_payloads(sub)
    assert all(received[e["event_id"]] == e for e in raised)  # original ids, timestamps, everything
    assert "lost MQTT broker" in err and "reconnected to MQTT broker" in err and "Traceback" not in err
    beats = jsonl(tmp_path / "raised.jsonl", "heartbeat")
    assert any(b["state"] == "degraded" and b["outbox_pending"] > 0 and not b["broker_connected"] for b in beats)
    assert beats[-1]["state"] == "online" and beats[-1]["outbox_pending"] == 0 and beats[-1]["outbox_dropped"] == 0
    assert outbox_rows(tmp_path / "outbox.sqlite") == []


def test_edge_ad_killed_while_broker_down_restart_delivers_the_outbox_first(tmp_path, bundle_dir, video,
                                                                            quiet_video):
    broker = Broker(tmp_path, persistent=True)
    broker.start()
    sub = Subscriber(broker.host, broker.port, "edge-ad/ekill/#", client_id="sub-ekill")
    first, second = tmp_path / "run1", tmp_path / "run2"
    first.mkdir()
    second.mkdir()
    outbox = tmp_path / "outbox.sqlite"
    run2 = None
    proc = start_cli(*args(broker.port, bundle_dir, video, "ekill", first, "--outbox", outbox))
    try:
        sub.wait_for(lambda m: any(p["event"] == "alert" for _, p in m), timeout=40, what="the first alert")
        broker.kill()
        before = len(jsonl(first / "raised.jsonl", "alert", "clear"))
        wait_until(lambda: len(jsonl(first / "raised.jsonl", "alert", "clear")) >= before + 2, timeout=20,
                   what="two events raised while the broker is down")
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        raised1 = jsonl(first / "raised.jsonl", "alert", "clear")
        stored = outbox_rows(outbox)
        undelivered = {e["event_id"] for e in raised1} - set(sub.event_ids())
        assert undelivered and undelivered <= {p["event_id"] for _, _, p in stored}
        assert [p for _, _, p in stored] == [e for e in raised1 if e["event_id"] in {p["event_id"] for _, _, p in stored}]

        broker.start()
        run2 = start_cli(*args(broker.port, bundle_dir, quiet_video, "ekill", second, "--outbox", outbox,
                               realtime=False))
        _, err = run2.communicate(timeout=45)
        raised2 = jsonl(second / "raised.jsonl", "alert", "clear")
        ids = [e["event_id"] for e in raised1 + raised2]
        wait_until(lambda: set(sub.event_ids()) >= set(ids), timeout=15, what="every event of both runs")
    finally:
        for p in (proc, run2):
            if p is not None and p.poll() is None:
                p.kill()
        sub.close()
        broker.stop()
    figures("edge-ad SIGKILL while broker down, restart", ids, sub, in_outbox_at_kill=len(stored))
    assert run2.returncode == 0, err
    assert f"holds {len(stored)} undelivered alert(s) from an earlier run" in err
    assert len(raised2) == 2 and sub.event_ids() == ids  # the old ones first, then the new run's, all in order
    received = first_payloads(sub)
    assert all(received[e["event_id"]] == e for e in raised1)  # original event ids and timestamps
    assert outbox_rows(outbox) == []


def test_network_cut_silently_then_restored_every_alert_arrives(tmp_path, bundle_dir, video):
    broker = Broker(tmp_path)
    broker.start()
    proxy = TcpProxy(broker.port)
    sub = Subscriber(broker.host, broker.port, "edge-ad/netcut/#")
    proc = start_cli(*args(proxy.port, bundle_dir, video, "netcut", tmp_path, "--mqtt-keepalive", 2))
    try:
        sub.wait_for(lambda m: any(p["event"] == "alert" for _, p in m), timeout=40, what="the first alert")
        proxy.cut()
        cut = time.time()
        wait_until(lambda: any(not b["broker_connected"] for b in jsonl(tmp_path / "raised.jsonl", "heartbeat")),
                   timeout=15, what="edge-ad noticing the cut (keepalive)")
        time.sleep(1.0)
        proxy.restore()
        restored = time.time()
        _, err = proc.communicate(timeout=45)
        raised = jsonl(tmp_path / "raised.jsonl", "alert", "clear")
        ids = [e["event_id"] for e in raised]
        wait_until(lambda: set(sub.event_ids()) >= set(ids), timeout=15, what="every raised event")
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
        proxy.close()
        broker.stop()
    figures("silent network cut", ids, sub, raised_during_cut=sum(cut <= epoch(e) <= restored for e in raised))
    assert proc.returncode == 0, err
    assert any(cut <= epoch(e) <= restored for e in raised), "no event was raised during the cut"
    assert sub.event_ids() == ids
    assert "lost MQTT broker" in err
    assert outbox_rows(tmp_path / "outbox.sqlite") == []


def test_full_outbox_drops_the_oldest_and_says_so(tmp_path, bundle_dir, video, quiet_video):
    broker = Broker(tmp_path, persistent=True)
    broker.start()
    sub = Subscriber(broker.host, broker.port, "edge-ad/full/#", client_id="sub-full")
    proc = start_cli(*args(broker.port, bundle_dir, video, "full", tmp_path, "--outbox-max", 3))
    try:
        wait_until(lambda: jsonl(tmp_path / "raised.jsonl", "heartbeat"), timeout=40, what="the first heartbeat")
        assert not jsonl(tmp_path / "raised.jsonl", "alert")
        broker.kill()
        _, err = proc.communicate(timeout=45)
    finally:
        if proc.poll() is None:
            proc.kill()
    raised = jsonl(tmp_path / "raised.jsonl", "alert", "clear")
    kept = outbox_rows(tmp_path / "outbox.sqlite")
    assert proc.returncode == 0, err
    assert len(raised) >= 4 and [p for _, _, p in kept] == raised[-3:]  # the newest three, oldest dropped
    dropped = len(raised) - 3
    assert "is full (3 rows, --outbox-max): dropped the oldest 1 undelivered event(s)" in err
    assert f"({dropped} dropped so far)" in err
    last = jsonl(tmp_path / "raised.jsonl", "heartbeat")[-1]
    assert last["outbox_dropped"] == dropped and last["outbox_pending"] == 3 and last["state"] == "degraded"
    assert "3 alert(s) not yet acknowledged" in err

    broker.start()
    try:
        run2 = start_cli(*args(broker.port, bundle_dir, quiet_video, "full", tmp_path / "r2", "--outbox",
                               tmp_path / "outbox.sqlite", realtime=False))
        _, err2 = run2.communicate(timeout=45)
        wait_until(lambda: set(sub.event_ids()) >= {p["event_id"] for _, _, p in kept}, timeout=15,
                   what="the kept events")
    finally:
        sub.close()
        broker.stop()
    print(f"\nFIGURES outbox full (max 3, broker down): raised {len(raised)}, dropped {dropped} (oldest), "
          f"kept 3, delivered after restart {len(set(sub.event_ids()) & {p['event_id'] for _, _, p in kept})}")
    assert run2.returncode == 0, err2
    assert sub.event_ids()[:3] == [p["event_id"] for _, _, p in kept]


def test_killed_between_publish_and_puback_the_alert_is_sent_after_restart(tmp_path, bundle_dir, video, quiet_video):
    """The network dies silently (no keepalive timeout yet): an alert is handed to paho and sent into the void,
    then edge-ad is killed -9. paho's memory is gone; the outbox still has the row; the restart sends it."""
    broker = Broker(tmp_path)
    broker.start()
    proxy = TcpProxy(broker.port)
    sub = Subscriber(broker.host, broker.port, "edge-ad/void/#")
    outbox = tmp_path / "outbox.sqlite"
    first, second = tmp_path / "run1", tmp_path / "run2"
    run2 = None
    proc = start_cli(*args(proxy.port, bundle_dir, video, "void", first, "--outbox", outbox, "--mqtt-keepalive", 60))
    try:
        sub.wait_for(lambda m: any(p["event"] == "alert" for _, p in m), timeout=40, what="the first alert")
        proxy.cut()
        before = len(jsonl(first / "raised.jsonl", "alert", "clear"))
        wait_until(lambda: len(jsonl(first / "raised.jsonl", "alert", "clear")) >= before + 2, timeout=20,
                   what="two events raised into the cut network")
        time.sleep(0.5)  # delivered to paho and written to the (dead) socket
        assert all(b["broker_connected"] for b in jsonl(first / "raised.jsonl", "heartbeat")), "cut was noticed"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        raised1 = jsonl(first / "raised.jsonl", "alert", "clear")
        lost_in_flight = [e["event_id"] for e in raised1[before:]]
        assert not set(lost_in_flight) & set(sub.event_ids())
        assert set(lost_in_flight) <= {p["event_id"] for _, _, p in outbox_rows(outbox)}
        proxy.restore()
        run2 = start_cli(*args(proxy.port, bundle_dir, quiet_video, "void", second, "--outbox", outbox,
                               realtime=False))
        _, err = run2.communicate(timeout=45)
        ids = [e["event_id"] for e in raised1 + jsonl(second / "raised.jsonl", "alert", "clear")]
        wait_until(lambda: set(sub.event_ids()) >= set(ids), timeout=15, what="every event of both runs")
    finally:
        for p in (proc, run2):
            if p is not None and p.poll() is None:
                p.kill()
        sub.close()
        proxy.close()
        broker.stop()
    figures("SIGKILL between publish and PUBACK, restart", ids, sub, in_flight_at_kill=len(lost_in_flight))
    assert run2.returncode == 0, err
    assert sub.event_ids() == ids
    assert outbox_rows(outbox) == []
