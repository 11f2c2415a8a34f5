"""Raw model scores -> 0..1 scores with the decision threshold at 0.5.

Applied by the runtime from the bundle's statistics, so thresholds can be
recalibrated on site without re-exporting the model.
"""

from __future__ import annotations

import numpy as np


def normalize(raw, threshold: float, minimum: float, maximum: float):
    """clip(0.5 + (raw - threshold) / (max - min), 0, 1); works on scalars and arrays."""
    span = max(float(maximum) - float(minimum), 1e-12)
    normalized = 0.5 + (np.asarray(raw, dtype=np.float64) - float(threshold)) / span
    result = np.clip(normalized, 0.0, 1.0)
    return float(result) if np.ndim(result) == 0 else result.astype(np.float32)
