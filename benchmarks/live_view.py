"""What the live view (`--http`) costs: fps of an as-fast-as-possible `edge-ad` run on a video, three ways.

    python benchmarks/live_view.py --model bundles/bottle-fp32 [--video V] [--frames 600] [--repeat 3]

1. without --http;  2. with --http and nobody looking;  3. with --http and one viewer that fetches the
frame JPEG at --poll-hz (default 5, as the page does) and the state JSON at 1 Hz.
Each run is the real command (`python -m edge_ad --video V --model B --jsonl F`, no --realtime: every
frame is processed); its fps is the run summary of its final heartbeat (`fps_avg`: first to last decided
frame, start-up excluded), with `cpu_ms_per_frame` (process CPU time per frame, which other jobs on the
machine do not inflate). The three variants are interleaved (1 2 3 1 2 3 ...) so drifting load on a shared
box spreads over all of them; medians are reported. The viewer's own figures: frames fetched, JPEG size,
and request time (render + encode + transfer). Without --video the video is made from the MVTec AD
bottle test images (if present) or a synthetic texture, at --size. Without --model the tiny test bundle
is built (that measures the pipeline, not a real model: say so when quoting it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/live_view.py`

from benchmarks.broker import free_port  # noqa: E402
from benchmarks.pipeline_fps import (cpu_model, load_average, parse_size, synthetic_video, usable_cores,  # noqa: E402
                                     video_from_images, video_info)

REPO = Path(__file__).resolve().parents[1]
MVTEC_BOTTLE = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle" / "test"
VARIANTS = ("no --http", "--http, no viewer", "--http, 1 viewer")


class Viewer(threading.Thread):
    """Polls /api/frame at `hz` and /api/state at 1 Hz, one request at a time, as the page does."""

    def __init__(self, url: str, hz: float):
        super().__init__(daemon=True)
        self.url, self.period = url, 1.0 / hz
        self.stop = threading.Event()
        self.frames, self.bytes, self.times, self.errors = 0, 0, [], 0

    def run(self) -> None:
        next_state = 0.0
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url + "/api/frame", timeout=5) as response:
                    body = response.read()
                self.frames += 1
                self.bytes += len(body)
                self.times.append(time.monotonic() - started)
                if started >= next_state:
                    next_state = started + 1.0
                    urllib.request.urlopen(self.url + "/api/state", timeout=5).read()
            except OSError:
                self.errors += 1  # the server is not up yet (503 before the first frame), or already gone
            self.stop.wait(max(0.0, self.period - (time.monotonic() - started)))


def run_once(bundle: Path, video: Path, variant: int, workdir: Path, hz: float) -> dict:
    events = workdir / f"events-{variant}-{time.monotonic_ns()}.jsonl"
    args = [sys.executable, "-m", "edge_ad", "--video", str(video), "--model", str(bundle), "--jsonl", str(events),
            "--heartbeat", "3600", "--camera-id", "bench", "--device-id", "bench", "--log-level", "warning"]
    port = free_port()
    if variant > 0:
        args += ["--http", f"127.0.0.1:{port}"]
    env = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
    env.update(PYTHONPATH=str(REPO), XDG_STATE_HOME=str(workdir / "state"))  # a fresh outbox/ROI folder
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    viewer = Viewer(f"http://127.0.0.1:{port}", hz) if variant == 2 else None
    if viewer:
        viewer.start()
    _, err = proc.communicate(timeout=3600)
    if viewer:
        viewer.stop.set()
        viewer.join()
    if proc.returncode != 0:
        raise SystemExit(f"edge-ad failed ({proc.returncode}): {err.strip()[-500:]}")
    final = [e for e in map(json.loads, events.read_text().splitlines()) if e.get("final")][-1]
    result = {"fps_avg": final["fps_avg"], "cpu_ms_per_frame": final["cpu_ms_per_frame"],
              "processed": final["processed"]}
    if viewer:
        result.update(viewer_frames=viewer.frames, viewer_kb=round(viewer.bytes / max(1, viewer.frames) / 1024, 1),
                      viewer_ms_p50=round(1000 * statistics.median(viewer.times), 1) if viewer.times else None,
                      viewer_rate_hz=round(viewer.frames / max(1e-6, final["elapsed_s"]), 2))
    return result


def render_cost(bundle: Path, video: Path, renders: int = 40) -> dict:
    """In this process: the observer's cost per frame, and one viewer request's work (heatmap overlay, regions,
    JPEG) on the video's frames with the bundle's real anomaly maps: min (the uncontended cost on a shared
    box) and median, in ms."""
    import cv2

    from edge_ad.decide.scoring import Scorer
    from edge_ad.model.inference import Detector
    from edge_ad.ops.stats import RuntimeStats
    from edge_ad.sources.capture import Frame
    from edge_ad.view.frames import CameraView
    from edge_ad.view.roi_editor import RoiEditor

    detector = Detector(str(bundle))
    scorer = Scorer(detector.bundle.thresholds)
    times, sizes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        view = CameraView("bench", scorer, RuntimeStats(), None, RoiEditor(scorer, Path(tmp) / "roi.png", False))
        cap = cv2.VideoCapture(str(video))
        for index in range(renders):
            ok, image = cap.read()
            if not ok:
                break
            frame = Frame(index, image, index / 25.0)
            detector.start(frame, detector.prepare(frame))
            result = detector.results.get()
            view.observe(result, scorer.decide(result.anomaly_map, result.score, image.shape[:2], with_regions=False))
            started = time.perf_counter()
            _, jpeg = view.frame_jpeg()
            times.append(time.perf_counter() - started)
            sizes.append(len(jpeg))
        cap.release()
        decision = scorer.decide(result.anomaly_map, result.score, image.shape[:2], with_regions=False)
        started = time.perf_counter()
        for _ in range(20000):  # what every frame pays with --http, viewer or not
            view.observe(result, decision)
        observe_us = (time.perf_counter() - started) / 20000 * 1e6
    return {"observer_us_per_frame": round(observe_us, 2), "render_ms_min": round(1000 * min(times), 2), "render_ms_median": round(1000 * statistics.median(times), 2),
            "jpeg_kib": round(statistics.median(sizes) / 1024, 1), "renders": len(times)} if times else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="bundle folder (default: the tiny test bundle, built here)")
    parser.add_argument("--video", type=Path, help="video file (default: made from MVTec bottle test images)")
    parser.add_argument("--size", type=parse_size, default=(640, 480), help="size of the made video (640x480)")
    parser.add_argument("--frames", type=int, default=600, help="frames of the made video (600)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the three variants (3)")
    parser.add_argument("--poll-hz", type=float, default=5.0, help="the viewer's frame requests per second (5)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edge-ad-liveview-") as tmp:
        workdir = Path(tmp)
        bundle, model = args.model, "tiny test bundle (absdiff, 64 px: pipeline cost, not a real model)"
        if bundle is None:
            from benchmarks.tiny_bundle import build_bundle

            bundle = build_bundle(workdir / "bundle")
        else:
            meta = json.loads((bundle / "bundle.json").read_text())
            model = (f"{meta['model']['algorithm']}/{meta['model']['backbone']} {meta['model']['precision']}, "
                     f"{meta['preprocess']['width']} px ({bundle})")
        video = args.video
        if video is None:
            width, height = args.size
            video = (video_from_images(workdir / "video.avi", MVTEC_BOTTLE, args.frames, width, height)
                     if MVTEC_BOTTLE.is_dir() else synthetic_video(workdir / "video.avi", args.frames, width, height))
        render = render_cost(bundle, video)
        print(f"one frame request (overlay + regions + JPEG, in-process): {render}", flush=True)
        runs: dict[int, list[dict]] = {0: [], 1: [], 2: []}
        load_before = load_average()
        for round_ in range(args.repeat):
            for variant in range(3):
                result = run_once(bundle, video, variant, workdir, args.poll_hz)
                runs[variant].append(result)
                print(f"round {round_ + 1} {VARIANTS[variant]:<18} {result['fps_avg']:8.1f} fps "
                      f"{result['cpu_ms_per_frame']:7.2f} CPU ms/frame"
                      + (f"  viewer: {result['viewer_frames']} frames, {result['viewer_rate_hz']} Hz, "
                         f"{result['viewer_kb']} KiB, {result['viewer_ms_p50']} ms p50" if variant == 2 else ""),
                      flush=True)
        summary = {
            "cpu": cpu_model(), "cores": usable_cores(), "model": model, "video": video_info(video),
            "load_average": {"before": load_before, "after": load_average()}, "poll_hz": args.poll_hz,
            "frame_request": render,
            "variants": {VARIANTS[v]: {"fps_median": round(statistics.median(r["fps_avg"] for r in rs), 1),
                                       "fps_runs": [r["fps_avg"] for r in rs],
                                       "cpu_ms_per_frame_median": round(statistics.median(r["cpu_ms_per_frame"]
                                                                                          for r in rs), 2),
                                       **({"viewer": rs[-1]} if v == 2 else {})}
                         for v, rs in runs.items()},
        }
    base = summary["variants"][VARIANTS[0]]
    print(f"\nCPU: {summary['cpu']} ({summary['cores']} cores usable); model: {model}; video "
          f"{summary['video']['size']} x {summary['video']['frames']} frames; load {load_before} -> "
          f"{summary['load_average']['after']}")
    print(f"{'variant':<20}{'fps (median)':>14}{'vs no --http':>14}{'CPU ms/frame':>14}   runs")
    for name, row in summary["variants"].items():
        print(f"{name:<20}{row['fps_median']:>14.1f}{row['fps_median'] / base['fps_median']:>13.1%}"
              f"{row['cpu_ms_per_frame_median']:>14.2f}   {row['fps_runs']}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
