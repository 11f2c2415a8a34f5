"""Accuracy on real MVTec AD bottle and screw (skipped where the data is absent): the issue's targets."""

import json

import pytest

pytestmark = [pytest.mark.mvtec, pytest.mark.slow]


def metrics_of(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def test_stfpm_bottle_accuracy(bottle_stfpm_run):
    metrics = metrics_of(bottle_stfpm_run)
    assert metrics["image_auroc"] >= 0.99, metrics
    assert metrics["pixel_auroc"] >= 0.985, metrics


def test_dfm_bottle_accuracy(bottle_dfm_run):
    metrics = metrics_of(bottle_dfm_run)
    assert metrics["image_auroc"] >= 0.99, metrics
    assert metrics["pixel_auroc"] >= 0.97, metrics


def test_thresholds_come_from_held_out_normal_images(bottle_stfpm_run):
    split = json.loads((bottle_stfpm_run / "split.json").read_text())
    assert 20 <= len(split["validation"]) <= 42  # 10-20 % of 209
    assert all("/train/good/" in path for path in split["validation"])
    assert metrics_of(bottle_stfpm_run)["thresholds"]["source"] == "validation"


def test_dfm_default_recipe_on_screw(screw_dfm_run):
    """The issue's target for the default DFM on the hard category (measured 0.945 with the 8-pose PCA of round 7)."""
    metrics = metrics_of(screw_dfm_run)
    assert metrics["image_auroc"] >= 0.85, metrics


def test_stfpm_default_recipe_on_screw(screw_stfpm_run):
    """The issue's target for the default STFPM on screw (measured 0.950 when the subspace weight was chosen;
    the student alone gives 0.690)."""
    metrics = metrics_of(screw_stfpm_run)
    assert metrics["image_auroc"] >= 0.92, metrics


@pytest.mark.parametrize("fixture", ["bottle_stfpm_run", "bottle_dfm_run", "screw_stfpm_run", "screw_dfm_run"])
def test_deployed_threshold_keeps_its_false_positive_promise(fixture, request):
    """At most 3x the target rate of normal test images flagged (the fitted-tail threshold's job)."""
    metrics = metrics_of(request.getfixturevalue(fixture))
    target = metrics["thresholds"]["target_fpr"]
    assert metrics["fpr_deployed"] <= 3 * target, metrics
    split = json.loads((request.getfixturevalue(fixture) / "split.json").read_text())
    fit = metrics["thresholds"]["fit"]
    # the defaults fit it on the validation images alone (--threshold-folds is an option, docs/TRAINING.md rounds 16-17)
    assert "out_of_fold" not in fit and fit["n"] == len(split["validation"])
