"""Test helpers for the edge_ad runtime: a real (tiny) OpenVINO bundle, synthetic frames, a real broker.

No training: the model is built with OpenVINO's opset API. It computes
anomaly_map = avg_pool3x3(mean_c |x - 0.5|) and score = max(anomaly_map), so
bright rectangles on a flat gray background are "defects" whose masks we know.
Import fixtures from here in a test module: `from runtime_helpers import bundle_dir, mosquitto`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
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

    from edge_ad.model.bundle import Bundle, ModelInfo, Thresholds, TrainingInfo, write_bundle
    from edge_ad.model.preprocess import PreprocessSpec

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


_STATE_ROOT: Path | None = None


def fresh_state_dir() -> Path:
    """An empty folder for edge-ad's default outbox, so runs never share state with each other or with ~."""
    global _STATE_ROOT
    if _STATE_ROOT is None:
        _STATE_ROOT = Path(tempfile.mkdtemp(prefix="edge-ad-test-state-"))
        atexit.register(shutil.rmtree, _STATE_ROOT, True)
    return Path(tempfile.mkdtemp(dir=_STATE_ROOT))


def cli_env(env: dict | None = None) -> dict:
    """Environment for a `python -m edge_ad` subprocess: this checkout, a fresh state folder, then `env`."""
    base = {k: v for k, v in os.environ.items() if k not in ("STATE_DIRECTORY", "CREDENTIALS_DIRECTORY")}
    return {**base, "PYTHONPATH": str(REPO), "XDG_STATE_HOME": str(fresh_state_dir()), **(env or {})}


def run_cli(*args, timeout: float = 60, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`python -m edge_ad ARGS` in a subprocess (covers __main__ and the CLI exactly as operators run it)."""
    return subprocess.run([sys.executable, "-m", "edge_ad", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(env), cwd=REPO, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundle"))


class Broker:
    """A real mosquitto on a loopback port; can be stopped (or killed) and started again on the same port.

    persistent=True saves sessions and queued QoS 1 messages to disk after every change, so a
    subscriber with a persistent session gets what arrived while it was away even across a kill -9.
    """

    def __init__(self, folder: Path, extra: str = "allow_anonymous true\n", persistent: bool = False):
        self.folder = folder
        self.host, self.port = "127.0.0.1", free_port()
        self.conf = folder / "mosquitto.conf"
        stay = "user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""  # keep access to tmp files
        keep = (f"persistence true\npersistence_location {folder}/\nautosave_interval 1\nautosave_on_changes true\n"
                if persistent else "persistence false\n")
        self.conf.write_text(f"listener {self.port} 127.0.0.1\n{keep}{stay}{extra}")
        self.proc: subprocess.Popen | None = None

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients, nothing saved beyond what autosave already wrote."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

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


# -- reliability helpers ------------------------------------------------------------------------------

class Subscriber:
    """A QoS 1 subscriber with a persistent session (clean_session=False): after its broker was killed and
    restarted (persistent=True), it reconnects by itself and receives what was queued for it meanwhile."""

    def __init__(self, host: str, port: int, topic: str, username: str | None = None, password: str | None = None,
                 tls_ca: Path | None = None, client_id: str | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None):
        import threading
        import uuid

        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"sub-{uuid.uuid4().hex[:8]}",
                                  clean_session=False)
        if username:
            self.client.username_pw_set(username, password)
        if tls_ca:
            import ssl

            self.client.tls_set(ca_certs=str(tls_ca), certfile=tls_cert and str(tls_cert),
                                keyfile=tls_key and str(tls_key), cert_reqs=ssl.CERT_REQUIRED)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: ready.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=5)
        self.client.loop_start()
        assert ready.wait(10), "subscription not acknowledged"

    def _on_message(self, client, userdata, message) -> None:
        import json

        with self.lock:
            self.messages.append((message.topic, json.loads(message.payload)))

    def events(self, *kinds: str) -> list[dict]:
        with self.lock:
            return [p for _, p in self.messages if not kinds or p.get("event") in kinds]

    def event_ids(self, *kinds: str) -> list[str]:
        """Event ids in arrival order, duplicates (at-least-once) removed."""
        seen: dict[str, None] = {}
        for payload in self.events(*kinds or ("alert", "clear")):
            seen.setdefault(payload["event_id"], None)
        return list(seen)

    def wait_for(self, predicate, timeout: float = 20.0, what: str = "messages"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                snapshot = list(self.messages)
            if predicate(snapshot):
                return snapshot
            time.sleep(0.05)
        summary = [(t, p.get("event"), p.get("state"), p.get("frame_index")) for t, p in snapshot]
        raise AssertionError(f"timed out waiting for {what}; got {summary}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def jsonl(path: Path, *kinds: str) -> list[dict]:
    """Events of a JSON-lines file (the runtime's local mirror), skipping a torn last line."""
    import json

    events = []
    if not Path(path).exists():
        return events
    for line in Path(path).read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not kinds or event.get("event") in kinds:
            events.append(event)
    return events


def outbox_rows(path: Path) -> list[tuple[int, str, dict]]:
    """(seq, topic, payload) still waiting in an outbox file, read the way an operator would (sqlite3)."""
    import json
    import sqlite3

    if not Path(path).exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [(seq, topic, json.loads(payload))
                for seq, topic, payload in db.execute("SELECT seq, topic, payload FROM outbox ORDER BY seq")]
    finally:
        db.close()


def start_cli(*args, env: dict | None = None) -> subprocess.Popen:
    """`python -m edge_ad ARGS` in the background (stderr piped; read it with .communicate())."""
    return subprocess.Popen([sys.executable, "-m", "edge_ad", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=cli_env(env))


def wait_until(predicate, timeout: float = 20.0, what: str = "condition", interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


class TcpProxy:
    """A loopback TCP relay to a broker whose "network" can be cut: cut() silently drops every byte both ways
    (what a pulled cable or a dead switch looks like: no FIN, no RST), restore() resets the dead connections
    (as the peer's TCP stack would have given up on them) and relays again."""

    def __init__(self, target_port: int, host: str = "127.0.0.1"):
        import threading

        self.target = (host, target_port)
        self.host = host
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind((host, 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.cut_off = threading.Event()
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self.closed.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if not self.cut_off.is_set():
                    sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.cut_off.set()

    def restore(self) -> None:
        import struct

        with self.lock:
            dead, self.sockets = self.sockets, []
        for sock in dead:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                sock.close()
            except OSError:
                pass
        self.cut_off.clear()

    def close(self) -> None:
        self.closed.set()
        self.server.close()
        self.restore()
