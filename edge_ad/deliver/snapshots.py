"""Heatmap-overlay JPEGs of alerting frames, so an operator sees what the model saw.

Written before the alert is published; the alert carries the file's path.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from edge_ad.model.preprocess import as_bgr_uint8, resize_map
from edge_ad.decide.regions import Region


def overlay(frame: np.ndarray, normalized_map: np.ndarray, regions: list[Region], alpha: float = 0.45) -> np.ndarray:
    """Frame (any frame the model accepts) + 0..1 map (model size) -> BGR image with heatmap and boxes."""
    frame = as_bgr_uint8(frame)
    height, width = frame.shape[:2]
    heat = resize_map(np.clip(normalized_map, 0.0, 1.0), height, width)
    colored = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(frame, 1.0 - alpha, colored, alpha, 0.0)
    thickness = max(1, round(min(height, width) / 200))
    for region in regions:
        cv2.rectangle(out, (region.x, region.y), (region.x + region.w - 1, region.y + region.h - 1),
                      (255, 255, 255), thickness)
    return out


class SnapshotWriter:
    def __init__(self, folder: str | Path, quality: int = 90):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.quality = int(quality)

    def write(self, name: str, frame: np.ndarray, normalized_map: np.ndarray, regions: list[Region]) -> Path:
        """Encode and write atomically (a reader never sees half a JPEG); returns the absolute path."""
        ok, data = cv2.imencode(".jpg", overlay(frame, normalized_map, regions),
                                [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise OSError("JPEG encoding failed")
        path = (self.folder / f"{name}.jpg").resolve()
        tmp = path.with_suffix(".jpg.tmp")
        tmp.write_bytes(data.tobytes())
        os.replace(tmp, path)
        return path
