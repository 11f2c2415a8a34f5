"""Roofline: FLOPs per frame of each model, achieved GFLOP/s, and how far that is from the CPU's limits.

Why: a latency alone does not say whether a model could run faster on this CPU. Placing each model
(torch eager, OpenVINO FP32, OpenVINO INT8) on a roofline (compute peak, memory-bandwidth slope) shows how
much of the machine it uses and which limit is nearer.

    python -m benchmarks.roofline --variants variants.json --out benchmarks/results   # after benchmarks.speed

Method:
- FLOPs per frame: `torch.utils.flop_counter.FlopCounterMode` on the trained torch module (batch 1, the
  training input size). It counts convolutions (2 x MACs; grouped/depthwise correctly: the weight's
  in-channels are already divided by the groups) and matrix products (mm, addmm, bmm, ...), without bias
  adds. It does not count elementwise ops (activations, residual adds, STFPM's feature normalisation, DFM's
  centring and squared error), batch norm (folded into the convolutions in the IR), pooling, interpolation
  (upsampling the anomaly map) or reductions; their output elements are reported as `uncounted_elements`
  (about one operation each) so their share can be judged.
- achieved GFLOP/s = FLOPs / p50 single-frame latency from speed.json (INT8: the same network's operations
  per second, GOP/s).
- compute peak = cores x clock x FP32 FLOP per cycle per core: vector lanes (AVX-512: 16, AVX2: 8, SSE: 4)
  x 2 (FMA) x FMA units (assumed 2, --fma-units). The clock is the CPU's base clock (lscpu max MHz, else the
  "@ x GHz" of the model name): no turbo, no AVX-512 frequency drop. Without VNNI an INT8 multiply-accumulate
  takes vpmaddubsw + vpmaddwd + vpaddd, 3 instructions per 64 MACs against one FMA per 16 FP32 MACs, so the
  INT8 peak is at most 4/3 of the FP32 one; with VNNI (vpdpbusd) it would be 4x.
- measured ceilings: float32 matrix multiply (torch.mm, n = 2048, all cores; what dense compute reaches in
  practice) and memory bandwidth (numpy copy and a two-pass triad on arrays far larger than the L3, one
  thread per core; bytes = reads + writes, no write-allocate, as STREAM counts; the roof uses the larger).
- arithmetic intensity = FLOPs / bytes moved per frame. Bytes (an estimate of compulsory traffic): every
  weight once (torch: the parameters and buffers the counted ops read; IRs: the size of model.bin, which
  holds all constants, INT8 weights at 1 byte) plus, for every counted op, its activation inputs and
  output once (FP32, 4 bytes; also for INT8, where OpenVINO keeps some activations in 8 bits: an upper
  bound). Fused ops and caches change the real traffic: most activations of a 256x256 MobileNet fit in
  the L2/L3, so the DRAM traffic is likely below this and the true intensity higher.
"""

from __future__ import annotations

import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks import pipeline_fps as pf
from benchmarks.speed import (BACKEND_LABELS, BACKENDS, InputError, _f, base_parser, check_variant, log, machine,
                              machine_line, read_variants, run_cli, select_variants)
from benchmarks.variants import Variant

MARKERS = {"torch": "o", "fp32": "s", "int8": "^"}


# -- counting -----------------------------------------------------------------------------------------

def count_flops(model, x) -> dict:
    """FLOPs of one forward pass as FlopCounterMode counts them, total and per aten op."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"total": int(counter.get_total_flops()), "by_op": by_op}


def count_traffic(model, x) -> dict:
    """Bytes the FLOP-counted ops read and write (weights once, activations per op) and what is left uncounted.

    Weights are the module's parameters and buffers, recognised by storage; activations are every other
    tensor argument and the outputs of those ops. `uncounted_elements` sums the outputs of all other
    non-view ops (elementwise, pooling, interpolation, reductions).
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import flop_registry

    weights = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        weights[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    used: set[int] = set()
    totals = {"activation_in": 0, "activation_out": 0, "uncounted_elements": 0}
    uncounted_ops: dict[str, int] = {}

    class Traffic(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func._overloadpacket not in flop_registry:  # as FlopCounterMode: composite ops (conv2d) decompose
                with self:
                    out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            out = func(*args, **kwargs)
            outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            if func._overloadpacket in flop_registry:
                for t in tree_flatten((args, kwargs))[0]:
                    if not isinstance(t, torch.Tensor):
                        continue
                    ptr = t.untyped_storage().data_ptr()
                    if ptr in weights:
                        used.add(ptr)
                    else:
                        totals["activation_in"] += t.numel() * t.element_size()
                totals["activation_out"] += sum(t.numel() * t.element_size() for t in outputs)
            elif not func.is_view:
                elements = sum(t.numel() for t in outputs)
                totals["uncounted_elements"] += elements
                name = str(func._overloadpacket)
                uncounted_ops[name] = uncounted_ops.get(name, 0) + elements
            return out

    with torch.inference_mode(), Traffic():
        model(x)
    top = dict(sorted(uncounted_ops.items(), key=lambda kv: kv[1], reverse=True)[:8])
    return {"weight_bytes": sum(weights[p] for p in used), **totals, "uncounted_by_op": top}


def model_counts(run_dir: Path) -> dict:
    """FLOPs and traffic of the trained module of a run folder at its input size, batch 1."""
    import torch

    from training.run_dir import RunDirError, load_model

    try:
        model, config = load_model(run_dir)
    except RunDirError as exc:
        raise InputError(str(exc)) from None
    size = int(config.get("image_size", 256))
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return {"input": f"1x3x{size}x{size}", "flops": count_flops(model, x), "traffic": count_traffic(model, x)}


# -- the machine's ceilings ---------------------------------------------------------------------------

def _cpuinfo() -> tuple[set[str], list[float]]:
    try:
        mhz = [float(value) for value in pf.cpuinfo_field("cpu MHz")]
    except ValueError:
        mhz = []
    return pf.cpu_flags() or set(), mhz


def _lscpu_max_mhz() -> float | None:
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^CPU max MHz:\s*([\d.]+)", out, re.M)
    return float(match.group(1)) if match else None


def cpu_peak(ghz: float | None = None, fma_units: int = 2, cores: int | None = None) -> dict:
    """Theoretical FP32 peak (and the INT8 bound) from the ISA flags, clock and core count; see the docstring."""
    flags, mhz = _cpuinfo()
    cores = cores or pf.usable_cores()
    source = "given"
    if ghz is None:
        lscpu = _lscpu_max_mhz()
        named = re.search(r"@\s*([\d.]+)\s*GHz", pf.cpu_model())
        if lscpu:
            ghz, source = lscpu / 1000.0, "lscpu CPU max MHz"
        elif named:
            ghz, source = float(named.group(1)), "model name (base clock)"
        elif mhz:
            ghz, source = max(mhz) / 1000.0, "/proc/cpuinfo cpu MHz"
        else:
            ghz, source = 1.0, "unknown (1 GHz assumed)"
    if "avx512f" in flags:
        isa, lanes = "AVX-512", 16
    elif "avx2" in flags:
        isa, lanes = "AVX2", 8
    else:
        isa, lanes = "SSE", 4
    fma = "fma" in flags or "avx512f" in flags
    per_cycle = lanes * 2 * fma_units if fma else lanes * 2  # FMA: mul + add per lane per unit; else 1 mul + 1 add port
    vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    int8_factor = 4.0 if vnni else 4.0 / 3.0
    peak = cores * ghz * per_cycle
    return {"cores": cores, "ghz": ghz, "clock_source": source, "isa": isa, "fma": fma, "fma_units": fma_units,
            "flops_per_cycle_per_core": per_cycle, "gflops": peak, "vnni": vnni, "int8_factor": int8_factor,
            "int8_gops": peak * int8_factor,
            "assumption": f"{cores} cores x {ghz:.2f} GHz ({source}) x {per_cycle} FP32 FLOP/cycle "
                          f"({isa}: {lanes} lanes x 2 (FMA) x {fma_units} FMA units); no turbo, no AVX-512 "
                          f"clock drop; INT8 <= {int8_factor:.2f}x ({'VNNI' if vnni else 'no VNNI'})"}


def measure_bandwidth(mb: float = 256.0, repeats: int = 5, threads: int | None = None) -> dict:
    """Best-of-`repeats` memory bandwidth of numpy copies (one thread per core, each on its own slice).

    copy: dst[:] = src, 2 x size bytes. triad-like: a = b + s * c done by numpy in two passes
    (a = s * c; a += b), counted as the 5 x size bytes those passes move.
    """
    threads = threads or pf.usable_cores()
    n = max(threads * 1024, int(mb * 1e6 / 8))
    a, b, c = (np.full(n, v, dtype=np.float64) for v in (0.0, 1.0, 2.0))  # touched: pages are resident
    bounds = np.linspace(0, n, threads + 1, dtype=np.int64)
    parts = [slice(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]

    def copy(part):
        np.copyto(a[part], b[part])

    def triad(part):
        np.multiply(c[part], 3.0, out=a[part])
        np.add(a[part], b[part], out=a[part])

    best = {}
    with ThreadPoolExecutor(threads) as pool:
        for name, fn, passes in (("copy", copy, 2), ("triad", triad, 5)):
            times = []
            for _ in range(repeats + 1):  # the first is a warm-up
                start = time.perf_counter()
                list(pool.map(fn, parts))
                times.append(time.perf_counter() - start)
            best[name] = passes * a.nbytes / min(times[1:]) / 1e9
    return {"gbs": max(best.values()), "copy_gbs": best["copy"], "triad_gbs": best["triad"],
            "array_mb": a.nbytes / 1e6, "threads": threads, "repeats": repeats}


def measure_sgemm(n: int = 2048, repeats: int = 3) -> dict:
    """Best-of-`repeats` GFLOP/s of an n x n float32 matrix product with torch's default threads."""
    import torch

    x, y = torch.rand(n, n), torch.rand(n, n)
    torch.mm(x, y)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(x, y)
        times.append(time.perf_counter() - start)
    return {"gflops": 2.0 * n**3 / min(times) / 1e9, "n": n, "threads": torch.get_num_threads(), "repeats": repeats}


# -- the whole measurement --------------------------------------------------------------------------

def measure_roofline(variants: list[Variant], out_dir: Path, *, speed_json: Path | None = None,
                     category: str | None = None, ghz: float | None = None, fma_units: int = 2,
                     bandwidth_mb: float = 256.0, sgemm_n: int = 2048, plot: bool = True) -> dict:
    """FLOPs, bytes and achieved GFLOP/s per variant and backend against the CPU's ceilings; roofline.json/md/png.

    Latencies come from speed.json (default OUT_DIR/speed.json, written by benchmarks.speed); the models
    measured are the variants speed measured (its category), recounted from their run folders.
    """
    out_dir = Path(out_dir)
    speed_json = Path(speed_json) if speed_json else out_dir / "speed.json"
    if not speed_json.is_file():
        raise InputError(f"{speed_json} not found: run `python -m benchmarks.speed --variants ... --out {out_dir}` first")
    try:
        speed = json.loads(speed_json.read_text())
        speed_rows = {row["variant"]: row for row in speed["results"]}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{speed_json} is not a speed.json of benchmarks.speed ({type(exc).__name__}: {exc})") from None
    category = category or speed.get("settings", {}).get("category", "bottle")
    chosen = select_variants(variants, category)
    for variant in chosen:
        check_variant(variant)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    log(f"roofline: {machine_line(info)}")
    peak = cpu_peak(ghz, fma_units)
    log(f"roofline: peak {peak['gflops']:.0f} GFLOP/s: {peak['assumption']}")
    log(f"roofline: memory bandwidth (numpy copy, {bandwidth_mb:g} MB arrays) ...")
    bandwidth = measure_bandwidth(bandwidth_mb)
    log(f"roofline: copy {bandwidth['copy_gbs']:.1f} GB/s, triad {bandwidth['triad_gbs']:.1f} GB/s; sgemm n={sgemm_n} ...")
    sgemm = measure_sgemm(sgemm_n)
    log(f"roofline: sgemm {sgemm['gflops']:.1f} GFLOP/s")

    rows = []
    for variant in chosen:
        log(f"roofline: counting FLOPs of {variant.name} ...")
        counts = model_counts(variant.run_dir)
        flops, traffic = counts["flops"]["total"], counts["traffic"]
        activations = traffic["activation_in"] + traffic["activation_out"]
        weights = {"torch": traffic["weight_bytes"],
                   "fp32": (variant.fp32 / "model.bin").stat().st_size,
                   "int8": (variant.int8 / "model.bin").stat().st_size}
        speed_row = speed_rows.get(variant.name)
        if speed_row is None:
            log(f"roofline: warning: {variant.name} is not in {speed_json}; FLOPs only")
        row = {"variant": variant.name, "algorithm": variant.algorithm, "backbone": variant.backbone,
               "category": variant.category, "input": counts["input"], "flops": flops,
               "flops_by_op": counts["flops"]["by_op"], "activation_bytes": activations,
               "uncounted_elements": traffic["uncounted_elements"], "uncounted_by_op": traffic["uncounted_by_op"],
               "backends": {}}
        for kind in BACKENDS:
            moved = weights[kind] + activations
            intensity = flops / moved
            p50 = speed_row["latency_ms"][kind]["p50"] if speed_row else None
            achieved = flops / (p50 / 1000.0) / 1e9 if p50 else None
            roof = min(peak["gflops"], bandwidth["gbs"] * intensity)
            row["backends"][kind] = {
                "weight_bytes": weights[kind], "bytes": moved, "intensity": intensity, "p50_ms": p50,
                "achieved_gflops": achieved, "percent_of_peak": 100.0 * achieved / peak["gflops"] if achieved else None,
                "roof_gflops": roof, "percent_of_roof": 100.0 * achieved / roof if achieved else None,
                "bound": "memory" if bandwidth["gbs"] * intensity < peak["gflops"] else "compute"}
        rows.append(row)

    report = {"machine": info, "peak": peak, "bandwidth": bandwidth, "sgemm": sgemm, "speed_json": str(speed_json),
              "speed_machine": speed.get("machine"), "category": category, "results": rows,
              "load_average_end": pf.load_average()}
    if plot and any(r["backends"]["fp32"]["achieved_gflops"] for r in rows):
        report["figure"] = str(out_dir / "roofline.png")
        plot_roofline(report, out_dir / "roofline.png")
    (out_dir / "roofline.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "roofline.md").write_text(markdown(report) + "\n")
    return report


def plot_roofline(report: dict, path: Path) -> None:
    """Log-log roofline: compute peak, INT8 bound, measured sgemm, bandwidth slope; one point per model form."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    peak, bw, sgemm = report["peak"]["gflops"], report["bandwidth"]["gbs"], report["sgemm"]["gflops"]
    points = [(r, k, b) for r in report["results"] for k, b in r["backends"].items() if b["achieved_gflops"]]
    xs = [b["intensity"] for _, _, b in points] + [peak / bw]
    lo, hi = min(xs) / 3.0, max(xs) * 3.0
    grid = np.geomspace(lo, hi, 200)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=150)
    ax.plot(grid, np.minimum(peak, bw * grid), "k-", lw=2,
            label=f"roof: FP32 peak {peak:.0f} GFLOP/s, memory bandwidth {bw:.1f} GB/s")
    if report["peak"]["int8_factor"] != 1.0:
        ax.plot(grid, np.minimum(report["peak"]["int8_gops"], bw * grid), "k:", lw=1,
                label=f"INT8 bound {report['peak']['int8_gops']:.0f} GOP/s "
                      f"({'VNNI' if report['peak']['vnni'] else 'no VNNI'})")
    ax.axhline(sgemm, color="gray", ls="--", lw=1, label=f"measured sgemm {sgemm:.0f} GFLOP/s")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    models = list(dict.fromkeys(f"{r['algorithm'].upper()} {r['backbone']}" for r, _, _ in points))
    for row, kind, b in points:
        model = f"{row['algorithm'].upper()} {row['backbone']}"
        ax.scatter(b["intensity"], b["achieved_gflops"], marker=MARKERS[kind], s=60,
                   color=colors[models.index(model) % len(colors)], edgecolors="black", linewidths=0.5, zorder=3)
    for i, model in enumerate(models):
        ax.scatter([], [], color=colors[i % len(colors)], marker="o", label=model)
    for kind in BACKENDS:
        ax.scatter([], [], color="white", edgecolors="black", marker=MARKERS[kind], label=BACKEND_LABELS[kind])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("arithmetic intensity (FLOP per byte moved, estimated)")
    ax.set_ylabel("achieved GFLOP/s (FLOPs / p50 latency, batch 1)")
    m = report.get("speed_machine") or report["machine"]  # the points' latencies were measured there
    load = m.get("load_average_start") or ["?"]
    when = str(m.get("date", "?"))[:16].replace("T", " ")
    ax.set_title(f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores; latencies measured {when} at 1-min load {load[0]}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)



def markdown(report: dict) -> str:
    p, bw, sg = report["peak"], report["bandwidth"], report["sgemm"]
    speed_m = report.get("speed_machine") or {}
    lines = [
        f"Machine: {machine_line(report['machine'])}.",
        f"Latencies from {Path(report['speed_json']).name} (measured {speed_m.get('date', '?')}, load average at start "
        f"{speed_m.get('load_average_start', '?')}).",
        "",
        f"Compute peak **{p['gflops']:.0f} GFLOP/s** FP32 = {p['assumption']}. Measured: float32 matrix product "
        f"(n={sg['n']}, {sg['threads']} threads) {sg['gflops']:.0f} GFLOP/s; memory bandwidth (numpy, "
        f"{bw['array_mb']:.0f} MB arrays, {bw['threads']} threads) copy {bw['copy_gbs']:.1f} GB/s, triad "
        f"{bw['triad_gbs']:.1f} GB/s (the roof uses the larger); ridge point {p['gflops'] / bw['gbs']:.1f} FLOP/byte.",
        "",
        "| algorithm | backbone | model | GFLOPs / frame | bytes / frame (MB) | FLOP/byte | p50 (ms) | "
        "achieved GFLOP/s | % of peak | % of roof |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        for kind in BACKENDS:
            b = row["backends"][kind]
            lines.append(f"| {row['algorithm'].upper()} | {row['backbone']} | {BACKEND_LABELS[kind]} | "
                         f"{row['flops'] / 1e9:.3f} | {b['bytes'] / 1e6:.1f} | {b['intensity']:.1f} | "
                         f"{_f(b['p50_ms'])} | {_f(b['achieved_gflops'])} | {_f(b['percent_of_peak'])} | "
                         f"{_f(b['percent_of_roof'])} |")
    lines += ["", "FLOPs counted by op, and what FlopCounterMode leaves out (output elements of other ops, "
                  "about one operation each):", ""]
    for row in report["results"]:
        ops = ", ".join(f"{op} {n / 1e9:.3f} G" for op, n in row["flops_by_op"].items())
        share = 100.0 * row["uncounted_elements"] / row["flops"] if row["flops"] else 0.0
        top = ", ".join(f"{op.replace('aten.', '')} {n / 1e6:.1f} M" for op, n in list(row["uncounted_by_op"].items())[:5])
        lines.append(f"- {row['variant']}: {ops}; uncounted {row['uncounted_elements'] / 1e6:.1f} M elements "
                     f"({share:.1f} % of the counted FLOPs; largest: {top})")
    if report.get("figure"):  # no image link here: this table is spliced into the README, which links the figure
        lines += ["", f"Figure: `{Path(report['figure']).name}` beside this table."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = base_parser("python -m benchmarks.roofline",
                         "FLOPs per frame, achieved GFLOP/s and the CPU's compute and bandwidth ceilings.")
    parser.set_defaults(category=None)
    parser.add_argument("--speed", type=Path, default=None, metavar="SPEED_JSON",
                        help="speed.json of benchmarks.speed (default: OUT_DIR/speed.json)")
    parser.add_argument("--ghz", type=float, default=None, help="clock for the peak (default: from lscpu/model name)")
    parser.add_argument("--fma-units", type=int, default=2, help="FMA units per core for the peak (default: 2)")
    parser.add_argument("--bandwidth-mb", type=float, default=256.0,
                        help="size of each array in the bandwidth test, MB (default: 256; keep it >> L3)")
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="skip roofline.png")
    args = parser.parse_args(argv)
    if args.fma_units < 1 or args.bandwidth_mb <= 0 or (args.ghz is not None and args.ghz <= 0):
        parser.error("--fma-units >= 1, --bandwidth-mb > 0 and --ghz > 0 please")
    return run_cli(lambda: measure_roofline(
        read_variants(args.variants), args.out, speed_json=args.speed, category=args.category, ghz=args.ghz,
        fma_units=args.fma_units, bandwidth_mb=args.bandwidth_mb, plot=args.plot), markdown)


if __name__ == "__main__":
    sys.exit(main())
