"""Defect regions: the thresholded anomaly map as boxes in frame pixels.

Connected components run on the model-size map (64x64 to 256x256 pixels,
whatever the camera delivers), and only the boxes are scaled to the frame.
Upsampling the map to 1080p first cost 30-90 ms per anomalous frame and
bought no information: the map has the model's resolution. Boxes are
therefore quantized to the model grid (one model pixel = frame size / model
size frame pixels). Peaks come from one vectorized pass over the foreground
pixels, and only the `max_regions` largest regions are turned into objects:
a noisy map with thousands of specks costs about what a clean one costs, and
an alert carries at most `max_regions` boxes (plus how many there were).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from edge_ad.sources.images import ImageReadError, read_image

DEFAULT_MAX_REGIONS = 10


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
    """Region of interest (nonzero = inspect), resized to each (model) size once and cached."""

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
        """uint8 {0,1} mask at (height, width): a cell is inspected when at least half of it is in the ROI.

        A ROI thinner than half a cell would vanish under that rule; then any overlap counts, so
        a non-empty mask never turns into "inspect nothing".
        """
        key = (height, width)
        if key not in self._cache:
            if self._mask.shape == key:
                mask = self._mask
            else:
                cover = cv2.resize(self._mask.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
                mask = (cover >= 0.5).astype(np.uint8)
                if not mask.any():
                    mask = (cover > 0).astype(np.uint8)
            self._cache[key] = mask
        return self._cache[key]


def find_regions(
    anomaly_map: np.ndarray,
    frame_size: tuple[int, int],
    raw_threshold: float,
    to_normalized,
    min_area: int = 1,
    roi: RoiMask | None = None,
    max_regions: int | None = DEFAULT_MAX_REGIONS,
) -> tuple[list[Region], int]:
    """Raw model-size map (HxW) -> (the largest regions in a (height, width) frame, how many there are).

    Regions are in frame pixels, largest area first (ties: higher peak first), at most
    `max_regions` of them (None = all). `min_area` is in frame pixels. `to_normalized(raw)`
    maps raw pixel values to 0..1 for the reported peak.
    """
    amap = np.asarray(anomaly_map, dtype=np.float32)
    amap = amap.reshape(amap.shape[-2:])
    model_h, model_w = amap.shape
    height, width = frame_size
    binary = (amap >= raw_threshold).view(np.uint8)
    if roi is not None:
        binary &= roi.at(model_h, model_w)
    if not binary.any():
        return [], 0
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8, ltype=cv2.CV_32S)
    sx, sy = width / model_w, height / model_h
    areas = stats[1:, cv2.CC_STAT_AREA] * (sx * sy)  # frame pixels; index i = label i + 1
    keep = np.flatnonzero(areas >= min_area)
    total = int(keep.size)
    if total == 0:
        return [], 0
    foreground = labels.ravel()
    inside = foreground > 0
    peaks = np.full(count, -np.inf, dtype=np.float32)
    np.maximum.at(peaks, foreground[inside], amap.ravel()[inside])
    peaks = peaks[1:]
    order = keep[np.lexsort((-peaks[keep], -areas[keep]))]  # last key sorts first: area, then peak
    if max_regions is not None:
        order = order[:max_regions]
    regions = []
    for i in order:
        x, y, w, h = (int(v) for v in stats[i + 1, :4])
        x0, x1 = _scale(x, sx, width - 1), _scale(x + w, sx, width)
        y0, y1 = _scale(y, sy, height - 1), _scale(y + h, sy, height)
        regions.append(Region(x0, y0, max(1, x1 - x0), max(1, y1 - y0), max(1, int(areas[i] + 0.5)),
                              round(float(to_normalized(float(peaks[i]))), 4)))
    return regions, total


def _scale(edge: int, factor: float, limit: int) -> int:
    """A model-grid edge in frame pixels (the model pixel's frame extent), rounded, inside the frame."""
    return min(limit, max(0, int(edge * factor + 0.5)))
