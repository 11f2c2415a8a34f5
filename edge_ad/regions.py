"""Defect regions: the thresholded anomaly map as boxes in frame pixels.

The model-size map is resized to the frame (`edge_ad.preprocess.resize_map`), so
boxes are in the coordinates an operator sees; OpenCV's connected components
give box, area and label per region in one pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from edge_ad.images import ImageReadError, read_image
from edge_ad.preprocess import resize_map


@dataclass(frozen=True)
class Region:
    """One connected defect region; peak is the normalized (0..1) map maximum inside it."""

    x: int
    y: int
    w: int
    h: int
    area: int
    peak: float

    def to_dict(self) -> dict:
        return asdict(self)


class RoiMask:
    """Region of interest (nonzero = inspect), resized to each frame size once and cached."""

    def __init__(self, mask: np.ndarray):
        if mask.ndim == 3:
            mask = mask.max(axis=2)
        self._mask = (mask > 0).astype(np.uint8)
        if not self._mask.any():
            raise ValueError("the region-of-interest mask is all zero: nothing would be inspected")
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def load(cls, path) -> "RoiMask":
        try:
            return cls(read_image(path, grayscale=True))
        except ImageReadError as exc:
            raise ValueError(str(exc)) from None

    def at(self, height: int, width: int) -> np.ndarray:
        key = (height, width)
        if key not in self._cache:
            self._cache[key] = cv2.resize(self._mask, (width, height), interpolation=cv2.INTER_NEAREST)
        return self._cache[key]


def extract_regions(
    anomaly_map: np.ndarray,
    frame_size: tuple[int, int],
    raw_threshold: float,
    to_normalized,
    min_area: int = 1,
    roi: RoiMask | None = None,
) -> list[Region]:
    """Raw model-size map (HxW) -> regions in a (height, width) frame, largest first.

    `to_normalized(raw)` maps raw pixel values to 0..1 for the reported peak.
    """
    height, width = frame_size
    full = resize_map(np.asarray(anomaly_map, dtype=np.float32).reshape(anomaly_map.shape[-2:]), height, width)
    binary = (full >= raw_threshold).astype(np.uint8)
    if roi is not None:
        binary &= roi.at(height, width)
    if not binary.any():
        return []
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    regions = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area < min_area:
            continue
        peak_raw = float(full[y : y + h, x : x + w][labels[y : y + h, x : x + w] == label].max())
        regions.append(Region(x, y, w, h, area, round(float(to_normalized(peak_raw)), 4)))
    regions.sort(key=lambda r: r.area, reverse=True)
    return regions
