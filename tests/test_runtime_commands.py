"""Remote commands on a real mosquitto: <root>/<device>/<camera>/cmd -> .../cmd/result, against a running edge-ad.

Each command (set-thresholds, reload, snapshot, teach, deploy is in test_runtime_rollout.py), malformed and
unknown commands (a clear error answer, the process goes on), idempotent ids (the stored answer, not a second
run, also after a restart), persisted thresholds, and the documented broker ACL for commands."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import cv2
import numpy as np
import pytest
from command_helpers import EdgeAd, Operator, shared_env
from prerequisites import missing
from runtime_helpers import (  # noqa: F401  (fixtures)
    MOSQUITTO, REPO, Broker, broker, build_bundle, make_frame, mosquitto, write_video,
)

from edge_ad.ops.commands import CommandError, Record, parse

pytestmark = pytest.mark.mosquitto
BOX = (64, 48, 64, 48)
DEVICE, CAMERA = "line3", "cam"


def line_video(path, seconds: int):
    """`seconds` at 25 fps (played in real time): a defect every 100 frames (two frames, shared: little memory)."""
    normal, defect = make_frame(), make_frame([BOX])
    return write_video(path, [defect if i % 100 < 6 else normal for i in range(25 * seconds)])


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    return line_video(tmp_path_factory.mktemp("cmdvideo") / "line.avi", 60)


def start(bundle, video, mosquitto, state, *extra, device=DEVICE):
    host, port = mosquitto
    return EdgeAd("--video", video, "--realtime", "--model", bundle, "--mqtt-host", host, "--mqtt-port", port,
                  "--device-id", device, "--camera-id", CAMERA, "--heartbeat", 0.5, "--cooldown", "10f", *extra,
                  env=shared_env(state))


@pytest.fixture(scope="module")
def served_camera(mosquitto, tmp_path_factory):
    """One edge-ad for the module's tests (its own bundle copy: teach-in writes into it), and an operator. Its
    video (10 min) outlasts the tests on any machine; the fixture stops it."""
    folder = tmp_path_factory.mktemp("cmdrun")
    bundle = build_bundle(folder / "bundle")
    state = folder / "state"
    edge = start(bundle, line_video(folder / "line.avi", 600), mosquitto, state)
    op = Operator(*mosquitto, DEVICE, CAMERA)
    edge.wait_log("remote commands on")
    op.wait(lambda o: o.heartbeats, what="a heartbeat")
    yield edge, op, bundle, state / "edge-ad"
    op.close()
    assert edge.stop() == 0, edge.log[-3000:]


@pytest.fixture()
def running(served_camera):
    """Per test: the configured thresholds back, and only alerts from then on (tests may run in any order)."""
    edge, op, _, _ = served_camera
    assert edge.proc.poll() is None, edge.log[-3000:]
    reset = op.send("set-thresholds", {"reset": True})
    assert reset["ok"], reset
    with op.lock:
        op.alerts.clear()
    return served_camera


def test_malformed_and_unknown_commands_get_a_clear_error_and_edge_ad_goes_on(running):
    edge, op, _, _ = running
    op.publish(b"\xff not json")
    answer = op.wait_result(lambda r: r["id"] is None and "not JSON" in r.get("error", ""), what="non-JSON")
    assert answer["ok"] is False and answer["command"] is None
    op.publish({"command": "snapshot"})
    assert "needs an \"id\"" in op.wait_result(lambda r: "needs an" in (r.get("error") or ""))["error"]
    op.publish({"id": "m1", "command": "snapshot", "args": [1]})
    assert op.wait_result(lambda r: r["id"] == "m1")["error"] == "\"args\" must be a JSON object"
    answer = op.send("self-destruct", ident="u1")
    assert answer["ok"] is False
    assert answer["error"].startswith("unknown command 'self-destruct'; known: deploy, reload, set-thresholds")
    bad = op.send("set-thresholds", {"image": 1.5})
    assert bad["ok"] is False and "args.image must be a number in" in bad["error"]
    assert op.send("snapshot", {"colour": "red"})["error"].startswith("unknown args ['colour']")
    assert edge.proc.poll() is None
    assert op.send("snapshot")["ok"] is True  # still serving


def test_set_thresholds_applies_from_the_next_frame_and_is_persisted(running):
    edge, op, _, state = running
    answer = op.send("set-thresholds", {"image": 0.97, "pixel": 0.6}, ident="thr-1")
    assert answer["ok"], answer
    out = answer["outcome"]
    assert isinstance(out["applied_at_frame"], int)
    assert out["threshold"]["normalized"] == 0.97 and out["threshold"]["pixel_normalized"] == 0.6
    assert out["threshold"]["raw"] > 0.15  # above the bundle's raw threshold (0.15 at 0.5)
    record = json.loads((state / f"thresholds-{DEVICE}-{CAMERA}.json").read_text())
    assert record["image_threshold"] == 0.97 and record["command_id"] == "thr-1"
    # alerts raised after the change carry it
    frame = out["applied_at_frame"]
    later = op.wait(lambda o: [a for a in o.alerts if a["frame_index"] > frame], timeout=20, what="a later alert")
    assert later[0]["threshold"]["normalized"] == 0.97
    assert all(a["threshold"]["normalized"] == 0.5 for a in op.alerts if a["frame_index"] < frame)


def test_a_repeated_id_gets_the_stored_answer_without_running_again(running):
    edge, op, _, state = running
    first = op.send("set-thresholds", {"image": 0.7}, ident="same-id")
    assert first["ok"]
    again = op.send("set-thresholds", {"image": 0.3}, ident="same-id")
    assert again["repeated"] is True
    assert {k: v for k, v in again.items() if k != "repeated"} == first
    record = json.loads((state / f"thresholds-{DEVICE}-{CAMERA}.json").read_text())
    assert record["image_threshold"] == 0.7  # the second one did not run
    stored = json.loads((state / f"commands-{DEVICE}-{CAMERA}.json").read_text())
    assert [a["id"] for a in stored].count("same-id") == 1


def test_snapshot_publishes_the_next_frame_with_its_heatmap(running):
    edge, op, _, _ = running
    before = len(op.snapshots)
    answer = op.send("snapshot", {"max_width": 128})
    assert answer["ok"], answer
    out = answer["outcome"]
    assert out["topic"] == f"edge-ad/{DEVICE}/{CAMERA}/snapshot" and out["overlay"] is True
    jpeg = op.wait(lambda o: o.snapshots[before:], what="the JPEG")[0]
    assert hashlib.sha256(jpeg).hexdigest() == out["sha256"] and len(jpeg) == out["bytes"]
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (96, 128, 3) == (out["height"], out["width"], 3)
    assert isinstance(out["frame_index"], int) and 0.0 <= out["score"] <= 1.0
    # with the heatmap overlay, a flat gray normal frame is no longer gray: JET colours it
    raw = op.send("snapshot", {"overlay": False})["outcome"]
    assert raw["overlay"] is False and raw["width"] == 256
    plain = cv2.imdecode(np.frombuffer(op.wait(lambda o: o.snapshots[before + 1:])[0], np.uint8), cv2.IMREAD_COLOR)
    assert np.abs(plain.astype(int) - 128).max() <= 8 or raw["anomalous"]
    assert np.abs(image.astype(int) - 128).max() > 40


def test_teach_in_on_the_running_camera_and_revert(running):
    edge, op, bundle, _ = running
    answer = op.send("teach", {"frames": 30, "min_frames": 30}, timeout=60)
    assert answer["ok"], answer
    out = answer["outcome"]
    assert out["frames"] == 30 and out["kept"] == "bundle.json.v1" and out["dry_run"] is False
    taught = json.loads((bundle / "bundle.json").read_text())
    assert taught["thresholds"]["image"] == pytest.approx(out["new"]["image_raw"])
    assert taught["calibration"]["teach"]["source"].startswith(f"teach command {answer['id']}")
    assert isinstance(out["applied_at_frame"], int)
    reverted = op.send("teach", {"revert": True})
    assert reverted["ok"], reverted
    assert json.loads((bundle / "bundle.json").read_text())["thresholds"]["image"] == 0.15
    assert op.send("teach", {"revert": True})["error"].startswith("revert failed: nothing to revert")
    assert op.send("teach", {"frames": 5})["error"] == "args.frames must be an integer in [30, 20000], got 5"


def test_reload_recompiles_the_active_bundle_and_swaps_between_frames(running):
    edge, op, bundle, _ = running
    answer = op.send("reload")
    assert answer["ok"], answer
    out = answer["outcome"]
    assert out["bundle"] == str(bundle) and isinstance(out["first_frame"], int)
    assert out["timings"]["compile_s"] > 0 and out["timings"]["switch_ms"] < 100
    assert op.wait(lambda o: o.status and o.status[-1].get("model", {}).get("bundle_hash"), what="status")
    # a bundle that no longer loads: the running model stays
    xml = bundle / "model.xml"
    saved = xml.read_bytes()
    try:
        xml.write_bytes(saved.replace(b"<layers>", b"<layers><broken"))
        failed = op.send("reload")
        assert failed["ok"] is False and "checksum mismatch" in failed["error"] and "still running" in failed["error"]
    finally:
        xml.write_bytes(saved)
    assert op.send("snapshot")["ok"]


def test_record_is_bounded_and_survives_a_restart(tmp_path):
    record = Record(tmp_path / "r.json", size=3)
    for i in range(5):
        record.save(record.put({"id": f"c{i}", "ok": True}))
    again = Record(tmp_path / "r.json", size=3)
    assert again.get("c0") is None and again.get("c4") == {"id": "c4", "ok": True}
    with pytest.raises(CommandError, match="unknown field"):
        parse(b'{"id": "x", "command": "reload", "extra": 1}')
    assert parse(b'{"id": "x", "command": "reload"}').args == {}


def test_restart_keeps_thresholds_and_answers_repeated_ids(long_video, mosquitto, tmp_path):
    bundle = build_bundle(tmp_path / "bundle")
    state = tmp_path / "state"
    op = Operator(*mosquitto, "line9", CAMERA)
    try:
        edge = start(bundle, long_video, mosquitto, state, device="line9")
        edge.wait_log("remote commands on")
        first = op.send("set-thresholds", {"image": 0.8}, ident="keep-me")
        assert first["ok"]
        assert edge.stop() == 0
        edge = start(bundle, long_video, mosquitto, state, device="line9")
        edge.wait_log("remote commands on")
        assert "thresholds set remotely" in edge.log and "image 0.8" in edge.log
        again = op.send("set-thresholds", {"image": 0.2}, ident="keep-me")
        assert again["repeated"] is True and again["outcome"] == first["outcome"]
        alert = op.wait(lambda o: [a for a in o.alerts if a["threshold"]["normalized"] == 0.8], what="alert")
        assert alert
        reset = op.send("set-thresholds", {"reset": True})
        assert reset["ok"] and reset["outcome"]["threshold"]["normalized"] == 0.5
        assert not (state / "edge-ad" / f"thresholds-line9-{CAMERA}.json").exists()
        assert edge.stop() == 0
    finally:
        op.close()


# -- broker ACL ------------------------------------------------------------------------------------------
PASSWORDS = {"line3": "line3-Pa55", "line4": "line4-Pa55", "operator": "op-Pa55", "dashboard": "dash-Pa55"}


def test_acl_lets_the_operator_command_a_device_and_no_device_command_another(long_video, tmp_path):
    if MOSQUITTO is None or not shutil.which("mosquitto_passwd"):
        missing("mosquitto", "needs mosquitto and mosquitto_passwd")
    passwd = tmp_path / "passwd"
    for user, password in PASSWORDS.items():
        subprocess.run(["mosquitto_passwd", "-b", *([] if passwd.exists() else ["-c"]), str(passwd), user, password],
                       check=True, capture_output=True)
    acl = tmp_path / "acl"
    acl.write_text((REPO / "deploy/examples/mosquitto-acl.conf").read_text() + "\n"
                   + (REPO / "deploy/examples/mosquitto-acl-commands.conf").read_text())
    server = Broker(tmp_path / "broker", extra=f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n")
    server.start()
    bundle = build_bundle(tmp_path / "bundle")
    env = shared_env(tmp_path / "state")
    env["EDGE_AD_MQTT_PASSWORD"] = PASSWORDS["line3"]
    edge = EdgeAd("--video", long_video, "--realtime", "--model", bundle, "--mqtt-host", server.host,
                  "--mqtt-port", server.port, "--mqtt-username", "line3", "--device-id", "line3", "--camera-id",
                  CAMERA, env=env)
    ops = [Operator(server.host, server.port, "line3", CAMERA, username=u, password=PASSWORDS[u])
           for u in ("operator", "line4")]
    try:
        edge.wait_log("remote commands on")
        answer = ops[0].send("snapshot")
        assert answer["ok"] and ops[0].snapshots, answer  # the operator reads answers and snapshots
        ops[1].publish({"id": "from-line4", "command": "set-thresholds", "args": {"image": 0.99}})
        ops[0].publish({"id": "probe", "command": "snapshot"})
        ops[0].wait_result(lambda r: r["id"] == "probe")
        everything = ops[0].results + ops[1].results
        assert all(r["id"] != "from-line4" for r in everything)  # denied by the broker: never arrived
        assert ops[1].results == [] and ops[1].snapshots == []  # line4 cannot read line3's answers either
    finally:
        for op in ops:
            op.close()
        edge.stop()
        server.stop()


def test_no_commands_subscribes_nothing(long_video, mosquitto, tmp_path):
    bundle = build_bundle(tmp_path / "bundle")
    op = Operator(*mosquitto, "line8", CAMERA)
    try:
        edge = start(bundle, long_video, mosquitto, tmp_path / "state", "--no-commands", device="line8")
        op.wait(lambda o: o.heartbeats, what="a heartbeat")
        op.publish({"id": "ignored", "command": "snapshot"})
        op.wait(lambda o: len(o.heartbeats) >= 4, what="more heartbeats")  # 1.5 s later
        assert op.results == [] and "remote commands on" not in edge.log
        assert edge.stop() == 0
    finally:
        op.close()
