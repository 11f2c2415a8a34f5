"""The `edge-ad` command as operators run it: every bad input is one clear line and an exit code."""

from __future__ import annotations

import json
import shutil
import sys

import cv2
import pytest
from runtime_helpers import bundle_dir, free_port, make_frame, run_cli  # noqa: F401  (fixture)

from edge_ad.ops.cli import main


def one_line_error(proc, *fragments):
    """The last stderr line is `edge-ad: error: ...` naming the problem; no traceback anywhere."""
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edge-ad: error:")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from runtime_helpers import write_video

    folder = tmp_path_factory.mktemp("video")
    return write_video(folder / "v.avi", [make_frame() for _ in range(5)])


def test_no_torch_in_the_runtime():
    code = ("import edge_ad.ops.cli, edge_ad.app, edge_ad.model.inference, edge_ad.pipeline, edge_ad.sources.capture, edge_ad.decide.regions, "
            "edge_ad.decide.policy, edge_ad.decide.scoring, edge_ad.deliver.mqtt_sink, edge_ad.deliver.jsonl_sink, edge_ad.deliver.snapshots, "
            "edge_ad.ops.bench, edge_ad.ops.listen, edge_ad.ops.config; import sys; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_help_is_grouped(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for group in ("frame source", "model", "decision", "alert policy", "identity and outputs", "MQTT broker",
                  "edge-ad bench", "edge-ad listen", "EDGE_AD_MQTT_PASSWORD"):
        assert group in out
    assert "--mqtt-password " not in out
    assert main(["bench", "--help"]) == 0 and "--seconds" in capsys.readouterr().out
    assert main(["listen", "--help"]) == 0 and "--count" in capsys.readouterr().out


def test_no_arguments_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: edge-ad" in capsys.readouterr().err


def test_no_such_camera(bundle_dir):
    proc = run_cli("--camera", "99", "--model", bundle_dir, "--source-retries", "1", "--retry-delay", "0.05")
    assert proc.returncode == 1  # retryable: the camera may be plugged in later (systemd restarts on 1)
    one_line_error(proc, "camera 99", "gave up after 2 attempts")


def test_missing_bundle(tmp_path, video, capsys):
    assert main(["--video", str(video), "--model", str(tmp_path / "nope")]) == 2
    assert "bundle folder not found" in capsys.readouterr().err


def test_corrupt_bundle_checksum(bundle_dir, video, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    data = bytearray((broken / "model.bin").read_bytes())
    data[0] ^= 0xFF
    (broken / "model.bin").write_bytes(bytes(data))
    proc = run_cli("--video", video, "--model", broken)
    assert proc.returncode == 2
    one_line_error(proc, "checksum mismatch", "model.bin")


def test_unknown_schema(bundle_dir, video, tmp_path, capsys):
    future = tmp_path / "future"
    shutil.copytree(bundle_dir, future)
    meta = json.loads((future / "bundle.json").read_text())
    meta["schema_version"] = 99
    (future / "bundle.json").write_text(json.dumps(meta))
    assert main(["--video", str(video), "--model", str(future)]) == 2
    assert "schema version 99 is not supported" in capsys.readouterr().err


def test_unreachable_broker_names_host_and_port(bundle_dir, video):
    port = free_port()  # nothing listens there
    proc = run_cli("--video", video, "--model", bundle_dir, "--mqtt-host", "127.0.0.1", "--mqtt-port", port,
                   "--mqtt-retries", "1", "--mqtt-retry-delay", "0.05", timeout=30)
    assert proc.returncode == 1
    one_line_error(proc, f"cannot reach MQTT broker at 127.0.0.1:{port}", "gave up after 2 attempts")


def test_bad_config_file(bundle_dir, video, tmp_path, capsys):
    config = tmp_path / "edge.yaml"
    config.write_text("alert_n: [1\n")
    assert main(["--config", str(config), "--video", str(video), "--model", str(bundle_dir)]) == 2
    assert "invalid YAML" in capsys.readouterr().err


@pytest.mark.parametrize("args,fragment", [
    (["--video", "x.avi", "--model", "b", "--bogus"], "unrecognized arguments: --bogus"),
    (["--video", "x.avi", "--model", "b", "--mqtt-password", "hunter2"], "not accepted on the command line"),
    (["--video", "x.avi", "--model", "b", "--alert-n", "three"], "invalid int value"),
    (["--video", "x.avi", "--model", "b", "--mode", "fast"], "invalid choice"),
    (["bench"], "required: --model"),
    (["listen"], "needs --mqtt-host"),
    (["listen", "--mqtt-host", "h", "--events", "alerts"], "unknown alerts"),
])
def test_usage_errors(args, fragment, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and "hunter2" not in err[0]


def test_missing_video_file(bundle_dir, tmp_path, capsys):
    assert main(["--video", str(tmp_path / "missing.avi"), "--model", str(bundle_dir)]) == 2
    assert "video file not found" in capsys.readouterr().err


def test_image_folder_run_skips_corrupt_images_and_alerts(bundle_dir, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    box = (40, 40, 48, 32)
    for i in range(12):
        frame = make_frame([box] if 4 <= i < 7 else [], height=120 + (i % 2) * 8, width=160)
        cv2.imwrite(str(folder / f"{i:03d}.png"), frame if i % 3 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
    (folder / "005b.png").write_bytes(b"corrupt")
    out = tmp_path / "events.jsonl"
    proc = run_cli("--images", folder, "--model", bundle_dir, "--jsonl", out, "--alert-n", "2", "--alert-m", "3",
                   "--cooldown", "0", "--mode", "throughput", "--requests", "3", "--device-id", "pc1")
    assert proc.returncode == 0, proc.stderr
    assert "skipping unreadable image" in proc.stderr and "005b.png" in proc.stderr
    events = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "status" and events[0]["state"] == "online"
    assert events[-1]["event"] == "status" and events[-1]["state"] == "offline"
    alerts = [e for e in events if e["event"] == "alert"]
    assert [a["frame_index"] for a in alerts] == [5]  # file 005.png; 005b.png is index 6 and skipped
    assert alerts[0]["camera"] == "imgs" and alerts[0]["device"] == "pc1" and alerts[0]["source"] == "005.png"
    (region,) = alerts[0]["regions"]
    assert alerts[0]["regions_total"] == 1
    # Regions come from the model-size map (64 px) scaled to the 160x128 frame: edges are exact to one model
    # pixel (2.5 x 2 frame pixels), plus one for rounding.
    got = (region["x"], region["y"], region["x"] + region["w"], region["y"] + region["h"])
    want = (box[0], box[1], box[0] + box[2], box[1] + box[3])
    assert all(abs(g - w) <= tol for g, w, tol in zip(got, want, (3.5, 3, 3.5, 3))), (got, want)
    heartbeat = [e for e in events if e["event"] == "heartbeat"][-1]
    assert heartbeat["skipped"] == 1 and heartbeat["processed"] == 12 and heartbeat["dropped"] == 0
    assert heartbeat["final"] is True and heartbeat["elapsed_s"] > 0 and heartbeat["fps_avg"] > 0
    assert "run summary: processed=12 elapsed_s=" in proc.stderr and "skipped=1" in proc.stderr


def test_stdout_jsonl_is_default_without_broker(bundle_dir, video):
    proc = run_cli("--video", video, "--model", bundle_dir, "--max-frames", "3", "--log-level", "warning")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["event"] for e in events] == ["status", "heartbeat", "status"]
    assert events[1]["processed"] == 3


def test_bench_command(bundle_dir):
    proc = run_cli("bench", "--model", bundle_dir, "--seconds", "0.4", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["latency_ms"]["median"] > 0 and result["latency_ms"]["p99"] >= result["latency_ms"]["median"]
    assert result["throughput_fps"] > 0 and result["device"] == "CPU"
    proc = run_cli("bench", "--model", bundle_dir, "--seconds", "0.2", "--mode", "throughput")
    assert proc.returncode == 0 and "median" in proc.stdout and "fps" in proc.stdout


def test_log_handler_follows_a_replaced_stderr(monkeypatch):
    """A handler bound to a stderr that was since closed (a test harness, a service wrapper) must not
    print 'Logging error' tracebacks into whatever stderr is now."""
    import io
    import logging
    import sys

    from edge_ad.ops.statusline import setup_logging

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging("info")  # conftest removes the handler afterwards
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("edge_ad.test").warning("skipped %d of %d files", 1, 13)
    assert second.getvalue() == "edge-ad: warning: skipped 1 of 13 files\n"
