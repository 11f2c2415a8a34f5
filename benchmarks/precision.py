"""FP32 vs FP32-run-as-bf16 vs INT8 on this CPU, per default bundle: python -m benchmarks.precision

For each model NAME it reads bundles/NAME-fp32 and bundles/NAME-int8 (and bundles/NAME-int8-w8, the
8-bit-weight recipe, when present) and measures, with each bundle compiled exactly as `edge-ad run`
compiles it (`compile_bundle`: uint8 input, performance hint, inference precision pinned here):
- latency p50: one synchronous request, LATENCY hint (what one frame waits);
- throughput: THROUGHPUT hint, AsyncInferQueue with OpenVINO's optimal request count (as
  `edge-ad bench --mode throughput`).
Variants are timed in interleaved rounds and the median of the rounds is reported: the CPU may be
shared, and load then hits every variant alike. For each INT8 model it also lists which operations
the compiled CPU graph runs in f32 vs i8 (runtime model `runtimePrecision`) and their share of the
time (PERF_COUNT profiling), and it compares the bundles' recorded accuracy (7-bit vs 8-bit weights,
bf16 checks). Results: benchmarks/results/precision.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openvino as ov

from benchmarks import pipeline_fps as pf
from edge_ad.model.bundle import read_bundle
from edge_ad.model.inference import compile_bundle
from edge_ad.model.precision import cpu_capabilities, cpu_has_bf16

MODELS = ("stfpm-bottle", "stfpm-screw", "dfm-bottle", "dfm-screw")
HEAVY = ("Convolution", "FullyConnected", "MatMul")  # substrings: GroupConvolution, FullyConnectedCompressed...
INT8_TARGET = 1.7  # INT8 >= 1.7x FP32 throughput on a VNNI CPU (issue 13)


@dataclass(frozen=True)
class Variant:
    label: str  # e.g. "FP32 as bf16"
    suffix: str  # bundle folder suffix
    precision: str  # INFERENCE_PRECISION_HINT


VARIANTS = (
    Variant("FP32 (f32)", "fp32", "f32"),
    Variant("FP32 as bf16", "fp32", "bf16"),
    Variant("INT8 (7-bit w)", "int8", "f32"),
    Variant("INT8 as bf16", "int8", "bf16"),
    Variant("INT8 8-bit w", "int8-w8", "f32"),
)


def cpu_info(core: ov.Core) -> dict:
    import os

    return {"cpu": str(core.get_property("CPU", "FULL_DEVICE_NAME")), "model_name": pf.cpu_model(),
            "cores": os.cpu_count(), "flags": pf.isa_flags() or [],
            "openvino_capabilities": cpu_capabilities(core),
            "openvino": ov.get_version(), "load_average_start": [round(x, 2) for x in os.getloadavg()]}


def latency_p50_ms(built, seconds: float) -> float:
    request, name, tensor = built.compiled.create_infer_request(), built.bundle.model.input_name, built.example_input()
    for _ in range(3):
        request.infer({name: tensor}, share_inputs=True)
    samples, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(samples) < 10:
        start = time.perf_counter()
        request.infer({name: tensor}, share_inputs=True)
        samples.append(time.perf_counter() - start)
    return float(np.median(samples)) * 1000.0


def throughput_fps(built, seconds: float) -> float:
    """edge_ad.ops.bench's throughput phase: OpenVINO's optimal number of requests kept busy."""
    name, tensor, nireq = built.bundle.model.input_name, built.example_input(), built.optimal_requests
    queue = ov.AsyncInferQueue(built.compiled, nireq)
    for _ in range(nireq):
        queue.start_async({name: tensor}, share_inputs=True)
    queue.wait_all()
    frames, start = 0, time.perf_counter()
    while time.perf_counter() < start + seconds or frames < nireq:
        queue.start_async({name: tensor}, share_inputs=True)
        frames += 1
    queue.wait_all()
    return frames / (time.perf_counter() - start)


def _arithmetic(kernel: str, runtime_precision: str) -> str:
    """i8 / bf16 / f32 from the kernel name (brgconv_avx512_1x1_I8, brgemm_avx512_f32...): an INT8-weight
    FullyConnectedCompressed reports runtimePrecision u8 but multiplies in f32; else runtimePrecision."""
    tail = kernel.lower().rsplit("_", 1)[-1]
    if tail in ("i8", "u8", "bf16", "f32", "fp32", "f16"):
        return {"u8": "i8", "fp32": "f32"}.get(tail, tail)
    rp = runtime_precision.lower()
    return "i8" if rp in ("i8", "u8") else rp or "?"


def op_precisions(bundle_dir: Path, precision: str, core: ov.Core, runs: int = 20) -> dict:
    """Which compiled ops run in which precision, and their share of the time (PERF_COUNT, latency hint)."""
    from edge_ad.model.inference import with_uint8_input

    bundle = read_bundle(bundle_dir)  # compiled as compile_bundle does, plus PERF_COUNT
    source = with_uint8_input(core.read_model(str(bundle_dir / bundle.model.xml)), bundle.preprocess,
                              bundle.model.input_name)
    compiled = core.compile_model(source, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision,
                                                  "PERF_COUNT": True})
    model = compiled.get_runtime_model()
    info = {}
    for op in model.get_ordered_ops():
        rt = op.get_rt_info()
        get = lambda key: rt[key].astype(str) if key in rt else ""  # noqa: E731
        info[op.get_friendly_name()] = (get("layerType"), get("runtimePrecision"), get("originalLayersNames"))
    kernels = {}
    request = compiled.create_infer_request()
    tensor = np.random.default_rng(0).integers(0, 256, (1, bundle.preprocess.height, bundle.preprocess.width, 3),
                                               dtype=np.uint8)
    times: dict[str, float] = defaultdict(float)
    for _ in range(3 + runs):
        request.infer({bundle.model.input_name: tensor})
    for _ in range(runs):
        request.infer({bundle.model.input_name: tensor})
        for item in request.profiling_info:
            times[item.node_name] += item.real_time.total_seconds() * 1e3 / runs
            kernels[item.node_name] = item.exec_type
    total = sum(times.values()) or 1.0
    by_precision: dict[str, float] = defaultdict(float)
    heavy_count: dict[str, int] = defaultdict(int)
    heavy_f32 = []
    for name, ms in times.items():
        layer, rp, original = info.get(name, ("?", "?", ""))
        group = _arithmetic(kernels.get(name, ""), rp)
        heavy = any(kind in layer for kind in HEAVY)
        by_precision[f"{'heavy' if heavy else 'other'} {group}"] += ms
        if heavy:
            heavy_count[group] += 1
            if group != "i8":
                heavy_f32.append({"node": name, "type": layer, "precision": rp, "kernel": kernels.get(name, ""),
                                  "ms": round(ms, 3),
                                  "share": round(ms / total, 4), "original": original[:200]})
    heavy_f32.sort(key=lambda row: -row["ms"])
    return {"total_ms": round(total, 3),
            "share_by_precision": {k: round(v / total, 4) for k, v in sorted(by_precision.items(), key=lambda kv: -kv[1])},
            "heavy_ops_by_precision": dict(heavy_count), "heavy_not_i8": heavy_f32}


def recorded_accuracy(bundle_dir: Path) -> dict:
    """What the bundle's own bundle.json says: test metrics vs FP32 IR, validation agreement, bf16 check."""
    bundle = read_bundle(bundle_dir, verify=False)
    key = "int8_ir" if bundle.model.precision == "int8" else "fp32_ir"
    metrics = bundle.metrics.get(key, {})
    calibration = bundle.calibration or {}
    check = bundle.precision_checks.get("bf16")
    return {
        "image_auroc": metrics.get("image_auroc"), "pixel_auroc": metrics.get("pixel_auroc"),
        "image_auroc_drop_vs_fp32_ir": metrics.get("image_auroc_drop_vs_fp32_ir"),
        "pixel_auroc_drop_vs_fp32_ir": metrics.get("pixel_auroc_drop_vs_fp32_ir"),
        "spearman_vs_fp32_ir": metrics.get("spearman_vs_fp32_ir"),
        "validation_agreement": (calibration.get("validation_agreement") or {}).get("mean"),
        "kernel_agreement": (calibration.get("kernel_check") or {}).get("int8_kernels_vs_fp32_emulation"),
        "recipe": (calibration.get("recipe") or {}).get("name"),
        "bf16": None if check is None else {k: getattr(check, k) for k in (
            "verified", "image_auroc_delta", "pixel_auroc_delta", "spearman", "max_score_deviation",
            "max_validation_deviation",
            "validation_decisions_agree", "test_decision_agreement", "reason")},
    }


def measure(bundles: Path, models: list[str], seconds: float, rounds: int) -> dict:
    core = ov.Core()
    report = {"machine": cpu_info(core), "seconds_per_phase": seconds, "rounds": rounds, "models": {}}
    # without BF16 the CPU plugin would run a bf16 hint as f32: timing it twice says nothing
    precisions = ("f32", "bf16") if cpu_has_bf16(core) else ("f32",)
    for name in models:
        variants = [v for v in VARIANTS if v.precision in precisions
                    and (bundles / f"{name}-{v.suffix}" / "bundle.json").is_file()]
        if not variants:
            print(f"skipping {name}: no bundles under {bundles}", file=sys.stderr)
            continue
        print(f"{name}: {', '.join(v.label for v in variants)}", file=sys.stderr)
        compiled = {(v, mode): compile_bundle(bundles / f"{name}-{v.suffix}", "CPU", mode, v.precision, core)
                    for v in variants for mode in ("latency", "throughput")}
        lat, fps = defaultdict(list), defaultdict(list)
        for _ in range(rounds):
            for v in variants:
                lat[v].append(latency_p50_ms(compiled[(v, "latency")], seconds))
                fps[v].append(throughput_fps(compiled[(v, "throughput")], seconds))
        rows = {}
        for v in variants:
            rows[v.label] = {"bundle": str(bundles / f"{name}-{v.suffix}"), "precision": v.precision,
                             "compiled_precision": compiled[(v, "latency")].precision,
                             "latency_p50_ms": round(statistics.median(lat[v]), 3),
                             "latency_rounds_ms": [round(x, 3) for x in lat[v]],
                             "throughput_fps": round(statistics.median(fps[v]), 2),
                             "throughput_rounds_fps": [round(x, 2) for x in fps[v]],
                             "requests": compiled[(v, "throughput")].optimal_requests,
                             "accuracy": recorded_accuracy(bundles / f"{name}-{v.suffix}")}
        del compiled
        entry = {"variants": rows}
        base = rows.get("FP32 (f32)")
        if base:
            for row in rows.values():
                row["throughput_vs_fp32"] = round(row["throughput_fps"] / base["throughput_fps"], 3)
                row["latency_speedup_vs_fp32"] = round(base["latency_p50_ms"] / row["latency_p50_ms"], 3)
        for suffix in ("int8", "int8-w8"):
            if (bundles / f"{name}-{suffix}" / "bundle.json").is_file():
                entry[f"ops_{suffix}"] = op_precisions(bundles / f"{name}-{suffix}", "f32", core)
        report["models"][name] = entry
    return report


def _f(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"CPU: {m['model_name'] or m['cpu']} ({m['cores']} cores; flags {', '.join(m['flags'])}; OpenVINO "
             f"capabilities {', '.join(m['openvino_capabilities'])}), OpenVINO {m['openvino'].split('-')[0]}, load "
             f"average at start {m['load_average_start']}; median of {report['rounds']} interleaved rounds of "
             f"{report['seconds_per_phase']:g} s per phase.", "",
             "| model | variant | latency p50 ms | throughput fps | x FP32 fps | image AUROC | pixel AUROC | "
             "Spearman vs FP32 | bf16 check |", "|---|---|---|---|---|---|---|---|---|"]
    if "BF16" not in m["openvino_capabilities"]:
        lines[0] += " No bf16 rows: this CPU has no BF16, so OpenVINO runs a bf16 hint as f32."
    vnni = any(flag in m["flags"] for flag in ("avx512_vnni", "avx_vnni"))
    verdicts = []
    for name, entry in report["models"].items():
        for label, row in entry["variants"].items():
            acc = row["accuracy"]
            bf16 = acc["bf16"]
            if row["precision"] == "bf16" and bf16 and bf16["image_auroc_delta"] is None:
                check = f"not verified: {bf16['reason']}"
            elif row["precision"] == "bf16" and bf16:
                check = (f"{'verified' if bf16['verified'] else 'FAILED'}: AUROC {_f(bf16['image_auroc_delta'], '+.4f')}"
                         f"/{_f(bf16['pixel_auroc_delta'], '+.4f')}, rho {_f(bf16['spearman'], '.4f')}, "
                         f"max dev {_f(bf16['max_score_deviation'], '.2%')}")
            else:
                check = ""
            rho = acc["spearman_vs_fp32_ir"] if "INT8" in label and row["precision"] == "f32" else (
                bf16["spearman"] if row["precision"] == "bf16" and bf16 else None)
            lines.append(f"| {name} | {label} | {row['latency_p50_ms']:.2f} | {row['throughput_fps']:.1f} | "
                         f"{_f(row.get('throughput_vs_fp32'), '.2f')} | {_f(acc['image_auroc'])} | "
                         f"{_f(acc['pixel_auroc'])} | {_f(rho, '.4f')} | {check} |")
        int8 = entry["variants"].get("INT8 (7-bit w)")
        if int8 and "throughput_vs_fp32" in int8:
            met = int8["throughput_vs_fp32"] >= INT8_TARGET
            verdicts.append(f"{name}: INT8 {int8['throughput_vs_fp32']:.2f}x FP32 throughput "
                            f"({'meets' if met else 'misses'} the {INT8_TARGET}x target)")
    scope = "" if vnni else " (the target is for CPUs with VNNI; this one has none: the gain is only recorded)"
    lines += ["", f"INT8 >= 1.7x FP32 throughput{scope}: " + "; ".join(verdicts) + ".", "",
              "Where the INT8 models' time goes (f32 hint, latency, PERF_COUNT; heavy = convolutions/matmuls):", "",
              "| model | recipe | time in i8 conv/matmul | in f32 conv/matmul | in other ops | heavy ops i8 / f32 | "
              "heaviest f32 ops (share of time) |", "|---|---|---|---|---|---|---|"]
    for name, entry in report["models"].items():
        for suffix in ("int8", "int8-w8"):
            ops = entry.get(f"ops_{suffix}")
            if not ops:
                continue
            share, heavy = ops["share_by_precision"], ops["heavy_ops_by_precision"]
            top = ", ".join(f"{o['type']} {o['node'][:40]} {o['share']:.0%}" for o in ops["heavy_not_i8"][:3])
            other = sum(v for k, v in share.items() if k.startswith("other"))
            lines.append(f"| {name} | {suffix} | {share.get('heavy i8', 0):.0%} | {share.get('heavy f32', 0):.0%} | "
                         f"{other:.0%} | {heavy.get('i8', 0)} / {heavy.get('f32', 0)} | {top} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", type=Path, default=Path("bundles"), help="folder with NAME-fp32, NAME-int8 (default: bundles)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list (default: {','.join(MODELS)})")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per latency/throughput phase (default: 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, median reported (default: 3)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where precision.json/.md go")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1:
        print("error: --seconds must be > 0 and --rounds >= 1", file=sys.stderr)
        return 2
    report = measure(args.bundles, [m for m in args.models.split(",") if m], args.seconds, args.rounds)
    if not report["models"]:
        print(f"error: no bundles found under {args.bundles}", file=sys.stderr)
        return 2
    text = markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "precision.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
