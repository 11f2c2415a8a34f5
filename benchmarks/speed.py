"""Single-frame latency, batch-1 throughput, model size and pipeline fps of every variant.

Why: the issues ask what one frame costs on the CPU in each form the model takes (PyTorch eager FP32,
OpenVINO FP32 IR, OpenVINO INT8 IR) and what the whole `edge-ad` pipeline sustains on a video, per
algorithm and backbone, with the machine and its load stated next to the numbers.

    python -m benchmarks.speed --variants variants.json --out benchmarks/results

Method (everything at batch 1, the variant's input size, 256x256 for the real models):
- latency: the torch module of `training.run_dir.load_model` under `torch.inference_mode()` with torch's
  default threads; the bundles compiled exactly as the runtime compiles them
  (`edge_ad.model.inference.compile_bundle`: uint8 input with the pixel conversion in the graph, LATENCY hint,
  the precision the runtime picks: f32, or bf16 where the CPU has it and the bundle verified it) and run
  with synchronous requests, as `edge-ad bench` does. Each
  (variant, backend) segment does --warmup untimed calls, then --runs timed calls (p50, p99 of that
  segment). Segments are interleaved (every variant and backend once per round, the order rotated each
  round) over --rounds rounds, and the median over rounds of p50 and of p99 is reported: load drift on a
  shared machine hits all alike.
- throughput at batch 1: `edge-ad bench --mode throughput --json` (THROUGHPUT hint, OpenVINO's optimal
  number of requests in flight) for the IRs, once per round, median; torch = 1000 / p50 latency.
- model size on disk: model.xml + model.bin of each bundle; torch = the run's model.pt (state dict).
- pipeline fps: `edge-ad --video V --model B --mode throughput` publishing to a throw-away mosquitto,
  via `benchmarks.pipeline_fps.run_pipeline` (fps_avg of edge-ad's run summary: start-up excluded), median
  of --pipeline-repeat runs; the video is a 256x256 synthetic one unless --video / --from-images.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks import pipeline_fps as pf
from benchmarks.variants import Variant, load_variants

BACKENDS = ("torch", "fp32", "int8")
BACKEND_LABELS = {"torch": "PyTorch eager FP32", "fp32": "OpenVINO FP32 IR", "int8": "OpenVINO INT8 IR"}
DEFAULT_CATEGORY = "bottle"
InputError = pf.InputError
BenchmarkError = pf.BenchmarkError


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- input ------------------------------------------------------------------------------------------

def read_variants(path: Path) -> list[Variant]:
    """The variants JSON, or an InputError naming what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"variants file not found: {path}")
    try:
        variants = load_variants(path)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: expected a list of objects with algorithm, backbone, category, run_dir, "
                         f"fp32, int8 ({type(exc).__name__}: {exc})") from None
    if not variants:
        raise InputError(f"{path} lists no variants")
    return variants


def select_variants(variants: list[Variant], category: str = DEFAULT_CATEGORY) -> list[Variant]:
    """One variant per (algorithm, backbone): the one of `category`, else the first listed.

    Speed does not depend on the category (same architecture and input size); DFM's PCA size varies a
    little between categories, which is why the category measured is recorded with every row.
    """
    chosen: dict[tuple[str, str], Variant] = {}
    for variant in variants:
        key = (variant.algorithm, variant.backbone)
        if key not in chosen or (variant.category == category and chosen[key].category != category):
            chosen[key] = variant
    return list(chosen.values())


def check_variant(variant: Variant, need: tuple[str, ...] = ("run", "fp32", "int8")) -> None:
    """Fail early (before minutes of measuring) on a missing run folder or bundle."""
    if "run" in need:
        for name in ("config.json", "model.pt"):
            if not (variant.run_dir / name).is_file():
                raise InputError(f"{variant.name}: run folder {variant.run_dir} has no {name}")
    for kind in ("fp32", "int8"):
        if kind in need:
            bundle = getattr(variant, kind)
            for name in ("bundle.json", "model.xml", "model.bin"):
                if not (bundle / name).is_file():
                    raise InputError(f"{variant.name}: {kind} bundle {bundle} has no {name}")


# -- machine ----------------------------------------------------------------------------------------

def machine() -> dict:
    """pipeline_fps's machine description plus torch's version and thread count."""
    info = pf.machine_info()
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return info


def machine_line(m: dict) -> str:
    extra = f", torch {m['torch']} ({m['torch_threads']} threads)" if "torch" in m else ""
    return (f"{m['cpu']}, {m['cores']} usable core(s) ({pf.describe_isa(m.get('isa'))}), "
            f"load average at start {m['load_average_start']} (1/5/15 min), OpenVINO {m['openvino']}{extra}, "
            f"Python {m['python']}, {m['date']}")


# -- latency ----------------------------------------------------------------------------------------

def torch_runner(run_dir: Path, threads: int | None = None) -> tuple[Callable[[], object], dict]:
    """The trained module on a random batch of one at its training size, eager, inference_mode.

    `threads` sets torch's (process-wide) intra-op thread count; None keeps torch's default (one per core).
    """
    import torch

    if threads:
        torch.set_num_threads(threads)

    from training.run_dir import RunDirError, load_model

    try:
        model, config = load_model(run_dir)
    except RunDirError as exc:
        raise InputError(str(exc)) from None
    size = int(config.get("image_size", 256))
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))

    def call():
        with torch.inference_mode():
            return model(x)

    params = sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())
    return call, {"input": f"1x3x{size}x{size}", "tensors_elements": int(params), "threads": torch.get_num_threads()}


def openvino_runner(bundle: Path) -> tuple[Callable[[], object], dict]:
    """The bundle compiled as `edge-ad run --mode latency` compiles it; one synchronous request."""
    from edge_ad.model.bundle import BundleError
    from edge_ad.errors import EdgeAdError
    from edge_ad.model.inference import compile_bundle

    try:
        built = compile_bundle(bundle, "CPU", "latency")
    except (BundleError, EdgeAdError) as exc:
        raise InputError(f"{bundle}: {exc}") from None
    request = built.compiled.create_infer_request()
    name = built.bundle.model.input_name
    tensor = built.example_input()

    def call():
        return request.infer({name: tensor}, share_inputs=True)

    spec = built.bundle.preprocess
    return call, {"input": f"1x3x{spec.height}x{spec.width}", "inference_precision": built.precision,
                  "streams": built.streams, "host_input": built.host_input}


def time_calls(call: Callable[[], object], runs: int, warmup: int) -> list[float]:
    """`warmup` untimed calls, then `runs` timed ones; seconds per call."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def percentiles_ms(samples: list[float]) -> dict:
    ms = np.asarray(samples, dtype=np.float64) * 1000.0
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()),
            "min": float(ms.min()), "max": float(ms.max()), "n": int(ms.size)}


def measure_latency(runners: dict[tuple[str, str], Callable[[], object]], *, runs: int, warmup: int, rounds: int,
                    on_round: Callable[[int], None] | None = None) -> dict[tuple[str, str], dict]:
    """Interleaved rounds over every (variant, backend) segment; medians over rounds of p50 and p99.

    The segment order is rotated by one each round so that no segment always follows the same one.
    `on_round(r)` runs after round r (the caller interleaves throughput measurements there).
    """
    keys = list(runners)
    per_round: dict[tuple[str, str], list[dict]] = {key: [] for key in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            stats = percentiles_ms(time_calls(runners[key], runs, warmup))
            per_round[key].append(stats)
            log(f"speed: round {r + 1}/{rounds} {key[0]} {key[1]}: p50 {stats['p50']:.2f} ms, "
                f"p99 {stats['p99']:.2f} ms ({runs} runs), load {pf.load_average()[:1]}")
        if on_round is not None:
            on_round(r)
    results = {}
    for key, stats in per_round.items():
        results[key] = {
            "p50": statistics.median(s["p50"] for s in stats), "p99": statistics.median(s["p99"] for s in stats),
            "min": min(s["min"] for s in stats), "p50_rounds": [round(s["p50"], 3) for s in stats],
            "p99_rounds": [round(s["p99"], 3) for s in stats], "runs_per_round": runs, "warmup": warmup,
            "rounds": rounds,
        }
    return results


# -- sizes ------------------------------------------------------------------------------------------

def bundle_size(bundle: Path) -> int:
    """Bytes of the IR an industrial PC loads: model.xml + model.bin (bundle.json is ~10 kB of metadata)."""
    return sum((Path(bundle) / name).stat().st_size for name in ("model.xml", "model.bin"))


def torch_size(run_dir: Path) -> int:
    return (Path(run_dir) / "model.pt").stat().st_size


# -- the whole measurement --------------------------------------------------------------------------

def make_video(workdir: Path, video: Path | None, from_images: Path | None, frames: int, size: tuple[int, int]) -> dict:
    """The video the pipeline runs: given, made from images, or pipeline_fps's synthetic one."""
    width, height = size
    if video is not None:
        if not Path(video).is_file():
            raise InputError(f"video not found: {video}")
        path, origin = Path(video).resolve(), "given"
    elif from_images is not None:
        log(f"speed: writing a {width}x{height} video of {frames} frames from {from_images} ...")
        path = pf.video_from_images(workdir / "from_images.avi", Path(from_images), frames, width, height)
        origin = f"made from images under {from_images}"
    else:
        log(f"speed: writing a synthetic {width}x{height} video of {frames} frames ...")
        path, origin = pf.synthetic_video(workdir / "synthetic.avi", frames, width, height), "synthetic"
    return {**pf.video_info(path), "origin": origin}


def pipeline_runs(bundle: Path, video: dict, *, repeat: int, frames: int, broker, workdir: Path, tag: str,
                  timeout: float) -> dict:
    """--repeat runs of `edge-ad --video` in throughput mode; median fps_avg."""
    runs = []
    for rep in range(repeat):
        log(f"speed: edge-ad --video on {bundle.name} ({min(frames, video['frames'])} frames), run {rep + 1}/{repeat} ...")
        run = pf.run_pipeline(bundle, Path(video["path"]), mode="throughput", device="CPU",
                              max_frames=min(frames, video["frames"]), broker=broker, workdir=workdir,
                              run_id=f"{tag}-{rep}", timeout=timeout)
        runs.append(run)
    fps = [r["pipeline_fps"] for r in runs if r["pipeline_fps"] is not None]
    typical = runs[len(runs) // 2]
    return {"fps": statistics.median(fps) if fps else None, "fps_runs": [round(f, 2) for f in fps],
            "processed": typical["processed"], "errors": typical["errors"], "dropped": typical["dropped"],
            "alerts": typical["alerts"], "alerts_received": typical["alerts_received"],
            "cpu_ms_per_frame": typical["cpu_ms_per_frame"], "requests_in_flight": typical["requests_in_flight"],
            "load_average": [r["load_average"] for r in runs]}


def measure_speed(variants: list[Variant], out_dir: Path, *, category: str = DEFAULT_CATEGORY, runs: int = 60,
                  warmup: int = 10, rounds: int = 3, throughput_seconds: float = 3.0, pipeline: bool = True,
                  pipeline_frames: int = 300, pipeline_repeat: int = 2, video: Path | None = None,
                  from_images: Path | None = None, video_size: tuple[int, int] = (256, 256), mqtt: bool | None = None,
                  torch_threads: int | None = None, timeout: float = 600.0) -> dict:
    """Measure every (algorithm, backbone) of `variants` (one category) and write speed.json / speed.md."""
    if runs < 1 or warmup < 0 or rounds < 1 or pipeline_repeat < 1 or pipeline_frames < 10:
        raise InputError("need runs >= 1, warmup >= 0, rounds >= 1, pipeline repeat >= 1, pipeline frames >= 10")
    chosen = select_variants(variants, category)
    for variant in chosen:
        check_variant(variant)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    if torch_threads:
        info["torch_threads"] = torch_threads
    log(f"speed: {machine_line(info)}")
    log(f"speed: {len(chosen)} variant(s): {', '.join(v.name for v in chosen)}")

    runners, meta = {}, {}
    for variant in chosen:
        log(f"speed: loading {variant.name} (torch, FP32 IR, INT8 IR) ...")
        runners[(variant.name, "torch")], meta[(variant.name, "torch")] = torch_runner(variant.run_dir, torch_threads)
        runners[(variant.name, "fp32")], meta[(variant.name, "fp32")] = openvino_runner(variant.fp32)
        runners[(variant.name, "int8")], meta[(variant.name, "int8")] = openvino_runner(variant.int8)

    throughput: dict[tuple[str, str], list[dict]] = {(v.name, k): [] for v in chosen for k in ("fp32", "int8")}

    def throughput_round(r: int) -> None:
        """After each latency round, `edge-ad bench --mode throughput` on every IR (same interleaving)."""
        for variant in chosen:
            for kind in ("fp32", "int8"):
                bench = pf.run_bench(getattr(variant, kind), "throughput", "CPU", 2.0 * throughput_seconds, timeout)
                throughput[(variant.name, kind)].append(bench)
                log(f"speed: round {r + 1}/{rounds} {variant.name} {kind}: {bench['throughput_fps']:.1f} fps "
                    f"(edge-ad bench --mode throughput, {bench['requests_in_flight']} requests)")

    latency = measure_latency(runners, runs=runs, warmup=warmup, rounds=rounds, on_round=throughput_round)
    del runners  # free the compiled models before edge-ad runs beside us

    pipe: dict[tuple[str, str], dict] = {}
    video_info, publishing = None, None
    if pipeline:
        mosquitto = pf.find_mosquitto()
        use_mqtt = bool(mosquitto) if mqtt is None else mqtt
        if use_mqtt and not mosquitto:
            raise InputError("MQTT publishing needs the mosquitto binary (apt-get install mosquitto)")
        with tempfile.TemporaryDirectory(prefix="speed-") as tmp:
            workdir = Path(tmp)
            video_info = make_video(workdir, video, from_images, max(pipeline_frames, 10), video_size)
            broker = pf.Mosquitto(workdir, binary=mosquitto) if use_mqtt else None
            if broker is not None:
                broker.__enter__()
            try:
                publishing = (f"MQTT to mosquitto {broker.version()} on 127.0.0.1" if broker
                              else "JSON lines to a file (no broker)")
                for i, variant in enumerate(chosen):
                    for kind in ("fp32", "int8"):
                        pipe[(variant.name, kind)] = pipeline_runs(
                            getattr(variant, kind), video_info, repeat=pipeline_repeat, frames=pipeline_frames,
                            broker=broker, workdir=workdir, tag=f"{i}-{kind}", timeout=timeout)
            finally:
                if broker is not None:
                    broker.__exit__()
            if video is None:
                video_info["path"] = "(temporary)"

    results = []
    for variant in chosen:
        row = {"variant": variant.name, "algorithm": variant.algorithm, "backbone": variant.backbone,
               "category": variant.category, "run_dir": str(variant.run_dir), "fp32_bundle": str(variant.fp32),
               "int8_bundle": str(variant.int8), "input": meta[(variant.name, "torch")]["input"],
               "tensors_elements": meta[(variant.name, "torch")]["tensors_elements"],
               "size_bytes": {"torch": torch_size(variant.run_dir), "fp32": bundle_size(variant.fp32),
                              "int8": bundle_size(variant.int8)},
               "latency_ms": {}, "throughput_fps": {}, "throughput_fps_rounds": {}, "pipeline": {}, "compiled": {}}
        for kind in BACKENDS:
            row["latency_ms"][kind] = latency[(variant.name, kind)]
        row["throughput_fps"]["torch"] = 1000.0 / latency[(variant.name, "torch")]["p50"]
        row["throughput_fps_rounds"]["torch"] = "1000 / p50 latency (batch 1, no request overlap in eager torch)"
        for kind in ("fp32", "int8"):
            benches = throughput[(variant.name, kind)]
            fps = [b["throughput_fps"] for b in benches]
            row["throughput_fps"][kind] = statistics.median(fps)
            row["throughput_fps_rounds"][kind] = fps
            m = meta[(variant.name, kind)]
            row["compiled"][kind] = {"latency": {k: m[k] for k in ("inference_precision", "streams", "host_input")},
                                     "throughput": {"streams": benches[-1]["streams"],
                                                    "requests_in_flight": benches[-1]["requests_in_flight"],
                                                    "cpu_ms_per_frame": statistics.median(
                                                        b["throughput_cpu_ms_per_frame"] for b in benches)}}
            row["pipeline"][kind] = pipe.get((variant.name, kind))
        results.append(row)

    report = {"machine": info, "load_average_end": pf.load_average(),
              "settings": {"category": category, "runs": runs, "warmup": warmup, "rounds": rounds,
                           "throughput_seconds": throughput_seconds, "pipeline": pipeline,
                           "pipeline_frames": pipeline_frames, "pipeline_repeat": pipeline_repeat,
                           "pipeline_mode": "throughput", "video": video_info, "publishing": publishing},
              "results": results}
    write_report(report, out_dir)
    return report


def flat_rows(report: dict) -> list[dict]:
    """One flat row per (variant, engine) for consumers that want a table (e.g. benchmarks.figures)."""
    rows = []
    for r in report["results"]:
        for kind in BACKENDS:
            pipe = r["pipeline"].get(kind) if kind != "torch" else None
            rows.append({"algorithm": r["algorithm"], "backbone": r["backbone"], "category": r["category"],
                         "engine": kind, "label": BACKEND_LABELS[kind], "p50_ms": r["latency_ms"][kind]["p50"],
                         "p99_ms": r["latency_ms"][kind]["p99"], "throughput_fps": r["throughput_fps"][kind],
                         "size_bytes": r["size_bytes"][kind], "pipeline_fps": pipe["fps"] if pipe else None})
    return rows


def write_report(report: dict, out_dir: Path) -> None:
    """speed.json (nested results plus flat `rows`) and speed.md."""
    report["rows"] = flat_rows(report)
    (Path(out_dir) / "speed.json").write_text(json.dumps(report, indent=2) + "\n")
    (Path(out_dir) / "speed.md").write_text(markdown(report) + "\n")


# -- report -----------------------------------------------------------------------------------------

def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def _f(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"Machine: {machine_line(report['machine'])}; load average at end {report['load_average_end']}.",
        "",
        f"Batch 1, category {s['category']} (speed does not depend on it). Latency: {s['warmup']} warm-up + "
        f"{s['runs']} timed single-frame calls per segment, segments interleaved over {s['rounds']} round(s), "
        "median over rounds of p50 and p99 (spread of p50 over rounds in brackets). OpenVINO compiled as "
        "`edge-ad` does (LATENCY hint, the runtime's precision choice, uint8 input with the pixel conversion in the graph). "
        "Throughput: `edge-ad bench --mode throughput` (OpenVINO's optimal requests in flight), median over "
        "rounds; torch = 1000 / p50. Pipeline: `edge-ad --video --mode throughput` end to end (decode, resize, "
        "infer, decide, publish)"
        + (f", {s['video']['size']} {s['video']['origin']} video, {s['publishing']}, median of "
           f"{s['pipeline_repeat']} run(s)." if s.get("video") else ": not measured."),
        "",
        "| algorithm | backbone | model | size on disk (MB) | latency p50 (ms) | latency p99 (ms) | "
        "throughput batch 1 (fps) | edge-ad pipeline (fps) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        for kind in BACKENDS:
            lat = row["latency_ms"][kind]
            spread = f" ({min(lat['p50_rounds']):.1f}-{max(lat['p50_rounds']):.1f})" if len(lat["p50_rounds"]) > 1 else ""
            pipe = row["pipeline"].get(kind) if kind != "torch" else None
            lines.append(
                f"| {row['algorithm'].upper()} | {row['backbone']} | {BACKEND_LABELS[kind]} | "
                f"{_mb(row['size_bytes'][kind])} | {lat['p50']:.1f}{spread} | {lat['p99']:.1f} | "
                f"{_f(row['throughput_fps'][kind])} | {_f(pipe['fps'] if pipe else None)} |")
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one `error: ...` line, exit code 2."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description)
    parser.add_argument("--variants", type=Path, required=True, metavar="VARIANTS_JSON",
                        help="list of variants (benchmarks.variants.save_variants)")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT_DIR", help="where the JSON and Markdown go")
    parser.add_argument("--category", default=DEFAULT_CATEGORY,
                        help=f"measure the variants of this category (default: {DEFAULT_CATEGORY}; "
                             "another one where a model has none)")
    return parser


def run_cli(work: Callable[[], dict], render: Callable[[dict], str]) -> int:
    """Run `work`, print its Markdown; a bad input or failed measurement is one `error:` line."""
    try:
        report = work()
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(render(report))
    return 0


def main(argv=None) -> int:
    parser = base_parser("python -m benchmarks.speed", "Latency, throughput, model size and edge-ad pipeline fps "
                                                        "of torch / OpenVINO FP32 / OpenVINO INT8, per variant.")
    parser.add_argument("--runs", type=int, default=60, help="timed calls per segment (default: 60)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls before each segment (default: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (default: 3)")
    parser.add_argument("--throughput-seconds", type=float, default=3.0,
                        help="throughput phase of each edge-ad bench run (default: 3)")
    parser.add_argument("--torch-threads", type=int, default=None, metavar="N",
                        help="torch intra-op threads (default: torch's own, one per core)")
    parser.add_argument("--no-pipeline", dest="pipeline", action="store_false", help="skip the edge-ad video runs")
    parser.add_argument("--pipeline-frames", type=int, default=300, help="frames per edge-ad run (default: 300)")
    parser.add_argument("--pipeline-repeat", type=int, default=2, help="edge-ad runs per bundle (default: 2)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--video", type=Path, help="video for the pipeline (default: synthetic 256x256)")
    src.add_argument("--from-images", type=Path, metavar="DIR", help="make the pipeline video from these images")
    parser.add_argument("--size", type=pf.parse_size, default=(256, 256), metavar="WxH",
                        help="frame size of a generated video (default: 256x256)")
    parser.add_argument("--mqtt", action=argparse.BooleanOptionalAction, default=None,
                        help="publish to a throw-away mosquitto (default: when installed)")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run_cli(lambda: measure_speed(
        read_variants(args.variants), args.out, category=args.category, runs=args.runs, warmup=args.warmup,
        rounds=args.rounds, throughput_seconds=args.throughput_seconds, pipeline=args.pipeline,
        pipeline_frames=args.pipeline_frames, pipeline_repeat=args.pipeline_repeat, video=args.video,
        from_images=args.from_images, video_size=args.size, mqtt=args.mqtt, torch_threads=args.torch_threads),
        markdown)


if __name__ == "__main__":
    sys.exit(main())
