"""Hold out normal training images for model selection, thresholds and INT8 calibration.

The test split is never used to choose anything, so every choice made after
training is made on these held-out normal images instead. The split depends
only on the set of files and the seed, not on listing order, so a run folder's
split.json can be reproduced on another machine.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .errors import DatasetError
from .mvtec import Sample


def split_validation(samples: list[Sample], fraction: float = 0.15, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Seeded split of normal images into (train, validation), both sorted by path."""
    if not (isinstance(fraction, numbers.Real) and 0.0 < fraction <= 0.5):
        raise DatasetError(f"validation fraction must be in (0, 0.5], got {fraction!r}")
    anomalous = [s for s in samples if s.label != 0]
    if anomalous:
        raise DatasetError(f"validation is held out from normal images only; got anomalous {anomalous[0].path}")
    ordered = sorted(samples, key=lambda s: str(s.path))
    paths = [str(s.path) for s in ordered]
    if len(set(paths)) != len(paths):
        raise DatasetError("the same image is listed twice; cannot split it into disjoint parts")
    n = len(ordered)
    if n < 2:
        raise DatasetError(f"need at least 2 normal training images to hold out a validation set, got {n}")
    n_val = min(max(1, int(math.floor(n * fraction + 0.5))), n - 1)
    chosen = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [s for i, s in enumerate(ordered) if i not in chosen]
    validation = [s for i, s in enumerate(ordered) if i in chosen]
    return train, validation
