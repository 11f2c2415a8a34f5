"""Several cameras in one `edge-ad` process (a config file with a `cameras` list), against a real mosquitto.

Each camera must behave as its own single-camera run would: its own status, heartbeats and alerts
on its own topics, its own outbox file; cameras on the same bundle share one compiled model; a
camera whose video is corrupt fails alone (offline with the reason on its own status topic) while
the others finish and deliver their alerts, and the exit code says one failed; SIGINT drains them all.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import cv2
import pytest
from runtime_helpers import (  # noqa: F401  (fixtures)
    Subscriber, broker, build_bundle, bundle_dir, make_frame, mosquitto, run_cli, start_cli, write_video,
)

from edge_ad.errors import ConfigError
from edge_ad.ops.camera_config import build_camera_configs
from edge_ad.ops.config import load_config_file

BOX = (64, 48, 64, 48)
FRAMES = 30  # defects in frames 10-15: with N=3 of M=5 exactly one alert per camera (frame 12) and one all-clear


@pytest.fixture(scope="module")
def site(tmp_path_factory, bundle_dir):
    """Two bundles, two videos with one defect each, one corrupt video."""
    folder = tmp_path_factory.mktemp("multicamera")
    build_bundle(folder / "bundle-b")
    frames = [make_frame([BOX] if 10 <= i < 16 else []) for i in range(FRAMES)]
    write_video(folder / "left.avi", frames)
    write_video(folder / "right.avi", frames)
    (folder / "corrupt.avi").write_bytes(b"RIFF\x00\x00\x00\x00AVI garbage" * 200)
    (folder / "parts").mkdir()
    for name, boxes in (("p1.png", []), ("p2.png", [BOX]), ("p3.png", [])):
        cv2.imwrite(str(folder / "parts" / name), make_frame(boxes))
    return folder


def write_config(folder: Path, text: str) -> Path:
    path = folder / "cameras.yaml"
    path.write_text(text)
    return path


def camera_messages(sub: Subscriber, camera: str, event: str) -> list[dict]:
    return [p for t, p in sub.messages if t.startswith(f"edge-ad/mc/{camera}/") and p.get("event") == event]


def test_cameras_share_models_publish_apart_and_fail_alone(site, bundle_dir, mosquitto, tmp_path):
    host, port = mosquitto
    config = write_config(site, f"""
device_id: mc
mqtt: {{host: {host}, port: {port}}}
heartbeat: 0.3
model: {bundle_dir}
cameras:
  - {{camera_id: left, video: left.avi}}
  - {{camera_id: right, video: right.avi, alert: {{n: 2, m: 4}}}}
  - {{camera_id: other, video: left.avi, model: bundle-b}}
  - {{camera_id: broken, video: corrupt.avi, model: bundle-b}}
  - {{camera_id: parts, images: parts, per_part: true}}
""")
    sub = Subscriber(host, port, "edge-ad/mc/#")
    try:
        proc = run_cli("--config", config, timeout=120, env={"XDG_STATE_HOME": str(tmp_path)})
        assert proc.returncode == 2, proc.stderr  # the corrupt file: bad configuration, as for one camera
        sub.wait_for(lambda m: sum(p.get("state") == "offline" for _, p in m) >= 5, what="five offline statuses")
    finally:
        sub.close()
    err = proc.stderr
    assert err.count("compiled once") == 2, err
    assert f"bundle {bundle_dir.resolve()}: compiled once (CPU, latency mode) for 3 camera(s): left, right, parts" in err
    assert "for 2 camera(s): other, broken" in err
    assert "[broken] camera failed: cannot read video file" in err and "1 of 5 camera(s) failed" in err

    for camera in ("left", "right", "other"):
        alerts = camera_messages(sub, camera, "alert")
        assert len(alerts) == 1 and alerts[0]["camera"] == camera and alerts[0]["device"] == "mc", alerts
        assert alerts[0]["policy"]["n"] == (2 if camera == "right" else 3)  # the entry's own policy
        assert len(camera_messages(sub, camera, "clear")) == 1
        final = [p for p in camera_messages(sub, camera, "heartbeat") if p.get("final")]
        assert len(final) == 1 and final[0]["processed"] == FRAMES and final[0]["camera"] == camera
        states = [p["state"] for p in camera_messages(sub, camera, "status")]
        assert states[0] == "online" and states[-1] == "offline", states
        assert (tmp_path / "edge-ad" / f"outbox-mc-{camera}.sqlite").is_file()  # one outbox per camera
    assert camera_messages(sub, "right", "alert")[0]["frame_index"] == 11  # 2 of 4 (the others: 3 of 5, frame 12)
    assert camera_messages(sub, "left", "alert")[0]["frame_index"] == 12
    broken = camera_messages(sub, "broken", "status")
    assert broken[-1]["state"] == "offline" and "cannot read video file" in broken[-1]["reason"], broken
    assert camera_messages(sub, "broken", "alert") == []
    verdicts = camera_messages(sub, "parts", "verdict")  # a per-part camera beside the stream cameras
    assert sorted((v["part_id"], v["verdict"]) for v in verdicts) == [
        ("p1.png", "OK"), ("p2.png", "NOK"), ("p3.png", "OK")], verdicts
    assert "all cameras: processed=93 " in err


def test_sigint_drains_every_camera(site, bundle_dir, mosquitto, tmp_path):
    host, port = mosquitto
    long = [make_frame([BOX] if 10 <= i < 16 else []) for i in range(400)]
    write_video(tmp_path / "long.avi", long)
    config = tmp_path / "cameras.toml"
    config.write_text(f"""
device_id = "mcs"
model = "{bundle_dir}"
realtime = true
[mqtt]
host = "{host}"
port = {port}
[[cameras]]
camera_id = "a"
video = "long.avi"
[[cameras]]
camera_id = "b"
video = "long.avi"
""")
    sub = Subscriber(host, port, "edge-ad/mcs/#")
    proc = start_cli("--config", config, env={"XDG_STATE_HOME": str(tmp_path)})
    try:
        sub.wait_for(lambda m: {t for t, p in m if p.get("event") == "alert"} == {"edge-ad/mcs/a/alert",
                                                                                   "edge-ad/mcs/b/alert"},
                     timeout=60, what="an alert from each camera")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        sub.wait_for(lambda m: sum(p.get("state") == "offline" for _, p in m) == 2, what="both offline")
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
    assert "SIGINT received" in err and "stopped on request" in err
    for camera in ("a", "b"):
        final = [p for t, p in sub.messages if t == f"edge-ad/mcs/{camera}/heartbeat" and p.get("final")]
        assert len(final) == 1 and 0 < final[0]["processed"] < 400  # stopped early, summary published
        offline = [p for t, p in sub.messages if t == f"edge-ad/mcs/{camera}/status" and p["state"] == "offline"]
        assert offline[-1]["reason"] == "shutdown"


def test_config_precedence_and_print_config(site, bundle_dir):
    config = write_config(site, f"""
device_id: mc
model: {bundle_dir}
cooldown: 20s
image_threshold: 0.6
cameras:
  - {{camera_id: left, video: left.avi, image_threshold: 0.7}}
  - {{camera: 3, roi_mask: null}}
""")
    proc = run_cli("--config", config, "--print-config", "--image-threshold", "0.8", "--max-frames", "5")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert [c["camera_id"] for c in shown] == ["left", None] and shown[1]["camera"] == 3
    assert shown[0]["video"] == str(site / "left.avi")  # relative to the config file
    assert {c["image_threshold"] for c in shown} == {0.8} and {c["max_frames"] for c in shown} == {5}  # CLI wins
    assert {c["cooldown"] for c in shown} == {"20s"} and {c["device_id"] for c in shown} == {"mc"}
    assert "cameras" not in load_config_file(config) and load_config_file(config)["device_id"] == "mc"  # listen


@pytest.mark.parametrize("body, message", [
    ("cameras: []", "'cameras' must be a non-empty list"),
    ("cameras: {a: 1}", "'cameras' must be a non-empty list"),
    ("cameras: [3]", "cameras entry 1 must be a mapping"),
    ("cameras:\n  - {camera_id: c1, video: v.avi, alert_nn: 2}", "camera c1: unknown option 'alert_nn' (did you mean 'alert_n'?)"),
    ("cameras:\n  - {video: v.avi}\n  - {video: w.avi, alert_n: 9}", "camera #2: --alert-n (9) cannot exceed --alert-m (5)"),
    ("cameras:\n  - {camera_id: c1, model: null}", "camera c1: no frame source"),
    ("cameras:\n  - {camera_id: c1, camera: 0, log_level: debug}", "camera c1: 'log_level' is shared by all cameras"),
    ("camera: 0\ncameras:\n  - {camera: 1}", "'camera' at the top level"),
    ("cameras:\n  - {camera: 0, camera_id: x}\n  - {camera: 1, camera_id: x}", "cameras x and x have the same topics"),
    ("cameras:\n  - {camera: 0}\n  - {camera: 0}", "cameras cam0 and cam0 have the same topics"),
    ("mqtt_host: b\noutbox: o.sqlite\ncameras:\n  - {camera: 0}\n  - {camera: 1}", "cameras cam0 and cam1 share one outbox"),
    ("mqtt_host: b\nmqtt_client_id: x\ncameras:\n  - {camera: 0}\n  - {camera: 1}", "have the same mqtt_client_id"),
    ("jsonl: a.jsonl\ncameras:\n  - {camera: 0}\n  - {camera: 1}", "write the same JSON-lines file"),
    ("cameras:\n  - {camera: 0, trigger: stdin}\n  - {camera: 1, trigger: stdin}", "both read triggers from stdin"),
])
def test_bad_camera_lists_are_one_line_errors(tmp_path, body, message):
    config = tmp_path / "c.yaml"
    config.write_text("model: m\n" + body + "\n")
    with pytest.raises(ConfigError) as info:
        build_camera_configs({}, config)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_cli_refuses_a_source_beside_a_camera_list(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: m\ncameras:\n  - {camera: 0}\n  - {camera: 1}\n")
    proc = run_cli("--config", config, "--camera", "2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"edge-ad: error: --camera cannot be combined with the 'cameras' list of {config} (it would apply to every "
        "camera); set it in the camera's entry"]
    assert build_camera_configs({}, config)[1].camera == 1  # the same file without the option is fine


def test_shared_models_compile_each_bundle_once(site, bundle_dir):
    from edge_ad.model.shared_queue import QueueView
    from edge_ad.multicamera import SharedModels, _Total, prepare

    configs = build_camera_configs({}, write_config(site, f"""
model: {bundle_dir}
cameras:
  - {{camera_id: a, video: left.avi}}
  - {{camera_id: b, video: left.avi}}
  - {{camera_id: c, video: left.avi, model: bundle-b}}
"""))
    models = SharedModels()
    cameras = prepare(configs, models, _Total())
    assert models.compiled == 2
    assert cameras[0].detector.compiled is cameras[1].detector.compiled  # one compiled model ...
    assert cameras[0].detector.queue.shared is not cameras[1].detector.queue.shared  # ... each camera its own
    assert isinstance(cameras[0].detector.queue, QueueView)  # request queue, whose callbacks never block
    assert cameras[0].detector.results is not cameras[1].detector.results  # ... and its own results
    assert cameras[2].detector.compiled is not cameras[0].detector.compiled
    assert all(camera.detector.core is models.core for camera in cameras)  # deploy/reload compile on it
    assert not models.queues

    shared = SharedModels(shared_queue=True)  # the alternative benchmarks/multicamera.py compares
    cameras = prepare(configs, shared, _Total())
    assert cameras[0].detector.queue.shared is cameras[1].detector.queue.shared  # one request queue ...
    assert cameras[0].detector.queue is not cameras[1].detector.queue  # ... each camera its own view of it
    assert cameras[2].detector.queue.shared is not cameras[0].detector.queue.shared


def test_server_conflicts_fail_before_any_camera_starts(tmp_path):
    """A metrics/live-view port in use, two view tokens, one port with two hosts: one ConfigError naming the
    camera from the start-up step (hold_servers), and what it had started is released."""
    import socket

    from benchmarks.broker import free_port
    from edge_ad.errors import EdgeAdError
    from edge_ad.multicamera import _Camera, hold_servers, release_servers
    from edge_ad.ops.config import RunConfig

    def cameras(*configs):
        return [_Camera(name, config, None, None) for name, config in zip("ab", configs)]

    port, other = free_port(), free_port()
    (tmp_path / "token").write_text("a-view-token-1234\n")
    for configs, message in (
        ((RunConfig(metrics_port=port), RunConfig(metrics_port=port, metrics_host="0.0.0.0")), "one --metrics-host"),
        ((RunConfig(http=f"127.0.0.1:{other}"), RunConfig(http=f"127.0.0.1:{other}",
                                                           http_token_file=str(tmp_path / "token"))), "one view token"),
    ):
        with pytest.raises(ConfigError, match=f"camera b: .*{message}"):
            hold_servers(cameras(*configs))
    release_servers(hold_servers(cameras(RunConfig(metrics_port=port, http=f"127.0.0.1:{other}"),
                                         RunConfig(metrics_port=port, http=f"127.0.0.1:{other}"))))  # released: free
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        with pytest.raises(EdgeAdError, match=f"camera a: --metrics-port {port}"):
            hold_servers(cameras(RunConfig(metrics_port=port)))


def test_camera_stats_share_the_process_cpu_time(monkeypatch):
    import time

    from edge_ad.multicamera import CameraStats, _Total

    cpu = [0.0]
    monkeypatch.setattr(time, "process_time", lambda: cpu[0])
    total = _Total()
    a, b = CameraStats(total), CameraStats(total)
    for _ in range(10):
        cpu[0] += 0.002  # the process spends 2 ms per pair of frames: 1 ms per frame
        a.frame_done(0.001, 0.001, False)
        b.frame_done(0.001, 0.001, False)
        time.sleep(0.001)
    for stats in (a, b):
        assert stats.run_rate()[2] == pytest.approx(1.0)  # not 2.0: the other camera's frames share the CPU
    assert total.summary().startswith("processed=20 ") and "cpu_ms_per_frame=0.95" in total.summary()  # 18 ms, 19 frames


def test_one_status_line_shows_every_camera():
    import io

    from edge_ad.multicamera import StatusBoard

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    board = StatusBoard(["left", "right"], 10.0, stream)
    with board, board.view("left") as left, board.view("right") as right:
        left.update("10.0 fps")
        right.update("20.0 fps")
    shown = stream.getvalue().split("\r\x1b[K")
    assert "left: 10.0 fps  ||  right: 20.0 fps" in shown


@pytest.mark.parametrize("arrangement", ["a queue per camera", "one shared queue"])
def test_a_stalled_camera_does_not_starve_the_others(bundle_dir, arrangement):
    """Camera 0's decision thread stops reading: its results queue is full. Camera 1 on the same compiled
    model (whose completion callbacks run on threads both share) must still get every frame; camera 0 gets
    all of its frames, in order, once it reads again."""
    import threading

    import numpy as np

    from edge_ad.model.inference import compile_bundle
    from edge_ad.model.shared_queue import QueueView, SharedInferQueue
    from edge_ad.model.swap import SwappableDetector
    from edge_ad.sources.capture import Frame

    built = compile_bundle(bundle_dir, mode="throughput")
    shared = SharedInferQueue(built.compiled, 2)
    queues = ([SharedInferQueue(built.compiled, 2).view() for _ in range(2)]  # what SharedModels() gives
              if arrangement == "a queue per camera" else [shared.view(), shared.view()])
    stalled, running = (SwappableDetector(bundle_dir, mode="throughput", requests=1, result_queue_size=1,
                                          built=built, infer_queue=queue) for queue in queues)
    frames = 12

    def feed(detector):
        for index in range(frames):
            frame = Frame(index=index, image=np.full((48, 64, 3), 128, np.uint8), timestamp=index / 25)
            assert detector.start(frame, detector.prepare(frame))

    feeder = threading.Thread(target=feed, args=(stalled,), daemon=True)
    feeder.start()
    feeder.join(1.0)  # blocked: its results queue (2 results) is full
    assert feeder.is_alive()
    other = threading.Thread(target=feed, args=(running,), daemon=True)
    other.start()
    got = [running.results.get(timeout=10) for _ in range(frames)]  # before the fix: queue.Empty, starved
    other.join(10)
    assert sorted(r.seq for r in got) == list(range(frames)) and all(r.error is None for r in got)
    late = [stalled.results.get(timeout=10) for _ in range(frames)]
    feeder.join(10)
    assert sorted(r.seq for r in late) == list(range(frames)) and all(r.error is None for r in late)
    stalled.swap(compile_bundle(bundle_dir, mode="throughput"), bundle_dir)  # a deploy: still non-blocking
    assert isinstance(stalled.queue, QueueView) and stalled.queue._results is stalled.results
    feeder = threading.Thread(target=feed, args=(stalled,), daemon=True)
    feeder.start()
    assert sorted(stalled.results.get(timeout=10).seq for _ in range(frames)) == list(range(frames, 2 * frames))
    feeder.join(10)


def test_a_shared_queue_keeps_each_cameras_frames_apart_and_in_order(bundle_dir):
    import threading

    import numpy as np

    from edge_ad.model.inference import compile_bundle
    from edge_ad.model.shared_queue import SharedInferQueue
    from edge_ad.model.swap import SwappableDetector
    from edge_ad.sources.capture import Frame

    built = compile_bundle(bundle_dir, mode="throughput")
    shared = SharedInferQueue(built.compiled, 2)
    levels = (128, 178, 228)  # camera c's frames are flat gray levels[c]: score |level / 255 - 0.5|
    detectors = [SwappableDetector(bundle_dir, mode="throughput", requests=2, built=built, infer_queue=shared.view())
                 for _ in levels]
    frames = 60

    def feed(detector, level):
        for index in range(frames):
            frame = Frame(index=index, image=np.full((48, 64, 3), level, np.uint8), timestamp=index / 25)
            assert detector.start(frame, detector.prepare(frame))

    got = {c: [] for c in range(len(levels))}
    collectors = [threading.Thread(target=lambda c=c: got[c].extend(detectors[c].results.get(timeout=20)
                                                                     for _ in range(frames)))
                  for c in range(len(levels))]
    feeders = [threading.Thread(target=feed, args=(d, level)) for d, level in zip(detectors, levels)]
    for thread in collectors + feeders:
        thread.start()
    for thread in feeders:
        thread.join()
    for detector in detectors:
        detector.drain()  # waits for its own requests only
        assert detector.in_flight == 0
    for thread in collectors:
        thread.join()
    for camera, level in enumerate(levels):
        results = got[camera]
        assert sorted(r.seq for r in results) == list(range(frames))  # complete, each camera its own sequence
        assert sorted(r.frame.index for r in results) == list(range(frames))
        assert all(r.error is None and r.score == pytest.approx(abs(level / 255 - 0.5), abs=0.01) for r in results)
