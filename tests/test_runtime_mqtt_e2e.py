"""End to end with a real mosquitto: video -> `python -m edge_ad` -> broker -> subscriber.

The video holds two defects; with N=3 of M=5, a 10-frame cool-down and an all-clear
after 5 normal frames, the policy implies exactly two alerts (frames 12 and 32) and
two all-clears (frames 20 and 40). The subscriber must see exactly those, with
regions inside the true defect boxes, plus the retained status and `offline` at the end.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from runtime_helpers import (  # noqa: F401  (fixtures)
    REPO, Broker, Subscriber, broker, bundle_dir, cli_env, inside, iou, make_frame, mosquitto, needs_mosquitto,
    run_cli, write_video,
)

from edge_ad.model.bundle import bundle_hash, read_bundle

pytestmark = pytest.mark.mosquitto

BOX_A = (64, 48, 64, 48)
BOX_B = (152, 100, 60, 40)
DEFECTS = {**{i: BOX_A for i in range(10, 16)}, **{i: BOX_B for i in range(30, 36)}}
MARGIN = 5  # boxes are on the model grid: one model pixel (256/64 = 4 frame pixels) + 1 for rounding


def offline(messages) -> bool:
    return any(p.get("event") == "status" and p.get("state") == "offline" for _, p in messages)


@pytest.fixture(scope="module")
def defect_video(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("e2e")
    frames = [make_frame([DEFECTS[i]] if i in DEFECTS else []) for i in range(42)]
    return write_video(folder / "line.avi", frames, fps=25)


def test_alerts_clears_and_status_over_a_real_broker(mosquitto, bundle_dir, defect_video, tmp_path):
    host, port = mosquitto
    sub = Subscriber(host, port, "edge-ad/e2e/#")
    listener = subprocess.Popen(
        [sys.executable, "-m", "edge_ad", "listen", "--mqtt-host", host, "--mqtt-port", str(port), "--device", "e2e",
         "--count", "2", "--timeout", "60", "--json", "--log-level", "info"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env=cli_env())
    try:
        assert "listening on" in listener.stderr.readline()
        proc = run_cli("--video", defect_video, "--model", bundle_dir, "--mqtt-host", host, "--mqtt-port", port,
                       "--device-id", "e2e", "--camera-id", "line1", "--alert-n", 3, "--alert-m", 5,
                       "--cooldown", "10f", "--heartbeat", 60, "--snapshots", tmp_path / "snaps")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == ""  # with a broker, no JSON lines on stdout unless asked
        messages = sub.wait_for(offline)
        listened, _ = listener.communicate(timeout=30)
    finally:
        sub.close()
        if listener.poll() is None:
            listener.kill()
    assert listener.returncode == 0

    alerts = [(t, p) for t, p in messages if p["event"] == "alert"]
    assert [p["frame_index"] for _, p in alerts] == [12, 32]
    bundle = read_bundle(bundle_dir)
    for (topic, alert), box in zip(alerts, (BOX_A, BOX_B)):
        assert topic == "edge-ad/e2e/line1/alert"
        assert alert["device"] == "e2e" and alert["camera"] == "line1"
        assert uuid.UUID(alert["event_id"]).version == 4
        assert datetime.fromisoformat(alert["timestamp"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0
        assert 0.5 <= alert["score"] <= 1.0 and alert["raw_score"] >= 0.15
        assert alert["threshold"]["raw"] == pytest.approx(0.15) and alert["threshold"]["normalized"] == 0.5
        assert alert["model"] == {"algorithm": "absdiff", "backbone": "none", "bundle_hash": bundle_hash(bundle),
                                  "precision": "fp32", "inference_precision": "f32"}  # tiny bundle: no bf16 check
        assert len(alert["regions"]) == 1 and alert["regions_total"] == 1
        region = alert["regions"][0]
        assert inside(region, box, MARGIN) and iou(region, box) > 0.8, (region, box)
        assert 0.5 < region["peak"] <= 1.0 and region["area"] > 0.8 * box[2] * box[3]
        assert Path(alert["snapshot"]).is_file() and Path(alert["snapshot"]).parent == (tmp_path / "snaps").resolve()

    clears = [(t, p) for t, p in messages if p["event"] == "clear"]
    assert [(t, p["frame_index"]) for t, p in clears] == [("edge-ad/e2e/line1/clear", 20), ("edge-ad/e2e/line1/clear", 40)]
    assert [p["clears"] for _, p in clears] == [p["event_id"] for _, p in alerts]

    statuses = [(t, p["state"]) for t, p in messages if p["event"] == "status"]
    assert statuses[0] == ("edge-ad/e2e/line1/status", "online") and statuses[-1] == ("edge-ad/e2e/line1/status", "offline")
    beat = [p for t, p in messages if t == "edge-ad/e2e/line1/heartbeat"][-1]
    assert beat["processed"] == 42 and beat["dropped"] == 0 and beat["alerts"] == 2
    assert set(beat["latency_ms"]) == {"p50", "p95", "p99"} and beat["fps"] >= 0

    heard = [json.loads(line) for line in listened.splitlines()]
    assert [(h["topic"], h["frame_index"]) for h in heard] == [("edge-ad/e2e/line1/alert", 12),
                                                               ("edge-ad/e2e/line1/alert", 32)]

    late = Subscriber(host, port, "edge-ad/e2e/line1/status")  # retained status survives the process
    try:
        retained = late.wait_for(lambda m: len(m) >= 1)
    finally:
        late.close()
    topic, payload = retained[0]
    assert late.retain_flags[0] and payload["state"] == "offline" and payload["reason"] == "shutdown"


def _start_live_run(host, port, bundle_dir, video, device_id):
    return subprocess.Popen(
        [sys.executable, "-m", "edge_ad", "--video", str(video), "--realtime", "--model", str(bundle_dir),
         "--mqtt-host", host, "--mqtt-port", str(port), "--device-id", device_id, "--heartbeat", "0.3",
         "--mqtt-keepalive", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env=cli_env())


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("long")
    return write_video(folder / "long.avi", [make_frame() for _ in range(250)], fps=25)  # 10 s in real time


def test_sigterm_drains_and_publishes_offline(mosquitto, bundle_dir, long_video):
    host, port = mosquitto
    sub = Subscriber(host, port, "edge-ad/sigterm/#")
    proc = _start_live_run(host, port, bundle_dir, long_video, "sigterm")
    try:
        sub.wait_for(lambda m: any(p["event"] == "heartbeat" and p["processed"] > 0 for _, p in m))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        messages = sub.wait_for(offline)
    finally:
        sub.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM received" in err and "Traceback" not in err
    last = [p for _, p in messages if p["event"] == "status"][-1]
    assert last["state"] == "offline" and last["reason"] == "shutdown"
    beat = [p for _, p in messages if p["event"] == "heartbeat"][-1]
    assert 0 < beat["processed"] < 250


def test_last_will_reports_offline_when_the_process_dies(mosquitto, bundle_dir, long_video):
    host, port = mosquitto
    sub = Subscriber(host, port, "edge-ad/killed/+/status")
    proc = _start_live_run(host, port, bundle_dir, long_video, "killed")
    try:
        sub.wait_for(lambda m: any(p.get("state") == "online" for _, p in m))
        proc.kill()
        proc.wait(10)
        messages = sub.wait_for(offline, timeout=15)
    finally:
        sub.close()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    will = messages[-1][1]
    assert will["state"] == "offline" and will["reason"] == "connection lost"


def test_alerts_raised_while_the_broker_is_down_arrive_after_it_returns(needs_mosquitto, bundle_dir, tmp_path):
    """QoS 1 alerts are queued during a broker outage and delivered after paho reconnects.

    A persistent broker and a persistent-session subscriber: what edge-ad publishes the instant the
    broker is back is queued for the subscriber even before it has reconnected (no race with its
    reconnect; the subscriber's own reconnect is not what is tested here).
    """
    frames = [make_frame([BOX_A] if (i // 25) % 2 else []) for i in range(150)]  # defects at 25-49, 75-99, 125-149
    video = write_video(tmp_path / "restart.avi", frames, fps=25)
    broker = Broker(tmp_path / "broker", persistent=True)
    broker.start()
    sub = Subscriber(broker.host, broker.port, "edge-ad/restart/#", client_id="sub-restart")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_ad", "--video", str(video), "--realtime", "--model", str(bundle_dir),
         "--mqtt-host", broker.host, "--mqtt-port", str(broker.port), "--device-id", "restart",
         "--cooldown", "10f", "--heartbeat", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=cli_env())
    try:
        sub.wait_for(lambda m: any(p["event"] == "alert" for _, p in m), what="the first alert")  # went out live
        broker.stop()
        time.sleep(1.5)
        broker.start()
        _, err = proc.communicate(timeout=60)
        sub.wait_for(lambda m: any(p["event"] == "status" and p.get("state") == "offline" for _, p in m),
                     what="the offline status")
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
        broker.stop()
    assert proc.returncode == 0, err
    assert "lost MQTT broker" in err and "reconnected to MQTT broker" in err and "not confirmed" not in err
    raised = [int(line.split(" frame ")[1].split()[0]) for line in err.splitlines() if "ALERT" in line]
    received = {p["frame_index"] for p in sub.events("alert")}
    assert len(raised) >= 6 and received == set(raised)
