"""Frame sources: image folders (corrupt files skipped and counted), video files, cameras with retries."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest
from runtime_helpers import make_frame, write_video

from edge_ad.errors import SourceError
from edge_ad.sources.capture import Backoff, CaptureSource, ImageFolderSource, open_source


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), make_frame())
    cv2.imwrite(str(folder / "b.jpg"), make_frame(((10, 10, 20, 20),), height=100, width=80))
    cv2.imwrite(str(folder / "c.png"), make_frame(channels=1))  # grayscale
    (folder / "d.png").write_bytes(b"\x89PNG garbage")  # corrupt
    (folder / "e.jpg").write_bytes(b"")  # empty
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_image_folder_skips_and_counts_unreadable(image_folder, caplog):
    source = ImageFolderSource(str(image_folder))
    source.open()
    frames = list(source)
    assert [f.name for f in frames] == ["a.png", "b.jpg", "c.png"]
    assert [f.index for f in frames] == [0, 1, 2]
    assert frames[1].image.shape == (100, 80, 3) and frames[2].image.ndim == 2
    assert source.skipped == 2
    assert sum("skipping unreadable image" in r.message for r in caplog.records) == 2


def test_image_glob(image_folder):
    source = ImageFolderSource(str(image_folder / "*.png"))
    source.open()
    assert [f.name for f in source] == ["a.png", "c.png"]


def test_image_folder_errors(tmp_path):
    with pytest.raises(SourceError, match="not found") as info:
        ImageFolderSource(str(tmp_path / "nope")).open()
    assert info.value.exit_code == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images"):
        ImageFolderSource(str(tmp_path / "empty")).open()


def test_video_file_all_frames_with_media_timestamps(tmp_path):
    path = write_video(tmp_path / "v.avi", [make_frame(((8 * i, 8, 8, 8),)) for i in range(12)], fps=20)
    source = open_source(video=str(path))
    assert not source.live and source.default_id == "v"
    source.open()
    frames = list(source)
    assert [f.index for f in frames] == list(range(12))
    assert [f.timestamp for f in frames] == pytest.approx([i / 20 for i in range(12)])
    assert frames[0].image.shape == (192, 256, 3)


def test_video_realtime_is_paced_and_live(tmp_path):
    path = write_video(tmp_path / "v.avi", [make_frame() for _ in range(6)], fps=20)
    source = open_source(video=str(path), realtime=True)
    assert source.live
    source.open()
    start = time.monotonic()
    assert len(list(source)) == 6
    assert time.monotonic() - start >= 5 / 20 * 0.9


def test_video_file_errors(tmp_path):
    with pytest.raises(SourceError, match="video file not found"):
        open_source(video=str(tmp_path / "missing.avi")).open()
    (tmp_path / "bad.avi").write_bytes(b"garbage" * 100)
    with pytest.raises(SourceError, match="cannot read video file") as info:
        open_source(video=str(tmp_path / "bad.avi")).open()
    assert info.value.exit_code == 2


def test_missing_camera_retries_with_backoff_then_one_clear_error():
    states = []
    source = CaptureSource(99, kind="camera", backoff=Backoff(retries=2, initial=0.05, maximum=0.1),
                           on_state=lambda state, reason: states.append((state, reason)))
    start = time.monotonic()
    with pytest.raises(SourceError) as info:
        source.open()
    assert time.monotonic() - start >= 0.075  # (0.05 + 0.1) x jitter 0.5..1
    message = str(info.value)
    assert "camera 99" in message and "gave up after 3 attempts" in message and "\n" not in message
    assert info.value.exit_code == 1  # the camera may come later (USB, boot order): systemd restarts on 1
    assert states and states[0][0] == "degraded" and "camera 99" in states[0][1]
    assert source.live and source.default_id == "cam99"


def test_stop_interrupts_backoff():
    stop = threading.Event()
    source = CaptureSource(99, kind="camera", backoff=Backoff(retries=5, initial=10, maximum=10), stop=stop)
    threading.Timer(0.2, stop.set).start()
    start = time.monotonic()
    assert list(source) == []  # stopped while waiting to retry: no error, no frames
    assert time.monotonic() - start < 5


def test_stream_reconnects_after_it_stops(tmp_path):
    """A 'stream' that ends is reopened (here: the same file again) and frame indices continue."""
    path = write_video(tmp_path / "s.avi", [make_frame() for _ in range(3)])
    states = []
    source = CaptureSource(str(path), kind="stream", backoff=Backoff(retries=1, initial=0.01),
                           on_state=lambda s, r: states.append(s))
    source.open()
    frames = []
    for frame in source:
        frames.append(frame.index)
        if len(frames) == 7:
            break
    assert frames == list(range(7))


def test_backoff_schedule():
    """One schedule for cameras, streams and the broker: doubling up to the maximum, times a random 0.5..1
    (a plant of devices must not retry in lock-step)."""
    for _ in range(100):
        delays = list(Backoff(retries=5, initial=1, maximum=5).delays())
        assert len(delays) == 5 and all(0.5 * b <= d <= b for d, b in zip(delays, [1, 2, 4, 5, 5]))
    spread = [Backoff(initial=1, maximum=30).delay(attempt) for attempt in (4,) * 200]
    assert max(spread) - min(spread) > 0.25 * 16  # really spread, not a constant
    assert list(Backoff(retries=0).delays()) == []
    assert Backoff(initial=1, maximum=30).delay(10**6) <= 30.0  # no overflow after a very long outage


def test_frames_of_any_shape_reach_the_model_input():
    from edge_ad.model.preprocess import PreprocessSpec, preprocess

    spec = PreprocessSpec.square(64)
    for frame in (np.zeros((480, 640, 3), np.uint8), np.zeros((31, 17), np.uint8), np.zeros((50, 70, 1), np.uint8)):
        assert preprocess(frame, spec).shape == (3, 64, 64)


def test_unreachable_stream_is_a_clear_error():
    source = open_source(video="rtsp://127.0.0.1:1/line3", backoff=Backoff(retries=0))
    assert source.live and source.default_id == "127.0.0.1_1"
    with pytest.raises(SourceError, match=r"stream rtsp://127.0.0.1:1/line3: cannot open .*gave up after 1 attempt\)"):
        source.open()


def test_stream_credentials_are_not_logged():
    source = open_source(video="rtsp://admin:s3cret@10.0.0.7:554/stream1")
    assert "s3cret" not in source.description and "admin:***@10.0.0.7:554" in source.description
    assert source.default_id == "10.0.0.7_554"
