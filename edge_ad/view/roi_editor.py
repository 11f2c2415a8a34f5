"""The ROI editor's server side: polygons drawn over the frame -> the ROI mask file -> the running scorer.

The file is the one `--roi-mask` reads (edge_ad/decide/regions.py `RoiMask`: an image, nonzero =
inspect, any size), written at frame size and atomically (temporary file, fsync, rename), so a
crash never leaves half a mask and the next start inspects what the operator saw. The scorer
takes the new mask on its next frame (`Scorer.set_roi`). Without `--roi-mask` the file is
`roi-<device>-<camera>.png` in the state folder, loaded at the next start with `--http`.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import cv2
import numpy as np

from edge_ad.atomic import write_atomic
from edge_ad.decide.regions import RoiMask
from edge_ad.decide.scoring import Scorer
from edge_ad.deliver.outbox import state_dir

log = logging.getLogger("edge_ad.view")

MAX_POLYGONS = 64
MAX_POINTS = 1000
MAX_SIDE = 8192


def default_roi_path(device: str, camera: str) -> Path:
    return state_dir() / f"roi-{device}-{camera}.png"


def polygons_to_mask(polygons, width: int, height: int) -> np.ndarray:
    """[[[x, y], ...], ...] in frame pixels -> uint8 mask (255 = inspect). ValueError on bad input."""
    if not (isinstance(width, int) and isinstance(height, int) and 0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise ValueError(f"width and height must be 1..{MAX_SIDE} pixels")
    if not isinstance(polygons, list) or not polygons or len(polygons) > MAX_POLYGONS:
        raise ValueError(f"give 1..{MAX_POLYGONS} polygons")
    mask = np.zeros((height, width), np.uint8)
    for polygon in polygons:
        if not isinstance(polygon, list) or not 3 <= len(polygon) <= MAX_POINTS:
            raise ValueError(f"a polygon needs 3..{MAX_POINTS} points")
        try:
            points = np.array([[float(x), float(y)] for x, y in polygon], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError("points must be [x, y] number pairs") from None
        if not np.isfinite(points).all():
            raise ValueError("points must be finite numbers")
        points[:, 0] = points[:, 0].clip(0, width - 1)
        points[:, 1] = points[:, 1].clip(0, height - 1)
        cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 255)
    if not mask.any():
        raise ValueError("the region is empty: nothing would be inspected")
    return mask


def write_mask(path: Path, mask: np.ndarray) -> None:
    """PNG, atomically: a reader (or the next start) sees the old mask or the new one, never a torn file."""
    ok, data = cv2.imencode(".png", mask)
    if not ok:
        raise OSError("PNG encoding failed")
    write_atomic(path, data.tobytes())


def outline(mask: np.ndarray) -> list[list[list[int]]]:
    """The mask's outer contours as polygons (what the page draws over the frame)."""
    binary = (mask > 0).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours[:MAX_POLYGONS]:
        approx = cv2.approxPolyDP(contour, 1.0, True).reshape(-1, 2)
        if len(approx) >= 3:
            polygons.append(approx.astype(int).tolist())
    return polygons


class RoiEditor:
    """One camera's ROI file and scorer. Called from the HTTP threads; one save at a time."""

    def __init__(self, scorer: Scorer, path: Path, configured: bool):
        self.scorer, self.path, self.configured = scorer, Path(path), configured
        self._lock = threading.Lock()
        self._outline: dict | None = None
        if scorer.roi is None and not configured and self.path.is_file():
            try:
                self._apply(RoiMask.load(self.path), cv2.imread(str(self.path), cv2.IMREAD_GRAYSCALE))
                log.info("ROI mask from the live view's editor in force: %s", self.path)
            except (ValueError, TypeError) as exc:
                log.error("ignoring the live view's ROI mask %s: %s", self.path, exc)
        elif configured and self.path.is_file():
            self._outline = self._describe(cv2.imread(str(self.path), cv2.IMREAD_GRAYSCALE))

    @staticmethod
    def _describe(mask) -> dict | None:
        if mask is None:
            return None
        return {"width": int(mask.shape[1]), "height": int(mask.shape[0]), "polygons": outline(mask)}

    def _apply(self, roi: RoiMask | None, mask) -> None:
        self.scorer.set_roi(roi)
        self._outline = self._describe(mask) if roi is not None else None

    def current(self) -> dict | None:
        """{width, height, polygons} of the ROI in force, None when the whole frame is inspected."""
        return self._outline if self.scorer.roi is not None else None

    def save(self, polygons, width: int, height: int) -> Path:
        mask = polygons_to_mask(polygons, width, height)
        roi = RoiMask(mask)
        with self._lock:
            write_mask(self.path, mask)
            self._apply(roi, mask)
        log.info("ROI mask saved by the live view: %s (%d polygon(s), %.0f %% of the frame inspected)", self.path,
                 len(polygons), 100.0 * float((mask > 0).mean()))
        return self.path

    def clear(self) -> None:
        """Inspect the whole frame again. A configured --roi-mask file becomes all-inspect (the option still
        names it); the state-folder file is removed."""
        with self._lock:
            if self.configured:
                shape = self._outline and (self._outline["height"], self._outline["width"])
                write_mask(self.path, np.full(shape or (16, 16), 255, np.uint8))
            else:
                self.path.unlink(missing_ok=True)
            self._apply(None, None)
        log.info("ROI cleared by the live view: the whole frame is inspected")
