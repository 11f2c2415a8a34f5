"""The README's main job, end to end on a generated dataset.

generate data -> train STFPM -> export FP32 IR bundle -> INT8 bundle (NNCF, validation images)
-> teach-in on normal parts of the line (edge-ad teach) -> play a "production line" video through
edge-ad -> alerts over a local MQTT broker -> per-part inspection of a station's image folder (one
verdict per part). It checks what it shows: exactly one alert per defective stretch and none on
normal frames, NOK for exactly the defective parts (exit 1 otherwise; summary.json has the counts).
Every step is the same command a user would type; this script only chains them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(ROOT))

from benchmarks.broker import BrokerStartError, Mosquitto  # noqa: E402  (needs ROOT on sys.path)
from benchmarks.pipeline_fps import cpu_model  # noqa: E402


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


def start_broker(workdir: Path) -> Mosquitto | None:
    """The test suite's own throw-away mosquitto (benchmarks/broker.py), or None without one."""
    try:
        return Mosquitto(workdir / "broker").start()
    except BrokerStartError as exc:
        print(f"demo: {exc}")
        return None


def print_metrics(bundle_dir: Path) -> None:
    bundle = json.loads((bundle_dir / "bundle.json").read_text())
    print("\nTest-split metrics (same images for each):")
    print(f"{'model':10s} {'image AUROC':>12s} {'pixel AUROC':>12s} {'image F1':>9s}")
    for name, metrics in bundle["metrics"].items():
        pixel = metrics.get("pixel_auroc")
        print(f"{name:10s} {metrics['image_auroc']:12.3f} {pixel if pixel is None else f'{pixel:.3f}':>12} {metrics['image_f1_deployed']:9.3f}")
    model_bytes = (bundle_dir / "model.bin").stat().st_size
    print(f"INT8 bundle: {bundle_dir} ({model_bytes / 1e6:.1f} MB weights)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="work folder (replaced)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=60, help="training images (default: 60)")
    parser.add_argument("--teach-frames", type=int, default=200, help="normal frames for teach-in (default: 200)")
    args = parser.parse_args()

    out = (ROOT / args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data, runs, bundles = out / "data", out / "runs", out / "bundles"

    step("1/8 generate a synthetic MVTec-layout dataset", "-m", "training.data.synthetic", "--out", str(data),
         "--image-size", str(args.image_size), "--n-train", str(args.n_train), "--n-test-good", "10", "--n-test-defect", "10")
    step("2/8 train STFPM (MobileNetV2 teacher, offline ImageNet weights)", "-m", "training.stfpm",
         "--data-root", str(data), "--category", "synthetic", "--image-size", str(args.image_size),
         "--epochs", str(args.epochs), "--batch-size", "8", "--out", str(runs))
    run_dir = newest(runs)
    step("3/8 export to an OpenVINO FP32 bundle", "-m", "deploy.export", str(run_dir), "--out", str(bundles / "fp32"))
    step("4/8 quantize to INT8 with NNCF on held-out normal images", "-m", "calibration.quantize", str(bundles / "fp32"),
         "--data-root", str(data), "--category", "synthetic", "--out", str(bundles / "int8"))
    print_metrics(bundles / "int8")

    video = out / "line.avi"
    defect_frames = make_line_video(data, video)
    runs_of_defects = stretches(defect_frames)
    print(f"\n=== 5/8 production-line video: {video.name}, defective parts at frames "
          + " and ".join(f"{a}-{b}" for a, b in runs_of_defects))

    station = make_station(data, out / "station")
    before = {"video": before_teach(out, bundles / "int8", ["--video", str(video), "--cooldown", "5f"], "video"),
              "station": before_teach(out, bundles / "int8", ["--images", str(station.folder), "--per-part"],
                                      "station")}
    false_alerts = [i for i in before["video"] if i[0] == "alert" and not any(a <= i[1] <= b for a, b in runs_of_defects)]
    false_nok = [i for i in before["station"] if i[0] == "NOK" and i[1] not in station.defective]
    print(f"before teach-in (the quantizer's thresholds, set on training images): {len(false_alerts)} alert(s) on "
          f"normal video frames, {len(false_nok)} good station part(s) NOK")

    # Teach-in: the line's own normal parts (other parts than the test set, through the line's camera and
    # codec), so the thresholds fit the station and not only the training photos.
    step("6/8 normal parts of the line (other parts than the test set)", "-m", "training.data.synthetic",
         "--out", str(out / "line_data"), "--image-size", str(args.image_size), "--n-train", str(args.teach_frames),
         "--n-test-good", "0", "--n-test-defect", "0", "--seed", "1", capture=True)
    teach_video = make_teach_video(out / "line_data", out / "line_normal.avi")
    step("6/8 teach-in on normal parts of the line (edge PC, no torch)", "-m", "edge_ad", "teach",
         "--video", str(teach_video), "--model", str(bundles / "int8"), "--frames", str(args.teach_frames))

    broker = start_broker(out)
    common = ["-m", "edge_ad", "--model", str(bundles / "int8"), "--device-id", "demo-pc", "--camera-id", "line1",
              "--outbox", str(out / "outbox.sqlite")]
    stream = ["--video", str(video), "--cooldown", "5f"]
    parts = ["--images", str(station.folder), "--per-part", "--camera-id", "station1"]
    try:
        events = run_edge_ad("7/8 edge-ad on the video, alerts over MQTT", broker, out, [*common, *stream],
                             "alert,clear", out / "alerts.jsonl")
        verdicts = run_edge_ad("8/8 per-part inspection: one verdict per part", broker, out, [*common, *parts],
                               "verdict", out / "verdicts.jsonl")
    finally:
        if broker is not None:
            broker.stop()

    print("\nEvents received by the operator's side (edge-ad listen):")
    for event in events:
        if event.get("event") == "alert":
            boxes = ", ".join(f"({r['x']},{r['y']},{r['w']}x{r['h']})" for r in event.get("regions", []))
            print(f"  ALERT frame {event['frame_index']:3d} score {event['score']:.2f} regions {boxes}")
        elif event.get("event") == "clear":
            print(f"  clear frame {event['frame_index']:3d}")
    alerts = [e["frame_index"] for e in events if e.get("event") == "alert"]
    per_stretch = [sum(a <= i <= b for i in alerts) for a, b in runs_of_defects]
    outside = [i for i in alerts if not any(a <= i <= b for a, b in runs_of_defects)]
    verdicts = [v for v in verdicts if v.get("event") == "verdict"]
    nok = {v["part_id"] for v in verdicts if v["verdict"] == "NOK"}
    summary = {
        "stretches": len(runs_of_defects), "alerts": len(alerts), "alerts_per_stretch": per_stretch,
        "alerts_on_normal_frames": len(outside), "parts": len(verdicts), "defective_parts": len(station.defective),
        "nok_defective": len(nok & station.defective), "nok_good": len(nok - station.defective),
        "cpu": cpu_model(),
        "before_teach_in": {"alerts_on_normal_frames": len(false_alerts), "nok_good": len(false_nok)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nvideo: {len(alerts)} alert(s) for {len(runs_of_defects)} defective stretches "
          f"(per stretch {per_stretch}, {len(outside)} on normal frames)")
    print(f"station: {len(verdicts)} verdicts, NOK for {summary['nok_defective']} of {len(station.defective)} "
          f"defective parts and {summary['nok_good']} of {len(verdicts) - len(station.defective)} good ones")
    ok = (per_stretch == [1] * len(runs_of_defects) and not outside and len(verdicts) == station.count
          and nok == station.defective)
    print(("demo: as expected" if ok else "demo: NOT as expected (see above)")
          + f". Next: edge-ad --camera 0 --model {bundles / 'int8'} --mqtt-host HOST")
    return 0 if ok else 1


def before_teach(out: Path, bundle: Path, args: list[str], tag: str) -> list[tuple[str, object]]:
    """A quiet JSON-lines run with the thresholds the bundle came with: (alert, frame) / (verdict, part) pairs."""
    mirror = out / f"before_teach_{tag}.jsonl"
    subprocess.run([PY, "-m", "edge_ad", *args, "--model", str(bundle), "--jsonl", str(mirror), "--log-level", "error"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    events = [json.loads(line) for line in mirror.read_text().splitlines() if line.startswith("{")]
    return ([("alert", e["frame_index"]) for e in events if e.get("event") == "alert"]
            + [(e["verdict"], e["part_id"]) for e in events if e.get("event") == "verdict"])


def stretches(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive frame indices -> (first, last) of each run."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return [(a, b) for a, b in runs]


def make_teach_video(line_data: Path, path: Path, fps: int = 10) -> Path:
    """The line's normal parts as the line's camera delivers them (MJPG, like the production video)."""
    images = sorted((line_data / "synthetic" / "train" / "good").glob("*.png"))
    first = cv2.imread(str(images[0]))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, first.shape[1::-1])
    for image in images:
        writer.write(cv2.imread(str(image)))
    writer.release()
    return path


class Station:
    """A folder of part images, as an inspection station's camera software writes them."""

    def __init__(self, folder: Path, defective: set[str], count: int):
        self.folder, self.defective, self.count = folder, defective, count


def make_station(data_root: Path, folder: Path) -> Station:
    """Every test part once (good and defective interleaved), as JPEG files named by part number."""
    category = data_root / "synthetic" / "test"
    good = sorted((category / "good").glob("*.png"))
    defective = sorted(p for d in sorted(category.iterdir()) if d.name != "good" for p in d.glob("*.png"))
    folder.mkdir(parents=True, exist_ok=True)
    order = [p for pair in zip(good, defective) for p in pair] + good[len(defective):] + defective[len(good):]
    bad = set()
    for number, image in enumerate(order):
        name = f"part{number:04d}.jpg"
        cv2.imwrite(str(folder / name), cv2.imread(str(image)), [cv2.IMWRITE_JPEG_QUALITY, 95])
        if image.parent.name != "good":
            bad.add(name)
    return Station(folder, bad, len(order))


def run_edge_ad(title: str, broker, out: Path, args: list[str], events: str, mirror: Path) -> list[dict]:
    """One edge-ad run; the events as the operator's side receives them (MQTT), or JSON lines without a broker."""
    if broker is None:
        print("mosquitto not found: events go to JSON lines instead of MQTT")
        step(title + " (JSON lines)", *args, "--jsonl", str(mirror))
        return [json.loads(line) for line in mirror.read_text().splitlines()]
    listener = subprocess.Popen(
        [PY, "-m", "edge_ad", "listen", "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port),
         "--events", events, "--json", "--timeout", "300"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1.0)
        step(title, *args, "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port))
        time.sleep(1.0)
    finally:
        listener.terminate()
        received, _ = listener.communicate(timeout=10)
    return [json.loads(line) for line in received.splitlines() if line.startswith("{")]


if __name__ == "__main__":
    sys.exit(main())
