"""The README's main job, end to end on a generated dataset.

generate data -> train STFPM -> export FP32 IR bundle -> INT8 bundle (NNCF, validation images)
-> play a "production line" video through edge-ad -> alerts over a local MQTT broker.
Every step is the same command a user would type; this script only chains them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def step(title: str, *args: str, capture: bool = False) -> str:
    print(f"\n=== {title}\n$ {' '.join(args)}", flush=True)
    result = subprocess.run([PY, *args], cwd=ROOT, text=True, capture_output=capture)
    if result.returncode != 0:
        if capture:
            print(result.stdout, result.stderr, sep="\n")
        sys.exit(f"demo: step failed: {title}")
    return result.stdout if capture else ""


def newest(folder: Path) -> Path:
    return max(folder.iterdir(), key=lambda p: p.stat().st_mtime)


def make_line_video(data_root: Path, path: Path, fps: int = 10) -> list[int]:
    """Normal parts with two defective stretches; returns the frame indices that show a defect."""
    category = data_root / "synthetic" / "test"
    good = sorted((category / "good").glob("*.png"))
    defective = sorted(p for d in sorted(category.iterdir()) if d.name != "good" for p in d.glob("*.png"))
    sequence = good * 2 + defective[:1] * 6 + good * 2 + defective[1:2] * 6 + good
    first = cv2.imread(str(sequence[0]))
    height, width = first.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    for image in sequence:
        writer.write(cv2.imread(str(image)))
    writer.release()
    return [i for i, image in enumerate(sequence) if image.parent.name != "good"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_broker(workdir: Path) -> tuple[subprocess.Popen | None, int]:
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        return None, 0
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    broker = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return broker, port
        except OSError:
            time.sleep(0.1)
    broker.kill()
    return None, 0


def print_metrics(bundle_dir: Path) -> None:
    bundle = json.loads((bundle_dir / "bundle.json").read_text())
    print("\nTest-split metrics (same images for each):")
    print(f"{'model':10s} {'image AUROC':>12s} {'pixel AUROC':>12s} {'image F1':>9s}")
    for name, metrics in bundle["metrics"].items():
        pixel = metrics.get("pixel_auroc")
        print(f"{name:10s} {metrics['image_auroc']:12.3f} {pixel if pixel is None else f'{pixel:.3f}':>12} {metrics['image_f1']:9.3f}")
    model_bytes = (bundle_dir / "model.bin").stat().st_size
    print(f"INT8 bundle: {bundle_dir} ({model_bytes / 1e6:.1f} MB weights)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="work folder (replaced)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()

    out = (ROOT / args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data, runs, bundles = out / "data", out / "runs", out / "bundles"

    step("1/6 generate a synthetic MVTec-layout dataset", "-m", "training.data.synthetic", "--out", str(data),
         "--image-size", str(args.image_size), "--n-train", "60", "--n-test-good", "10", "--n-test-defect", "10")
    step("2/6 train STFPM (MobileNetV2 teacher, offline ImageNet weights)", "-m", "training.stfpm",
         "--data-root", str(data), "--category", "synthetic", "--image-size", str(args.image_size),
         "--epochs", str(args.epochs), "--batch-size", "8", "--out", str(runs))
    run_dir = newest(runs)
    step("3/6 export to an OpenVINO FP32 bundle", "-m", "deploy.export", str(run_dir), "--out", str(bundles / "fp32"))
    step("4/6 quantize to INT8 with NNCF on held-out normal images", "-m", "calibration.quantize", str(bundles / "fp32"),
         "--data-root", str(data), "--category", "synthetic", "--out", str(bundles / "int8"))
    print_metrics(bundles / "int8")

    video = out / "line.avi"
    defect_frames = make_line_video(data, video)
    print(f"\n=== 5/6 production-line video: {video.name}, defects at frames {defect_frames[0]}-{defect_frames[5]} "
          f"and {defect_frames[6]}-{defect_frames[-1]}")

    broker, port = start_broker(out)
    common = ["-m", "edge_ad", "--video", str(video), "--model", str(bundles / "int8"),
              "--device-id", "demo-pc", "--camera-id", "line1", "--cooldown", "5f", "--outbox", str(out / "outbox.sqlite")]
    if broker is None:
        print("mosquitto not found: alerts go to JSON lines instead of MQTT")
        step("6/6 edge-ad on the video (JSON lines)", *common, "--jsonl", str(out / "alerts.jsonl"))
        alerts = [json.loads(line) for line in (out / "alerts.jsonl").read_text().splitlines()]
    else:
        try:
            listener = subprocess.Popen(
                [PY, "-m", "edge_ad", "listen", "--mqtt-host", "127.0.0.1", "--mqtt-port", str(port),
                 "--events", "alert,clear", "--json", "--timeout", "120"],
                cwd=ROOT, stdout=subprocess.PIPE, text=True,
            )
            time.sleep(1.0)
            step("6/6 edge-ad on the video, alerts over MQTT", *common, "--mqtt-host", "127.0.0.1", "--mqtt-port", str(port))
            time.sleep(1.0)
            listener.terminate()
            received, _ = listener.communicate(timeout=10)
            alerts = [json.loads(line) for line in received.splitlines() if line.startswith("{")]
        finally:
            broker.terminate()
    print("\nEvents received by the operator's side (edge-ad listen):")
    for event in alerts:
        if event.get("event") == "alert":
            boxes = ", ".join(f"({r['x']},{r['y']},{r['w']}x{r['h']})" for r in event.get("regions", []))
            print(f"  ALERT frame {event['frame_index']:3d} score {event['score']:.2f} regions {boxes}")
        elif event.get("event") == "clear":
            print(f"  clear frame {event['frame_index']:3d}")
    raised = sum(event.get("event") == "alert" for event in alerts)
    print(f"\n{raised} alerts for 2 defective stretches. Next: edge-ad --camera 0 --model {bundles / 'int8'} --mqtt-host HOST")
    return 0 if raised >= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
