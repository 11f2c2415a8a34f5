"""Running counters, frame rate and latency percentiles for heartbeats and the status line.

Percentiles come from a bounded window of recent frames, so a heartbeat says
how the system behaves now, not averaged since start-up. `elapsed_s`, `fps_avg`
and `cpu_ms_per_frame` are the exception: the whole run from the first to the
latest decided frame (start-up excluded), so the final heartbeat is a
machine-readable summary.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import deque

import numpy as np


def percentiles_ms(samples, qs=(50, 95, 99)) -> dict:
    """Seconds -> {"p50": ms, ...}; None values when there are no samples."""
    if len(samples) == 0:
        return {f"p{q}": None for q in qs}
    values = np.percentile(np.asarray(samples, dtype=np.float64) * 1000.0, qs)
    return {f"p{q}": round(float(v), 2) for q, v in zip(qs, values)}


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # seconds


class Histogram:
    """Frames per latency bucket since start, for Prometheus (/metrics): one bisect and two additions per
    frame, no allocation, so the frame path stays O(1) whatever the run length. The caller holds the lock."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def add(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1  # bucket i holds bounds[i-1] < x <= bounds[i]
        self.sum += seconds

    def cumulative(self) -> tuple[list[tuple[float, int]], float]:
        """([(upper bound, frames at or below it), ..., (inf, all)], sum of seconds)."""
        total, out = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            total += count
            out.append((bound, total))
        return out, self.sum


class RuntimeStats:
    """Thread-safe: the capture, consumer and heartbeat threads all touch it."""

    def __init__(self, window: int = 500, fps_seconds: float = 5.0):
        self._lock = threading.Lock()
        self._latency: deque[float] = deque(maxlen=window)
        self._e2e: deque[float] = deque(maxlen=window)
        self.latency_hist, self.e2e_hist = Histogram(), Histogram()  # whole run, for /metrics
        self._done: deque[float] = deque()  # completion times within fps_seconds
        self._fps_seconds = fps_seconds
        self.started = time.monotonic()
        self.first_done: float | None = None  # monotonic time of the first / latest decided frame
        self.last_done: float | None = None
        self._cpu_first = self._cpu_last = 0.0  # process CPU time (all threads) at those frames
        self.captured = 0
        self.processed = 0
        self.anomalous = 0
        self.alerts = 0
        self.clears = 0
        self.errors = 0
        self.dropped = 0  # set from the detector
        self.skipped = 0  # set from the source

    def error(self) -> int:
        """Count one failed frame; returns the new total. The preparing and deciding threads both count:
        a bare `errors += 1` from two threads can lose increments."""
        with self._lock:
            self.errors += 1
            return self.errors

    def frame_done(self, latency: float, e2e: float, anomalous: bool) -> None:
        now = time.monotonic()
        with self._lock:
            self.processed += 1
            self.anomalous += int(anomalous)
            cpu = time.process_time()
            if self.first_done is None:
                self.first_done, self._cpu_first = now, cpu
            self.last_done, self._cpu_last = now, cpu
            self._latency.append(latency)
            self._e2e.append(e2e)
            self.latency_hist.add(latency)
            self.e2e_hist.add(e2e)
            self._done.append(now)
            while self._done and now - self._done[0] > self._fps_seconds:
                self._done.popleft()

    def histograms(self) -> dict:
        """{"latency": (cumulative buckets, sum), "e2e": ...} of the whole run (frames decided so far)."""
        with self._lock:
            return {"latency": self.latency_hist.cumulative(), "e2e": self.e2e_hist.cumulative()}

    def fps(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._done if now - t <= self._fps_seconds]
        if len(recent) < 2:
            return 0.0
        span = max(now - recent[0], 1e-6)
        return len(recent) / span

    def run_rate(self) -> tuple[float, float | None, float | None]:
        """(elapsed_s, fps_avg, cpu_ms_per_frame) over the run: seconds from the first to the latest decided
        frame, frames after the first per second of it, and the process's CPU time (every thread: capture,
        preprocessing, inference on CPU, decisions, publishing) per frame over the same span. The last is
        what a frame costs the machine, unaffected by other jobs competing for it. None before two frames."""
        with self._lock:
            first, last, processed = self.first_done, self.last_done, self.processed
            cpu = self._cpu_last - self._cpu_first
        if first is None or last is None or last <= first or processed < 2:
            return 0.0, None, None
        return last - first, (processed - 1) / (last - first), cpu * 1000.0 / (processed - 1)

    def snapshot(self) -> dict:
        """The numbers a heartbeat carries."""
        elapsed, fps_avg, cpu_ms = self.run_rate()
        with self._lock:
            latency, e2e = list(self._latency), list(self._e2e)
            counts = dict(captured=self.captured, processed=self.processed, dropped=self.dropped,
                          skipped=self.skipped, anomalous=self.anomalous, alerts=self.alerts, clears=self.clears,
                          errors=self.errors)
        return {
            "uptime_s": round(time.monotonic() - self.started, 1),
            "fps": round(self.fps(), 2),
            "elapsed_s": round(elapsed, 4),
            "fps_avg": None if fps_avg is None else round(fps_avg, 2),
            "cpu_ms_per_frame": None if cpu_ms is None else round(cpu_ms, 2),
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

    def summary_line(self) -> str:
        """The end-of-run log line, key=value like the final heartbeat's fields (elapsed_s: first to last
        decided frame; fps_avg: frames after the first per second of it)."""
        elapsed, fps_avg, cpu_ms = self.run_rate()
        with self._lock:
            counts = dict(processed=self.processed, anomalous=self.anomalous, alerts=self.alerts,
                          dropped=self.dropped, skipped=self.skipped, errors=self.errors)
        fields = {"processed": counts.pop("processed"), "elapsed_s": f"{elapsed:.4f}",
                  "fps_avg": "-" if fps_avg is None else f"{fps_avg:.2f}",
                  "cpu_ms_per_frame": "-" if cpu_ms is None else f"{cpu_ms:.2f}", **counts}
        return "run summary: " + " ".join(f"{key}={value}" for key, value in fields.items())
