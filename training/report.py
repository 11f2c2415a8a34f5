"""Each training run's report.html: what the numbers in metrics.json look like, for a person deciding to deploy.

    python -m training.report RUN_DIR [--bundle BUNDLE_DIR ...]     # again later, with exported bundles

Training writes it (`write`, called at the end of `training.pipeline.evaluate_and_save`): the ROC curve of the
test split with the deployed operating point, histograms of normal and anomalous test scores with the deployed
threshold, the normal scores that set that threshold (validation, and with `--threshold-folds` the training images' out-of-fold scores), and heatmaps of the worst misses and false alarms.
Given bundles (an export, an INT8 bundle: their bundle.json carries torch / FP32 IR / INT8 IR metrics on the
same test images), the precisions are tabled side by side. The HTML holds its figures as data URIs (no
network, one file to mail); the PNGs lie beside it. Each figure carries what it plots as data attributes
(the threshold, axes limits and pixel box, counts), so a reader or a test can check a figure against
metrics.json. The scores are kept in report_data.npz, so re-rendering needs neither the model nor the data.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from pathlib import Path

import numpy as np

from edge_ad.decide.thresholds import describe_outliers

REPORT_FILE = "report.html"
DATA_FILE = "report_data.npz"
EXAMPLES_FILE = "examples.json"
THRESHOLD_COLOR = "#ff0000"  # the threshold line alone uses this colour, so it can be found in the PNG
DPI = 100
N_EXAMPLES = 3
STAGES = (("torch", "PyTorch"), ("fp32_ir", "FP32 IR"), ("fp16_ir", "FP16 IR"), ("int8_ir", "INT8 IR"))
METRIC_ROWS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"),
               ("image_f1_deployed", "image F1 at the deployed threshold"), ("image_f1_optimal", "image F1 at the best threshold"),
               ("fpr_deployed", "false-positive rate at the deployed threshold"),
               ("recall_deployed", "recall at the deployed threshold"), ("n_test", "test images"))


class ReportError(ValueError):
    """A run folder or bundle the report cannot be drawn from (one line, exit 2)."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def write(run_dir: str | Path, validation, test, out_of_fold_scores: np.ndarray | None = None) -> Path:
    """Keep the scores, draw the example heatmaps (they need the maps and images), then render the report.
    `out_of_fold_scores`: the training images' (training.crossfit), where the threshold was fitted on them too."""
    run_dir = Path(run_dir)
    extra = {} if out_of_fold_scores is None else {"out_of_fold_scores": np.asarray(out_of_fold_scores, np.float64)}
    np.savez_compressed(run_dir / DATA_FILE, test_scores=test.scores.astype(np.float64), test_labels=test.labels,
                        test_paths=np.asarray(test.paths, dtype=str),
                        validation_scores=validation.scores.astype(np.float64), **extra)
    threshold = _metrics(run_dir)["thresholds"]["image"]
    examples = _example_figure(test, threshold, run_dir / "examples.png")
    (run_dir / EXAMPLES_FILE).write_text(json.dumps(examples, indent=2) + "\n")
    return render(run_dir)


def _metrics(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"not a finished training run (metrics.json unreadable): {run_dir}: {exc}") from None


def _pick_examples(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, list[int]]:
    """Indices of the lowest-scoring anomalous images (misses first) and the highest-scoring normal ones."""
    anomalous = np.flatnonzero(labels == 1)
    normal = np.flatnonzero(labels == 0)
    return {"misses": [int(i) for i in anomalous[np.argsort(scores[anomalous], kind="stable")][:N_EXAMPLES]],
            "false_alarms": [int(i) for i in normal[np.argsort(-scores[normal], kind="stable")][:N_EXAMPLES]]}


def _example_figure(test, threshold: float, out: Path) -> dict:
    """Image, heatmap overlay and true mask outline of the worst misses and false alarms."""
    import cv2

    from edge_ad.sources.images import read_image

    plt = _pyplot()
    chosen = _pick_examples(test.scores, test.labels, threshold)
    rows = [(kind, i) for kind in ("misses", "false_alarms") for i in chosen[kind]]
    described: dict[str, list[dict]] = {"misses": [], "false_alarms": []}
    if not rows:
        return described
    vmin, vmax = float(np.percentile(test.maps, 1)), float(np.percentile(test.maps, 99.9))
    figure, axes = plt.subplots(len(rows), 2, figsize=(5.2, 2.6 * len(rows)), dpi=DPI, squeeze=False)
    for (kind, i), (left, right) in zip(rows, axes):
        height, width = test.maps[i].shape
        image = cv2.resize(read_image(test.paths[i]), (width, height), interpolation=cv2.INTER_AREA)
        if image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        wrong = (test.scores[i] < threshold) if kind == "misses" else (test.scores[i] >= threshold)
        label = ("missed defect" if wrong else "lowest-scoring defect") if kind == "misses" else \
            ("false alarm" if wrong else "highest-scoring good part")
        left.imshow(image, cmap="gray" if image.ndim == 2 else None)
        left.set_title(f"{label}\n{Path(test.paths[i]).parent.name}/{Path(test.paths[i]).name}", fontsize=8)
        right.imshow(image, cmap="gray" if image.ndim == 2 else None)
        right.imshow(test.maps[i], cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax)
        if test.has_mask[i] and test.masks[i].any():
            right.contour(test.masks[i] > 0, levels=[0.5], colors="white", linewidths=0.8)
        right.set_title(f"score {test.scores[i]:.4g} (threshold {threshold:.4g})", fontsize=8)
        for ax in (left, right):
            ax.set_axis_off()
        described[kind].append({"path": str(test.paths[i]), "score": float(test.scores[i]), "wrong_side": bool(wrong)})
    figure.tight_layout()
    figure.savefig(out, dpi=DPI)
    plt.close(figure)
    return described


def _axes_box(figure, ax) -> list[float]:
    """The axes' x0, x1 in PNG pixel columns (origin left), for mapping a pixel back to data."""
    box = ax.get_window_extent(figure.canvas.get_renderer())
    return [round(float(box.x0), 3), round(float(box.x1), 3)]


def _score_figure(scores: np.ndarray, labels: np.ndarray, threshold: float, out: Path) -> dict:
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6.4, 3.6), dpi=DPI)
    low, high = float(min(scores.min(), threshold)), float(max(scores.max(), threshold))
    pad = (high - low) * 0.05 or 1.0
    bins = np.linspace(low - pad, high + pad, 41)
    normal, anomalous = scores[labels == 0], scores[labels == 1]
    ax.hist(normal, bins=bins, alpha=0.6, color="tab:blue", label=f"normal ({normal.size})")
    ax.hist(anomalous, bins=bins, alpha=0.6, color="tab:orange", label=f"anomalous ({anomalous.size})")
    line = ax.axvline(threshold, color=THRESHOLD_COLOR, linewidth=1.0, antialiased=False,
                      label=f"deployed threshold {threshold:.4g}")
    ax.set_xlim(bins[0], bins[-1])
    ax.set_xlabel("image score (raw)")
    ax.set_ylabel("test images")
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.canvas.draw()
    attrs = {"threshold": float(line.get_xdata()[0]), "xlim": [float(v) for v in ax.get_xlim()],
             "axes-px": _axes_box(figure, ax), "n-normal": int(normal.size), "n-anomalous": int(anomalous.size),
             "max-normal": float(normal.max()) if normal.size else None,
             "min-anomalous": float(anomalous.min()) if anomalous.size else None}
    figure.savefig(out, dpi=DPI)
    plt.close(figure)
    return attrs


def _roc_figure(scores: np.ndarray, labels: np.ndarray, threshold: float, out: Path) -> dict | None:
    from sklearn.metrics import auc, roc_curve

    if len(set(labels.tolist())) < 2:
        return None
    fpr, tpr, _ = roc_curve(labels, scores)
    point_fpr = float(np.mean(scores[labels == 0] >= threshold))
    point_tpr = float(np.mean(scores[labels == 1] >= threshold))
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(4.2, 4.0), dpi=DPI)
    ax.plot(fpr, tpr, color="tab:blue", label=f"ROC, AUROC {auc(fpr, tpr):.3f}")
    ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8, linestyle="--")
    ax.plot([point_fpr], [point_tpr], "o", color="tab:red", label="deployed threshold")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate (recall)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(out, dpi=DPI)
    plt.close(figure)
    return {"auroc": float(auc(fpr, tpr)), "fpr": [round(float(v), 6) for v in fpr],
            "tpr": [round(float(v), 6) for v in tpr], "point-fpr": point_fpr, "point-tpr": point_tpr}


def _validation_figure(scores: np.ndarray, threshold: float, target_fpr: float | None, out: Path,
                       outliers: list[int] = (), n_validation: int | None = None) -> dict:
    """`scores`: those the threshold was fitted on, the validation images' first (`n_validation`; all by default),
    then the training images' out-of-fold ones."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6.4, 3.0), dpi=DPI)
    n_validation = scores.size if n_validation is None else n_validation
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    from_validation = order < n_validation
    ax.plot(np.flatnonzero(from_validation), ordered[from_validation], "o", markersize=3, color="tab:blue",
            label=f"validation images (normal, {n_validation})")
    if n_validation < scores.size:
        ax.plot(np.flatnonzero(~from_validation), ordered[~from_validation], "o", markersize=2, color="tab:gray",
                label=f"training images, out-of-fold ({scores.size - n_validation})")
    if len(outliers):
        rank = np.searchsorted(ordered, scores[list(outliers)])
        ax.plot(rank, scores[list(outliers)], "o", markersize=8, fillstyle="none", color=THRESHOLD_COLOR,
                label="beyond the others' tail (named below)")
    ax.axhline(threshold, color=THRESHOLD_COLOR, linewidth=1.0, antialiased=False,
               label=f"deployed threshold {threshold:.4g}" + (f" (target FPR {target_fpr:.1%})" if target_fpr else ""))
    ax.set_xlabel("normal image (sorted by score)")
    ax.set_ylabel("image score (raw)")
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=DPI)
    plt.close(figure)
    return {"threshold": float(threshold), "scores": [float(v) for v in scores],
            "above-threshold": int(np.sum(scores >= threshold)), "outliers": [int(v) for v in outliers]}


def _bundle_metrics(bundle: Path) -> tuple[str, dict]:
    try:
        data = json.loads((Path(bundle) / "bundle.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"not a bundle (bundle.json unreadable): {bundle}: {exc}") from None
    return data.get("model", {}).get("precision", "?"), data.get("metrics", {})


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _precision_table(metrics: dict, bundles: list[Path]) -> tuple[str, dict]:
    """torch from metrics.json; every IR stage any bundle measured (an INT8 bundle repeats torch and FP32)."""
    stages: dict[str, dict] = {"torch": metrics}
    for bundle in bundles:
        _, measured = _bundle_metrics(bundle)
        for stage, values in measured.items():
            if stage != "torch":
                stages[stage] = values
    order = [key for key, _ in STAGES if key in stages]
    names = dict(STAGES)
    head = "".join(f"<th>{names[key]}</th>" for key in order)
    body = "".join(f"<tr><td>{label}</td>" + "".join(f"<td>{_cell(stages[key].get(name))}</td>" for key in order)
                   + "</tr>" for name, label in METRIC_ROWS)
    data = {key: {name: stages[key].get(name) for name, _ in METRIC_ROWS} for key in order}
    return f"<table><tr><th></th>{head}</tr>{body}</table>", data


def _fitted_names(run_dir: Path, with_training: bool) -> list[str]:
    """The names of the images whose scores set the threshold, from split.json, in the order their scores were
    stored (validation, then training with out-of-fold scores); [] when unreadable."""
    try:
        split = json.loads((run_dir / "split.json").read_text())
        return [Path(path).name for path in split["validation"] + (split["train"] if with_training else [])]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return []


def _figure(run_dir: Path, name: str, caption: str, attrs: dict | None) -> str:
    path = run_dir / name
    if attrs is None or not path.is_file():
        return f"<p><em>{html.escape(caption)}: not drawn (the test split needs normal and anomalous images).</em></p>"
    data = " ".join(f'data-{key}="{html.escape(json.dumps(value), quote=True)}"' for key, value in attrs.items())
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure id="{path.stem}" data-file="{name}" {data}><img alt="{html.escape(caption)}" '
            f'src="data:image/png;base64,{encoded}"><figcaption>{html.escape(caption)}</figcaption></figure>')


def render(run_dir: str | Path, bundles: list[str | Path] = ()) -> Path:
    """(Re)draw the score figures from report_data.npz and metrics.json and write report.html."""
    run_dir = Path(run_dir)
    metrics = _metrics(run_dir)
    try:
        config = json.loads((run_dir / "config.json").read_text())
        data = np.load(run_dir / DATA_FILE)
        scores, labels = data["test_scores"], data["test_labels"]
        validation_scores = data["validation_scores"]
        out_of_fold = data["out_of_fold_scores"] if "out_of_fold_scores" in data.files else np.zeros(0)
    except (OSError, KeyError, ValueError) as exc:
        raise ReportError(f"{run_dir} has no report data ({DATA_FILE}, config.json): {exc}") from None
    examples = json.loads((run_dir / EXAMPLES_FILE).read_text()) if (run_dir / EXAMPLES_FILE).is_file() else {}
    thresholds = metrics["thresholds"]
    threshold = float(thresholds["image"])
    roc = _roc_figure(scores, labels, threshold, run_dir / "roc.png")
    histogram = _score_figure(scores, labels, threshold, run_dir / "scores.png")
    outliers = (thresholds.get("fit") or {}).get("outliers") or []
    fitted = np.concatenate([validation_scores, out_of_fold])
    validation = _validation_figure(fitted, threshold, thresholds.get("target_fpr"), run_dir / "validation.png",
                                    outliers, n_validation=validation_scores.size)
    validation_caption = "Scores of the validation images that set the threshold" if not out_of_fold.size else \
        ("Scores of the normal images that set the threshold: the validation images, and the training images "
         "each scored by a model fitted without it (out-of-fold)")
    if outliers:
        names = _fitted_names(run_dir, with_training=bool(out_of_fold.size))
        validation_caption += "; " + describe_outliers(thresholds["fit"], names if len(names) == fitted.size
                                                       else [f"normal image {i + 1}" for i in range(fitted.size)])
    table, table_data = _precision_table(metrics, [Path(b) for b in bundles])
    title = f"{config.get('algorithm', '?').upper()} {config.get('backbone', '?')} on {config.get('category', '?')}"
    settings = ", ".join(f"{key} {config[key]}" for key in ("epochs", "image_size", "batch_size", "seed", "split_seed",
                                                             "validation_fraction", "target_fpr")
                         if config.get(key) is not None)
    examples_attrs = {"misses": examples.get("misses", []), "false-alarms": examples.get("false_alarms", [])}
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}: training report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}td:first-child{{text-align:left}}
figure{{margin:1.5em 0}}img{{max-width:100%}}figcaption{{font-size:.9em;color:#555}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Run folder <code>{html.escape(run_dir.name)}</code>; {html.escape(settings)}. The deployed threshold (raw image
score {threshold:.6g}) was set on {"the validation split (normal images held out of training)" if not out_of_fold.size
    else "normal images only: the validation split (held out of training) and the training images, each scored by a fit without it"},
never on the test split, which is only measured here.</p>
<h2>Metrics per precision</h2>
<div id="precisions" data-stages="{html.escape(json.dumps(table_data), quote=True)}">{table}</div>
<p>{"Exported bundles measured on the same test images." if bundles else
    "Only the PyTorch model so far; after export and INT8 quantization run "
    f"<code>python -m training.report {html.escape(str(run_dir))} --bundle BUNDLE_DIR</code> to add them."}</p>
<h2>Test split</h2>
{_figure(run_dir, "roc.png", "ROC curve of the test images; the dot is the deployed threshold", roc)}
{_figure(run_dir, "scores.png", "Scores of normal and anomalous test images; red: the deployed threshold", histogram)}
<h2>{"Validation scores" if not out_of_fold.size else "Normal scores that set the threshold"}</h2>
{_figure(run_dir, "validation.png", validation_caption, validation)}
<h2>Worst misses and false alarms</h2>
{_figure(run_dir, "examples.png", "Lowest-scoring defects and highest-scoring good parts of the test split; "
         "heatmap over the image, white: the true defect outline", examples_attrs)}
</body></html>
"""
    out = run_dir / REPORT_FILE
    out.write_text(page, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    from edge_ad.ops.tool_cli import run_tool

    parser = argparse.ArgumentParser(prog="python -m training.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a training run folder")
    parser.add_argument("--bundle", type=Path, action="append", default=[],
                        help="a bundle exported from this run (repeat: FP32, INT8); adds its metrics")
    args = parser.parse_args(argv)
    return run_tool(lambda: render(args.run_dir, args.bundle), (ReportError, OSError))


if __name__ == "__main__":
    sys.exit(main())
