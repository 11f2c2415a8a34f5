"""Decision thresholds and normalization statistics from held-out normal images.

The validation split holds only normal images, so thresholds are set for a
target false-positive rate on them; the test split never chooses anything.
"""

from __future__ import annotations

import numpy as np

from edge_ad.model.bundle import Thresholds

DEFAULT_IMAGE_FPR = 0.01
DEFAULT_PIXEL_FPR = 0.001


def thresholds_from_normal(
    scores: np.ndarray,
    maps: np.ndarray,
    target_fpr: float = DEFAULT_IMAGE_FPR,
    pixel_fpr: float = DEFAULT_PIXEL_FPR,
    source: str = "validation",
) -> Thresholds:
    """Raw thresholds at the (1 - fpr) quantile of normal scores and normal pixels."""
    if not 0.0 <= target_fpr < 1.0 or not 0.0 <= pixel_fpr < 1.0:
        raise ValueError("target false-positive rates must be in [0, 1)")
    scores = np.asarray(scores, dtype=np.float64).ravel()
    pixels = np.asarray(maps, dtype=np.float32).ravel()
    if scores.size == 0:
        raise ValueError("no normal images to set thresholds on")
    return Thresholds(
        image=float(np.quantile(scores, 1.0 - target_fpr)),
        pixel=float(np.quantile(pixels, 1.0 - pixel_fpr)),
        image_min=float(scores.min()),
        image_max=float(scores.max()),
        pixel_min=float(pixels.min()),
        pixel_max=float(pixels.max()),
        target_fpr=float(target_fpr),
        source=source,
    )
