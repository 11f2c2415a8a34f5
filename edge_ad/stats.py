"""Running counters, frame rate and latency percentiles for heartbeats and the status line.

Percentiles come from a bounded window of recent frames, so a heartbeat says
how the system behaves now, not averaged since start-up.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np


def percentiles_ms(samples, qs=(50, 95, 99)) -> dict:
    """Seconds -> {"p50": ms, ...}; None values when there are no samples."""
    if len(samples) == 0:
        return {f"p{q}": None for q in qs}
    values = np.percentile(np.asarray(samples, dtype=np.float64) * 1000.0, qs)
    return {f"p{q}": round(float(v), 2) for q, v in zip(qs, values)}


class RuntimeStats:
    """Thread-safe: the capture, consumer and heartbeat threads all touch it."""

    def __init__(self, window: int = 500, fps_seconds: float = 5.0):
        self._lock = threading.Lock()
        self._latency: deque[float] = deque(maxlen=window)
        self._e2e: deque[float] = deque(maxlen=window)
        self._done: deque[float] = deque()  # completion times within fps_seconds
        self._fps_seconds = fps_seconds
        self.started = time.monotonic()
        self.captured = 0
        self.processed = 0
        self.anomalous = 0
        self.alerts = 0
        self.clears = 0
        self.errors = 0
        self.dropped = 0  # set from the detector
        self.skipped = 0  # set from the source

    def frame_done(self, latency: float, e2e: float, anomalous: bool) -> None:
        now = time.monotonic()
        with self._lock:
            self.processed += 1
            self.anomalous += int(anomalous)
            self._latency.append(latency)
            self._e2e.append(e2e)
            self._done.append(now)
            while self._done and now - self._done[0] > self._fps_seconds:
                self._done.popleft()

    def fps(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._done if now - t <= self._fps_seconds]
        if len(recent) < 2:
            return 0.0
        span = max(now - recent[0], 1e-6)
        return len(recent) / span

    def snapshot(self) -> dict:
        """The numbers a heartbeat carries."""
        with self._lock:
            latency, e2e = list(self._latency), list(self._e2e)
            counts = dict(captured=self.captured, processed=self.processed, dropped=self.dropped,
                          skipped=self.skipped, anomalous=self.anomalous, alerts=self.alerts, clears=self.clears,
                          errors=self.errors)
        return {
            "uptime_s": round(time.monotonic() - self.started, 1),
            "fps": round(self.fps(), 2),
            "latency_ms": percentiles_ms(latency),
            "e2e_latency_ms": percentiles_ms(e2e),
            **counts,
        }

    def line(self) -> str:
        """The one-line operator status."""
        snap = self.snapshot()
        lat = snap["latency_ms"]
        p50 = "-" if lat["p50"] is None else f"{lat['p50']:.1f}"
        p99 = "-" if lat["p99"] is None else f"{lat['p99']:.1f}"
        extra = f" skipped {snap['skipped']}" if snap["skipped"] else ""
        extra += f" errors {snap['errors']}" if snap["errors"] else ""
        return (f"{snap['fps']:.1f} fps | latency p50 {p50} ms p99 {p99} ms | frames {snap['processed']} "
                f"| alerts {snap['alerts']} | dropped {snap['dropped']}{extra}")
