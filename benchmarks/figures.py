"""The README's pictures: accuracy against latency per variant, and what the runtime sees on test images.

The heatmap grid is drawn from generated data (MVTec AD cannot be redistributed) through the same path
as the runtime: the bundle compiled by `edge_ad.model.inference`, thresholds and regions from
`edge_ad.decide.scoring`, overlay from `edge_ad.deliver.snapshots`.

    python -m benchmarks.figures --results benchmarks/results --grid-bundle B --grid-data ROOT --grid-category C
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import cv2
import numpy as np

from edge_ad.ops.tool_cli import run_tool

log = logging.getLogger("benchmarks.figures")

STAGE_LABELS = {"torch": "PyTorch eager", "fp32_ir": "OpenVINO FP32", "int8_ir": "OpenVINO INT8"}
STAGE_MARKERS = {"torch": "s", "fp32_ir": "o", "int8_ir": "^"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: edge PCs and CI have no display
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_latency(accuracy_rows: list[dict], latency_ms: dict[tuple[str, str, str], float], category: str,
                        out: Path, machine: str = "") -> Path | None:
    """Image AUROC on `category` against median single-frame latency, one point per model and stage.

    `latency_ms` maps (algorithm, backbone, stage) to milliseconds; stages without a latency are left out.
    """
    plt = _pyplot()
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    points = [
        (row, latency_ms[(row["algorithm"], row["backbone"], row["stage"])])
        for row in accuracy_rows
        if row["category"] == category and (row["algorithm"], row["backbone"], row["stage"]) in latency_ms
    ]
    if not points:
        log.warning("no variant of %s has both an accuracy and a latency: accuracy-vs-latency figure skipped", category)
        return None
    models = sorted({(r["algorithm"], r["backbone"]) for r, _ in points})
    fastest, slowest = min(ms for _, ms in points), max(ms for _, ms in points)
    colors = dict(zip(models, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for axis, metric, title in ((axes[0], "image_auroc", "image AUROC"), (axes[1], "pixel_auroc", "pixel AUROC")):
        for row, ms in points:
            if row[metric] is None:
                continue
            model = (row["algorithm"], row["backbone"])
            axis.scatter(ms, row[metric], color=colors[model], marker=STAGE_MARKERS[row["stage"]], s=60,
                         edgecolors="black", linewidths=0.5)
        for model in models:  # connect the stages of one model: the cost of each step
            line = sorted((ms, row[metric]) for row, ms in points
                          if (row["algorithm"], row["backbone"]) == model and row[metric] is not None)
            if line:
                axis.plot(*zip(*line), color=colors[model], linewidth=0.8, alpha=0.6)
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xticks([t for t in (5, 10, 20, 50, 100, 200, 500, 1000) if fastest / 1.5 <= t <= slowest * 1.5])
        axis.set_xlabel("single-frame latency, ms (median, log scale)")
        axis.set_ylabel(f"{title} ({category})")
        axis.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[m], marker="o", linestyle="-", label=f"{m[0].upper()} {m[1]}") for m in models]
    handles += [plt.Line2D([], [], color="gray", marker=STAGE_MARKERS[s], linestyle="", label=STAGE_LABELS[s])
                for s in STAGE_LABELS]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    fig.suptitle(f"Accuracy vs latency, MVTec AD {category}, 256 px" + (f" ({machine})" if machine else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def heatmap_grid(bundle_dir: Path, data_root: Path, category: str, out: Path, n_defective: int = 6,
                 n_good: int = 2, pixel_threshold: float = 0.5) -> Path:
    """Test images, each with its true mask outlined (green) beside the runtime's heatmap and regions."""
    from edge_ad.sources.images import read_image
    from edge_ad.model.inference import compile_bundle
    from edge_ad.decide.scoring import Scorer
    from edge_ad.deliver.snapshots import overlay
    from training.data.mvtec import load_category

    plt = _pyplot()
    data = load_category(data_root, category)
    by_type: dict[str, list] = {}
    for s in data.test:
        if s.label == 1:
            by_type.setdefault(s.defect_type, []).append(s)
    # round-robin over defect types, so every kind of defect is shown
    defective = [group[i] for i in range(max(map(len, by_type.values()), default=0)) for group in by_type.values()
                 if i < len(group)][:n_defective]
    good = [s for s in data.test if s.label == 0][:n_good]
    samples = defective + good
    built = compile_bundle(bundle_dir)
    bundle = built.bundle
    scorer = Scorer(bundle.thresholds, pixel_threshold=pixel_threshold)
    map_port = built.compiled.output(bundle.model.outputs[0])
    score_port = built.compiled.output(bundle.model.outputs[1])

    fig, axes = plt.subplots(2, len(samples), figsize=(1.9 * len(samples), 4.2))
    for column, sample in enumerate(samples):
        frame = read_image(sample.path)
        result = built.compiled(built.prepare(frame, bundle.preprocess)[None])
        anomaly_map = np.asarray(result[map_port]).reshape(bundle.preprocess.height, bundle.preprocess.width)
        decision = scorer.decide(anomaly_map, float(np.asarray(result[score_port]).ravel()[0]), frame.shape[:2])
        truth = frame.copy()
        if sample.mask_path is not None:
            mask = cv2.imread(str(sample.mask_path), cv2.IMREAD_GRAYSCALE)
            contours, _ = cv2.findContours((mask > 127).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(truth, contours, -1, (0, 255, 0), max(1, frame.shape[0] // 128))
        heat = overlay(frame, scorer.normalize_pixels(anomaly_map), decision.regions or [])
        verdict = "DEFECT" if decision.anomalous else "ok"
        for row, (image, title) in enumerate(((truth, sample.defect_type), (heat, f"{decision.score:.2f} {verdict}"))):
            axis = axes[row, column]
            axis.imshow(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
            axis.set_title(title, fontsize=8, color="black" if row == 0 or decision.anomalous == bool(sample.label) else "red")
            axis.axis("off")
    fig.suptitle("Top: test image, true defect outlined. Bottom: edge-ad heatmap, defect regions (boxes), "
                 "normalized score and decision", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def latency_from_speed(speed: dict) -> dict[tuple[str, str, str], float]:
    """(algorithm, backbone, stage) -> p50 ms from speed.json (written by benchmarks.speed)."""
    stages = {"torch": "torch", "fp32": "fp32_ir", "int8": "int8_ir"}
    table = {}
    for row in speed.get("rows", []):
        stage = stages.get(row.get("engine"))
        if stage and row.get("p50_ms"):
            table[(row["algorithm"], row["backbone"], stage)] = float(row["p50_ms"])
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"),
                        help="folder with accuracy.json and speed.json; figures are written here")
    parser.add_argument("--category", default="bottle", help="category of the accuracy-vs-latency figure")
    parser.add_argument("--grid-bundle", type=Path, help="bundle for the heatmap grid")
    parser.add_argument("--grid-data", type=Path, help="MVTec-layout root of the grid's images (generated data)")
    parser.add_argument("--grid-category", default="synthetic")
    args = parser.parse_args(argv)

    def draw() -> str:
        accuracy = json.loads((args.results / "accuracy.json").read_text())
        speed = json.loads((args.results / "speed.json").read_text())
        written = [accuracy_vs_latency(accuracy, latency_from_speed(speed), args.category,
                                       args.results / "accuracy_vs_latency.png", speed.get("machine", {}).get("cpu", ""))]
        if args.grid_bundle:
            written.append(heatmap_grid(args.grid_bundle, args.grid_data, args.grid_category,
                                        args.results / "heatmap_grid.png"))
        return "\n".join(str(path) for path in written if path)

    return run_tool(draw, (OSError, ValueError, KeyError))


if __name__ == "__main__":
    sys.exit(main())
