"""Every number and figure of the README's results section, from one command.

    python -m benchmarks.run --data-root ../shared/data/mvtec_ad --categories bottle screw

1. models: for each category x algorithm x backbone, train (`python -m training.<algorithm>`), export
   (`python -m deploy.export`) and quantize (`python -m calibration.quantize`), the same commands a
   user types. Finished runs and bundles in --work are reused when their settings match, so a rerun
   after an interruption only does what is missing (--retrain forces new runs).
2. accuracy: image/pixel AUROC and image F1 of torch / FP32 IR / INT8 IR (`benchmarks.accuracy`).
3. speed, footprint, roofline (`benchmarks.speed`, `.footprint`, `.roofline`), on the first category.
4. peer: anomalib on the same data and weights (`benchmarks.peer_anomalib`; installs anomalib in a
   separate environment, so it is opt-in: --steps all, or --steps peer alone).
5. figures (`benchmarks.figures`), and `summary.md` (every table). --readme splices a short summary (INT8
   accuracy, speed, size, the anomalib verdicts) into the README and every table into docs/RESULTS.md
   (--results-doc), each between its `<!-- benchmarks:begin -->` and `<!-- benchmarks:end -->` markers.
   `--steps summary` measures nothing: it rewrites both blocks from the tables and JSON already in --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from benchmarks.peer_anomalib import _mib
from benchmarks.pipeline_fps import describe_isa
from benchmarks.variants import Variant, load_variants, save_variants
from edge_ad.ops.tool_cli import run_tool
from training.config import DfmConfig, StfpmConfig

log = logging.getLogger("benchmarks.run")

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ALL_STEPS = ("models", "accuracy", "speed", "footprint", "roofline", "figures", "peer")
DEFAULT_STEPS = ("models", "accuracy", "speed", "footprint", "roofline", "figures")
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
PEER_BACKBONE = "mobilenet_v2"  # benchmarks.peer_anomalib's default: the backbone anomalib gets our weights for


class RunError(Exception):
    pass


def _command(title: str, *args: str, log_file: Path) -> None:
    """A step as its own process (as a user runs it); its output goes to a log file, failures name it."""
    log.info("%s: python %s (log: %s)", title, " ".join(args), log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log_file.open("w") as handle:
        code = subprocess.call([PY, *args], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if code != 0:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise RunError(f"{title} failed (exit {code}): {tail[0]} (full log: {log_file})")
    log.info("%s: done in %.0f s", title, time.perf_counter() - started)


# Recipe settings a reused run must share with today's defaults, each with the value runs saved before it
# existed were trained with (a student-only STFPM; a DFM on the stride-16 tap, total error, no posed copies).
RECIPE_KEYS = {"stfpm": {"subspace_weight": 0.0, "subspace_posed_copies": 3, "memory_weight": 0.0, "student_pool": 1,
                         "memory_fraction": StfpmConfig.memory_fraction, "memory_fusion": "map"},
               "dfm": {"posed_copies": 3, "taps": "2", "score_type": "fre", "augment": "none", "pool": 1}}


# anomalib's DFM has one tap, the total reconstruction error and no posed copies: the like-for-like run the anomalib
# comparison trains for DFM (today's default DFM is not a model anomalib can train). STFPM is compared as it ships.
PEER_RECIPES = {"dfm": {"taps": "2", "score_type": "fre", "augment": "none"}}


def _matches(run_dir: Path, algorithm: str, backbone: str, category: str, data_root: Path, image_size: int,
             epochs: int | None, recipe: dict[str, str] | None = None) -> bool:
    """A finished run trained with the settings asked for: today's default recipe, or `recipe` where given
    (anything else is not reused)."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not (run_dir / "model.pt").is_file() or not (run_dir / "metrics.json").is_file():
        return False
    same = (config.get("algorithm"), config.get("backbone"), config.get("category"), config.get("image_size")) == (
        algorithm, backbone, category, image_size)
    same_root = Path(config.get("data_root", "")).resolve() == data_root.resolve()
    defaults = StfpmConfig if algorithm == "stfpm" else DfmConfig
    recipe = recipe or {}
    for key, before in RECIPE_KEYS.get(algorithm, {}).items():  # today's default recipe, not an older one
        if key not in recipe:
            same = same and config.get(key, before) == getattr(defaults, key)
    same = same and all(str(config.get(key)) == value for key, value in recipe.items())
    return same and same_root and (epochs is None or config.get("epochs") == epochs)


def find_run(runs: Path, algorithm: str, backbone: str, category: str, data_root: Path, image_size: int,
             epochs: int | None, recipe: dict[str, str] | None = None) -> Path | None:
    candidates = sorted(runs.glob(f"{algorithm}-{backbone}-{category}-*"), key=lambda p: p.name)
    matching = [p for p in candidates
                if _matches(p, algorithm, backbone, category, data_root, image_size, epochs, recipe)]
    return matching[-1] if matching else None


def _bundle_done(bundle: Path) -> bool:
    return (bundle / "bundle.json").is_file() and (bundle / "model.xml").is_file()


def train_run(runs: Path, logs: Path, algorithm: str, backbone: str, category: str, data_root: Path, image_size: int,
              epochs: int | None, *extra: str, recipe: dict[str, str] | None = None, name: str | None = None) -> Path:
    """Train with the user's command (with `recipe`'s options where given) and return the new run folder; `name`
    titles the step and its log (default: algorithm-backbone-category)."""
    name = name or f"{algorithm}-{backbone}-{category}"
    options = [arg for key, value in (recipe or {}).items() for arg in (f"--{key.replace('_', '-')}", value)]
    train_args = ["-m", f"training.{algorithm}", "--data-root", str(data_root), "--category", category,
                  "--backbone", backbone, "--image-size", str(image_size), "--out", str(runs), *options, *extra]
    if epochs is not None:
        train_args += ["--epochs", str(epochs)]
    _command(f"train {name}", *train_args, log_file=logs / f"train-{name}.log")
    run_dir = find_run(runs, algorithm, backbone, category, data_root, image_size, epochs, recipe)
    if run_dir is None:
        raise RunError(f"training {name} finished but left no run folder in {runs}")
    return run_dir


def export_bundle(run_dir: Path, bundle: Path, name: str, logs: Path) -> None:
    if not _bundle_done(bundle):
        _command(f"export {name}", "-m", "deploy.export", str(run_dir), "--out", str(bundle), "--force",
                 log_file=logs / f"export-{name}.log")


def prepare_variant(args: argparse.Namespace, algorithm: str, backbone: str, category: str,
                    recipe: dict[str, str] | None = None) -> Variant | None:
    """Train (or reuse), export and quantize one model; `recipe`: options instead of today's defaults (the anomalib
    comparison's like-for-like DFM), kept in runs and bundles of their own."""
    prefix = "peer-" if recipe else ""
    runs, bundles, logs = args.work / f"{prefix}runs", args.work / f"{prefix}bundles", args.work / "logs"
    epochs = args.epochs if algorithm == "stfpm" else None
    name = f"{prefix}{algorithm}-{backbone}-{category}"
    image_size = args.image_size or (StfpmConfig if algorithm == "stfpm" else DfmConfig).image_size
    run_dir = None if args.retrain else find_run(runs, algorithm, backbone, category, args.data_root, image_size, epochs,
                                                 recipe)
    if run_dir is None and args.no_train:
        log.warning("%s: no finished run in %s and --no-train: left out", name, runs)
        return None
    if run_dir is None:
        run_dir = train_run(runs, logs, algorithm, backbone, category, args.data_root, image_size, epochs,
                            recipe=recipe, name=name)
    else:
        log.info("%s: reusing %s", name, run_dir)
    fp32, int8 = bundles / f"{run_dir.name}-fp32", bundles / f"{run_dir.name}-int8"
    export_bundle(run_dir, fp32, name, logs)
    if not _bundle_done(int8):
        _command(f"quantize {name}", "-m", "calibration.quantize", str(fp32), "--run-dir", str(run_dir),
                 "--out", str(int8), "--force", log_file=logs / f"quantize-{name}.log")
    if (run_dir / "report_data.npz").is_file():  # the run's report.html, now with FP32 / INT8 beside torch
        _command(f"report {name}", "-m", "training.report", str(run_dir), "--bundle", str(fp32), "--bundle", str(int8),
                 log_file=logs / f"report-{name}.log")
    return Variant(algorithm, backbone, category, run_dir.resolve(), fp32.resolve(), int8.resolve())


def peer_variants(args: argparse.Namespace, variants: list[Variant], category: str) -> Path:
    """OUT/peer-variants.json: what the anomalib comparison measures of ours, each algorithm as anomalib can train it
    (PEER_RECIPES), on the comparison's category and backbone."""
    backbone = PEER_BACKBONE
    chosen = []
    for algorithm in args.algorithms:
        if algorithm in PEER_RECIPES:
            variant = prepare_variant(args, algorithm, backbone, category, PEER_RECIPES[algorithm])
        else:
            variant = next((v for v in variants if (v.algorithm, v.backbone, v.category) == (algorithm, backbone, category)),
                           None) or prepare_variant(args, algorithm, backbone, category)
        if variant is None:
            raise RunError(f"peer: no {algorithm} {backbone} {category} model to compare (--no-train)")
        chosen.append(variant)
    path = args.out / "peer-variants.json"
    save_variants(chosen, path)
    return path


def _read(path: Path) -> str:
    return path.read_text().strip() if path.is_file() else f"_(not measured in this run: {path.name} missing)_"


def _link(out: Path, doc_dir: Path, name: str) -> str:
    """A results file as a link relative to the document that shows it (README at the root, docs/RESULTS.md)."""
    return Path(os.path.relpath(out / name, doc_dir)).as_posix()


def regenerate_command(categories: list[str]) -> str:
    return (f"`python -m benchmarks.run --data-root DATA --categories {' '.join(categories)} --steps all "
            f"--readme README.md`")


def isa_text(info: dict) -> str:
    """The CPU's flags for a summary line; '' for machine records from before they were kept."""
    return describe_isa(info["isa"]) if "isa" in info else ""


def earlier_peer(peer: dict, info: dict) -> str:
    """A comparison kept from an earlier run (--steps without peer) says when, where and with which recipes it was
    measured; '' when this run measured it (its date is not before the run's start, info's date)."""
    measured = peer.get("machine", {})
    try:
        earlier = datetime.fromisoformat(measured["date"]) < datetime.fromisoformat(info["date"])
    except (KeyError, TypeError, ValueError):
        return ""
    if not earlier:  # measured by this run (which started at info's date), or after it
        return ""
    return (f"measured {measured['date'][:10]} on {measured.get('cpu', 'another CPU')} with edge-ad's recipes of that "
            f"day, not re-run since")


def full_block(out: Path, info: dict, categories: list[str], steps: list[str], doc_dir: Path) -> str:
    """docs/RESULTS.md's block: every table each benchmark wrote, figures linked from doc_dir."""
    cpu = info.get("cpu", "unknown CPU")
    parts = [
        BEGIN,
        f"Measured on {cpu}, {info.get('cores', '?')} cores{f' ({isa})' if (isa := isa_text(info)) else ''}, Python {info.get('python')}, OpenVINO "
        f"{info.get('openvino')}; each timing table below names when it was measured and the load average then "
        f"(this summary: {info.get('date')}). Regenerate with {regenerate_command(categories)}; "
        f"raw JSON beside each table in [benchmarks/results/]({_link(out, doc_dir, '')}/).",
        "",
        "#### Accuracy (test split; torch / OpenVINO FP32 / OpenVINO INT8)",
        "",
        _read(out / "accuracy.md"),
    ]
    if (out / "accuracy_vs_latency.png").is_file():
        parts += ["", f"![accuracy vs latency]({_link(out, doc_dir, 'accuracy_vs_latency.png')})"]
    for step, title in (("speed", "Speed and size (256x256, batch 1)"), ("footprint", "Footprint"),
                        ("roofline", "How far from the CPU's limit")):
        if step in steps or (out / f"{step}.md").is_file():
            parts += ["", f"#### {title}", "", _read(out / f"{step}.md")]
    if (out / "roofline.png").is_file():
        parts += ["", f"![roofline]({_link(out, doc_dir, 'roofline.png')})"]
    if "peer" in steps or (out / "peer.md").is_file():
        earlier = earlier_peer(_json(out / "peer.json") or {}, info)
        parts += ["", "#### Side by side with anomalib", ""] + ([f"({earlier}.)", ""] if earlier else []) + [
            _read(out / "peer.md")]
    if (out / "heatmap_grid.png").is_file():
        parts += ["", "#### What the runtime sees (generated data)", "",
                  f"![heatmaps and regions on generated test images]({_link(out, doc_dir, 'heatmap_grid.png')})"]
    parts.append(END)
    return "\n".join(parts) + "\n"


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def short_block(out: Path, info: dict, categories: list[str], results_doc: Path, doc_dir: Path) -> str:
    """The README's block: what a user decides on (INT8 accuracy, speed, size) and the anomalib verdicts."""
    accuracy, speed, peer = _json(out / "accuracy.json"), _json(out / "speed.json"), _json(out / "peer.json")
    full = Path(os.path.relpath(results_doc, doc_dir)).as_posix()
    shape = next((r.get("input") for r in (speed or {}).get("results", []) if r.get("input")), None)  # 1x3xHxW
    size_text = f"{'x'.join(shape.split('x')[2:])} input, " if shape else ""
    parts = [BEGIN,
             f"INT8 OpenVINO bundles, {size_text}on {info.get('cpu', 'unknown CPU')} ({info.get('cores', '?')} "
             f"cores{f'; {isa}' if (isa := isa_text(info)) else ''}), OpenVINO {info.get('openvino')}, "
             f"{str(info.get('date', ''))[:10]}. Every table (torch / FP32 / "
             f"INT8 side by side, F1, training time, memory, roofline, anomalib details): [{full}]({full}).", ""]
    if accuracy:
        int8 = [row for row in accuracy if row["stage"] == "int8_ir"]
        cats = [c for c in categories if any(row["category"] == c for row in int8)]
        masked = [c for c in cats if any(row["category"] == c and row["pixel_auroc"] is not None for row in int8)]
        by_speed = {(r["algorithm"], r["backbone"]): r for r in (speed or {}).get("results", [])}
        speed_cat = (speed or {}).get("settings", {}).get("category")
        header = (["model"] + [f"image AUROC {c}" for c in cats] + [f"pixel AUROC {c}" for c in masked]
                  + ["latency p50 (ms)", "edge-ad pipeline (fps)", "size (MB)"])
        parts += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        models = list(dict.fromkeys((row["algorithm"], row["backbone"]) for row in int8))
        for algorithm, backbone in models:
            rows = {row["category"]: row for row in int8 if (row["algorithm"], row["backbone"]) == (algorithm, backbone)}
            timing = by_speed.get((algorithm, backbone))
            size = rows.get(speed_cat, next(iter(rows.values())))["size_mb"]
            cells = ([f"{algorithm.upper()} {backbone}"] + [_cell(rows.get(c, {}).get("image_auroc"), ".3f") for c in cats]
                     + [_cell(rows.get(c, {}).get("pixel_auroc"), ".3f") for c in masked]
                     + [_cell(timing and timing["latency_ms"]["int8"]["p50"], ".1f"),
                        _cell(timing and (timing["pipeline"].get("int8") or {}).get("fps"), ".1f"), _cell(size, ".1f")])
            parts.append("| " + " | ".join(cells) + " |")
        parts += ["", f"Latency: one frame, OpenVINO LATENCY hint; pipeline: `edge-ad --video` end to end into a local "
                      f"MQTT broker; size: model.xml + model.bin{f' ({speed_cat})' if speed_cat else ''}."]
    if peer:
        versions = peer.get("anomalib_versions", {})
        earlier = earlier_peer(peer, info)
        what = earlier or "DFM: a run with anomalib's recipe, `" + " ".join(
            f"--{key.replace('_', '-')} {value}" for key, value in PEER_RECIPES["dfm"].items()) + "`"
        parts += ["", f"Against anomalib {versions.get('anomalib', '')} on {peer.get('category')} (same data, same "
                      f"{peer.get('backbone')} ImageNet weights, same machine; {what}):", "",
                  "| algorithm | measure | edge-ad | anomalib | ratio | target | verdict |", "|---|---|---:|---:|---:|---|---|"]
        for section in peer["comparisons"]:
            for row in section["rows"]:
                if not row["target"]:
                    continue
                size = row["fmt"] == "size"
                fmt = _mib if size else (lambda v: _cell(v, row["fmt"]))
                ratio = "-" if row["ratio"] is None else (f"{row['ratio']:.1%}" if size else f"{row['ratio']:.2f}x")
                parts.append(f"| {section['name']} | {row['measure']} | {fmt(row['ours'])} | {fmt(row['theirs'])} | "
                             f"{ratio} | {row['target']} | {row['verdict']} |")
    parts.append(END)
    return "\n".join(parts) + "\n"


RESULTS_TITLE = "# Benchmark results\n\nGenerated by `python -m benchmarks.run` between the markers; the README shows a summary.\n\n"


def splice_readme(readme: Path, block: str, *, create: bool = False, markers: tuple[str, str] = (BEGIN, END)) -> None:
    """Replace the block between the markers (the block carries them); with create, a missing file is written
    with just a title and the block."""
    begin, end = markers
    if create and not readme.exists():
        readme.parent.mkdir(parents=True, exist_ok=True)
        readme.write_text(RESULTS_TITLE + block)
        log.info("%s written", readme)
        return
    text = readme.read_text()
    if begin not in text or end not in text:
        raise RunError(f"{readme} has no {begin} ... {end} markers to replace")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + block.rstrip("\n") + tail)
    log.info("results block of %s replaced", readme)


def write_summaries(args: argparse.Namespace, info: dict) -> Path:
    """summary.md (the full block) in OUT; with --readme, the full block into the results document and the
    short one into the README."""
    (args.out / "machine.json").write_text(json.dumps(info, indent=2) + "\n")
    summary_md = args.out / "summary.md"
    summary_md.write_text(full_block(args.out, info, args.categories, list(args.steps), args.out))
    if args.readme:
        results_doc = args.results_doc or args.readme.parent / "docs" / "RESULTS.md"
        if args.readme.resolve() == results_doc.resolve():
            raise RunError("--readme and --results-doc name the same file")
        splice_readme(args.readme, short_block(args.out, info, args.categories, results_doc, args.readme.parent))
        splice_readme(results_doc, full_block(args.out, info, args.categories, list(args.steps), results_doc.parent),
                      create=True)
    return summary_md


def grid_figure(args: argparse.Namespace) -> None:
    """Generated data -> small STFPM -> FP32 bundle -> heatmap grid (MVTec images cannot be shown)."""
    from benchmarks.figures import heatmap_grid
    from training.data.synthetic import generate_synthetic_dataset

    work = args.work / "grid"
    data = work / "data"
    if not (data / "synthetic").is_dir():
        generate_synthetic_dataset(data, image_size=128, n_train=60, n_test_good=4, n_test_defect=12, seed=1)
    logs = args.work / "logs"
    run_dir = (find_run(work / "runs", "stfpm", "mobilenet_v2", "synthetic", data, 128, 8)
               or train_run(work / "runs", logs, "stfpm", "mobilenet_v2", "synthetic", data, 128, 8, "--batch-size", "8"))
    bundle = work / "bundle"
    export_bundle(run_dir, bundle, "grid", logs)
    heatmap_grid(bundle, data, "synthetic", args.out / "heatmap_grid.png")


def run(args: argparse.Namespace) -> Path:
    if args.steps == ["summary"]:  # nothing measured: the blocks again from the tables already in OUT
        if not (args.out / "machine.json").is_file():
            raise RunError(f"{args.out / 'machine.json'} missing: nothing measured into {args.out} yet")
        return write_summaries(args, json.loads((args.out / "machine.json").read_text()))
    args.out.mkdir(parents=True, exist_ok=True)
    from benchmarks.pipeline_fps import machine_info

    info = machine_info()  # what the figures were measured on; printed with them
    log.info("machine: %s", info)
    variants_json = args.out / "variants.json"
    if "models" in args.steps:
        variants = [prepare_variant(args, algorithm, backbone, category)
                    for category in args.categories for algorithm in args.algorithms for backbone in args.backbones]
        variants = [v for v in variants if v is not None]
        if not variants:
            raise RunError("no variant to measure")
        save_variants(variants, variants_json)
    elif not variants_json.is_file():
        raise RunError(f"{variants_json} missing: run the 'models' step first")
    first = args.categories[0]
    if "accuracy" in args.steps:
        _command("accuracy", "-m", "benchmarks.accuracy", "--variants", str(variants_json), "--out", str(args.out),
                 log_file=args.work / "logs" / "accuracy.log")
    for step in ("speed", "footprint", "roofline"):
        if step in args.steps:
            _command(step, "-m", f"benchmarks.{step}", "--variants", str(variants_json), "--out", str(args.out),
                     "--category", first, log_file=args.work / "logs" / f"{step}.log")
    if "peer" in args.steps:
        peer_json = peer_variants(args, load_variants(variants_json), first)
        _command("peer (anomalib)", "-m", "benchmarks.peer_anomalib", "--data-root", str(args.data_root),
                 "--category", first, "--variants", str(peer_json), "--out", str(args.out),
                 "--backbone", PEER_BACKBONE, "--algorithms", ",".join(args.algorithms),
                 "--epochs", str(args.epochs), *(["--reuse-anomalib-result"] if args.peer_reuse else []),
                 log_file=args.work / "logs" / "peer.log")
    if "figures" in args.steps:
        from benchmarks.figures import accuracy_vs_latency, latency_from_speed

        speed_json = args.out / "speed.json"
        if speed_json.is_file():
            accuracy = json.loads((args.out / "accuracy.json").read_text())
            speed = json.loads(speed_json.read_text())
            accuracy_vs_latency(accuracy, latency_from_speed(speed), first, args.out / "accuracy_vs_latency.png",
                                info.get("cpu", ""))
        grid_figure(args)
    return write_summaries(args, info)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n", 3)[3], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, help="MVTec-AD-layout root (not needed for --steps summary)")
    parser.add_argument("--categories", nargs="+", default=["bottle"], help="first one: speed, footprint, peer")
    parser.add_argument("--algorithms", nargs="+", default=["stfpm", "dfm"], choices=["stfpm", "dfm"])
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "efficientnet_lite0"],
                        help="resnet18 / wide_resnet50_2 need torchvision's ImageNet weights (internet or --weights)")
    parser.add_argument("--epochs", type=int, default=10, help="STFPM epochs")
    parser.add_argument("--image-size", type=int, default=None,
                        help="model input size (default: each algorithm's own config default, 256 for both today)")
    parser.add_argument("--steps", nargs="+", default=list(DEFAULT_STEPS), choices=(*ALL_STEPS, "all", "summary"),
                        help=f"default: {' '.join(DEFAULT_STEPS)}; 'all' adds peer (installs anomalib and trains it, 15-25 min); "
                             "'summary' alone measures nothing and rewrites the blocks from the tables in --out")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work", help="runs, bundles and logs (reused)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="tables, JSON and figures")
    parser.add_argument("--retrain", action="store_true", help="train new runs even where matching ones exist")
    parser.add_argument("--no-train", action="store_true", help="measure only what has a finished run; train nothing")
    parser.add_argument("--peer-reuse", action="store_true",
                        help="peer: keep anomalib's measured result (OUT/anomalib.json), re-measure only edge-ad")
    parser.add_argument("--readme", type=Path, help="replace this README's results block with the short summary "
                        "(and the results document's block with every table)")
    parser.add_argument("--results-doc", type=Path, help="where every table goes with --readme (default: "
                        "docs/RESULTS.md beside the README; created when missing)")
    args = parser.parse_args(argv)
    if "all" in args.steps:
        args.steps = list(ALL_STEPS)
    args.work, args.out = args.work.resolve(), args.out.resolve()
    args.data_root = args.data_root.resolve() if args.data_root else None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def benchmark() -> str:
        if "summary" in args.steps and args.steps != ["summary"]:
            raise RunError("--steps summary runs alone (every other step writes the summaries anyway)")
        if args.data_root is None and args.steps != ["summary"]:
            raise RunError("--data-root is required (except with --steps summary)")
        if args.data_root is not None and not args.data_root.is_dir():
            raise RunError(f"data root not found: {args.data_root}")
        return run(args).read_text()

    return run_tool(benchmark, (RunError, OSError, ValueError),
                    interrupted="interrupted (finished runs and bundles are kept and reused next time)")


if __name__ == "__main__":
    sys.exit(main())
