"""Trigger-to-verdict latency of per-part inspection, as the line's PLC sees it.

    python benchmarks/trigger_latency.py                          # tiny test bundle, local mosquitto, 200 parts
    python benchmarks/trigger_latency.py --model bundles/stfpm-int8 --parts 300 --json

Starts a local mosquitto and `edge-ad` (a subprocess, exactly as deployed) twice:
  mqtt   `--trigger mqtt` over a folder of part images: a client publishes one trigger, waits for the
         verdict on `<root>/<device>/<camera>/verdict`, then sends the next (one part at a time, as a
         station does); latency = trigger published -> verdict received, both at the client.
  watch  `--images DIR --watch`: the client writes one complete part image (write + rename, as camera
         software does) and waits for its verdict; latency = rename -> verdict received.
Both include the broker round trip and the outbox's fsync of every verdict. The verdict's own
`latency_ms` (trigger arrival -> verdict published, inside edge-ad) is reported beside it.
Prints p50/p99 in ms; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402

from benchmarks.broker import Mosquitto  # noqa: E402
from benchmarks.pipeline_fps import cpu_model  # noqa: E402
from benchmarks.tiny_bundle import build_bundle  # noqa: E402

PLC_NAGLE = False


def part_image(index: int, size: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(index)
    frame = np.clip(rng.normal(128, 6, (*size, 3)), 0, 255).astype(np.uint8)
    if index % 10 == 4:
        frame[size[0] // 3: size[0] // 2, size[1] // 3: size[1] // 2] = 255
    return frame


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None, "n": 0}
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": round(float(p50), 2), "p99": round(float(p99), 2), "max": round(float(max(values)), 2),
            "n": len(values)}


class Plc:
    """The station's side: publishes triggers / writes files, receives verdicts."""

    def __init__(self, host: str, port: int, topic: str, nodelay: bool = True):
        self.verdicts: queue.Queue = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"plc-{os.getpid()}")
        self.client.on_message = lambda c, u, m: self.verdicts.put((time.perf_counter(), json.loads(m.payload)))
        if nodelay:  # a PLC stack's own Nagle stall is not edge-ad's latency; --plc-nagle to include one
            self.client.on_socket_open = lambda c, u, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.connect(host, port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def wait(self, timeout: float = 30.0) -> tuple[float, dict]:
        return self.verdicts.get(timeout=timeout)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def start_edge_ad(args: list[str], state: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_STATE_HOME": str(state)}
    return subprocess.Popen([sys.executable, "-m", "edge_ad", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(plc: Plc, proc: subprocess.Popen, probe) -> None:
    """Until a first verdict arrives (model compiled, subscribed); that warm-up part is not counted."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"edge-ad exited early: {proc.stderr.read()[-2000:]}")
        probe()
        try:
            plc.wait(1.0)
            return
        except queue.Empty:
            continue
    raise SystemExit("edge-ad did not answer within 60 s")


def measure_parts(plc: Plc, proc: subprocess.Popen, warm_up, fire, parts: int) -> tuple[list[float], list[float]]:
    """Warm up, then one part at a time: `fire(i)` triggers part i and returns (send time, expected part id).
    Returns the latencies seen at the PLC and those edge-ad reports inside itself, in ms."""
    client, inside = [], []
    try:
        wait_ready(plc, proc, warm_up)
        time.sleep(0.5)
        while not plc.verdicts.empty():
            plc.verdicts.get()
        for i in range(parts):
            sent, expected = fire(i)
            received, verdict = plc.wait()
            assert verdict["part_id"] == expected, verdict
            client.append((received - sent) * 1000.0)
            inside.append(verdict["latency_ms"])
    finally:
        proc.terminate()
        proc.wait(30)
        plc.close()
    return client, inside


def run_mqtt(model: Path, broker: Mosquitto, work: Path, parts: int, size) -> dict:
    folder = work / "camera"
    folder.mkdir()
    for i in range(parts + 100):  # the file "camera": each trigger takes the next image
        cv2.imwrite(str(folder / f"f{i:05d}.png"), part_image(i, size))
    topic = "bench/pc/st/"
    plc = Plc(broker.host, broker.port, topic + "verdict", not PLC_NAGLE)
    proc = start_edge_ad(["--images", str(folder), "--trigger", "mqtt", "--model", str(model), "--mqtt-host",
                          broker.host, "--mqtt-port", str(broker.port), "--topic-root", "bench", "--device-id", "pc",
                          "--camera-id", "st", "--log-level", "warning"], work / "state-mqtt")

    def fire(i: int) -> tuple[float, str]:
        sent = time.perf_counter()
        plc.client.publish(topic + "trigger", json.dumps({"part_id": f"P{i}"}), qos=1)
        return sent, f"P{i}"

    client, inside = measure_parts(plc, proc, lambda: plc.client.publish(topic + "trigger", "warm-up", qos=1),
                                   fire, parts)
    return {"trigger_to_verdict_ms": percentiles(client), "inside_edge_ad_ms": percentiles(inside)}


def run_watch(model: Path, broker: Mosquitto, work: Path, parts: int, size, poll: float) -> dict:
    folder = work / "inbox"
    folder.mkdir()
    topic = "bench/pc/wf/"
    plc = Plc(broker.host, broker.port, topic + "verdict", not PLC_NAGLE)
    proc = start_edge_ad(["--images", str(folder), "--watch", "--watch-poll", str(poll), "--model", str(model),
                          "--mqtt-host", broker.host, "--mqtt-port", str(broker.port), "--topic-root", "bench",
                          "--device-id", "pc", "--camera-id", "wf", "--log-level", "warning"], work / "state-watch")
    counter = iter(range(10**9))

    def write(name: str, index: int) -> float:
        tmp = folder / f".{name}.tmp"
        ok, data = cv2.imencode(".png", part_image(index, size))
        tmp.write_bytes(data.tobytes())
        os.replace(tmp, folder / name)
        return time.perf_counter()

    client, inside = measure_parts(plc, proc, lambda: write(f"warm{next(counter)}.png", 0),
                                   lambda i: (write(f"p{i:05d}.png", i), f"p{i:05d}.png"), parts)
    return {"file_to_verdict_ms": percentiles(client), "inside_edge_ad_ms": percentiles(inside), "poll_s": poll}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="bundle folder (default: the tiny test bundle)")
    parser.add_argument("--parts", type=int, default=200, help="parts per trigger kind (default: 200)")
    parser.add_argument("--size", default="480x640", help="part image HxW (default: 480x640)")
    parser.add_argument("--watch-poll", type=float, default=0.05, help="edge-ad --watch-poll (default: 0.05)")
    parser.add_argument("--broker-nagle", action="store_true", help="leave mosquitto's set_tcp_nodelay off (its default)")
    parser.add_argument("--plc-nagle", action="store_true", help="leave Nagle on at the PLC client's socket")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    global PLC_NAGLE
    PLC_NAGLE = args.plc_nagle
    size = tuple(int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="edge-ad-trigger-") as tmp:
        work = Path(tmp)
        model = args.model or build_bundle(work / "bundle")
        extra = "allow_anonymous true\n" + ("" if args.broker_nagle else "set_tcp_nodelay true\n")
        with Mosquitto(work / "broker", extra=extra) as broker:
            result = {"model": str(args.model or "tiny test bundle"), "image": args.size, "parts": args.parts,
                      "cpu": cpu_model(), "mqtt": run_mqtt(model, broker, work, args.parts, size),
                      "watch": run_watch(model, broker, work, args.parts, size, args.watch_poll)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        m, w = result["mqtt"], result["watch"]
        print(f"per-part trigger-to-verdict latency, {args.parts} parts each, {args.size} images, "
              f"{result['model']}, {result['cpu']}")
        print(f"  MQTT trigger -> verdict at the PLC:   p50 {m['trigger_to_verdict_ms']['p50']} ms, "
              f"p99 {m['trigger_to_verdict_ms']['p99']} ms (inside edge-ad p50 {m['inside_edge_ad_ms']['p50']} ms, "
              f"p99 {m['inside_edge_ad_ms']['p99']} ms)")
        print(f"  watched file -> verdict at the PLC:   p50 {w['file_to_verdict_ms']['p50']} ms, "
              f"p99 {w['file_to_verdict_ms']['p99']} ms (poll {args.watch_poll * 1000:.0f} ms; inside edge-ad "
              f"p50 {w['inside_edge_ad_ms']['p50']} ms, p99 {w['inside_edge_ad_ms']['p99']} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
