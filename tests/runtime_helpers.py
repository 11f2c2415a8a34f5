"""Test helpers for the edge_ad runtime: a real (tiny) OpenVINO bundle, synthetic frames, a real broker.

No training: the model is built with OpenVINO's opset API. It computes
anomaly_map = avg_pool3x3(mean_c |x - 0.5|) and score = max(anomaly_map), so
bright rectangles on a flat gray background are "defects" whose masks we know.
Import fixtures from here in a test module: `from runtime_helpers import bundle_dir, mosquitto`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # model input
GRAY = 128  # background, ~0.5 = the model's reference
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def build_bundle(folder: Path, size: int = SIZE, precision: str = "fp32") -> Path:
    """A real IR + bundle.json. Raw thresholds: image 0.15, pixel 0.25 (defects score ~0.5, background ~0.005)."""
    import openvino as ov
    import openvino.opset13 as ops

    from edge_ad.bundle import Bundle, ModelInfo, Thresholds, TrainingInfo, write_bundle
    from edge_ad.preprocess import PreprocessSpec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = ops.parameter([1, 3, size, size], np.float32, name="image")
    image.output(0).get_tensor().set_names({"image"})
    diff = ops.abs(ops.subtract(image, ops.constant(np.float32(0.5))))
    per_pixel = ops.reduce_mean(diff, ops.constant(np.array([1], dtype=np.int64)), keep_dims=True)
    smooth = ops.avg_pool(per_pixel, [1, 1], [1, 1], [1, 1], [3, 3], exclude_pad=True)
    smooth.set_friendly_name("anomaly_map")
    smooth.output(0).get_tensor().set_names({"anomaly_map"})
    score = ops.reduce_max(smooth, ops.constant(np.array([1, 2, 3], dtype=np.int64)), keep_dims=False)
    score.set_friendly_name("score")
    score.output(0).get_tensor().set_names({"score"})
    model = ov.Model([smooth, score], [image], "test-absdiff")
    ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=False)
    bundle = Bundle(
        model=ModelInfo(algorithm="absdiff", backbone="none", precision=precision),
        preprocess=PreprocessSpec.square(size),
        thresholds=Thresholds(image=0.15, pixel=0.25, image_min=0.0, image_max=0.3, pixel_min=0.0, pixel_max=0.5),
        training=TrainingInfo(category="synthetic", data_root="-", data_fingerprint="-", epochs=None, seed=0,
                              image_size=size, validation_fraction=0.0),
    )
    write_bundle(folder, bundle)
    return folder


def make_frame(boxes=(), height: int = 192, width: int = 256, channels: int = 3) -> np.ndarray:
    """Flat gray frame with white rectangles (x, y, w, h) as defects."""
    frame = np.full((height, width, channels) if channels > 1 else (height, width), GRAY, np.uint8)
    for x, y, w, h in boxes:
        frame[y : y + h, x : x + w] = 255
    return frame


def write_video(path: Path, frames: list[np.ndarray], fps: float = 25.0) -> Path:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    assert writer.isOpened(), "OpenCV cannot write MJPG .avi here"
    for frame in frames:
        writer.write(frame if frame.ndim == 3 else cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    check = cv2.VideoCapture(str(path))
    assert check.isOpened() and int(check.get(cv2.CAP_PROP_FRAME_COUNT)) == len(frames)
    check.release()
    return path


def inside(region: dict, box, margin: int) -> bool:
    x, y, w, h = box
    return (region["x"] >= x - margin and region["y"] >= y - margin
            and region["x"] + region["w"] <= x + w + margin and region["y"] + region["h"] <= y + h + margin)


def iou(region: dict, box) -> float:
    x, y, w, h = box
    ix = max(0, min(region["x"] + region["w"], x + w) - max(region["x"], x))
    iy = max(0, min(region["y"] + region["h"], y + h) - max(region["y"], y))
    inter = ix * iy
    return inter / (region["w"] * region["h"] + w * h - inter)


def run_cli(*args, timeout: float = 60, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`python -m edge_ad ARGS` in a subprocess (covers __main__ and the CLI exactly as operators run it)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "edge_ad", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundle"))


class Broker:
    """A real mosquitto on a loopback port; can be stopped and started again on the same port."""

    def __init__(self, folder: Path, extra: str = "allow_anonymous true\n"):
        self.folder = folder
        self.host, self.port = "127.0.0.1", free_port()
        self.conf = folder / "mosquitto.conf"
        stay = "user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""  # keep access to tmp files
        self.conf.write_text(f"listener {self.port} 127.0.0.1\npersistence false\n{stay}{extra}")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.folder / "mosquitto.log", "a")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.skip(f"mosquitto did not start: {(self.folder / 'mosquitto.log').read_text()[-300:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A real broker (skipped with a reason when mosquitto is not installed)."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto broker binary not installed (apt-get install mosquitto)")
    server = Broker(tmp_path_factory.mktemp("mosquitto"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mosquitto(broker):
    """(host, port) of a running real broker."""
    return broker.host, broker.port
