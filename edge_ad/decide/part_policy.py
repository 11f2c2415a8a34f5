"""Per-part inspection: one verdict (OK / NOK) for every part, no N-of-M, no cool-down.

At an inspection station a part arrives, a trigger fires, one image is taken,
and the line needs an answer for *that* part within its cycle time. The video
policy (N anomalous of the last M frames, then a quiet period) is wrong there:
one bad part among good ones never reaches N, and a second bad part inside the
cool-down is swallowed. Here every inspected frame gives exactly one verdict on
`<root>/<device>/<camera>/verdict` (QoS 1, through the outbox); NOK verdicts
are also published as alerts, so consumers of the alert topic keep working.
A part that could not be inspected (trigger dropped because the model is busy,
unreadable file, inference failure) still gets its answer: verdict ERROR with
the reason, so a PLC never waits for a verdict that will not come.

Verdicts of watched files carry an event id derived from the file (name, size,
modification time): if edge-ad is killed between publishing a verdict and
recording the file as done, the file is inspected again after the restart and
the repeated verdict has the same event id, so consumers can drop it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Callable

from edge_ad.decide.scoring import Decision, Scorer
from edge_ad.deliver.events import Topics, alert_payload, verdict_payload
from edge_ad.deliver.sinks import Sink
from edge_ad.deliver.snapshots import SnapshotWriter
from edge_ad.model.inference import Result
from edge_ad.ops.stats import percentiles_ms
from edge_ad.sources.capture import Frame

log = logging.getLogger("edge_ad.parts")

OK, NOK, ERROR = "OK", "NOK", "ERROR"
_NAMESPACE = uuid.UUID("6f1c2b1e-6a43-4f7e-9a53-3d0c1b7e2a10")  # edge-ad verdict ids (uuid5)


def part_of(frame: Frame) -> tuple[str, str, str | None]:
    """(part id, trigger kind, stable key) of a frame: set by a trigger or watcher, else the file name or index."""
    part_id = getattr(frame, "part_id", None)
    if part_id:
        return part_id, getattr(frame, "trigger", "trigger"), getattr(frame, "key", None)
    if frame.name:
        return frame.name, "file", None
    return str(frame.index), "frame", None


class PartInspector:
    """Turns each decided frame into a verdict; thread-safe (decision thread, MQTT thread for dropped triggers)."""

    def __init__(self, sinks: Sink, topics: Topics, model: dict, scorer: Scorer,
                 snapshots: SnapshotWriter | None = None, source: str = "",
                 on_done: Callable[[Frame], None] | None = None, latency_window: int = 500):
        self.sinks, self.topics, self.model, self.scorer = sinks, topics, model, scorer
        self.snapshots, self.source = snapshots, source
        self.on_done = on_done or (lambda frame: None)  # e.g. the folder watcher records the file as done
        self._lock = threading.Lock()
        self.counts = {OK: 0, NOK: 0, ERROR: 0}
        self.dropped = 0  # triggers answered ERROR because the model was busy
        self._latency: list[float] = []
        self._latency_window = latency_window

    def _event_id(self, kind: str, key: str | None) -> str:
        if key:
            return str(uuid.uuid5(_NAMESPACE, f"{kind}/{self.topics.device}/{self.topics.camera}/{key}"))
        return str(uuid.uuid4())

    def _count(self, verdict: str, latency: float | None) -> None:
        with self._lock:
            self.counts[verdict] += 1
            if latency is not None:
                self._latency.append(latency)
                if len(self._latency) > 2 * self._latency_window:
                    del self._latency[: -self._latency_window]

    # -- decision thread -----------------------------------------------------------------------------
    def decide(self, result: Result, decision: Decision) -> dict:
        """Publish the verdict (and an alert when NOK) for one inspected frame; returns the verdict payload."""
        frame = result.frame
        part_id, trigger, key = part_of(frame)
        verdict = NOK if decision.anomalous else OK
        regions, total = [], 0
        if decision.anomalous:
            if decision.regions is None:
                regions, total = self.scorer.regions(result.anomaly_map, frame.image.shape[:2])
            else:
                regions, total = decision.regions, decision.regions_total
        event_id = self._event_id("verdict", key)
        snapshot = None
        if decision.anomalous and self.snapshots is not None:
            try:
                snapshot = str(self.snapshots.write(f"{self.topics.camera}_{_safe(part_id)}_{event_id[:8]}",
                                                    frame.image, self.scorer.normalize_pixels(result.anomaly_map),
                                                    regions))
            except Exception as exc:  # noqa: BLE001  a missing picture must never cost the verdict
                log.error("cannot write snapshot to %s: %s", self.snapshots.folder, exc)
        latency = time.monotonic() - frame.captured
        payload = verdict_payload(
            event_id=event_id, device=self.topics.device, camera=self.topics.camera, part_id=part_id,
            verdict=verdict, utc=frame.utc, score=decision.score, raw_score=decision.raw_score,
            threshold=self.scorer.threshold_info(), regions=regions, regions_total=total,
            latency_ms=latency * 1000.0, model=self.model, trigger=trigger, source=frame.name or self.source,
            frame_index=frame.index, snapshot=snapshot)
        self.sinks.publish("verdict", payload)
        if decision.anomalous:
            log.warning("NOK %s part %s score %.3f, %d region(s)%s", self.topics.camera, part_id, decision.score,
                        total, f", snapshot {snapshot}" if snapshot else "")
            self.sinks.publish("alert", alert_payload(
                event_id=self._event_id("alert", key), device=self.topics.device, camera=self.topics.camera,
                frame_index=frame.index, utc=frame.utc, score=decision.score, raw_score=decision.raw_score,
                threshold=self.scorer.threshold_info(), regions=regions, model=self.model,
                policy={"mode": "per-part", "part_id": part_id, "verdict_id": event_id},
                snapshot=snapshot, source=frame.name or self.source, regions_total=total))
        else:
            log.debug("OK %s part %s score %.3f", self.topics.camera, part_id, decision.score)
        self._count(verdict, latency)
        self.on_done(frame)
        return payload

    # -- any thread ------------------------------------------------------------------------------------
    def error(self, part_id: str, reason: str, *, trigger: str, since: float | None = None, key: str | None = None,
              frame: Frame | None = None, dropped: bool = False) -> dict:
        """Answer a part that could not be inspected: verdict ERROR with the reason."""
        latency = 0.0 if since is None else time.monotonic() - since
        payload = verdict_payload(
            event_id=self._event_id("verdict", key), device=self.topics.device, camera=self.topics.camera,
            part_id=part_id, verdict=ERROR, utc=frame.utc if frame is not None else datetime.now(timezone.utc),
            score=None, raw_score=None, threshold=self.scorer.threshold_info(), regions=[], regions_total=0,
            latency_ms=latency * 1000.0, model=self.model, trigger=trigger, source=self.source,
            frame_index=None if frame is None else frame.index, error=reason)
        self.sinks.publish("verdict", payload)
        with self._lock:
            self.dropped += int(dropped)
            dropped_total = self.dropped
        if not dropped or dropped_total <= 5 or dropped_total % 100 == 0:
            log.error("part %s not inspected: %s%s", part_id, reason,
                      f" ({dropped_total} dropped so far)" if dropped else "")
        self._count(ERROR, None)
        if frame is not None:
            self.on_done(frame)
        return payload

    def error_frame(self, frame: Frame, reason: str) -> None:
        part_id, trigger, key = part_of(frame)
        self.error(part_id, reason, trigger=trigger, since=frame.captured, key=key, frame=frame)

    def fields(self) -> dict:
        """Heartbeat fields: verdict counts and trigger-to-verdict latency of recent parts."""
        with self._lock:
            counts = dict(self.counts)
            latency = self._latency[-self._latency_window:]
            dropped = self.dropped
        return {"verdicts": {"ok": counts[OK], "nok": counts[NOK], "error": counts[ERROR]},
                "triggers_dropped": dropped, "verdict_latency_ms": percentiles_ms(latency)}


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:64]
