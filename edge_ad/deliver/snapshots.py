"""Heatmap-overlay JPEGs of alerting frames, so an operator sees what the model saw.

Written before the alert is published; the alert carries the file's path.
The folder is bounded (at most `max_files` snapshots and `max_bytes` in all;
the oldest are deleted first), and no snapshot is written while the disk has
less than `reserve_bytes` free: the outbox, which holds the alerts themselves,
needs that space more than pictures do. Only files named like our snapshots are
ever deleted.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from collections import deque
from pathlib import Path

import cv2
import numpy as np

from edge_ad.atomic import write_atomic
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


log = logging.getLogger("edge_ad.snapshots")

MB = 1024 * 1024
OURS = re.compile(r"^.+_\d{8,}_[0-9a-f]{8}\.jpg$")  # <camera>_<frame index>_<event id prefix>.jpg (pipeline.py)


class LowDiskSpace(OSError):
    """Free space is below the reserve: the snapshot was not written, to keep room for the outbox."""


class SnapshotWriter:
    def __init__(self, folder: str | Path, quality: int = 90, max_files: int = 0, max_bytes: int = 0,
                 reserve_bytes: int = 0):
        """max_files, max_bytes: 0 = unbounded; reserve_bytes: free disk space no snapshot may eat into."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.quality = int(quality)
        self.max_files, self.max_bytes, self.reserve_bytes = int(max_files), int(max_bytes), int(reserve_bytes)
        self.deleted = 0  # old snapshots removed to stay within the bounds
        self.refused = 0  # snapshots not written for lack of free space
        self._lock = threading.Lock()
        existing = []
        for entry in os.scandir(self.folder):
            if OURS.match(entry.name) and entry.is_file(follow_symlinks=False):
                stat = entry.stat(follow_symlinks=False)
                existing.append((stat.st_mtime, Path(entry.path).resolve(), stat.st_size))
        self._files: deque[tuple[Path, int]] = deque((path, size) for _, path, size in sorted(existing))
        self._bytes = sum(size for _, size in self._files)
        with self._lock:
            self._prune()

    def write(self, name: str, frame: np.ndarray, normalized_map: np.ndarray, regions: list[Region]) -> Path:
        """Encode and write atomically (a reader never sees half a JPEG); returns the absolute path.

        LowDiskSpace when the disk is too full to afford it (the alert goes out without a snapshot).
        """
        ok, data = cv2.imencode(".jpg", overlay(frame, normalized_map, regions),
                                [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise OSError("JPEG encoding failed")
        if self.reserve_bytes:
            free = shutil.disk_usage(self.folder).free
            if free - data.nbytes < self.reserve_bytes:
                with self._lock:
                    self.refused += 1
                raise LowDiskSpace(f"only {free / MB:.0f} MB free, below the {self.reserve_bytes / MB:.0f} MB reserve "
                                   f"kept for the outbox (--disk-reserve-mb); snapshot not written "
                                   f"({self.refused} so far)")
        path = (self.folder / f"{name}.jpg").resolve()
        write_atomic(path, data.tobytes())
        with self._lock:
            self._files.append((path, data.nbytes))
            self._bytes += data.nbytes
            self._prune(keep=path)
        return path

    def _prune(self, keep: Path | None = None) -> None:
        """Delete the oldest snapshots until within max_files and max_bytes (never `keep`, the newest)."""
        while self._files and self._files[0][0] != keep and (
                (self.max_files and len(self._files) > self.max_files)
                or (self.max_bytes and self._bytes > self.max_bytes)):
            path, size = self._files.popleft()
            self._bytes -= size
            try:
                path.unlink()
            except FileNotFoundError:
                pass  # removed by someone else: already gone
            except OSError as exc:
                log.warning("cannot delete old snapshot %s: %s", path, exc.strerror or exc)
                continue
            self.deleted += 1
