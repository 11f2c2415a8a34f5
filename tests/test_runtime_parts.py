"""Per-part inspection as a factory runs it: a verdict per part, watched folder, MQTT triggers, teach-in, drift.

Real components only: the OpenVINO test bundle (runtime_helpers.build_bundle: score = max of the smoothed
|x - 0.5| map, threshold 0.15), real mosquitto, `python -m edge_ad` subprocesses.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime_helpers import (Subscriber, bundle_dir, broker, build_bundle, jsonl, make_frame, mosquitto,  # noqa: F401
                             run_cli, start_cli, wait_until, write_video)

from edge_ad.model.bundle import read_bundle, write_bundle

DEFECT = [(60, 50, 40, 30)]


def png(frame: np.ndarray) -> bytes:
    return cv2.imencode(".png", frame)[1].tobytes()


def site_frame(rng: np.random.Generator, level: float, defect: bool = False, size=(96, 128)) -> np.ndarray:
    """A "site" image: brighter than the training gray (level), with sensor noise; optionally a defect."""
    frame = np.clip(rng.normal(level, 12, (*size, 3)), 0, 255).astype(np.uint8)
    if defect:
        frame[30:60, 40:80] = 255
    return frame


def verdicts_of(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("event") == "verdict"]


def test_per_part_gives_one_verdict_per_image_where_the_video_policy_stays_silent(bundle_dir, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    bad = {3, 5, 6}  # one bad part among good ones, then two bad parts back to back
    for i in range(8):
        (folder / f"part{i:02d}.png").write_bytes(png(make_frame(DEFECT if i in bad else ())))
    out = tmp_path / "events.jsonl"
    done = run_cli("--images", folder, "--model", bundle_dir, "--per-part", "--jsonl", out)
    assert done.returncode == 0, done.stderr[-2000:]
    verdicts = verdicts_of(jsonl(out))
    assert [v["part_id"] for v in verdicts] == [f"part{i:02d}.png" for i in range(8)]
    assert [v["verdict"] for v in verdicts] == ["NOK" if i in bad else "OK" for i in range(8)]
    for v in verdicts:
        assert v["trigger"] == "file" and v["latency_ms"] > 0 and v["model"]["algorithm"] == "absdiff"
        assert (v["regions_total"] > 0) == (v["verdict"] == "NOK") and v["raw_score"] is not None
    alerts = jsonl(out, "alert")
    assert [a["policy"]["part_id"] for a in alerts] == [f"part{i:02d}.png" for i in sorted(bad)]
    assert {a["policy"]["verdict_id"] for a in alerts} == {v["event_id"] for v in verdicts if v["verdict"] == "NOK"}
    final = jsonl(out, "heartbeat")[-1]
    assert final["verdicts"] == {"ok": 5, "nok": 3, "error": 0}

    # The same parts under the video policy (3 of the last 5): one alert, at the third bad part, for all three.
    stream = tmp_path / "stream.jsonl"
    assert run_cli("--images", folder, "--model", bundle_dir, "--jsonl", stream).returncode == 0
    assert jsonl(stream, "verdict") == [] and [a["frame_index"] for a in jsonl(stream, "alert")] == [6]


def test_watch_needs_an_existing_folder_and_one_trigger(bundle_dir, tmp_path):
    for args, message in (
        (["--images", tmp_path / "missing", "--watch"], "--watch needs --images to be an existing folder"),
        (["--video", "x.avi", "--watch"], "--watch needs --images DIR"),
        (["--images", tmp_path, "--watch", "--trigger", "stdin"], "two different triggers"),
        (["--images", tmp_path, "--trigger", "mqtt"], "--trigger mqtt needs --mqtt-host"),
        (["--images", tmp_path, "--per-part", "--trigger-queue", "0"], "--trigger-queue must be > 0"),
    ):
        result = run_cli(*args, "--model", bundle_dir)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


class Writer(threading.Thread):
    """The camera software: bursts of files, some written in pieces with pauses (a slow network share)."""

    def __init__(self, folder: Path, plan: list[tuple[str, bool, bool]], defects: set[str]):
        super().__init__(daemon=True)
        self.folder, self.plan, self.defects = folder, plan, defects
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            rng = np.random.default_rng(7)
            for name, pause_before, pieces in self.plan:
                if pause_before:
                    time.sleep(0.8)
                frame = make_frame(DEFECT if name in self.defects else ())
                data = png(frame) if name.endswith(".png") else cv2.imencode(".jpg", frame)[1].tobytes()
                path = self.folder / name
                if pieces:
                    cut = sorted(rng.integers(1, len(data) - 1, 2))
                    with open(path, "wb") as handle:
                        for chunk in (data[: cut[0]], data[cut[0]: cut[1]], data[cut[1]:]):
                            handle.write(chunk)
                            handle.flush()
                            time.sleep(0.15)  # a reader that takes a partial file would fail to decode it
                else:
                    path.write_bytes(data)
        except BaseException as exc:  # noqa: BLE001  reported by the test
            self.error = exc


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_watched_folder_every_part_exactly_one_verdict_across_a_restart(bundle_dir, mosquitto, tmp_path, stop):
    """SIGTERM: exactly one verdict per part. kill -9: none lost; a part inspected again after the crash
    repeats its verdict's event id (derived from the file), so consumers that drop duplicates see one."""
    host, port = mosquitto
    folder = tmp_path / "inbox"
    folder.mkdir()
    names = [f"part{i:04d}.{'jpg' if i % 7 == 3 else 'png'}" for i in range(260)]
    defects = {n for i, n in enumerate(names) if i % 10 == 4}
    # burst of 100, then 60 written in pieces, then a burst of 100; the restart falls in the middle
    plan = [(n, i == 100 or i == 160, 100 <= i < 160) for i, n in enumerate(names)]
    (folder / "old.png.tmp").write_bytes(b"not yet renamed")  # temporary names are ignored
    state = tmp_path / "state"
    env = {"XDG_STATE_HOME": str(state)}
    sub = Subscriber(host, port, "edge-ad/line/+/verdict")
    args = ["--images", folder, "--watch", "--model", bundle_dir, "--mqtt-host", host, "--mqtt-port", port,
            "--device-id", "line", "--camera-id", "st1", "--heartbeat", "1"]
    first = start_cli(*args, env=env)
    writer = Writer(folder, plan, defects)
    try:
        writer.start()
        wait_until(lambda: len(sub.events("verdict")) >= 130, 60, "the first verdicts")
        first.send_signal(stop)
        _, err1 = first.communicate(timeout=30)
        assert first.returncode == (0 if stop == signal.SIGTERM else -signal.SIGKILL), err1[-2000:]
        second = start_cli(*args, env=env)  # while the writer goes on
        try:
            writer.join(60)
            assert writer.error is None and not writer.is_alive()
            wait_until(lambda: len(sub.events("verdict")) >= len(names), 60, "a verdict for every part")
            time.sleep(1.5)  # anything repeated would arrive now
        finally:
            second.send_signal(signal.SIGTERM)
            _, err2 = second.communicate(timeout=30)
        assert second.returncode == 0, err2[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
        sub.close()
    verdicts = sub.events("verdict")
    if stop == signal.SIGKILL:  # at-least-once: keep the first verdict of each event id, as consumers do
        verdicts = list({v["event_id"]: v for v in reversed(verdicts)}.values())
    counts = Counter(v["part_id"] for v in verdicts)
    assert sorted(counts) == sorted(names), set(names) ^ set(counts)
    assert max(counts.values()) == 1, [n for n, c in counts.items() if c > 1]
    assert len({v["event_id"] for v in verdicts}) == len(names)
    assert {v["part_id"] for v in verdicts if v["verdict"] == "NOK"} == defects
    assert all(v["verdict"] in ("OK", "NOK") for v in verdicts), [v for v in verdicts if v["verdict"] == "ERROR"]
    ledger = state / "edge-ad" / "watch-line-st1.done"
    assert sorted(line.split("\t")[0] for line in ledger.read_text().splitlines()) == sorted(names)
    assert "already inspected" in err2


def test_mqtt_trigger_storm_every_trigger_answered_or_counted_as_dropped(bundle_dir, mosquitto, tmp_path):
    import paho.mqtt.client as mqtt

    host, port = mosquitto
    folder = tmp_path / "camera"
    folder.mkdir()
    total = 400
    for i in range(total):
        (folder / f"f{i:04d}.png").write_bytes(png(make_frame(DEFECT if i % 25 == 0 else (), 96, 128)))
    sub = Subscriber(host, port, "edge-ad/line/st2/#")
    proc = start_cli("--images", folder, "--trigger", "mqtt", "--trigger-queue", "2", "--model", bundle_dir,
                     "--mqtt-host", host, "--mqtt-port", port, "--device-id", "line", "--camera-id", "st2",
                     "--heartbeat", "1")
    try:
        wait_until(lambda: any(p.get("event") == "heartbeat" for p in sub.events()), 60, "edge-ad running")
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="plc")
        client.connect(host, port)
        client.loop_start()
        infos = [client.publish("edge-ad/line/st2/trigger", json.dumps({"part_id": f"P{i:04d}"}), qos=1)
                 for i in range(total)]  # as fast as the client can: far faster than the model answers
        for info in infos:
            info.wait_for_publish(10)
        client.loop_stop()
        client.disconnect()
        wait_until(lambda: len(sub.events("verdict")) >= total, 60, "an answer for every trigger")
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        sub.close()
    assert proc.returncode == 0, err[-2000:]
    verdicts = sub.events("verdict")
    counts = Counter(v["part_id"] for v in verdicts)
    assert sorted(counts) == [f"P{i:04d}" for i in range(total)] and max(counts.values()) == 1
    dropped = [v for v in verdicts if v["verdict"] == "ERROR"]
    inspected = [v for v in verdicts if v["verdict"] in ("OK", "NOK")]
    assert dropped and inspected, "a storm this size must both be served and overflow a queue of 2"
    assert all(v["error"].startswith("dropped") and v["trigger"] == "mqtt" for v in dropped)
    assert all(v["trigger"] == "mqtt" and v["latency_ms"] > 0 for v in inspected)
    # triggered frames are taken in order: the k-th inspected trigger got the k-th image
    assert [v["frame_index"] for v in sorted(inspected, key=lambda v: v["part_id"])] == list(range(len(inspected)))
    final = [h for h in sub.events("heartbeat") if h.get("final")][-1]
    assert final["triggers_dropped"] == len(dropped)
    assert final["verdicts"]["error"] == len(dropped) and final["verdicts"]["ok"] + final["verdicts"]["nok"] == len(inspected)
    assert "dropped so far" in err


def with_validation_figures(folder: Path, p50: float, p95: float) -> Path:
    bundle = read_bundle(folder)
    bundle.thresholds.fit = {"method": "test", "n": 100, "p50": p50, "p95": p95}
    write_bundle(folder, bundle)
    return folder


@pytest.mark.parametrize("level,drifting", [(128, False), (150, True)])
def test_drift_watch_reports_scores_moving_towards_the_threshold(tmp_path, level, drifting):
    folder = with_validation_figures(build_bundle(tmp_path / "bundle"), p50=0.004, p95=0.008)
    video = write_video(tmp_path / "line.avi", [np.full((96, 128, 3), level, np.uint8)] * 120)
    out = tmp_path / "events.jsonl"
    done = run_cli("--video", video, "--model", folder, "--jsonl", out, "--heartbeat", "0.5")
    assert done.returncode == 0, done.stderr[-2000:]
    drift = jsonl(out, "heartbeat")[-1]["score_drift"]
    assert drift["state"] == ("drifting" if drifting else "ok") and drift["n"] == 120
    assert drift["validation_p50"] == 0.004 and (drift["drift"] > 0.5) == drifting
    degraded = [s for s in jsonl(out, "status") if s["state"] == "degraded"]
    assert bool(degraded) == drifting
    if drifting:
        assert degraded[0]["reason"].startswith("scores drifting") and "edge-ad teach" in degraded[0]["reason"]


def test_teach_in_on_site_frames_removes_false_nok_and_is_reversible(tmp_path):
    folder = build_bundle(tmp_path / "bundle")
    original = (folder / "bundle.json").read_bytes()
    rng = np.random.default_rng(3)
    teach_dir, test_dir = tmp_path / "teach", tmp_path / "test"
    teach_dir.mkdir()
    test_dir.mkdir()
    for i in range(80):
        (teach_dir / f"n{i:03d}.png").write_bytes(png(site_frame(rng, rng.uniform(157, 163))))
    bad = {f"t{i:02d}.png" for i in (2, 9, 15)}
    for i in range(20):
        name = f"t{i:02d}.png"
        (test_dir / name).write_bytes(png(site_frame(rng, rng.uniform(157, 163), defect=name in bad)))

    def nok(tag: str) -> set[str]:
        out = tmp_path / f"{tag}.jsonl"
        done = run_cli("--images", test_dir, "--model", folder, "--per-part", "--jsonl", out)
        assert done.returncode == 0, done.stderr[-2000:]
        verdicts = verdicts_of(jsonl(out))
        assert len(verdicts) == 20
        return {v["part_id"] for v in verdicts if v["verdict"] == "NOK"}

    before = nok("before")
    assert bad <= before and len(before - bad) >= 5, "the site is brighter than training: false NOKs expected"

    too_few = run_cli("teach", "--images", test_dir, "--model", folder, "--frames", "200")
    assert too_few.returncode == 2 and "needs at least 30 frames" in too_few.stderr
    assert "Traceback" not in too_few.stderr and (folder / "bundle.json").read_bytes() == original

    taught = run_cli("teach", "--images", teach_dir, "--model", folder, "--frames", "80")
    assert taught.returncode == 0, taught.stderr[-2000:]
    assert "image threshold 0.15 ->" in taught.stdout and "bundle.json.v1" in taught.stdout
    bundle = read_bundle(folder)  # checksums still valid
    assert bundle.thresholds.image > 0.15 and bundle.thresholds.source.startswith("teach-in: images")
    assert bundle.thresholds.fit["n"] == 80 and bundle.thresholds.fit["p50"] is not None
    assert bundle.calibration["teach"]["previous_version"] == "bundle.json.v1"
    assert bundle.calibration["teach"]["flagged_by_previous"] >= 8  # the old threshold flagged normal parts
    assert (folder / "bundle.json.v1").read_bytes() == original
    assert nok("after") == bad  # the false NOKs are gone, every defect still found

    # frames unlike the ones taught (the training gray): taught anyway on request, but with a warning
    gray_dir = tmp_path / "gray"
    gray_dir.mkdir()
    for i in range(40):
        (gray_dir / f"g{i:02d}.png").write_bytes(png(site_frame(rng, 128)))
    dry = run_cli("teach", "--images", gray_dir, "--model", folder, "--frames", "40", "--dry-run")
    assert dry.returncode == 0 and "unlike the bundle's validation images" in dry.stderr
    assert "dry run" in dry.stdout and not (folder / "bundle.json.v2").exists()

    reverted = run_cli("teach", "--model", folder, "--revert")
    assert reverted.returncode == 0, reverted.stderr
    assert (folder / "bundle.json").read_bytes() == original and not (folder / "bundle.json.v1").exists()
    again = run_cli("teach", "--model", folder, "--revert")
    assert again.returncode == 2 and "nothing to revert" in again.stderr


def test_stdin_trigger_one_verdict_per_line_in_order(bundle_dir, tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    for i in range(6):
        (folder / f"f{i}.png").write_bytes(png(make_frame(DEFECT if i == 1 else ())))
    out = tmp_path / "events.jsonl"
    done = run_cli("--images", folder, "--trigger", "stdin", "--model", bundle_dir, "--jsonl", out,
                   input='A-1\n{"part_id": "A-2"}\n\n')
    assert done.returncode == 0, done.stderr[-2000:]
    verdicts = verdicts_of(jsonl(out))
    assert [(v["part_id"], v["verdict"], v["frame_index"], v["trigger"]) for v in verdicts] == [
        ("A-1", "OK", 0, "stdin"), ("A-2", "NOK", 1, "stdin"), ("trigger-3", "OK", 2, "stdin")]


def test_trigger_payloads_and_drift_hysteresis():
    from edge_ad.decide.drift import DriftReference, DriftWatch
    from edge_ad.model.bundle import Thresholds
    from edge_ad.sources.trigger import parse_part_id

    assert parse_part_id(b"") is None and parse_part_id(b"  P-7 \n") == "P-7"
    assert parse_part_id(b'{"part_id": 4711}') == "4711" and parse_part_id(b"{}") is None
    assert parse_part_id("x\x00y" * 100) == ("xy" * 64)  # printable only, at most 128 characters

    thresholds = Thresholds(image=1.0, pixel=1.0, image_min=0.0, image_max=2.0, pixel_min=0.0, pixel_max=2.0)
    assert DriftReference.from_thresholds(thresholds) is None  # no validation figures: drift watch unavailable
    thresholds.fit = {"p50": 0.2, "p95": 0.3}
    changes = []
    watch = DriftWatch(DriftReference.from_thresholds(thresholds), bound=0.5, window=50, min_samples=50,
                       on_change=changes.append)
    for _ in range(50):
        watch.add(0.25)  # 0.05 / 0.8 of the margin: fine
    assert changes == [] and watch.fields()["score_drift"]["state"] == "ok"
    for _ in range(50):
        watch.add(0.65)  # p50 moved 0.45 / 0.8 = 0.56 of the margin
    assert len(changes) == 1 and changes[0].startswith("scores drifting")
    for _ in range(50):
        watch.add(0.54)  # 0.425 > 0.8 x bound: still drifting (hysteresis)
    assert len(changes) == 1 and watch.drifting
    for _ in range(50):
        watch.add(0.3)
    assert changes[-1] is None and not watch.drifting
