"""Model swap during a real-time run: how long a `deploy` takes and how many frames it costs (target 0).

    python benchmarks/model_swap.py                                   # tiny test bundles, 20 s at 25 fps
    python benchmarks/model_swap.py --model BUNDLE [--new-model BUNDLE2] --fps 25 --seconds 30 --swaps 3

Starts a local mosquitto, a local HTTP server (http.server) with the new bundle as a .tar.gz, and
`edge-ad --video ... --realtime` (a subprocess, exactly as deployed; a live source: frames the model cannot
take are dropped and counted). During the run a client sends `deploy` commands (alternating between the two
bundles) and reads the answers: download + verification (staging), compile + warm-up, switch (the lock held
while the next frame's model changes). Frames dropped are read from the heartbeats (every 0.5 s): in the run
before the first deploy (the baseline, as a rate) and from each deploy command until 2 s after its answer,
beside what the baseline rate alone would have dropped in that window (a busy machine drops frames anyway).
Without --new-model, the new bundle is a copy of --model with another image threshold (a full recompile all
the same). Prints the numbers and the CPU; --json for machines. Not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402

from benchmarks.broker import Mosquitto  # noqa: E402
from benchmarks.pipeline_fps import cpu_model, usable_cores  # noqa: E402
from benchmarks.tiny_bundle import build_bundle  # noqa: E402


def make_video(path: Path, frames: int, fps: float, width: int, height: int) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    rng = np.random.default_rng(0)
    base = np.full((height, width, 3), 128, np.uint8)
    for i in range(frames):
        frame = base.copy()
        if i % 50 < 3:
            x, y = int(rng.integers(0, width - 64)), int(rng.integers(0, height - 48))
            frame[y:y + 48, x:x + 64] = 255
        writer.write(frame)
    writer.release()
    return path


def tar_gz(folder: Path, out: Path) -> str:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname="bundle")
    return hashlib.sha256(out.read_bytes()).hexdigest()


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(folder), **k)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def variant(source: Path, dest: Path) -> Path:
    """A copy of `source` with another image threshold: a different bundle, the same graph."""
    from edge_ad.model.bundle import read_bundle, write_bundle

    shutil.copytree(source, dest)
    for extra in ("manifest.sha256", "manifest.sig"):
        (dest / extra).unlink(missing_ok=True)
    bundle = read_bundle(dest)
    bundle.thresholds.image *= 1.01
    write_bundle(dest, bundle)
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="bundle the run starts with (default: the tiny test bundle)")
    parser.add_argument("--new-model", type=Path, help="bundle deployed (default: a variant of --model)")
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--size", default="640x480", help="video frame size WxH")
    parser.add_argument("--requests", type=int, default=0, help="edge-ad --requests (0: OpenVINO's optimum)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    work = Path(tempfile.mkdtemp(prefix="edge-ad-swap-"))
    try:
        old = args.model or build_bundle(work / "old")
        new = args.new_model or (variant(old, work / "new") if args.model else build_bundle(work / "new", size=32))
        served = work / "served"
        served.mkdir()
        shas = {"new": tar_gz(new, served / "new.tar.gz"), "old": tar_gz(old, served / "old.tar.gz")}
        frames = int(args.fps * args.seconds)
        video = make_video(work / "line.avi", frames, args.fps, width, height)
        httpd, url = serve(served)
        broker = Mosquitto(work / "mosquitto").start()
        results, beats, lock = [], [], threading.Lock()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:6]}",
                             protocol=mqtt.MQTTv5)
        base = "edge-ad/bench/cam"
        ready = threading.Event()
        client.on_connect = lambda c, u, f, rc, p: c.subscribe([(f"{base}/cmd/result", 1), (f"{base}/heartbeat", 0)])
        client.on_subscribe = lambda c, u, mid, rcs, p: ready.set()

        def on_message(c, u, message):
            payload = json.loads(message.payload)
            with lock:
                (results if payload.get("event") == "cmd_result" else beats).append((time.monotonic(), payload))

        client.on_message = on_message
        client.connect(broker.host, broker.port)
        client.loop_start()
        ready.wait(10)
        env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_STATE_HOME": str(work / "state")}
        env.pop("STATE_DIRECTORY", None)
        proc = subprocess.Popen([sys.executable, "-m", "edge_ad", "--video", str(video), "--realtime", "--model",
                                 str(old), "--mqtt-host", broker.host, "--mqtt-port", str(broker.port),
                                 "--device-id", "bench", "--camera-id", "cam", "--heartbeat", "0.5",
                                 "--log-level", "warning", "--requests", str(args.requests)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        while not beats and proc.poll() is None:
            time.sleep(0.05)
        started = time.monotonic()
        spacing = args.seconds * 0.8 / max(1, args.swaps + 1)
        swaps = []
        for k in range(args.swaps):
            time.sleep(max(0.0, started + spacing * (k + 1) - time.monotonic()))
            which = "new" if k % 2 == 0 else "old"
            ident = f"swap-{k}"
            sent = time.monotonic()
            client.publish(f"{base}/cmd", json.dumps({"id": ident, "command": "deploy", "args": {
                "url": f"{url}/{which}.tar.gz", "sha256": shas[which]}}), qos=1)
            while True:
                with lock:
                    got = [(t, r) for t, r in results if r.get("id") == ident]
                if got or proc.poll() is not None:
                    break
                time.sleep(0.01)
            if got:
                swaps.append({"sent": sent, "answered": got[0][0], "answer": got[0][1]})
        stderr = proc.communicate(timeout=args.seconds * 3 + 60)[1]
        client.loop_stop()
        broker.stop()
        httpd.shutdown()
        if proc.returncode != 0:
            print(stderr[-3000:], file=sys.stderr)
            return 1

        def dropped_at(moment: float) -> int:
            with lock:
                seen = [b["dropped"] for t, b in beats if t <= moment]
            return seen[-1] if seen else 0

        final = next(b for _, b in beats if b.get("final"))
        first_swap = swaps[0]["sent"] if swaps else time.monotonic()
        baseline = dropped_at(first_swap) / max(1e-9, first_swap - started)  # drops per second without a swap
        rows = []
        for swap in swaps:
            answer = swap["answer"]
            timings = answer.get("outcome", {}).get("timings", {})
            rows.append({"ok": answer["ok"], "error": answer.get("error"), **timings,
                         "command_to_answer_s": round(swap["answered"] - swap["sent"], 3),
                         "dropped_during": dropped_at(swap["answered"] + 2.0) - dropped_at(swap["sent"]),
                         "baseline_expected": round(baseline * (swap["answered"] + 2.0 - swap["sent"]), 1)})
        report = {"cpu": cpu_model(), "cores": usable_cores(), "requests": args.requests or "OpenVINO optimum", "model": str(args.model or "tiny test bundle (64x64)"),
                  "new_model": str(args.new_model or ("variant of --model" if args.model
                                                      else "tiny test bundle (32x32)")),
                  "video": f"{frames} frames {width}x{height} at {args.fps:g} fps, --realtime",
                  "frames": frames, "processed": final["processed"], "dropped": final["dropped"],
                  "dropped_before_first_swap": dropped_at(first_swap), "baseline_dropped_per_s": round(baseline, 2),
                  "load_average": os.getloadavg()[0], "swaps": rows}
        if args.json:
            print(json.dumps(report, indent=1))
            return 0
        print(f"CPU: {report['cpu']} ({report['cores']} usable cores)")
        print(f"run: {report['video']}, requests {report['requests']}; model {report['model']} <-> "
              f"{report['new_model']}")
        print(f"frames: {frames} in the video, {final['processed']} processed, {final['dropped']} dropped "
              f"({report['dropped_before_first_swap']} before the first swap: {baseline:.2f}/s); "
              f"load average {report['load_average']:.1f}")
        print("swap  ok  download_s  stage_s  compile_s  switch_ms  old_drained_s  total_s  answer_s  dropped  "
              "(at the baseline rate)")
        for i, row in enumerate(rows):
            print(f"{i:>4}  {'yes' if row['ok'] else 'NO ':>3}  {row.get('download_s', '-'):>10}  "
                  f"{row.get('stage_s', '-'):>7}  {row.get('compile_s', '-'):>9}  {row.get('switch_ms', '-'):>9}  "
                  f"{row.get('old_model_drained_s', '-'):>13}  {row.get('total_s', '-'):>7}  "
                  f"{row['command_to_answer_s']:>8}  {row['dropped_during']:>7}  {row['baseline_expected']:>7}"
                  + (f"  {row['error']}" if row['error'] else ""))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
