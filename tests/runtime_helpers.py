"""Test helpers for the edge_ad runtime: a real (tiny) OpenVINO bundle, synthetic frames, a real broker.

The bundle builder (benchmarks/tiny_bundle.py) and the mosquitto launcher (benchmarks/broker.py) are
shared with the benchmarks and the demo and re-exported here. A broker that does not start is an
error, never a skip; a missing mosquitto binary is a skip, or a failure under EDGE_AD_REQUIRE=mosquitto.
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

from prerequisites import missing

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # `pytest` run from elsewhere: benchmarks/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.broker import BrokerStartError, Mosquitto as Broker, find_mosquitto, free_port  # noqa: F401
from benchmarks.tiny_bundle import SIZE, build_bundle  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
GRAY = 128  # background, ~0.5 = the model's reference
MOSQUITTO = find_mosquitto()


def systemd_verify(unit_text: str, path: Path) -> None:
    """`systemd-analyze verify` on a unit pointed at this checkout's edge-ad (verify insists ExecStart exists);
    skips where systemd cannot run. systemd < 254 does not know the growing restart delay: those lines pass."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    path.write_text(unit_text.replace("/usr/local/bin/edge-ad", str(Path(sys.executable).parent / "edge-ad")))
    proc = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    if "Failed to" in proc.stderr and "bus" in proc.stderr.lower():
        pytest.skip(f"systemd-analyze cannot run here: {proc.stderr.strip()[:200]}")
    complaints = [line for line in proc.stderr.splitlines()
                  if line.strip() and "RestartSteps" not in line and "RestartMaxDelaySec" not in line]
    assert proc.returncode == 0 and complaints == [], proc.stderr


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


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture
def needs_mosquitto():
    """For tests that start their own brokers: skipped, or failed under EDGE_AD_REQUIRE, without mosquitto."""
    if MOSQUITTO is None:
        missing("mosquitto", "mosquitto broker binary not installed (apt-get install mosquitto)")


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A real broker (skipped, or failed under EDGE_AD_REQUIRE=mosquitto, when mosquitto is not installed)."""
    if MOSQUITTO is None:
        missing("mosquitto", "mosquitto broker binary not installed (apt-get install mosquitto)")
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
        self.retain_flags: list[bool] = []  # per message: delivered as the broker's retained copy
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
            self.retain_flags.append(bool(message.retain))

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
