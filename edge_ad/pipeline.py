"""The run loop: capture -> async inference -> decisions and alerts, three overlapping stages.

The caller's thread reads frames and submits them; OpenVINO runs requests on
its own threads; a consumer thread puts results back in frame order (requests
can finish out of order), applies thresholds and the alert policy, and
publishes. A ticker thread refreshes the status line and sends heartbeats.
Shutdown drains in-flight requests so no processed frame's alert is lost.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from edge_ad.errors import SourceError
from edge_ad.events import Topics, alert_payload, clear_payload, heartbeat_payload
from edge_ad.inference import Detector, Result
from edge_ad.policy import AlertPolicy, Event
from edge_ad.scoring import Decision, Scorer
from edge_ad.sinks import Sink
from edge_ad.snapshots import SnapshotWriter
from edge_ad.sources import FrameSource
from edge_ad.stats import RuntimeStats
from edge_ad.statusline import StatusLine

log = logging.getLogger("edge_ad.pipeline")


@dataclass
class Pipeline:
    detector: Detector
    source: FrameSource
    scorer: Scorer
    policy: AlertPolicy
    sinks: Sink
    topics: Topics
    model: dict
    stop: threading.Event
    stats: RuntimeStats
    snapshots: SnapshotWriter | None = None
    max_frames: int | None = None
    heartbeat: float = 30.0
    status_line: StatusLine | None = None
    health: Callable[[], dict] | None = None  # extra heartbeat fields: state, outbox figures

    def __post_init__(self) -> None:
        self._last_alert_id: str | None = None
        self._ticker_stop = threading.Event()
        self._submit_errors = 0

    # -- capture (caller's thread) -------------------------------------------------
    def run(self) -> RuntimeStats:
        """Process the source until it ends, `max_frames`, or `stop`; always drains and flushes."""
        consumer = threading.Thread(target=self._consume, name="edge-ad-decide", daemon=True)
        ticker = threading.Thread(target=self._tick, name="edge-ad-ticker", daemon=True)
        consumer.start()
        ticker.start()
        failure: SourceError | None = None
        block = not self.source.live
        try:
            for frame in self.source:
                if self.stop.is_set():
                    break
                self.stats.captured += 1
                self._submit(frame, block)
                if self.max_frames and self.stats.captured >= self.max_frames:
                    log.info("stopping after --max-frames %d", self.max_frames)
                    break
        except SourceError as exc:
            failure = exc
        finally:
            self.source.close()
            self.detector.drain()
            self.detector.results.put(None)
            consumer.join()
            self._ticker_stop.set()
            ticker.join()
            self._sync_counters()
            self.sinks.publish("heartbeat", self._heartbeat())
        if failure is not None:
            raise failure
        return self.stats

    def _submit(self, frame, block: bool) -> None:
        """One frame into inference; nothing a single frame does may stop the stream."""
        try:
            self.detector.submit(frame, block=block)
        except Exception as exc:  # noqa: BLE001  (unusable frames are FrameErrors, counted by the detector)
            self.stats.errors += 1
            self._submit_errors += 1
            if self._submit_errors <= 5 or self._submit_errors % 100 == 0:
                log.error("frame %s could not be submitted (%d so far): %s: %s", getattr(frame, "index", "?"),
                          self._submit_errors, type(exc).__name__, exc)

    # -- decisions (consumer thread) --------------------------------------------------
    def _consume(self) -> None:
        pending: dict[int, Result] = {}
        next_seq = 0
        while True:
            item = self.detector.results.get()
            if item is None:
                break
            pending[item.seq] = item
            while next_seq in pending:
                self._handle_safely(pending.pop(next_seq))
                next_seq += 1
        for seq in sorted(pending):  # only if a request vanished; keep order anyway
            self._handle_safely(pending.pop(seq))

    def _handle_safely(self, result: Result) -> None:
        try:
            self._handle(result)
        except Exception:
            self.stats.errors += 1
            log.exception("frame %d could not be evaluated", result.frame.index)

    def _handle(self, result: Result) -> None:
        frame = result.frame
        if result.error is not None:
            self.stats.errors += 1
            if self.stats.errors == 1 or self.stats.errors % 100 == 0:
                log.error("inference failed on frame %d (%d failures so far): %s", frame.index, self.stats.errors,
                          result.error)
            return
        decision = self.scorer.decide(result.anomaly_map, result.score, frame.image.shape[:2])
        self.stats.frame_done(result.latency, time.monotonic() - frame.captured, decision.anomalous)
        window = self.policy.anomalous_in_window + int(decision.anomalous)
        event = self.policy.update(decision.anomalous, frame.timestamp, frame.index)
        if event is Event.ALERT:
            self._alert(result, decision, min(window, self.policy.m))
        elif event is Event.CLEAR:
            self._clear(result, decision)

    def _alert(self, result: Result, decision: Decision, window: int) -> None:
        frame = result.frame
        event_id = str(uuid.uuid4())
        snapshot = None
        if self.snapshots is not None:
            try:
                path = self.snapshots.write(f"{self.topics.camera}_{frame.index:08d}_{event_id[:8]}", frame.image,
                                            self.scorer.normalize_pixels(result.anomaly_map), decision.regions)
                snapshot = str(path)
            except Exception as exc:  # noqa: BLE001  a missing picture must never cost the alert
                log.error("cannot write snapshot to %s: %s", self.snapshots.folder, exc)
        payload = alert_payload(
            event_id=event_id, device=self.topics.device, camera=self.topics.camera, frame_index=frame.index,
            utc=frame.utc, score=decision.score, raw_score=decision.raw_score,
            threshold=self.scorer.threshold_info(), regions=decision.regions, model=self.model,
            policy={"n": self.policy.n, "m": self.policy.m, "anomalous_in_window": window,
                    "cooldown": str(self.policy.cooldown)},
            snapshot=snapshot, source=frame.name or self.source.description,
        )
        self.stats.alerts += 1
        self._last_alert_id = event_id
        log.warning("ALERT %s frame %d score %.3f, %d region(s)%s", self.topics.camera, frame.index, decision.score,
                    len(decision.regions), f", snapshot {snapshot}" if snapshot else "")
        self.sinks.publish("alert", payload)

    def _clear(self, result: Result, decision: Decision) -> None:
        frame = result.frame
        payload = clear_payload(device=self.topics.device, camera=self.topics.camera, frame_index=frame.index,
                                utc=frame.utc, score=decision.score, clears=self._last_alert_id,
                                normal_frames=self.policy.clear_after)
        self.stats.clears += 1
        log.info("all clear on %s at frame %d", self.topics.camera, frame.index)
        self.sinks.publish("clear", payload)

    # -- status line and heartbeats (ticker thread) --------------------------------
    def _sync_counters(self) -> None:
        self.stats.dropped = self.detector.dropped
        self.stats.skipped = self.source.skipped + self.detector.failed  # unreadable files, unusable frames

    def _heartbeat(self) -> dict:
        fields = self.stats.snapshot()
        if self.health is not None:
            try:
                fields.update(self.health())
            except Exception as exc:  # noqa: BLE001
                log.error("heartbeat health fields: %s", exc)
        return heartbeat_payload(device=self.topics.device, camera=self.topics.camera, stats=fields)

    def _tick(self) -> None:
        next_beat = time.monotonic() + self.heartbeat
        while not self._ticker_stop.wait(min(1.0, self.heartbeat)):
            try:
                self._sync_counters()
                if self.status_line is not None:
                    self.status_line.update(self.stats.line())
                if time.monotonic() >= next_beat:
                    next_beat = max(next_beat + self.heartbeat, time.monotonic())
                    self.sinks.publish("heartbeat", self._heartbeat())
            except Exception as exc:  # noqa: BLE001  the ticker must outlive any one failure
                log.error("status/heartbeat: %s: %s", type(exc).__name__, exc)
