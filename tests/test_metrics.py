"""Metrics and thresholds against brute-force definitions (not against the library they call)."""

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from edge_ad.decide.normalization import normalize
from training.metrics import compute_metrics, f1_at, f1_optimal, image_auroc, pixel_auroc
from edge_ad.decide.thresholds import estimate_thresholds


def mann_whitney_auroc(labels, scores):
    """P(score of a random anomaly > score of a random normal), ties count half."""
    positives = scores[labels == 1]
    negatives = scores[labels == 0]
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return (greater + 0.5 * ties) / (len(positives) * len(negatives))


def brute_force_best_f1(labels, scores):
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        tp = np.sum(predicted & (labels == 1))
        fp = np.sum(predicted & (labels == 0))
        fn = np.sum(~predicted & (labels == 1))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_matches_mann_whitney_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(size=60) + labels * 0.8, 1)  # rounding creates ties
    assert image_auroc(labels, scores) == pytest.approx(mann_whitney_auroc(labels, scores), abs=1e-12)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_pixel_auroc_over_all_pixels():
    rng = np.random.default_rng(0)
    masks = (rng.random((3, 16, 16)) > 0.8).astype(np.uint8)
    maps = rng.random((3, 16, 16)) + masks * 0.5
    expected = mann_whitney_auroc(masks.ravel(), maps.ravel().astype(np.float32))
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-9)


def test_perfect_and_inverted_separation():
    labels = np.array([0, 0, 0, 1, 1])
    assert image_auroc(labels, np.array([0.1, 0.2, 0.3, 0.8, 0.9])) == 1.0
    assert image_auroc(labels, np.array([0.9, 0.8, 0.7, 0.2, 0.1])) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_f1_optimal_is_the_best_over_all_thresholds(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    labels[:2] = [0, 1]
    scores = rng.normal(size=40) + labels
    f1, threshold = f1_optimal(labels, scores)
    assert f1 == pytest.approx(brute_force_best_f1(labels, scores))
    assert f1 == pytest.approx(f1_score(labels, scores >= threshold))
    assert f1_at(labels, scores, threshold) == pytest.approx(f1)


def test_single_class_is_an_error():
    with pytest.raises(ValueError, match="both"):
        image_auroc(np.zeros(4), np.arange(4))
    with pytest.raises(ValueError, match="both"):
        pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))


def test_compute_metrics_without_masks_has_no_pixel_auroc():
    metrics = compute_metrics(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8]), image_threshold=0.5)
    assert metrics.pixel_auroc is None
    assert metrics.image_auroc == 1.0
    assert metrics.image_f1_deployed == 1.0
    assert metrics.fpr_deployed == 0.0 and metrics.recall_deployed == 1.0


def test_thresholds_pixel_quantile_and_normalization_span():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=1000)
    maps = rng.random((10, 32, 32))
    thresholds = estimate_thresholds(scores, maps, target_fpr=0.05, pixel_fpr=0.01)
    assert np.mean(maps > thresholds.pixel) == pytest.approx(0.01, abs=0.001)
    assert thresholds.image_min == scores.min()
    assert thresholds.image_max == max(scores.max(), thresholds.image)
    assert thresholds.fit["n"] == 1000


def test_normalization_puts_threshold_at_half():
    assert normalize(3.0, threshold=3.0, minimum=1.0, maximum=5.0) == 0.5
    assert normalize(100.0, threshold=3.0, minimum=1.0, maximum=5.0) == 1.0
    assert normalize(-100.0, threshold=3.0, minimum=1.0, maximum=5.0) == 0.0
    values = normalize(np.array([2.0, 4.0]), threshold=3.0, minimum=1.0, maximum=5.0)
    np.testing.assert_allclose(values, [0.25, 0.75])
