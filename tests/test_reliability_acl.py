"""The documented broker ACL (deploy/examples/mosquitto-acl.conf) on a real mosquitto with passwords:
a device (user name = device id) publishes its alerts, status and heartbeats under edge-ad/<device>/,
and nothing anywhere else. MQTT 3.1.1 gives no sign of a denied publish (mosquitto drops it and still
acknowledges; edge-ad warns at start); with MQTT 5, the default, edge-ad sees the refusal and keeps the alerts
in the outbox, reported in status and heartbeats."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from prerequisites import missing
from runtime_helpers import (  # noqa: F401  (fixtures)
    MOSQUITTO, REPO, Broker, Subscriber, bundle_dir, jsonl, make_frame, outbox_rows, run_cli, write_video,
)

pytestmark = pytest.mark.mosquitto
PASSWORDS = {"line3": "line3-Pa55", "line4": "line4-Pa55", "dashboard": "dash-Pa55", "spy": "spy-Pa55"}
BOX = (64, 48, 64, 48)


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory):
    if MOSQUITTO is None or not shutil.which("mosquitto_passwd"):
        missing("mosquitto", "needs mosquitto and mosquitto_passwd")
    folder = tmp_path_factory.mktemp("acl")
    passwd = folder / "passwd"
    for user, password in PASSWORDS.items():
        subprocess.run(["mosquitto_passwd", "-b", *([] if passwd.exists() else ["-c"]), str(passwd), user, password],
                       check=True, capture_output=True)
    acl = folder / "acl"
    # The example, as shipped, plus a test-only user that can see every topic (to prove what did NOT arrive).
    acl.write_text((REPO / "deploy/examples/mosquitto-acl.conf").read_text() + "\nuser spy\ntopic read #\n")
    broker = Broker(folder, extra=f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    frames = [make_frame([BOX] if 5 <= i < 12 or 25 <= i < 32 else []) for i in range(40)]
    return write_video(tmp_path_factory.mktemp("aclvideo") / "line.avi", frames)


def run_device(broker, bundle, video, folder: Path, device: str, user: str, *extra):
    return run_cli("--video", video, "--model", bundle, "--mqtt-host", broker.host, "--mqtt-port", broker.port,
                   "--mqtt-username", user, "--device-id", device, "--camera-id", "cam", "--cooldown", "10f",
                   "--jsonl", folder / "raised.jsonl", "--outbox", folder / "outbox.sqlite", "--heartbeat", 0.2,
                   *extra, env={"EDGE_AD_MQTT_PASSWORD": PASSWORDS[user]})


def test_a_device_publishes_alerts_status_and_heartbeats_under_its_own_subtree(acl_broker, bundle_dir, video,
                                                                                tmp_path):
    sub = Subscriber(acl_broker.host, acl_broker.port, "edge-ad/#", username="dashboard",
                     password=PASSWORDS["dashboard"])
    try:
        proc = run_device(acl_broker, bundle_dir, video, tmp_path, "line3", "line3")
        raised = jsonl(tmp_path / "raised.jsonl", "alert", "clear")
        sub.wait_for(lambda m: set(sub.event_ids()) >= {e["event_id"] for e in raised}
                     and any(p.get("state") == "offline" for _, p in m), what="alerts and offline")
    finally:
        sub.close()
    assert proc.returncode == 0, proc.stderr
    assert [e["event"] for e in raised] == ["alert", "clear", "alert", "clear"]
    assert sub.event_ids() == [e["event_id"] for e in raised]
    topics = {t for t, _ in sub.messages}
    assert topics == {"edge-ad/line3/cam/alert", "edge-ad/line3/cam/clear", "edge-ad/line3/cam/status",
                      "edge-ad/line3/cam/heartbeat"}
    assert outbox_rows(tmp_path / "outbox.sqlite") == []
    assert PASSWORDS["line3"] not in proc.stderr + proc.stdout


def test_mqtt311_impersonation_is_dropped_silently_by_the_broker(acl_broker, bundle_dir, video, tmp_path):
    """User line3 claiming device id line4: mosquitto drops every publish (and still acknowledges it)."""
    spy = Subscriber(acl_broker.host, acl_broker.port, "#", username="spy", password=PASSWORDS["spy"])
    try:
        proc = run_device(acl_broker, bundle_dir, video, tmp_path, "line4", "line3", "--mqtt-version", "3.1.1")
        time.sleep(1.0)
    finally:
        spy.close()
    assert proc.returncode == 0, proc.stderr
    assert "ACL) still acknowledges it, so refused alerts cannot be detected" in proc.stderr
    assert len(jsonl(tmp_path / "raised.jsonl", "alert")) == 2
    assert not [t for t, _ in spy.messages if t.startswith("edge-ad/line4/")]  # denied: nothing arrived
    assert outbox_rows(tmp_path / "outbox.sqlite") == []  # ... yet acknowledged: why MQTT v5 is recommended


def test_mqtt5_refused_alerts_are_reported_and_kept(acl_broker, bundle_dir, video, tmp_path):
    spy = Subscriber(acl_broker.host, acl_broker.port, "#", username="spy", password=PASSWORDS["spy"])
    try:
        proc = run_device(acl_broker, bundle_dir, video, tmp_path, "line4", "line3")  # MQTT 5: the default
    finally:
        spy.close()
    assert proc.returncode == 0, proc.stderr
    assert "cannot be detected" not in proc.stderr
    raised = jsonl(tmp_path / "raised.jsonl", "alert", "clear")
    assert not [t for t, _ in spy.messages if t.startswith("edge-ad/line4/")]
    assert "MQTT broker refused an alert" in proc.stderr and "Not authorized" in proc.stderr
    assert "check the broker ACL" in proc.stderr and "Traceback" not in proc.stderr
    assert [p for _, _, p in outbox_rows(tmp_path / "outbox.sqlite")] == raised  # nothing lost
    beats = jsonl(tmp_path / "raised.jsonl", "heartbeat")
    assert any(b["state"] == "degraded" and "Not authorized" in b.get("reason", "") for b in beats)
    assert 1 <= max(b["outbox_refused"] for b in beats) <= len(raised)  # refused rows, counted, kept
    statuses = jsonl(tmp_path / "raised.jsonl", "status")
    assert any(s["state"] == "degraded" and "Not authorized" in s.get("reason", "") for s in statuses)
    print(f"\nFIGURES ACL denial (MQTT 5 default): raised {len(raised)}, delivered 0, kept in the outbox "
          f"{len(outbox_rows(tmp_path / 'outbox.sqlite'))}, refused rows in heartbeats "
          f"{max(b['outbox_refused'] for b in beats)}")

    # The same device under its own name: MQTT v5, accepted, the outbox drains (the ACL was the only problem).
    ok = run_device(acl_broker, bundle_dir, video, tmp_path / "own", "line3", "line3")
    assert ok.returncode == 0 and "refused an alert" not in ok.stderr, ok.stderr
    assert outbox_rows(tmp_path / "own" / "outbox.sqlite") == []


def test_a_device_cannot_write_outside_its_subtree(acl_broker):
    """A raw client with the device's credentials: other devices' topics and other roots are denied."""
    spy = Subscriber(acl_broker.host, acl_broker.port, "#", username="spy", password=PASSWORDS["spy"])
    acked: set[int] = set()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"line3-{uuid.uuid4().hex[:6]}")
    client.username_pw_set("line3", PASSWORDS["line3"])
    client.on_publish = lambda c, u, mid, rc, p: acked.add(mid)
    client.connect(acl_broker.host, acl_broker.port)
    client.loop_start()
    try:
        for topic in ("edge-ad/line4/cam/alert", "edge-ad/line4/status", "other/line3/alert", "edge-ad/status",
                      "$SYS/broker/x", "edge-ad/line3x/alert"):
            client.publish(topic, b'{"forged": true}', qos=1, retain=True)
        control = client.publish("edge-ad/line3/cam/alert", b'{"control": true}', qos=1)
        deadline = time.monotonic() + 5
        while control.mid not in acked and time.monotonic() < deadline:
            time.sleep(0.05)
        assert control.mid in acked
        spy.wait_for(lambda m: any(t == "edge-ad/line3/cam/alert" for t, _ in m), what="the control message")
        time.sleep(0.5)
    finally:
        client.disconnect()
        client.loop_stop()
        spy.close()
    fresh = [t for t, p in spy.messages if p.get("event") != "status"]  # (line3's retained status from before)
    assert fresh == ["edge-ad/line3/cam/alert"]
