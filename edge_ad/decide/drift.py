"""Drift watch: are the scores of normal parts still where the bundle's validation put them?

A camera that was nudged, a lamp that ages, a new batch of material: the normal
scores creep towards the threshold long before false alerts pile up. The watch
keeps the raw scores of recent *normal* frames (below the image threshold) and
compares their p50 and p95 with the validation figures stored in bundle.json
(`thresholds.fit.p50/p95`, written by `estimate_thresholds` at training time and
by `edge-ad teach`). Drift is measured in units of the validation margin, the
distance from the validation median to the threshold:

    drift = max(|p50 - p50_val|, |p95 - p95_val|) / (threshold - p50_val)

so 0.5 means "the normal scores moved half-way to the threshold". Beyond the
bound the camera's status turns `degraded: scores drifting` (and back, with a
little hysteresis, once they return): time to check the station or re-run
`edge-ad teach`.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edge_ad.model.bundle import Thresholds

DEFAULT_BOUND = 0.5
DEFAULT_WINDOW = 500
MIN_SAMPLES = 50  # fewer recent normal frames say nothing about a distribution
CHECK_EVERY = 10  # frames between evaluations (a percentile of 500 values costs ~20 us anyway)
CLEAR_FRACTION = 0.8  # drifting ends below 0.8 x bound, so a score hovering at the bound does not flap


@dataclass(frozen=True)
class DriftReference:
    """The validation figures the recent scores are compared with."""

    p50: float
    p95: float
    threshold: float  # raw image threshold in force

    @classmethod
    def from_thresholds(cls, thresholds: Thresholds, threshold_raw: float | None = None) -> "DriftReference | None":
        """None when the bundle has no validation percentiles (bundles written before they were recorded)."""
        fit = thresholds.fit or {}
        p50, p95 = fit.get("p50"), fit.get("p95")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (p50, p95)):
            return None
        threshold = float(thresholds.image if threshold_raw is None else threshold_raw)
        if threshold <= float(p50):
            return None
        return cls(float(p50), float(p95), threshold)


class DriftWatch:
    """Fed the raw score of every normal frame (decision thread); read by heartbeats (ticker thread)."""

    def __init__(self, reference: DriftReference | None, bound: float = DEFAULT_BOUND, window: int = DEFAULT_WINDOW,
                 min_samples: int = MIN_SAMPLES, on_change: Callable[[str | None], None] | None = None):
        self.reference, self.bound = reference, float(bound)
        self.min_samples = max(1, min(int(min_samples), int(window)))
        self.on_change = on_change or (lambda problem: None)
        self._scores: deque[float] = deque(maxlen=int(window))
        self._lock = threading.Lock()
        self._since_check = 0
        self.drifting = False
        self.last: dict | None = None

    def add(self, raw_score: float) -> None:
        if self.reference is None or self.bound <= 0 or not math.isfinite(raw_score):
            return
        with self._lock:
            self._scores.append(float(raw_score))
            self._since_check += 1
            if self._since_check < CHECK_EVERY or len(self._scores) < self.min_samples:
                return
            self._since_check = 0
            figures = self._figures()
        limit = self.bound * (CLEAR_FRACTION if self.drifting else 1.0)
        drifting = figures["drift"] > limit
        if drifting != self.drifting:
            self.drifting = drifting
            self.on_change(self.problem(figures) if drifting else None)

    def _figures(self) -> dict:
        ref = self.reference
        p50, p95 = (float(v) for v in np.percentile(np.asarray(self._scores), [50, 95]))
        margin = ref.threshold - ref.p50
        drift = max(abs(p50 - ref.p50), abs(p95 - ref.p95)) / margin
        self.last = {"p50": round(p50, 6), "p95": round(p95, 6), "drift": round(drift, 4)}
        return self.last

    def problem(self, figures: dict) -> str:
        ref = self.reference
        return (f"scores drifting: normal-part p50 {figures['p50']:.4g} / p95 {figures['p95']:.4g} vs validation "
                f"{ref.p50:.4g} / {ref.p95:.4g} ({figures['drift']:.2f} of the margin to the threshold "
                f"{ref.threshold:.4g}, bound {self.bound:g}; check the station or re-run edge-ad teach)")

    def fields(self) -> dict:
        """Heartbeat field `score_drift`."""
        if self.reference is None:
            return {"score_drift": {"state": "unavailable",
                                    "reason": "bundle has no validation score percentiles (run edge-ad teach)"}}
        with self._lock:
            n = len(self._scores)
            figures = self._figures() if n >= self.min_samples else None
        ref = self.reference
        out = {"n": n, "window": self._scores.maxlen, "bound": self.bound, "validation_p50": round(ref.p50, 6),
               "validation_p95": round(ref.p95, 6), "threshold": round(ref.threshold, 6)}
        if figures is None:
            out.update(state="warming up", p50=None, p95=None, drift=None)
        else:
            out.update(state="drifting" if self.drifting else "ok", **figures)
        return {"score_drift": out}
