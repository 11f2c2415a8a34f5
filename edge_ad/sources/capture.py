"""Frame sources: camera index, video file or stream URL, and folders of still images.

Live sources (cameras, streams) fail in the field: a camera that will not open
or stops delivering is reopened with exponential back-off and reported through
`on_state`, and only given up on after a configured number of retries. Files
end normally. Every frame carries its index in the source, a timestamp on the
source's clock (media time for files, so decisions replay deterministically)
and the UTC wall time for payloads.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from edge_ad.backoff import Backoff
from edge_ad.errors import SourceError
from edge_ad.sources.images import IMAGE_SUFFIXES, ImageReadError, list_images, read_image

log = logging.getLogger("edge_ad.sources")
# Our one-line messages, not OpenCV's and FFmpeg's warnings (users can still override the env var).
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
# A stalled stream must fail a read (and be reconnected) instead of hanging capture.
STREAM_TIMEOUTS = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 10000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 5000]

StateCallback = Callable[[str, str], None]  # (state "online" | "degraded", reason)


@dataclass
class Frame:
    index: int  # position in the source (dropped frames keep their index)
    image: np.ndarray  # uint8 BGR or grayscale, any size
    timestamp: float  # seconds on the source clock
    utc: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    captured: float = field(default_factory=time.monotonic)  # for end-to-end latency
    name: str | None = None  # file name for still images


class FrameSource:
    """Iterate frames; `live` sources may drop frames, file sources are processed completely."""

    live: bool = False
    default_id: str = "camera"
    description: str = ""
    skipped: int = 0  # unreadable inputs skipped

    def open(self) -> None:
        """Fail early (SourceError) when the source cannot deliver anything."""

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class CaptureSource(FrameSource):
    """cv2.VideoCapture behind retries: camera index, stream URL or video file."""

    def __init__(self, target: int | str, *, kind: str, backoff: Backoff = Backoff(),
                 realtime: bool = False, stop: threading.Event | None = None,
                 on_state: StateCallback | None = None):
        self.target = target
        self.kind = kind  # "camera" | "stream" | "file"
        self.backoff = backoff
        self.realtime = realtime
        self.stop = stop or threading.Event()
        self.on_state = on_state or (lambda state, reason: None)
        self.live = kind != "file" or realtime
        shown = redact_url(str(target)) if kind == "stream" else target
        self.description = f"camera {target}" if kind == "camera" else f"{kind} {shown}"
        if kind == "camera":
            self.default_id = f"cam{target}"
        elif kind == "stream":
            self.default_id = safe_id(str(target).split("://", 1)[-1].split("/", 1)[0].split("@")[-1]) or "stream"
        else:
            self.default_id = safe_id(Path(str(target)).stem) or "video"
        self._cap: cv2.VideoCapture | None = None
        self._first: np.ndarray | None = None
        self.fps = 0.0

    def _try_open(self) -> str | None:
        """One attempt; returns None on success or the reason it failed."""
        if self.kind == "stream":
            cap = cv2.VideoCapture(self.target, cv2.CAP_ANY, STREAM_TIMEOUTS)
        else:
            cap = cv2.VideoCapture(self.target)
        if not cap.isOpened():
            cap.release()
            return "cannot open" + (" (no such device?)" if self.kind == "camera" else "")
        ok, image = cap.read()
        if not ok or image is None:
            cap.release()
            return "opened but delivered no frame"
        self._cap, self._first = cap, image
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if 0 < fps < 1000 else 0.0
        return None

    def _open_with_retries(self, why: str) -> bool:
        reason = self._try_open()
        if reason is None:
            return True
        attempts = 1
        for delay in self.backoff.delays():
            log.warning("%s: %s; retry %d/%d in %.1f s", self.description, reason, attempts, self.backoff.retries, delay)
            self.on_state("degraded", f"{self.description}: {reason}")
            if self.stop.wait(delay):
                return False
            reason = self._try_open()
            attempts += 1
            if reason is None:
                log.info("%s: delivering frames again", self.description)
                self.on_state("online", "")
                return True
        plural = "attempt" if attempts == 1 else "attempts"
        raise SourceError(f"{self.description}: {reason} ({why}; gave up after {attempts} {plural})")

    def open(self) -> None:
        if self.kind == "file":
            if not Path(str(self.target)).is_file():
                raise SourceError(f"video file not found: {self.target}", exit_code=2)
            if self._try_open() is not None:
                raise SourceError(f"cannot read video file {self.target} (not a video, or a codec OpenCV lacks)", exit_code=2)
            return
        # A camera or stream still missing after the retries exits 1 (not 2): a PC that boots before its
        # USB camera or NVR is ready is restarted by systemd, which exit 2 (bad configuration) would prevent.
        self._open_with_retries("at startup")

    def __iter__(self) -> Iterator[Frame]:
        if self._cap is None:
            self.open()
        index = 0
        start = time.monotonic()
        while not self.stop.is_set() and self._cap is not None:
            if self._first is not None:
                ok, image = True, self._first
                self._first = None
            else:
                ok, image = self._cap.read()
            if not ok or image is None:
                if self.kind == "file":
                    return  # end of file
                log.warning("%s stopped delivering frames; reconnecting", self.description)
                self._cap.release()
                self._cap = None
                if not self._open_with_retries("stopped delivering frames"):
                    return
                continue
            if self.kind == "file" and self.fps:
                timestamp = index / self.fps
                if self.realtime:
                    wait = start + timestamp - time.monotonic()
                    if wait > 0 and self.stop.wait(wait):
                        return
            else:
                timestamp = time.monotonic()
            yield Frame(index=index, image=image, timestamp=timestamp)
            index += 1

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class ImageFolderSource(FrameSource):
    """Still images from a folder or glob pattern, in name order; unreadable files are skipped and counted."""

    def __init__(self, pattern: str, stop: threading.Event | None = None):
        self.pattern = pattern
        self.stop = stop or threading.Event()
        self.description = f"images {pattern}"
        path = Path(pattern)
        self.default_id = safe_id(path.name if path.is_dir() else path.parent.name) or "images"
        self.paths: list[Path] = []
        self.skipped = 0

    def open(self) -> None:
        path = Path(self.pattern)
        if path.is_dir():
            self.paths = list_images(path)
        elif glob.has_magic(self.pattern):
            self.paths = sorted(Path(p) for p in glob.glob(self.pattern) if Path(p).is_file())
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            self.paths = [path]
        else:
            raise SourceError(f"image folder not found: {self.pattern}", exit_code=2)
        if not self.paths:
            raise SourceError(f"no images in {self.pattern} (looked for {', '.join(IMAGE_SUFFIXES)})", exit_code=2)

    def __iter__(self) -> Iterator[Frame]:
        if not self.paths:
            self.open()
        for index, path in enumerate(self.paths):
            if self.stop.is_set():
                return
            try:
                image = read_image(path)
            except ImageReadError as exc:
                self.skipped += 1
                log.warning("skipping unreadable image (%d so far): %s", self.skipped, exc)
                continue
            yield Frame(index=index, image=image, timestamp=time.monotonic(), name=path.name)


def redact_url(url: str) -> str:
    """rtsp://user:secret@cam/stream -> rtsp://user:***@cam/stream: stream passwords stay out of logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def safe_id(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_.")


def open_source(camera: int | None = None, video: str | None = None, images: str | None = None, *,
                realtime: bool = False, backoff: Backoff = Backoff(), stop: threading.Event | None = None,
                on_state: StateCallback | None = None) -> FrameSource:
    """The one source the options name (not yet opened)."""
    if camera is not None:
        return CaptureSource(int(camera), kind="camera", backoff=backoff, stop=stop, on_state=on_state)
    if video is not None:
        kind = "stream" if "://" in video else "file"
        return CaptureSource(video, kind=kind, backoff=backoff, realtime=realtime, stop=stop, on_state=on_state)
    if images is not None:
        return ImageFolderSource(images, stop=stop)
    raise SourceError("no frame source given", exit_code=2)
