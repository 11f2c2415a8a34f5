"""Image- and pixel-level metrics, computed with scikit-learn."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels).ravel()
    if len(np.unique(labels)) < 2:
        raise ValueError("AUROC needs both normal and anomalous images")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64).ravel()))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """AUROC over every pixel of every image (masks {0,1}, maps same shape)."""
    masks = np.asarray(masks).reshape(-1).astype(np.uint8)
    if masks.min() == masks.max():
        raise ValueError("pixel AUROC needs both defect and normal pixels")
    return float(roc_auc_score(masks, np.asarray(maps, dtype=np.float32).reshape(-1)))


def f1_optimal(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold that reaches it (score >= threshold)."""
    precision, recall, thresholds = precision_recall_curve(np.asarray(labels).ravel(), np.asarray(scores).ravel())
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    denominator = precision + recall
    f1 = np.where(denominator > 0, 2 * precision * recall / np.maximum(denominator, 1e-12), 0.0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def f1_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """F1 of the decision score >= threshold: how the deployed threshold actually performs."""
    labels = np.asarray(labels).ravel().astype(bool)
    predicted = np.asarray(scores).ravel() >= threshold
    tp = np.sum(predicted & labels)
    fp = np.sum(predicted & ~labels)
    fn = np.sum(~predicted & labels)
    return float(2 * tp / max(2 * tp + fp + fn, 1))


def rates_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """(false-positive rate on normal images, recall on anomalous ones) of score >= threshold."""
    labels = np.asarray(labels).ravel().astype(bool)
    predicted = np.asarray(scores).ravel() >= threshold
    fpr = float(np.mean(predicted[~labels])) if np.any(~labels) else float("nan")
    recall = float(np.mean(predicted[labels])) if np.any(labels) else float("nan")
    return fpr, recall


@dataclass
class Metrics:
    """Test-split figures. `*_deployed`: at the threshold set on validation, what a line gets;
    `*_optimal`: at the F1-optimal threshold on the test split itself, a ceiling for comparison only."""

    image_auroc: float
    pixel_auroc: float | None
    image_f1_deployed: float
    fpr_deployed: float  # share of normal test images flagged, to compare with the target rate
    recall_deployed: float  # share of anomalous test images flagged
    deployed_threshold: float
    image_f1_optimal: float
    image_f1_optimal_threshold: float
    n_test: int
    n_test_anomalous: int

    def to_dict(self) -> dict:
        return asdict(self)


def compute_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    image_threshold: float,
    masks: np.ndarray | None = None,
    maps: np.ndarray | None = None,
) -> Metrics:
    f1, f1_threshold = f1_optimal(labels, scores)
    pixel = pixel_auroc(masks, maps) if masks is not None and maps is not None else None
    fpr, recall = rates_at(labels, scores, image_threshold)
    return Metrics(
        image_auroc=image_auroc(labels, scores),
        pixel_auroc=pixel,
        image_f1_deployed=f1_at(labels, scores, image_threshold),
        fpr_deployed=fpr,
        recall_deployed=recall,
        deployed_threshold=float(image_threshold),
        image_f1_optimal=f1,
        image_f1_optimal_threshold=f1_threshold,
        n_test=int(len(labels)),
        n_test_anomalous=int(np.sum(labels)),
    )
