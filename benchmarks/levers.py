"""Which training levers help: a greedy sweep chosen on validation data, measured on test.

    python -m benchmarks.levers --data-root ../shared/data/mvtec_ad --out runs/levers

Every step trains (or, for scoring levers, re-scores) a model with one lever changed from the
best recipe so far, and keeps the change only if it raises the *synthetic validation AUROC* by at
least KEEP_MARGIN:
validation images against copies of themselves with synthetic defects
(`training.data.synthetic_defects`). Test figures are printed beside it, measured, never used to
choose. Finished runs are reused (keyed by their settings), so an interrupted sweep resumes.
Writes `benchmarks/results/levers.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.run import RunError, splice_readme
from benchmarks.speed import machine, machine_line
from edge_ad.ops.tool_cli import run_tool
from training import dfm as dfm_cli
from training import stfpm as stfpm_cli
from training.config import DfmConfig, StfpmConfig, parse_taps
from training.models.image_score import ImageScore
from training.pipeline import (
    evaluate_and_save,
    loader,
    prepare_data,
    resolve_device,
)
from training.run_dir import load_model, read_json

log = logging.getLogger("benchmarks.levers")
RESULTS = Path(__file__).parent / "results"

# (lever, overrides). Scoring levers re-score the current best run; the others retrain.
STFPM_STEPS = [
    ("baseline: 10 epochs, loss selection, max score", {}),
    ("score: top-1% mean", {"score_reduction": "topk", "topk_fraction": 0.01}),
    ("score: top-0.1% mean", {"score_reduction": "topk", "topk_fraction": 0.001}),
    ("map smoothing sigma 4", {"smooth_sigma": 4.0}),
    ("map smoothing sigma 8", {"smooth_sigma": 8.0}),
    ("augment: rotate + flips", {"augment": "rotate,hflip,vflip"}),
    ("epochs 20, synthetic selection, cosine lr", {"epochs": 20, "select": "synthetic", "lr_schedule": "cosine"}),
    ("backbone efficientnet_lite1", {"backbone": "efficientnet_lite1"}),
    ("input 384 px", {"image_size": 384}),
    ("map from taps 1+2 only (stride 8, 16)", {"map_taps": "1,2"}),
    ("map: sum of the tap maps", {"map_combine": "sum"}),
    ("backbone mobilenet_v2_wide (144/192/576-channel taps)", {"backbone": "mobilenet_v2_wide"}),
]
DFM_STEPS = [
    ("baseline: tap 2, fre", {}),
    ("score nll", {"score_type": "nll"}),
    ("score: top-1% of the error map", {"score_type": "map", "score_reduction": "topk", "topk_fraction": 0.01}),
    ("taps 1+2 concatenated", {"taps": "1,2"}),
    ("finer map: tap 1 (stride 8), pool 2", {"taps": "1", "pool": 2}),
    ("augment: rotate + flips (PCA on 4 poses)", {"augment": "rotate,hflip,vflip"}),
    ("backbone efficientnet_lite1", {"backbone": "efficientnet_lite1"}),
    ("input 384 px", {"image_size": 384}),
    ("finer map: tap 1 unpooled (stride 8)", {"pool": 1}),
]
# The sweep starts from the recipe as it was before it (not from today's defaults, which it chose).
BASELINES = {
    "stfpm": {"epochs": 10, "select": "loss", "lr_schedule": "constant", "augment": "none", "smooth_sigma": 0.0,
              "score_reduction": "max", "topk_fraction": 0.01, "backbone": "mobilenet_v2", "image_size": 256,
              "subspace_weight": 0.0, "synthetic_copies": 1},
    "dfm": {"taps": "2", "pool": 1, "score_type": "fre", "augment": "none", "posed_copies": 3, "smooth_sigma": 0.0,
            "score_reduction": "max", "topk_fraction": 0.01, "backbone": "mobilenet_v2", "image_size": 256,
            "synthetic_copies": 1, "threshold_folds": 0},
}
SCORING_KEYS = {"score_reduction", "topk_fraction", "smooth_sigma", "map_taps", "map_combine"}
# A lever must beat noise: with 30-50 validation images and as many synthetic defects, AUROC moves by
# 1/n0n1 ~ 0.001 per swapped pair and its standard error is ~0.03, so gains below this are not evidence.
KEEP_MARGIN = 0.01


# Options added after runs were keyed: at these values they train what runs from before them trained, so the key
# leaves them out and those runs are still found.
LATER_OPTIONS = {"subspace_weight": 0.0, "posed_copies": 3, "subspace_posed_copies": 3, "student_pool": 1,
                 "memory_weight": 0.0, "memory_fraction": 0.003, "memory_fusion": "map", "synthetic_copies": 1,
                 "split_seed": None, "threshold_folds": 0}


def _key(config) -> str:
    skip = {"out", "data_root", "device"}
    return json.dumps({k: v for k, v in sorted(config.to_dict().items())
                       if k not in skip and not (k in LATER_OPTIONS and v == LATER_OPTIONS[k])}, sort_keys=True)


def _find_run(out: Path, config) -> Path | None:
    for metrics in sorted(out.glob("*/metrics.json")):
        saved = json.loads((metrics.parent / "lever.json").read_text()) if (metrics.parent / "lever.json").exists() else None
        if saved == _key(config):
            return metrics.parent
    return None


def _rescore(base_run: Path, config) -> Path:
    """A scoring lever: same trained weights, new ImageScore, thresholds and metrics recomputed."""
    model, _ = load_model(base_run)
    model.image_score = ImageScore(config.smooth_sigma, config.score_reduction, config.topk_fraction)
    if config.algorithm == "stfpm":
        model.map_taps = parse_taps(config.map_taps, "--map-taps")
        model.map_combine = config.map_combine
    device = resolve_device(config.device)
    data = prepare_data(config)
    model = model.to(device)
    if config.algorithm == "stfpm":  # a new image score: the subspace term's scales follow it
        stfpm_cli.calibrate_map_scales(model, loader(data.validation, data, config), device)
    base_metrics = read_json(base_run, "metrics.json")
    keep = {k: base_metrics[k] for k in ("best_epoch", "history") if k in base_metrics}
    # The fitted shapes the base run recorded (DFM's PCA, STFPM's subspace term) make the new run loadable too.
    fitted = {k: v for k, v in read_json(base_run, "config.json").items() if k not in config.to_dict()}
    return evaluate_and_save(model, config, data, device, base_metrics.get("train_time_s", 0.0),
                             extra_config=fitted, extra_metrics={**keep, "rescored_from": str(base_run)})


def run_step(config, out: Path, base_run: Path | None, scoring_only: bool) -> Path:
    found = _find_run(out, config)
    if found is not None:
        log.info("reusing %s", found)
        return found
    if scoring_only and base_run is not None:
        run = _rescore(base_run, config)
    else:
        run = (stfpm_cli.train if config.algorithm == "stfpm" else dfm_cli.train)(config)
    (run / "lever.json").write_text(json.dumps(_key(config)))
    return run


def _row(lever: str, category: str, run: Path, kept: bool | None) -> dict:
    m = read_json(run, "metrics.json")
    return {
        "lever": lever, "category": category, "run": str(run), "kept": kept,
        "synthetic_validation_auroc": m.get("synthetic_validation_auroc"),
        "image_auroc": m["image_auroc"], "pixel_auroc": m.get("pixel_auroc"),
        "image_f1_deployed": m["image_f1_deployed"], "fpr_deployed": m["fpr_deployed"],
        "recall_deployed": m["recall_deployed"], "image_f1_optimal": m["image_f1_optimal"],
        "train_time_s": m.get("train_time_s"), "best_epoch": m.get("best_epoch"), "device": m.get("device"),
    }


def sweep(algorithm: str, category: str, data_root: str, out: Path, steps: list, check: list[str],
          train: bool = True) -> list[dict]:
    """Greedy: each lever is kept if it raises the synthetic validation AUROC on `category`; the
    baseline and every kept recipe are also measured on the `check` categories (fixed-pose parts
    it must not hurt), re-scoring their current run where only the scoring changed."""
    config_class = StfpmConfig if algorithm == "stfpm" else DfmConfig
    best = config_class(category=category, data_root=data_root, out=str(out), **BASELINES[algorithm])
    best_run, best_signal, rows = None, -1.0, []
    check_runs: dict[str, Path] = {}
    for lever, overrides in steps:
        candidate = replace(best, **overrides)
        scoring_only = bool(overrides) and set(overrides) <= SCORING_KEYS
        log.info("[%s %s] %s", algorithm, category, lever)
        if not train and _find_run(out, candidate) is None:
            rows.append({"lever": lever, "category": category, "not_measured": True, "kept": False})
            continue
        run = run_step(candidate, out, best_run, scoring_only)
        signal = read_json(run, "metrics.json")["synthetic_validation_auroc"]
        kept = best_run is None or signal >= best_signal + KEEP_MARGIN
        rows.append(_row(lever, category, run, kept if best_run is not None else None))
        if not kept:
            continue
        best, best_run, best_signal = candidate, run, signal
        for other in check:
            if not train and _find_run(out, replace(candidate, category=other)) is None:
                continue
            check_runs[other] = run_step(replace(candidate, category=other), out, check_runs.get(other), scoring_only)
            rows.append(_row(lever, other, check_runs[other], None))
    rows.append({"lever": "chosen recipe", "category": category, "recipe": {
        k: v for k, v in best.to_dict().items() if k not in ("out", "data_root", "category")}})
    return rows


def f(value, pattern: str = "{:.3f}") -> str:
    return "-" if value is None else pattern.format(value)


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| model | lever | kept | category | synthetic val AUROC | image AUROC | pixel AUROC | F1 deployed | FPR test/good | recall | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "recipe" in row:
            continue
        if row.get("not_measured"):
            lines.append(f"| {row['model']} | {row['lever']} | not measured | {row['category']} |  |  |  |  |  |  |  |")
            continue
        kept = {None: "", True: "yes", False: "no"}[row["kept"]]
        lines.append(
            f"| {row['model']} | {row['lever']} | {kept} | {row['category']} | {f(row['synthetic_validation_auroc'])} "
            f"| {f(row['image_auroc'])} | {f(row['pixel_auroc'])} | {f(row['image_f1_deployed'])} "
            f"| {f(row['fpr_deployed'])} | {f(row['recall_deployed'])} | {f(row['train_time_s'], '{:.0f}')} |")
    for row in rows:
        if "recipe" in row:
            lines.append(f"\nChosen {row['model']} recipe for {row['category']}: `{json.dumps(row['recipe'])}`")
    return "\n".join(lines) + "\n"


README_MARKERS = ("<!-- levers:begin -->", "<!-- levers:end -->")


def readme_block(rows: list[dict], header: str) -> str:
    """The README's compact view: the hard category's steps with the check category's figures beside them."""
    check = {(r["model"], r["lever"]): r for r in rows
             if "recipe" not in r and r.get("kept") is None and r["category"] != rows[0]["category"]}
    others = ", ".join(sorted({r["category"] for r in check.values()})) or "check category"
    lines = [README_MARKERS[0], header.strip(), "",
             f"| model | lever (greedy, in order) | kept | {rows[0]['category']} synthetic val AUROC | {rows[0]['category']} image AUROC "
             f"| F1 / FPR / recall at deployed threshold | {others} image / pixel AUROC | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "recipe" in row or row["category"] != rows[0]["category"]:
            continue
        if row.get("not_measured"):
            lines.append(f"| {row['model']} | {row['lever']} | not measured (CPU time) |  |  |  |  |  |")
            continue
        other = check.get((row["model"], row["lever"]))
        bottle = f"{f(other['image_auroc'])} / {f(other['pixel_auroc'])}" if other else ""
        kept = {None: "start", True: "yes", False: "no"}[row["kept"]]
        lines.append(f"| {row['model']} | {row['lever']} | {kept} | {f(row['synthetic_validation_auroc'])} | {f(row['image_auroc'])} "
                     f"| {f(row['image_f1_deployed'], '{:.2f}')} / {f(row['fpr_deployed'], '{:.2f}')} / {f(row['recall_deployed'], '{:.2f}')} "
                     f"| {bottle} | {f(row['train_time_s'], '{:.0f}')} |")
    lines.append(README_MARKERS[1])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--category", default="screw", help="the hard category the levers are chosen on")
    parser.add_argument("--check", nargs="*", default=["bottle"], help="categories each kept recipe is also measured on")
    parser.add_argument("--algorithms", nargs="+", default=["dfm", "stfpm"], choices=["dfm", "stfpm"])
    parser.add_argument("--out", default="runs/levers")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--doc", "--readme", dest="doc", type=Path,
                        help="also splice the compact table between the levers markers of this Markdown file "
                             "(docs/TRAINING.md holds them)")
    parser.add_argument("--from-json", action="store_true", help="only rebuild the tables from results/levers.json")
    parser.add_argument("--no-train", action="store_true", help="reuse finished runs only; list the others as not measured")
    args = parser.parse_args(argv)

    def work() -> None:
        results = Path(args.results)
        if args.from_json:
            rows = json.loads((results / "levers.json").read_text())
            header = (results / "levers.md").read_text().split("\n\n", 1)[0] + "\n"
            (results / "levers.md").write_text(header + "\n" + to_markdown(rows))
            if args.doc:
                splice_readme(args.doc, readme_block(rows, header), markers=README_MARKERS)
            return
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        machine_info = machine()
        rows = []
        for algorithm in args.algorithms:
            steps = STFPM_STEPS if algorithm == "stfpm" else DFM_STEPS
            for row in sweep(algorithm, args.category, args.data_root, out, steps, args.check, train=not args.no_train):
                rows.append({"model": algorithm.upper(), **row})
            results.mkdir(parents=True, exist_ok=True)
            header = (f"Tables written on {machine_line(machine_info)}"
                      + (f"; this sweep trained for {time.time() - started:.0f} s" if args.no_train is False else "")
                      + ". Training times are per run, as measured then.\n\n")
            (results / "levers.json").write_text(json.dumps(rows, indent=2))
            (results / "levers.md").write_text(header + to_markdown(rows))
            print(header + to_markdown(rows))
            if args.doc:
                splice_readme(args.doc, readme_block(rows, header), markers=README_MARKERS)

    return run_tool(work, (ValueError, FileNotFoundError, RunError))


if __name__ == "__main__":
    raise SystemExit(main())
