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
5. figures (`benchmarks.figures`), and `summary.md`, which --readme splices into the README between
   its `<!-- benchmarks:begin -->` and `<!-- benchmarks:end -->` markers.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.variants import Variant, save_variants
from edge_ad.ops.tool_cli import run_tool

log = logging.getLogger("benchmarks.run")

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ALL_STEPS = ("models", "accuracy", "speed", "footprint", "roofline", "figures", "peer")
DEFAULT_STEPS = ("models", "accuracy", "speed", "footprint", "roofline", "figures")
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


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


def _matches(run_dir: Path, algorithm: str, backbone: str, category: str, data_root: Path, image_size: int,
             epochs: int | None) -> bool:
    """A finished run trained with the settings asked for (anything else is not reused)."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not (run_dir / "model.pt").is_file() or not (run_dir / "metrics.json").is_file():
        return False
    same = (config.get("algorithm"), config.get("backbone"), config.get("category"), config.get("image_size")) == (
        algorithm, backbone, category, image_size)
    same_root = Path(config.get("data_root", "")).resolve() == data_root.resolve()
    return same and same_root and (epochs is None or config.get("epochs") == epochs)


def find_run(runs: Path, algorithm: str, backbone: str, category: str, data_root: Path, image_size: int,
             epochs: int | None) -> Path | None:
    candidates = sorted(runs.glob(f"{algorithm}-{backbone}-{category}-*"), key=lambda p: p.name)
    matching = [p for p in candidates if _matches(p, algorithm, backbone, category, data_root, image_size, epochs)]
    return matching[-1] if matching else None


def _bundle_done(bundle: Path) -> bool:
    return (bundle / "bundle.json").is_file() and (bundle / "model.xml").is_file()


def train_run(runs: Path, logs: Path, algorithm: str, backbone: str, category: str, data_root: Path, image_size: int,
              epochs: int | None, *extra: str) -> Path:
    """Train with the user's command and return the new run folder."""
    name = f"{algorithm}-{backbone}-{category}"
    train_args = ["-m", f"training.{algorithm}", "--data-root", str(data_root), "--category", category,
                  "--backbone", backbone, "--image-size", str(image_size), "--out", str(runs), *extra]
    if epochs is not None:
        train_args += ["--epochs", str(epochs)]
    _command(f"train {name}", *train_args, log_file=logs / f"train-{name}.log")
    run_dir = find_run(runs, algorithm, backbone, category, data_root, image_size, epochs)
    if run_dir is None:
        raise RunError(f"training {name} finished but left no run folder in {runs}")
    return run_dir


def export_bundle(run_dir: Path, bundle: Path, name: str, logs: Path) -> None:
    if not _bundle_done(bundle):
        _command(f"export {name}", "-m", "deploy.export", str(run_dir), "--out", str(bundle), "--force",
                 log_file=logs / f"export-{name}.log")


def prepare_variant(args: argparse.Namespace, algorithm: str, backbone: str, category: str) -> Variant | None:
    runs, bundles, logs = args.work / "runs", args.work / "bundles", args.work / "logs"
    epochs = args.epochs if algorithm == "stfpm" else None
    name = f"{algorithm}-{backbone}-{category}"
    run_dir = None if args.retrain else find_run(runs, algorithm, backbone, category, args.data_root, args.image_size, epochs)
    if run_dir is None and args.no_train:
        log.warning("%s: no finished run in %s and --no-train: left out", name, runs)
        return None
    if run_dir is None:
        run_dir = train_run(runs, logs, algorithm, backbone, category, args.data_root, args.image_size, epochs)
    else:
        log.info("%s: reusing %s", name, run_dir)
    fp32, int8 = bundles / f"{run_dir.name}-fp32", bundles / f"{run_dir.name}-int8"
    export_bundle(run_dir, fp32, name, logs)
    if not _bundle_done(int8):
        _command(f"quantize {name}", "-m", "calibration.quantize", str(fp32), "--run-dir", str(run_dir),
                 "--out", str(int8), "--force", log_file=logs / f"quantize-{name}.log")
    return Variant(algorithm, backbone, category, run_dir.resolve(), fp32.resolve(), int8.resolve())


def _read(path: Path) -> str:
    return path.read_text().strip() if path.is_file() else f"_(not measured in this run: {path.name} missing)_"


def summary(out: Path, info: dict, categories: list[str], steps: list[str]) -> str:
    """The README's results block, assembled from the tables each benchmark wrote."""
    cpu = info.get("cpu", "unknown CPU")
    parts = [
        BEGIN,
        f"Measured on {cpu}, {info.get('cores', '?')} cores, Python {info.get('python')}, OpenVINO "
        f"{info.get('openvino')}; each timing table below names when it was measured and the load average then "
        f"(this summary: {info.get('date')}). Regenerate with "
        f"`python -m benchmarks.run --data-root DATA --categories {' '.join(categories)} --steps all --readme README.md`; "
        f"raw JSON beside each table in [benchmarks/results/](benchmarks/results/).",
        "",
        "#### Accuracy (test split; torch / OpenVINO FP32 / OpenVINO INT8)",
        "",
        _read(out / "accuracy.md"),
    ]
    if (out / "accuracy_vs_latency.png").is_file():
        parts += ["", "![accuracy vs latency](benchmarks/results/accuracy_vs_latency.png)"]
    for step, title in (("speed", "Speed and size (256x256, batch 1)"), ("footprint", "Footprint"),
                        ("roofline", "How far from the CPU's limit")):
        if step in steps or (out / f"{step}.md").is_file():
            parts += ["", f"#### {title}", "", _read(out / f"{step}.md")]
    if (out / "roofline.png").is_file():
        parts += ["", "![roofline](benchmarks/results/roofline.png)"]
    if "peer" in steps or (out / "peer.md").is_file():
        parts += ["", "#### Side by side with anomalib", "", _read(out / "peer.md")]
    if (out / "heatmap_grid.png").is_file():
        parts += ["", "#### What the runtime sees (generated data)", "",
                  "![heatmaps and regions on generated test images](benchmarks/results/heatmap_grid.png)"]
    parts.append(END)
    return "\n".join(parts) + "\n"


def splice_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise RunError(f"{readme} has no {BEGIN} ... {END} markers to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + block.rstrip("\n") + tail)
    log.info("results block of %s replaced", readme)


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
        _command("peer (anomalib)", "-m", "benchmarks.peer_anomalib", "--data-root", str(args.data_root),
                 "--category", first, "--variants", str(variants_json), "--out", str(args.out),
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
    (args.out / "machine.json").write_text(json.dumps(info, indent=2) + "\n")
    block = summary(args.out, info, args.categories, list(args.steps))
    (args.out / "summary.md").write_text(block)
    if args.readme:
        splice_readme(args.readme, block)
    return args.out / "summary.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n", 3)[3], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True, help="MVTec-AD-layout root")
    parser.add_argument("--categories", nargs="+", default=["bottle"], help="first one: speed, footprint, peer")
    parser.add_argument("--algorithms", nargs="+", default=["stfpm", "dfm"], choices=["stfpm", "dfm"])
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "efficientnet_lite0"],
                        help="resnet18 / wide_resnet50_2 need torchvision's ImageNet weights (internet or --weights)")
    parser.add_argument("--epochs", type=int, default=10, help="STFPM epochs")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--steps", nargs="+", default=list(DEFAULT_STEPS), choices=(*ALL_STEPS, "all"),
                        help=f"default: {' '.join(DEFAULT_STEPS)}; 'all' adds peer (installs anomalib, ~45 min)")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work", help="runs, bundles and logs (reused)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="tables, JSON and figures")
    parser.add_argument("--retrain", action="store_true", help="train new runs even where matching ones exist")
    parser.add_argument("--no-train", action="store_true", help="measure only what has a finished run; train nothing")
    parser.add_argument("--peer-reuse", action="store_true",
                        help="peer: keep anomalib's measured result (OUT/anomalib.json), re-measure only edge-ad")
    parser.add_argument("--readme", type=Path, help="replace this README's results block with the new summary")
    args = parser.parse_args(argv)
    args.data_root, args.work, args.out = args.data_root.resolve(), args.work.resolve(), args.out.resolve()
    if "all" in args.steps:
        args.steps = list(ALL_STEPS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def benchmark() -> str:
        if not args.data_root.is_dir():
            raise RunError(f"data root not found: {args.data_root}")
        return run(args).read_text()

    return run_tool(benchmark, (RunError, OSError, ValueError),
                    interrupted="interrupted (finished runs and bundles are kept and reused next time)")


if __name__ == "__main__":
    sys.exit(main())
