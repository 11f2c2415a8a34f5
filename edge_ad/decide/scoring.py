"""Raw model outputs -> one frame's decision, with the bundle's thresholds applied here.

Thresholds stay data (the bundle's raw values and normalization statistics),
so an operator can move them in normalized units (`--image-threshold 0.6`)
without re-exporting. With an ROI mask or a minimum area, a frame only counts
as anomalous when a region survives them: a defect outside the inspected area
must not raise an alert. Otherwise regions are only needed for what an alert
carries, so the pipeline asks for them (`Scorer.regions`) only when it alerts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_ad.model.bundle import Thresholds
from edge_ad.decide.normalization import normalize
from edge_ad.decide.regions import DEFAULT_MAX_REGIONS, Region, RoiMask, find_regions


def raw_threshold(normalized: float, threshold: float, minimum: float, maximum: float) -> float:
    """Inverse of `normalize` at one point: the raw value that normalizes to `normalized`."""
    span = max(float(maximum) - float(minimum), 1e-12)
    return float(threshold) + (float(normalized) - 0.5) * span


@dataclass
class Decision:
    score: float  # normalized 0..1
    raw_score: float
    anomalous: bool
    regions: list[Region] | None = field(default_factory=list)  # None: not computed (see Scorer.decide)
    regions_total: int = 0  # regions found; `regions` holds at most max_regions of them


class Scorer:
    """Applies image and pixel thresholds (normalized units) to raw outputs."""

    def __init__(self, thresholds: Thresholds, image_threshold: float = 0.5, pixel_threshold: float = 0.5,
                 min_area: int = 1, roi: RoiMask | None = None, max_regions: int = DEFAULT_MAX_REGIONS):
        self.thresholds = thresholds
        self.image_threshold = float(image_threshold)
        self.pixel_threshold = float(pixel_threshold)
        t = thresholds
        self.image_threshold_raw = raw_threshold(image_threshold, t.image, t.image_min, t.image_max)
        self.pixel_threshold_raw = raw_threshold(pixel_threshold, t.pixel, t.pixel_min, t.pixel_max)
        self.min_area = int(min_area)
        self.max_regions = int(max_regions)
        self.set_roi(roi)

    def set_roi(self, roi: RoiMask | None) -> None:
        """Change the inspected region while running (the live view's editor); the next frame uses it."""
        self.roi = roi
        self.require_region = roi is not None or self.min_area > 1

    def normalize_score(self, raw: float) -> float:
        t = self.thresholds
        return normalize(raw, t.image, t.image_min, t.image_max)

    def normalize_pixels(self, raw):
        t = self.thresholds
        return normalize(raw, t.pixel, t.pixel_min, t.pixel_max)

    def regions(self, anomaly_map: np.ndarray, frame_size: tuple[int, int]) -> tuple[list[Region], int]:
        """Defect regions in frame pixels (at most max_regions, largest first) and how many there are."""
        return find_regions(anomaly_map, frame_size, self.pixel_threshold_raw, self.normalize_pixels, self.min_area,
                            self.roi, self.max_regions)

    def decide(self, anomaly_map: np.ndarray, raw_score: float, frame_size: tuple[int, int],
               with_regions: bool = True) -> Decision:
        """Threshold one frame. With `with_regions=False` the regions of an anomalous frame are left for
        later (`regions` is None) unless the ROI mask or minimum area needs them to decide."""
        score = self.normalize_score(raw_score)
        anomalous = raw_score >= self.image_threshold_raw
        regions: list[Region] | None = []
        total = 0
        if anomalous:
            if with_regions or self.require_region:
                regions, total = self.regions(anomaly_map, frame_size)
                if self.require_region and not regions:
                    anomalous = False
            else:
                regions = None
        return Decision(score=score, raw_score=float(raw_score), anomalous=anomalous, regions=regions,
                        regions_total=total)

    def threshold_info(self) -> dict:
        """The thresholds in force, as carried in every alert."""
        return {
            "raw": round(self.image_threshold_raw, 6),
            "normalized": self.image_threshold,
            "pixel_raw": round(self.pixel_threshold_raw, 6),
            "pixel_normalized": self.pixel_threshold,
        }
