"""report.html of a real (tiny) training run: each figure checked against metrics.json, split.json and the data
on disk; the threshold line is found in the PNG's pixels and mapped back to a score."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.report import THRESHOLD_COLOR

ROOT = Path(__file__).resolve().parents[1]


def python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


class Figures(HTMLParser):
    """id -> data attributes (JSON-decoded) of every <figure>, and every src/href of the page."""

    def __init__(self, text: str):
        super().__init__()
        self.figures: dict[str, dict] = {}
        self.blocks: dict[str, dict] = {}
        self.links: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[key] for key in ("src", "href") if key in attrs]
        data = {key[5:]: json.loads(value) for key, value in attrs.items() if key.startswith("data-") and key != "data-file"}
        if tag == "figure":
            self.figures[attrs["id"]] = data
        elif "id" in attrs:
            self.blocks[attrs["id"]] = data


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`python -m training.dfm` on a generated category (64 px), as a user runs it."""
    from training.data.synthetic import generate_synthetic_dataset

    work = tmp_path_factory.mktemp("report")
    # 60 normal training images: the 15 % validation split holds enough to set a threshold
    root = generate_synthetic_dataset(work / "data", image_size=64, n_train=60, n_test_good=6, n_test_defect=8, seed=3)
    result = python("-m", "training.dfm", "--data-root", str(root), "--category", "synthetic", "--image-size", "64",
                    "--batch-size", "8", "--out", str(work / "runs"), "--threshold-folds", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("report: "))
    report = Path(line.removeprefix("report: "))
    return report.parent, report, root / "synthetic"


def threshold_in_pixels(png: Path, attrs: dict) -> float:
    """The score where the pure-red line is drawn, from its pixel column and the axes' limits and pixel box."""
    image = cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB)
    red = tuple(int(THRESHOLD_COLOR[i:i + 2], 16) for i in (1, 3, 5))
    columns = np.flatnonzero(np.all(image == red, axis=2).sum(axis=0) > image.shape[0] // 3)
    assert columns.size, "no threshold line in the figure"
    (x0, x1), (low, high) = attrs["axes-px"], attrs["xlim"]
    centre = columns.mean() + 0.5
    return low + (centre - x0) / (x1 - x0) * (high - low)


def test_run_prints_a_self_contained_report(run):
    run_dir, report, _ = run
    assert report == run_dir / "report.html" and report.is_file()
    page = Figures(report.read_text())
    assert set(page.figures) == {"roc", "scores", "validation", "examples"}
    assert page.links and all(link.startswith("data:image/png;base64,") for link in page.links)  # no network
    for name in ("roc", "scores", "validation", "examples"):
        assert cv2.imread(str(run_dir / f"{name}.png")) is not None


def test_threshold_line_sits_at_the_deployed_threshold(run):
    run_dir, report, _ = run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    deployed = metrics["thresholds"]["image"]
    attrs = Figures(report.read_text()).figures["scores"]
    assert attrs["threshold"] == pytest.approx(deployed, rel=1e-12)
    one_pixel = (attrs["xlim"][1] - attrs["xlim"][0]) / (attrs["axes-px"][1] - attrs["axes-px"][0])
    assert threshold_in_pixels(run_dir / "scores.png", attrs) == pytest.approx(deployed, abs=1.5 * one_pixel)


def test_histograms_roc_and_validation_match_the_run(run):
    run_dir, report, category = run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    split = json.loads((run_dir / "split.json").read_text())
    page = Figures(report.read_text())
    scores, roc, validation = page.figures["scores"], page.figures["roc"], page.figures["validation"]
    good = len(list((category / "test" / "good").glob("*.png")))
    defective = sum(len(list(d.glob("*.png"))) for d in (category / "test").iterdir() if d.name != "good")
    assert (scores["n-normal"], scores["n-anomalous"]) == (good, defective)
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(metrics["image_auroc"], abs=1e-5)
    assert roc["point-fpr"] == pytest.approx(metrics["fpr_deployed"])
    assert roc["point-tpr"] == pytest.approx(metrics["recall_deployed"])
    # the threshold was fitted on the validation images and (--threshold-folds 5) the training images' out-of-fold scores
    fit = metrics["thresholds"]["fit"]
    assert len(validation["scores"]) == len(split["validation"]) + len(split["train"]) == fit["n"]
    assert validation["scores"][len(split["validation"]):] == pytest.approx(fit["out_of_fold"]["scores"], rel=1e-5)
    assert min(validation["scores"]) == pytest.approx(metrics["thresholds"]["image_min"], rel=1e-6)


def test_examples_are_the_worst_of_each_class(run):
    run_dir, report, _ = run
    page = Figures(report.read_text())
    examples, scores = page.figures["examples"], page.figures["scores"]
    assert examples["misses"] and examples["false-alarms"]
    assert all("/test/good/" not in e["path"] for e in examples["misses"])
    assert all("/test/good/" in e["path"] for e in examples["false-alarms"])
    assert examples["misses"][0]["score"] == pytest.approx(scores["min-anomalous"])
    assert examples["false-alarms"][0]["score"] == pytest.approx(scores["max-normal"])
    assert [e["score"] for e in examples["misses"]] == sorted(e["score"] for e in examples["misses"])


def test_bundle_metrics_side_by_side(run, tmp_path):
    run_dir, report, _ = run
    bundle = tmp_path / "fp32"
    result = python("-m", "deploy.export", str(run_dir), "--out", str(bundle))
    assert result.returncode == 0, result.stderr[-3000:]
    result = python("-m", "training.report", str(run_dir), "--bundle", str(bundle))
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads((bundle / "bundle.json").read_text())["metrics"]
    stages = Figures(report.read_text()).blocks["precisions"]["stages"]
    assert set(stages) == {"torch", "fp32_ir"}
    assert stages["fp32_ir"]["image_auroc"] == measured["fp32_ir"]["image_auroc"]
    assert stages["torch"]["image_auroc"] == json.loads((run_dir / "metrics.json").read_text())["image_auroc"]
    assert "FP32 IR" in report.read_text()


def test_report_of_a_folder_that_is_no_run_is_one_line(tmp_path):
    result = python("-m", "training.report", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: not a finished training run") and "\n" not in result.stderr.strip()


def train_with_a_planted_defect(tmp_path, role: str, index: int):
    """`python -m training.dfm` on a generated category whose `role` ("train" or "validation") image `index` of the
    default split has a black disc: returns that image, the command's result and its run folder."""
    from training.data.split import split_validation
    from training.data import load_category
    from training.data.synthetic import generate_synthetic_dataset

    root = generate_synthetic_dataset(tmp_path / "data", image_size=64, n_train=60, n_test_good=6, n_test_defect=8, seed=3)
    train, validation = split_validation(load_category(root, "synthetic").train, fraction=0.15, seed=0)
    planted = Path((train if role == "train" else validation)[index].path)
    image = cv2.imread(str(planted))
    cv2.circle(image, (32, 32), 10, (0, 0, 0), -1)
    cv2.imwrite(str(planted), image)
    result = python("-m", "training.dfm", "--data-root", str(root), "--category", "synthetic", "--image-size", "64",
                    "--batch-size", "8", "--out", str(tmp_path / "runs"), "--threshold-folds", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = Path(next(line for line in result.stdout.splitlines() if line.startswith("report: "))
                   .removeprefix("report: ")).parent
    return planted, result, run_dir


def test_a_defect_among_the_validation_images_is_named_in_the_log_and_the_report(tmp_path):
    """One 'normal' validation image with a defect sets the threshold alone: training names it, the report circles it."""
    planted, result, run_dir = train_with_a_planted_defect(tmp_path, "validation", 2)
    warning = next(line for line in result.stderr.splitlines() if "beyond the tail" in line)
    assert f"({planted})" in warning and "validation + out-of-fold training images (5 folds): 1 of 60 normal images scores" in warning
    fit = json.loads((run_dir / "metrics.json").read_text())["thresholds"]["fit"]
    assert fit["outliers"] == [2] and fit["threshold_without_outliers"] < fit["empirical_quantile"]
    page = (run_dir / "report.html").read_text()
    assert Figures(page).figures["validation"]["outliers"] == [2]
    assert f"normal images scores beyond the tail of the others ({planted.name})" in page


def test_a_defect_among_the_training_images_is_named_too(tmp_path):
    """Out-of-fold scores reach the training images, which no validation score could: a defective one is named
    in the log and in the report, by the name split.json gives it."""
    planted, result, run_dir = train_with_a_planted_defect(tmp_path, "train", 5)
    warning = next(line for line in result.stderr.splitlines() if "beyond the tail" in line)
    assert str(planted) in warning
    split = json.loads((run_dir / "split.json").read_text())
    position = len(split["validation"]) + split["train"].index(str(planted))
    assert position in json.loads((run_dir / "metrics.json").read_text())["thresholds"]["fit"]["outliers"]
    page = (run_dir / "report.html").read_text()
    assert position in Figures(page).figures["validation"]["outliers"] and planted.name in page
    assert "Normal scores that set the threshold" in page
