"""Nothing crashes on bad input: any frame is a model input or a counted skip, any config value is a valid
config or one ConfigError line, unreadable files are skipped, and a camera that goes away and comes back
is picked up again without a restart."""

from __future__ import annotations

import json
import signal
import threading
import uuid
from pathlib import Path

import cv2
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prerequisites import missing
from runtime_helpers import (  # noqa: F401  (fixtures)
    MOSQUITTO, Broker, Subscriber, bundle_dir, jsonl, make_frame, start_cli, wait_until, write_video,
)

from edge_ad.ops.config import FIELD_NAMES, RunConfig, build_config
from edge_ad.errors import ConfigError
from edge_ad.deliver.events import Topics
from edge_ad.model.inference import Detector
from edge_ad.pipeline import Pipeline
from edge_ad.decide.policy import AlertPolicy, Cooldown
from edge_ad.model.preprocess import FrameError, PreprocessSpec, preprocess
from edge_ad.decide.scoring import Scorer
from edge_ad.deliver.sinks import Sinks
from edge_ad.deliver.jsonl_sink import JsonlSink
from edge_ad.deliver.snapshots import SnapshotWriter
from edge_ad.sources.capture import Backoff, CaptureSource, Frame, FrameSource, ImageFolderSource
from edge_ad.ops.stats import RuntimeStats

DTYPES = [np.uint8, np.uint16, np.int8, np.int16, np.int32, np.int64, np.uint32, np.float16, np.float32, np.float64,
          np.bool_, np.complex64]
SHAPES = st.one_of(
    st.tuples(st.integers(0, 40), st.integers(0, 40)),
    st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(0, 6)),
    st.lists(st.integers(0, 5), max_size=5).map(tuple),  # any rank, 0-d included
)
VIEWS = {"plain": lambda a: a, "reversed": lambda a: a[::-1] if a.ndim else a, "strided": lambda a: a[:, ::2] if a.ndim > 1 else a,
         "transposed": lambda a: a.T, "fortran": np.asfortranarray,
         "broadcast": lambda a: np.broadcast_to(a, (2, *a.shape))[0]}


@st.composite
def frames(draw):
    """Arrays of any dtype, shape, values (NaN, inf, extremes) and memory layout, and a few non-arrays."""
    if draw(st.integers(0, 20)) == 0:
        return draw(st.sampled_from([None, [], [[1, 2], [3, 4]], "frame", 3.5, b"\x00\x01"]))
    array = draw(hnp.arrays(st.sampled_from(DTYPES), SHAPES))
    return VIEWS[draw(st.sampled_from(sorted(VIEWS)))](array)


@settings(max_examples=300, deadline=None)
@given(frames(), st.sampled_from(["RGB", "BGR"]), st.integers(2, 80), st.integers(2, 80))
def test_any_frame_is_a_model_input_or_a_frame_error(frame, color, height, width):
    spec = PreprocessSpec(height=height, width=width, color=color)
    try:
        tensor = preprocess(frame, spec)
    except FrameError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert tensor.shape == (3, height, width) and tensor.dtype == np.float32 and tensor.flags.c_contiguous
    assert np.all(np.isfinite(tensor)) and tensor.min() >= 0.0 and tensor.max() <= 1.0


@pytest.fixture(scope="module")
def detector(bundle_dir):
    return Detector(bundle_dir, requests=2)


DEFECT, NORMAL = object(), object()  # stand-ins for good frames among the random ones


class ListSource(FrameSource):
    """Frames straight from memory: what a camera driver with a bad day might deliver."""

    live = False
    default_id = "mem"
    description = "memory"

    def __init__(self, images):
        self.images = images

    def __iter__(self):
        for index, image in enumerate(self.images):
            yield Frame(index=index, image=image, timestamp=index / 25)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(st.lists(st.one_of(frames(), st.just(DEFECT), st.just(NORMAL)), min_size=1, max_size=8))
def test_the_pipeline_skips_bad_frames_counts_them_and_goes_on(detector, tmp_path, items):
    """Through submit, inference, decisions, alert payloads and heatmap snapshots: never an exception."""
    images = [make_frame([(10, 10, 40, 30)]) if i is DEFECT else make_frame() if i is NORMAL else i for i in items]
    out = tmp_path / f"{uuid.uuid4().hex}.jsonl"
    sink = JsonlSink(str(out))
    bundle = detector.bundle
    stats = RuntimeStats()
    pipeline = Pipeline(detector=detector, source=ListSource(images), scorer=Scorer(bundle.thresholds),
                        policy=AlertPolicy(1, 1, Cooldown(frames=0), 1), sinks=Sinks([sink]),
                        topics=Topics("edge-ad", "prop", "mem"), model={}, stop=threading.Event(), stats=stats,
                        snapshots=SnapshotWriter(tmp_path / "snaps"), heartbeat=60)
    failed_before = detector.failed
    pipeline.run()
    sink.close()
    skipped = detector.failed - failed_before
    assert stats.errors == 0 and stats.processed + skipped == len(images)
    expected_skips = 0
    for image in images:
        try:
            preprocess(image, bundle.preprocess)
        except FrameError:
            expected_skips += 1
    assert skipped == expected_skips
    events = [json.loads(line) for line in out.read_text().splitlines()]
    alerts = [e for e in events if e["event"] == "alert"]
    assert all(Path(a["snapshot"]).is_file() for a in alerts)
    assert events[-1]["event"] == "heartbeat" and events[-1]["skipped"] >= skipped


# -- configuration ---------------------------------------------------------------------------------------

VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    | st.sampled_from(["10s", "30f", "-1", "1e400", "nan", "3.1.1", "5", "/nonexistent", "", " ", "a/b", "#"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)
KEYS = st.sampled_from(FIELD_NAMES + ("bogus", "mqtt_password", "alert", "mqtt", "outbox-max", "MQTT_HOST"))
BASE = {"video": "v.avi", "model": "bundle"}


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_any_option_values_give_a_config_or_one_config_error(values):
    try:
        config = build_config({**BASE, **values})
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message
        return
    assert isinstance(config, RunConfig)
    for name in ("heartbeat", "retry_delay", "retry_max_delay", "mqtt_retry_delay", "image_threshold"):
        assert np.isfinite(getattr(config, name))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.one_of(KEYS, st.text(max_size=10)), VALUES, max_size=6), st.sampled_from([".json", ".yaml"]))
def test_any_config_file_gives_a_config_or_one_config_error(tmp_path, values, suffix):
    path = tmp_path / f"edge{suffix}"
    text = json.dumps(values) if suffix == ".json" else yaml.safe_dump(values, allow_unicode=True)
    path.write_text(text, encoding="utf-8")
    try:
        build_config({}, path) if values.keys() & {"video", "camera", "images"} else \
            build_config(dict(BASE), path)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)


@pytest.mark.parametrize("text", ["a = 1" + "0" * 5000 + "\n", "x: !!python/object/apply:os.system ['true']\n",
                                  "\xff\xfe garbage", "[mqtt]\n[mqtt]\n", "alert:\n  n:\n    deep: 1\n"])
def test_hostile_config_files(tmp_path, text):
    for suffix in (".toml", ".yaml", ".json"):
        path = tmp_path / f"edge{suffix}"
        path.write_bytes(text.encode("latin-1", errors="replace") if "\xff" in text else text.encode())
        with pytest.raises(ConfigError):
            build_config(dict(BASE), path)


# -- sources --------------------------------------------------------------------------------------------

def test_a_camera_that_disappears_and_comes_back_is_picked_up_again(tmp_path):
    """Deterministic: the "camera" (a stream source on a file) is unplugged after frame 2 and plugged
    back in by the state callback after three failed reconnection attempts."""
    path = write_video(tmp_path / "cam.avi", [make_frame() for _ in range(5)])
    away = tmp_path / "unplugged.avi"
    states = []

    def on_state(state, reason):
        states.append((state, reason))
        if state == "degraded" and sum(s == "degraded" for s, _ in states) == 3:
            away.rename(path)

    source = CaptureSource(f"file://{path}", kind="stream", backoff=Backoff(retries=5, initial=0.01, maximum=0.02),
                           on_state=on_state)
    source.open()
    indices = []
    for frame in source:
        indices.append(frame.index)
        if frame.index == 2:
            path.rename(away)  # the open capture still plays out what it has
        if len(indices) == 12:
            break
    source.close()
    assert indices == list(range(12))  # frames keep flowing, numbering continues
    assert [s for s, _ in states] == ["degraded", "degraded", "degraded", "online"]
    assert "cannot open" in states[0][1]


def png_bomb() -> bytes:
    """A valid PNG header claiming 50000x50000 pixels: OpenCV refuses it with an exception."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 50000, 50000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))


def test_image_folder_with_hostile_files_goes_on(tmp_path, monkeypatch):
    import edge_ad.sources.images

    folder = tmp_path / "inbox"
    folder.mkdir()
    good = make_frame([(10, 10, 20, 20)])
    cv2.imwrite(str(folder / "00-good.png"), good)
    cv2.imwrite(str(folder / "01-16bit.png"), (good.astype(np.uint16) * 257))
    cv2.imwrite(str(folder / "02-rgba.png"), cv2.cvtColor(good, cv2.COLOR_BGR2BGRA))
    jpeg = cv2.imencode(".jpg", good)[1].tobytes()
    (folder / "03-truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "04-empty.png").write_bytes(b"")
    (folder / "05-text.png").write_text("not an image")
    (folder / "06-dir.png").mkdir()  # a folder with an image name
    cv2.imwrite(str(folder / "07-vanishes.png"), good)
    cv2.imwrite(str(folder / "08-good.bmp"), good)
    (folder / "09-link.png").symlink_to(folder / "nowhere.png")  # dangling
    (folder / "10-bomb.png").write_bytes(png_bomb())
    cv2.imwrite(str(folder / "11-locked.png"), good)
    real_fromfile = np.fromfile

    def fromfile(path, *args, **kwargs):  # the tests run as root: simulate a file we may not read
        if str(path).endswith("11-locked.png"):
            raise PermissionError(13, "Permission denied")
        return real_fromfile(path, *args, **kwargs)

    monkeypatch.setattr(edge_ad.sources.images.np, "fromfile", fromfile)
    cv2.imwrite(str(folder / "12-good.png"), good)
    source = ImageFolderSource(str(folder))
    source.open()
    names = []
    for frame in source:
        names.append(frame.name)
        if frame.name == "02-rgba.png":
            (folder / "07-vanishes.png").unlink()  # removed between listing and reading
        assert frame.image.dtype == np.uint8 and preprocess(frame.image, PreprocessSpec.square(32)).shape == (3, 32, 32)
    assert names[:3] == ["00-good.png", "01-16bit.png", "02-rgba.png"] and names[-2:] == ["08-good.bmp", "12-good.png"]
    assert "10-bomb.png" not in names and "11-locked.png" not in names
    assert "07-vanishes.png" not in names and "06-dir.png" not in names
    assert source.skipped == len(source.paths) - len(names) >= 3


def test_a_stream_that_vanishes_mid_run_is_degraded_then_online_again_over_mqtt(tmp_path, bundle_dir):
    """The CLI on a `file://` stream: the file disappears, status goes degraded (on the broker and in
    heartbeats), the file returns, frames flow again; no restart."""
    if MOSQUITTO is None:
        missing("mosquitto", "mosquitto not installed")
    broker = Broker(tmp_path)
    broker.start()
    path = write_video(tmp_path / "cam.avi", [make_frame() for _ in range(10)])
    sub = Subscriber(broker.host, broker.port, "edge-ad/flaky/#")
    proc = start_cli("--video", f"file://{path}", "--model", bundle_dir, "--mqtt-host", broker.host, "--mqtt-port",
                     broker.port, "--device-id", "flaky", "--camera-id", "cam", "--retry-delay", 0.1,
                     "--retry-max-delay", 0.3, "--source-retries", 1000, "--heartbeat", 0.3,
                     "--jsonl", tmp_path / "events.jsonl")
    try:
        sub.wait_for(lambda m: any(p.get("event") == "heartbeat" and p["processed"] > 0 for _, p in m),
                     timeout=40, what="frames flowing")
        path.rename(tmp_path / "gone.avi")
        sub.wait_for(lambda m: any(p.get("state") == "degraded" for _, p in m), what="degraded status")
        wait_until(lambda: any(b["state"] == "degraded" for b in jsonl(tmp_path / "events.jsonl", "heartbeat")),
                   what="a degraded heartbeat")
        degraded_at = max(p["processed"] for p in sub.events("heartbeat"))
        (tmp_path / "gone.avi").rename(path)
        sub.wait_for(lambda m: [p.get("state") for _, p in m if p.get("event") == "status"][-1:] == ["online"]
                     and max(p["processed"] for p in sub.events("heartbeat")) > degraded_at + 20,
                     what="online again with frames")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        sub.wait_for(lambda m: any(p.get("state") == "offline" for _, p in m), what="offline")
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
        broker.stop()
    assert proc.returncode == 0, err
    states = [p["state"] for p in sub.events("status")]
    assert states[0] == "online" and "degraded" in states and states[-1] == "offline"
    assert states[states.index("degraded") + 1] == "online"
    reason = next(p for p in sub.events("status") if p["state"] == "degraded")["reason"]
    assert f"file://{path}" in reason and "cannot open" in reason
    beats = jsonl(tmp_path / "events.jsonl", "heartbeat")
    assert any(b["state"] == "degraded" for b in beats) and beats[-1]["state"] == "online"
    assert "Traceback" not in err
