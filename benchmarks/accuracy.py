"""The accuracy table: image AUROC, pixel AUROC and image F1 of torch / FP32 IR / INT8 IR per category.

Nothing is re-inferred here: the INT8 bundle's bundle.json already holds all three stages measured on
the same test split by training, `deploy.export` and `calibration.quantize`, and the run folder holds
the training time. The layout follows the published STFPM/DFM tables: categories as columns, mean
first.

    python -m benchmarks.accuracy --variants benchmarks/results/variants.json --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from benchmarks.variants import Variant, load_variants
from edge_ad.ops.tool_cli import run_tool

log = logging.getLogger("benchmarks.accuracy")

STAGES = (("torch", "torch"), ("fp32_ir", "FP32 IR"), ("int8_ir", "INT8 IR"))
METRICS = (
    ("image_auroc", "Image AUROC"),
    ("pixel_auroc", "Pixel AUROC"),
    ("image_f1_deployed", "Image F1 at the deployed threshold"),
    ("fpr_deployed", "False-positive rate on test/good at the deployed threshold (target 0.01)"),
    ("recall_deployed", "Recall on defective test images at the deployed threshold"),
)
ALGORITHM_NAMES = {"stfpm": "STFPM", "dfm": "DFM"}


class AccuracyError(Exception):
    pass


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise AccuracyError(f"missing {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise AccuracyError(f"cannot read {path}: {exc}") from None


def _size_mb(bundle: Path) -> float:
    """Weights and graph on disk: what a deployment copies."""
    return sum(p.stat().st_size for p in bundle.glob("model.*") if p.suffix in (".xml", ".bin")) / 1e6


def collect(variants: list[Variant]) -> list[dict]:
    """One row per variant and stage."""
    rows = []
    for variant in variants:
        bundle = _read_json(variant.int8 / "bundle.json")
        run_metrics = _read_json(variant.run_dir / "metrics.json")
        measured = bundle.get("metrics") or {}
        bundle_of_stage = {"fp32_ir": variant.fp32, "int8_ir": variant.int8}
        for stage, _ in STAGES:
            if "image_auroc" not in measured.get(stage, {}):
                raise AccuracyError(f"{variant.int8}/bundle.json has no '{stage}' metrics (quantize with test data reachable)")
            m = measured[stage]
            rows.append({
                "category": variant.category,
                "algorithm": variant.algorithm,
                "backbone": variant.backbone,
                "stage": stage,
                "image_auroc": m["image_auroc"],
                "pixel_auroc": m.get("pixel_auroc"),
                # F1 where deployment puts the threshold (held-out normal images), not the best F1 a
                # look at the test labels would pick; the latter is kept in the JSON for comparison.
                "image_f1_deployed": m.get("image_f1_deployed"),
                "fpr_deployed": m.get("fpr_deployed"),
                "recall_deployed": m.get("recall_deployed"),
                "image_f1_optimal": m.get("image_f1_optimal"),
                "n_test": m.get("n_test"),
                "spearman_vs_fp32_ir": m.get("spearman_vs_fp32_ir"),  # INT8 stage only
                "size_mb": round(_size_mb(bundle_of_stage[stage]), 2) if stage in bundle_of_stage else None,
                "train_time_s": run_metrics.get("train_time_s"),
                "train_process_cpu_s": run_metrics.get("process_cpu_s"),
                "epochs": len(run_metrics.get("history") or []) or None,
            })
    return rows


def _mean(values: list[float | None], expected: list[bool]) -> float | None:
    """Mean over the categories that have this metric at all; None if this model lacks one of them, so a
    mean over fewer categories never sits beside means over more."""
    present = [v for v, e in zip(values, expected) if e]
    if not present or any(v is None for v in present):
        return None
    return sum(present) / len(present)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(rows: list[dict]) -> str:
    categories = sorted({r["category"] for r in rows})
    models = sorted({(r["algorithm"], r["backbone"]) for r in rows}, key=lambda m: (m[0] != "stfpm", m[1]))
    by_key = {(r["algorithm"], r["backbone"], r["stage"], r["category"]): r for r in rows}
    out = []
    for metric, title in METRICS:
        out.append(f"**{title}**\n")
        out.append("| model | stage | Mean | " + " | ".join(categories) + " |")
        out.append("|---|---|---|" + "---|" * len(categories))
        expected = [any(r["category"] == c and r[metric] is not None for r in rows) for c in categories]
        for algorithm, backbone in models:
            for stage, stage_name in STAGES:
                cells = [by_key.get((algorithm, backbone, stage, c), {}).get(metric) for c in categories]
                label = f"{ALGORITHM_NAMES.get(algorithm, algorithm)} {backbone}"
                out.append(f"| {label} | {stage_name} | {_cell(_mean(cells, expected))} | "
                           + " | ".join(_cell(v) for v in cells) + " |")
        if metric == "pixel_auroc":
            out.append("\n'-': the category has no ground-truth masks here; the mean is over categories that have them.")
        out.append("")
    out.append("**Size on disk (MB, model.xml + model.bin), INT8 score ranking, training time (s, wall / process CPU)**\n")
    out.append("| model | category | FP32 IR MB | INT8 IR MB | Spearman INT8 vs FP32 | training wall s | training CPU s |")
    out.append("|---|---|---|---|---|---|---|")
    for algorithm, backbone in models:
        for c in categories:
            fp32 = by_key.get((algorithm, backbone, "fp32_ir", c))
            int8 = by_key.get((algorithm, backbone, "int8_ir", c))
            if not fp32:
                continue
            wall, cpu, rho = fp32["train_time_s"], fp32["train_process_cpu_s"], int8["spearman_vs_fp32_ir"]
            out.append(
                f"| {ALGORITHM_NAMES.get(algorithm, algorithm)} {backbone} | {c} | {fp32['size_mb']:.2f} | "
                f"{int8['size_mb']:.2f} | {_cell(rho)} | {'-' if wall is None else f'{wall:.0f}'} | "
                f"{'-' if cpu is None else f'{cpu:.0f}'} |"
            )
    out.append("\nA '-' in a category column: not measured; the mean is then left out too.")
    return "\n".join(out) + "\n"


def write_tables(variants: list[Variant], out_dir: Path) -> list[dict]:
    rows = collect(variants)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "accuracy.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out_dir / "accuracy.md").write_text(markdown(rows))
    log.info("accuracy of %d variants -> %s", len(variants), out_dir / "accuracy.md")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=Path, required=True, help="variants.json written by benchmarks.run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    def tables() -> str:
        write_tables(load_variants(args.variants), args.out)
        return (args.out / "accuracy.md").read_text()

    return run_tool(tables, (AccuracyError, OSError, KeyError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
