"""Several cameras in one `edge-ad` process, against the model alone (`edge-ad bench --mode throughput`).

Why: a multi-camera process shares one compiled model per bundle among its cameras; what matters is
whether the cameras together still get (nearly) all the throughput the model has on this machine
(target: aggregate >= 90 % of bench), and what a frame costs the CPU.

    python -m benchmarks.multicamera --model BUNDLE [--cameras 4] [--size 640x480] [--frames 600] [--repeat 2]
    python -m benchmarks.multicamera --model BUNDLE --queues-only     # only the request-queue comparison

Two measurements, numbers printed (and --json FILE), nothing asserted:
- queues: how the cameras' frames should reach one compiled model in throughput mode. N feeder threads
  (one per camera) on the same compiled model, constant input: (a) a queue per camera with OpenVINO's
  optimal number of requests each (what edge-ad does), (b) a queue per camera with optimal / N requests
  each, (c) one queue shared by the cameras (edge_ad/model/shared_queue.py), (d) real batching across
  cameras: the model reshaped to batch N, one request carrying a frame of each. Variants alternate (order
  reversed every other round) for --rounds rounds; medians of fps and CPU ms per frame, and the median of
  each round's fps over variant (a)'s in the same round (paired: robust to the load drifting).
- pipeline: the real command, `edge-ad --config cameras.toml` with --cameras entries, each a --size MJPG
  video (pipeline_fps.synthetic_video, or --from-images) played as fast as possible (every frame), all on
  --model in throughput mode, publishing to a local mosquitto. The process's final line `all cameras:
  processed=... fps_avg=... cpu_ms_per_frame=...` gives the aggregate (first to last decided frame of any
  camera; process CPU time over all frames). Each run is bracketed by `edge-ad bench --mode throughput`
  runs and divided by their mean (the load of a shared machine drifts); the median over --repeat is shown.
  Beside it, the same runner with one queue shared by the cameras (variant c), and one camera alone
  (`edge-ad --video`, benchmarks.pipeline_fps.run_pipeline) on the same video. On a machine whose cores
  other jobs also use, fps ratios mean little (a process with more threads gets a larger share); CPU ms
  per frame does not depend on them, and bench CPU / (bench CPU + decode + resize CPU) is the ceiling of
  the fps ratio where inference and host work share the same cores.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/multicamera.py`

from benchmarks.broker import Mosquitto, find_mosquitto  # noqa: E402
from benchmarks.pipeline_fps import (  # noqa: E402
    REPO, _edge_ad, _env, load_average, machine_info, parse_size, run_bench, run_pipeline, stage_costs,
    synthetic_video, video_from_images,
)

TARGET = 0.90
SUMMARY = re.compile(r"all cameras: processed=(\d+) elapsed_s=([\d.]+) fps_avg=([\d.]+) cpu_ms_per_frame=([\d.]+)")


# -- queues -----------------------------------------------------------------------------------------

def _feed(submitters, queues, seconds: float, done: list[int]) -> tuple[float, float]:
    """One feeder thread per submitter until the deadline, then until every request finished;
    (frames per second, CPU ms per frame), counting completed frames only."""
    deadline = time.perf_counter() + seconds

    def loop(submit):
        while time.perf_counter() < deadline:
            submit()

    threads = [threading.Thread(target=loop, args=(submit,), daemon=True) for submit in submitters]
    before, cpu, start = done[0], time.process_time(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for queue in queues:
        queue.wait_all()
    frames = max(done[0] - before, 1)
    return frames / (time.perf_counter() - start), (time.process_time() - cpu) * 1000.0 / frames


def queue_variants(bundle: Path, cameras: int, seconds: float, rounds: int) -> dict:
    """The four ways of feeding one compiled model (module docstring), in alternating order each round."""
    import numpy as np
    import openvino as ov

    from edge_ad.model.inference import compile_bundle, compile_model, load_model, with_uint8_input
    from edge_ad.model.shared_queue import SharedInferQueue

    core = ov.Core()
    built = compile_bundle(bundle, "CPU", "throughput", None, core)
    name, optimal = built.bundle.model.input_name, built.optimal_requests
    tensor = built.example_input()
    done = [0]

    def count(request, frames):
        done[0] += frames

    def own_queues(compiled, size, number):
        queues = [ov.AsyncInferQueue(compiled, size) for _ in range(number)]
        for queue in queues:
            queue.set_callback(count)
        return queues

    def feeders(queues, inputs, frames=1):
        return [lambda q=q: q.start_async(inputs, userdata=frames, share_inputs=True) for q in queues]

    variants = {}
    queues = own_queues(built.compiled, optimal, cameras)
    variants[f"a) a queue per camera, {optimal} requests each (edge-ad)"] = (feeders(queues, {name: tensor}), queues)
    split = max(1, optimal // cameras)
    queues = own_queues(built.compiled, split, cameras)
    variants[f"b) a queue per camera, {split} request(s) each"] = (feeders(queues, {name: tensor}), queues)
    shared = SharedInferQueue(built.compiled, optimal)  # edge_ad/model/shared_queue.py
    views = [shared.view() for _ in range(cameras)]
    for view in views:
        view.set_callback(count)
    variants[f"c) one shared queue, {optimal} requests"] = (feeders(views, {name: tensor}), views)
    batch_note = None
    try:
        _, model = load_model(bundle, core)
        spec = built.bundle.preprocess
        model = with_uint8_input(model, spec, name)
        model.reshape({name: [cameras, spec.height, spec.width, 3]})
        batched = compile_model(core, model, "CPU", "throughput", None)
        size = max(1, int(batched.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        queues = own_queues(batched, size, 1)
        batch = np.ascontiguousarray(np.repeat(tensor, cameras, axis=0))
        variants[f"d) batches of {cameras} (a frame per camera), {size} requests"] = (
            feeders(queues, {name: batch}, cameras), queues)
    except Exception as exc:  # noqa: BLE001  a graph that cannot take another batch size
        batch_note = f"batch of {cameras} not possible: {' '.join(str(exc).split())[:200]}"
    for submitters, queues in variants.values():  # warm-up: the first run of each request costs extra
        _feed(submitters, queues, 0.5, done)
    samples: dict[str, list[tuple[float, float]]] = {key: [] for key in variants}
    for index in range(rounds):
        for key in (list(variants) if index % 2 == 0 else list(variants)[::-1]):
            samples[key].append(_feed(*variants[key], seconds, done))
    base = samples[next(iter(samples))]
    result = {key: {"fps": round(statistics.median(fps for fps, _ in values), 1),
                    "cpu_ms_per_frame": round(statistics.median(cpu for _, cpu in values), 2),
                    "fps_vs_a_paired": round(statistics.median(v[0] / b[0] for v, b in zip(values, base)), 3),
                    "fps_rounds": [round(fps, 1) for fps, _ in values]} for key, values in samples.items()}
    return {"cameras": cameras, "optimal_requests": optimal, "streams": built.streams, "variants": result,
            "note": batch_note}


# -- pipeline ---------------------------------------------------------------------------------------

def write_cameras_config(folder: Path, bundle: Path, videos: list[Path], port: int | None) -> Path:
    lines = [f'model = "{bundle.resolve()}"', 'mode = "throughput"', 'device_id = "bench"', "heartbeat = 5.0"]
    if port:
        lines += ["[mqtt]", 'host = "127.0.0.1"', f"port = {port}"]
    else:
        lines += ['jsonl = "-"']
    for index, video in enumerate(videos):
        lines += ["[[cameras]]", f'camera_id = "cam{index}"', f'video = "{video}"']
    path = folder / "cameras.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cameras(config: Path, timeout: float, shared_queue: bool = False) -> dict:
    """One `edge-ad --config` run (its outboxes in a state folder beside the config, not the user's); with
    shared_queue=True the same runner in a child process with one queue shared by the cameras, for comparison."""
    command = ([sys.executable, "-m", "benchmarks.multicamera", "--child", str(config)] if shared_queue else
               _edge_ad("--config", config))
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**_env(), "XDG_STATE_HOME": str(config.parent / "state")})
    match = SUMMARY.search(proc.stderr)
    if proc.returncode != 0 or match is None:
        raise SystemExit(f"edge-ad --config {config} failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    frames, elapsed, fps, cpu = match.groups()
    return {"processed": int(frames), "elapsed_s": float(elapsed), "fps": float(fps), "cpu_ms_per_frame": float(cpu)}


def child(config: Path) -> int:
    """`edge-ad --config CONFIG`, but with one infer request queue shared by the cameras."""
    from edge_ad.multicamera import SharedModels
    from edge_ad.multicamera import run_cameras as run_all
    from edge_ad.ops.camera_config import build_camera_configs
    from edge_ad.ops.statusline import setup_logging

    configs = build_camera_configs({}, config)
    setup_logging(configs[0].log_level)
    return run_all(configs, SharedModels(shared_queue=True))


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--child"]:
        return child(Path(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="bundle folder")
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--size", type=parse_size, default=(640, 480), help="video frame size WxH (default 640x480)")
    parser.add_argument("--frames", type=int, default=600, help="frames per camera's video (default 600)")
    parser.add_argument("--from-images", type=Path, help="make the videos from these images instead (e.g. MVTec test)")
    parser.add_argument("--repeat", type=int, default=2, help="pipeline runs, each between two bench runs")
    parser.add_argument("--bench-seconds", type=float, default=6.0)
    parser.add_argument("--queue-seconds", type=float, default=3.0, help="per variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the queue comparison")
    parser.add_argument("--queues-only", action="store_true")
    parser.add_argument("--no-queues", action="store_true")
    parser.add_argument("--no-mqtt", action="store_true", help="JSON lines to stdout instead of a local mosquitto")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    report: dict = {"machine": machine_info(), "bundle": str(args.model.resolve())}
    print(f"CPU: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
          f"load {report['machine']['load_average_start']}", flush=True)
    if not args.no_queues:
        queues = queue_variants(args.model, args.cameras, args.queue_seconds, args.rounds)
        report["queues"] = queues
        print(f"\nqueues: {args.cameras} feeder threads on one compiled model, throughput mode, "
              f"{queues['streams']} stream(s), optimum {queues['optimal_requests']} requests; median of "
              f"{args.rounds} rounds of {args.queue_seconds:g} s")
        for key, value in queues["variants"].items():
            print(f"  {key:56s} {value['fps']:7.1f} fps  {value['cpu_ms_per_frame']:6.2f} ms CPU/frame  "
                  f"x{value['fps_vs_a_paired']:.2f} of a) (paired)  rounds {value['fps_rounds']}")
        if queues["note"]:
            print(f"  {queues['note']}")
    if args.queues_only:
        return _write(report, args.json)

    work = Path(tempfile.mkdtemp(prefix="edge-ad-multicamera-"))
    width, height = args.size
    video = (video_from_images(work / "video.avi", args.from_images, args.frames, width, height) if args.from_images
             else synthetic_video(work / "video.avi", args.frames, width, height))
    videos = [video] * args.cameras  # every camera decodes its own copy of the stream: same cost as distinct files
    broker = None
    if not args.no_mqtt:
        if find_mosquitto() is None:
            raise SystemExit("mosquitto not installed (or use --no-mqtt)")
        broker = Mosquitto(work / "mosquitto")
        broker.start()
    try:
        config = write_cameras_config(work, args.model, videos, broker.port if broker else None)
        costs = stage_costs(args.model, video)
        benches = [run_bench(args.model, "throughput", "CPU", args.bench_seconds, 300)]
        runs, singles, shared = [], [], []
        for index in range(args.repeat):
            single = run_pipeline(args.model, video, mode="throughput", device="CPU", max_frames=None, broker=broker,
                                  workdir=work, run_id=f"single{index}", timeout=1200)
            singles.append({"fps": single["pipeline_fps"], "cpu_ms_per_frame": single["cpu_ms_per_frame"]})
            shared.append(run_cameras(config, timeout=1200, shared_queue=True))
            runs.append(run_cameras(config, timeout=1200))
            benches.append(run_bench(args.model, "throughput", "CPU", args.bench_seconds, 300))
    finally:
        if broker is not None:
            broker.stop()
    host_cpu = costs["decode_cpu_ms"] + costs["prepare_cpu_ms"]
    bench_cpu = statistics.median(b["throughput_cpu_ms_per_frame"] for b in benches)
    ratios = [run["fps"] / statistics.mean([benches[i]["throughput_fps"], benches[i + 1]["throughput_fps"]])
              for i, run in enumerate(runs)]
    cpu_ratios = [benches[i]["throughput_cpu_ms_per_frame"] / run["cpu_ms_per_frame"] for i, run in enumerate(runs)]
    ceiling = bench_cpu / (bench_cpu + host_cpu)
    bench_fields = ("throughput_fps", "throughput_cpu_ms_per_frame", "requests_in_flight", "streams")
    report["pipeline"] = {"cameras": args.cameras, "size": f"{width}x{height}", "frames_per_camera": args.frames,
                          "runs": runs, "single_camera": singles, "shared_queue": shared, "stage_costs": costs,
                          "cpu_share_ceiling": round(ceiling, 3),
                          "bench": [{k: b[k] for k in bench_fields} for b in benches],
                          "fps_ratio_median": round(statistics.median(ratios), 3),
                          "cpu_ratio_median": round(statistics.median(cpu_ratios), 3),
                          "load_average_end": load_average()}
    print(f"\npipeline: {args.cameras} cameras x {args.frames} frames of {width}x{height} MJPG, one process, "
          f"throughput mode, {'local mosquitto' if broker else 'JSON lines'}")
    for i, run in enumerate(runs):
        bench = statistics.mean([benches[i]["throughput_fps"], benches[i + 1]["throughput_fps"]])
        print(f"  run {i + 1}: aggregate {run['fps']:.1f} fps ({run['processed']} frames in "
              f"{run['elapsed_s']:.1f} s), {run['cpu_ms_per_frame']:.2f} ms CPU/frame; bench {bench:.1f} fps, "
              f"{benches[i]['throughput_cpu_ms_per_frame']:.2f} ms CPU/frame -> {ratios[i]:.0%} of bench fps")
    for i, (single, other) in enumerate(zip(singles, shared)):
        print(f"  run {i + 1} with one shared queue instead: {other['fps']:.1f} fps, "
              f"{other['cpu_ms_per_frame']:.2f} ms CPU/frame; one camera alone: {single['fps']:.1f} fps, "
              f"{single['cpu_ms_per_frame']:.2f} ms CPU/frame")
    print(f"  host work per frame (single-threaded CPU): decode {costs['decode_cpu_ms']:.2f} ms + resize "
          f"{costs['prepare_cpu_ms']:.2f} ms; bench {bench_cpu:.2f} ms -> CPU-share ceiling {ceiling:.0%}")
    print(f"  median: {statistics.median(ratios):.0%} of bench throughput (target {TARGET:.0%}); CPU-time ratio "
          f"(bench CPU/frame over the pipeline's) {statistics.median(cpu_ratios):.0%}; load {load_average()}")
    return _write(report, args.json)


def _write(report: dict, path: Path | None) -> int:
    if path:
        path.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
