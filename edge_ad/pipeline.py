"""The run loop: capture -> preprocessing -> async inference -> decisions and alerts, overlapping stages.

The caller's thread reads (decodes) frames; one or two preprocessing threads
resize them meanwhile (OpenCV releases the GIL) and start inference strictly in
frame order; OpenVINO runs requests on its own threads; a consumer thread puts
results back in frame order (requests can finish out of order), applies
thresholds and the alert policy, and publishes. A ticker thread refreshes the
status line and sends heartbeats. Every hand-over is bounded: a file source
waits when preprocessing is two frames per thread ahead, a live source drops
the new frame when every inference request is busy or already spoken for.
Shutdown drains in-flight requests so no processed frame's alert is lost.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from edge_ad.errors import SourceError
from edge_ad.deliver.events import Topics, alert_payload, clear_payload, heartbeat_payload
from edge_ad.model.inference import Detector, Result
from edge_ad.decide.policy import AlertPolicy, Event
from edge_ad.decide.scoring import Decision, Scorer
from edge_ad.deliver.sinks import Sink
from edge_ad.deliver.snapshots import SnapshotWriter
from edge_ad.sources.capture import Frame, FrameSource
from edge_ad.ops.stats import RuntimeStats
from edge_ad.ops.statusline import StatusLine

if TYPE_CHECKING:
    from edge_ad.decide.drift import DriftWatch
    from edge_ad.decide.part_policy import PartInspector

log = logging.getLogger("edge_ad.pipeline")


def default_prepare_threads() -> int:
    """One preprocessing thread on a 1-2 core machine (it already overlaps decoding), two on bigger ones."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if cores <= 2 else 2


class PrepareStage:
    """Resizes frames on worker threads while the capture thread decodes the next ones; starts inference
    in frame order (tickets), so results keep their order whatever thread finished first.

    Bounded both ways: a file source's `put` waits while 2 x workers frames are waiting or being prepared;
    a live source's `put` drops the new frame (counted in the detector's `dropped`) when the frames in
    inference plus those being prepared already fill every request, so a frame never waits for a request.
    """

    def __init__(self, detector: Detector, workers: int = 1, live: bool = False,
                 on_error: Callable[[Frame, Exception], None] | None = None):
        self.detector = detector
        self.live = live
        self.depth = 2 * max(1, workers)
        self._on_error = on_error or (lambda frame, exc: log.error("frame %d: %s", frame.index, exc))
        self._jobs: queue.Queue[tuple[int, Frame] | None] = queue.Queue()  # bounded by `depth` via _pending
        self._turn = threading.Condition()
        self._tickets = 0  # handed out (capture thread)
        self._next = 0  # the ticket whose frame starts next
        self._pending = 0  # accepted, not yet started
        self._threads = [threading.Thread(target=self._work, name=f"edge-ad-prepare-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for thread in self._threads:
            thread.start()

    def put(self, frame: Frame) -> bool:
        """Hand a frame over; False when a live source's frame was dropped."""
        with self._turn:
            if self.live:
                if self._pending + self.detector.in_flight >= self.detector.requests:
                    self.detector.drop()
                    return False
            else:
                self._turn.wait_for(lambda: self._pending < self.depth)
            ticket = self._tickets
            self._tickets += 1
            self._pending += 1
        self._jobs.put((ticket, frame))
        return True

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            ticket, frame = job
            tensor = None
            try:
                tensor = self.detector.try_prepare(frame)  # unusable frames are counted there
            except Exception as exc:  # noqa: BLE001  one frame must never stop the stream
                self._on_error(frame, exc)
            with self._turn:
                self._turn.wait_for(lambda: self._next == ticket)
            try:
                if tensor is not None:
                    self.detector.start(frame, tensor)  # blocks (file sources) while every request is busy
            except Exception as exc:  # noqa: BLE001
                self._on_error(frame, exc)
            finally:
                with self._turn:
                    self._next += 1
                    self._pending -= 1
                    self._turn.notify_all()

    def close(self) -> None:
        """Start whatever was handed over, then stop the workers."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()


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
    prepare_threads: int = 0  # 0 = default_prepare_threads()
    parts: "PartInspector | None" = None  # per-part mode: one verdict per frame instead of the alert policy
    drift: "DriftWatch | None" = None  # fed the raw scores of normal frames
    # Called as observer(result, decision) after each decision, in the decision thread: the live view, the
    # snapshot command. They must be quick and must not raise (an exception is logged and the frame still counts).
    observers: list[Callable] = field(default_factory=list)
    # Called as hook(result) before each frame's decision (decision thread): the frame boundary where remote
    # threshold changes and a swapped model's thresholds take effect (edge_ad.ops.control). Must not raise.
    before_decide: list[Callable] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._last_alert_id: str | None = None
        self._ticker_stop = threading.Event()
        self._submit_errors = 0

    # -- capture (caller's thread) -------------------------------------------------
    def run(self) -> RuntimeStats:
        """Process the source until it ends, `max_frames`, or `stop`; always drains and flushes."""
        first_seq = self.detector.next_seq  # a detector may serve several runs
        consumer = threading.Thread(target=self._consume, args=(first_seq,), name="edge-ad-decide", daemon=True)
        ticker = threading.Thread(target=self._tick, name="edge-ad-ticker", daemon=True)
        stage = PrepareStage(self.detector, self.prepare_threads or default_prepare_threads(), live=self.source.live,
                             on_error=self._submit_failed)
        consumer.start()
        ticker.start()
        failure: SourceError | None = None
        try:
            for frame in self.source:
                if self.stop.is_set():
                    break
                self.stats.captured += 1
                stage.put(frame)
                if self.max_frames and self.stats.captured >= self.max_frames:
                    log.info("stopping after --max-frames %d", self.max_frames)
                    break
        except SourceError as exc:
            failure = exc
        finally:
            self.source.close()
            stage.close()
            self.detector.drain()
            self.detector.results.put(None)
            consumer.join()
            self._ticker_stop.set()
            ticker.join()
            self._sync_counters()
            self.sinks.publish("heartbeat", self._heartbeat(final=True))
            log.info("%s", self.stats.summary_line())
        if failure is not None:
            raise failure
        return self.stats

    def _submit_failed(self, frame: Frame, exc: Exception) -> None:
        """A frame that could not be prepared or started; nothing a single frame does may stop the stream."""
        self.stats.error()
        self._submit_errors += 1
        if self.parts is not None:
            self.parts.error_frame(frame, f"not inspected: {type(exc).__name__}: {exc}")
        if self._submit_errors <= 5 or self._submit_errors % 100 == 0:
            log.error("frame %s could not be submitted (%d so far): %s: %s", getattr(frame, "index", "?"),
                      self._submit_errors, type(exc).__name__, exc)

    # -- decisions (consumer thread) --------------------------------------------------
    def _consume(self, next_seq: int = 0) -> None:
        pending: dict[int, Result] = {}  # at most the requests in flight
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
            self.stats.error()
            log.exception("frame %d could not be evaluated", result.frame.index)

    def _handle(self, result: Result) -> None:
        frame = result.frame
        for hook in self.before_decide:
            hook(result)
        if result.error is not None:
            errors = self.stats.error()
            if errors == 1 or errors % 100 == 0:
                log.error("inference failed on frame %d (%d failures so far): %s", frame.index, errors,
                          result.error)
            if self.parts is not None:
                self.parts.error_frame(frame, f"inference failed: {result.error}")
            return
        size = frame.image.shape[:2]
        decision = self.scorer.decide(result.anomaly_map, result.score, size, with_regions=False)
        self.stats.frame_done(result.latency, time.monotonic() - frame.captured, decision.anomalous)
        if self.drift is not None and not decision.anomalous:
            self.drift.add(decision.raw_score)
        for observer in self.observers:
            try:
                observer(result, decision)
            except Exception:
                log.exception("observer %r failed on frame %d", observer, frame.index)
        if self.parts is not None:
            if self.parts.decide(result, decision)["verdict"] == "NOK":
                self.stats.alerts += 1
            return
        window = self.policy.anomalous_in_window + int(decision.anomalous)
        event = self.policy.update(decision.anomalous, frame.timestamp, frame.index)
        if event is Event.ALERT:
            if decision.regions is None:  # only alerts need them (and ROI/min-area decisions, done already)
                decision.regions, decision.regions_total = self.scorer.regions(result.anomaly_map, size)
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
            snapshot=snapshot, source=frame.name or self.source.description, regions_total=decision.regions_total,
        )
        self.stats.alerts += 1
        self._last_alert_id = event_id
        shown = len(decision.regions)
        counted = f"{shown} region(s)" if shown == decision.regions_total else \
            f"{decision.regions_total} regions ({shown} largest reported)"
        log.warning("ALERT %s frame %d score %.3f, %s%s", self.topics.camera, frame.index, decision.score,
                    counted, f", snapshot {snapshot}" if snapshot else "")
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

    def _heartbeat(self, final: bool = False) -> dict:
        fields = self.stats.snapshot()
        if final:
            fields["final"] = True  # the run summary: elapsed_s and fps_avg cover the whole run
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
