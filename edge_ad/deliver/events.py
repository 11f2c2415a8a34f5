"""The JSON messages edge-ad emits and the MQTT topics they go to.

One place defines the payloads, so MQTT, JSON lines and the `listen` command
agree on them. Every payload carries `event` (alert | clear | status |
heartbeat) so a JSON-lines stream can be filtered without topics.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from edge_ad import __version__
from edge_ad.model.bundle import Bundle, bundle_hash
from edge_ad.decide.regions import Region

SCHEMA = 1  # payload schema version, bumped on incompatible changes


def utc_iso(moment: datetime | None = None) -> str:
    """ISO 8601 UTC with milliseconds and a Z suffix."""
    moment = moment or datetime.now(timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Topics:
    """Every topic is per camera: `<root>/<device>/<camera>/<name>`.

    MQTT gives one last will per connection and each camera has its own connection (also when
    several cameras run in one process), so status (retained, will `offline`) and heartbeat are
    per camera too: two cameras on one PC never overwrite each other's state. There is no
    device-level status topic; the device's view is the retained `<root>/<device>/+/status`.
    """

    root: str
    device: str
    camera: str

    def _topic(self, name: str) -> str:
        return f"{self.root}/{self.device}/{self.camera}/{name}"

    alert = property(lambda self: self._topic("alert"))
    clear = property(lambda self: self._topic("clear"))
    verdict = property(lambda self: self._topic("verdict"))  # one per inspected part, through the outbox
    trigger = property(lambda self: self._topic("trigger"))  # in: inspect the next frame (--trigger mqtt)
    cmd = property(lambda self: self._topic("cmd"))  # in: remote commands (edge_ad.ops.commands)
    cmd_result = property(lambda self: self._topic("cmd/result"))
    snapshot = property(lambda self: self._topic("snapshot"))  # out: the JPEG a `snapshot` command asked for
    status = property(lambda self: self._topic("status"))
    heartbeat = property(lambda self: self._topic("heartbeat"))

    def for_event(self, event: str) -> str:
        return getattr(self, event)


def model_identity(bundle: Bundle) -> dict:
    return {
        "algorithm": bundle.model.algorithm,
        "backbone": bundle.model.backbone,
        "bundle_hash": bundle_hash(bundle),
        "precision": bundle.model.precision,
    }


def alert_payload(*, device: str, camera: str, frame_index: int, utc: datetime, score: float, raw_score: float,
                  threshold: dict, regions: list[Region], model: dict, policy: dict,
                  snapshot: str | None = None, event_id: str | None = None, source: str | None = None,
                  regions_total: int | None = None) -> dict:
    """`regions` holds the largest regions (capped); `regions_total` says how many the frame had."""
    return {
        "event": "alert",
        "schema": SCHEMA,
        "event_id": event_id or str(uuid.uuid4()),
        "device": device,
        "camera": camera,
        "timestamp": utc_iso(utc),
        "frame_index": frame_index,
        "score": round(float(score), 6),
        "raw_score": round(float(raw_score), 6),
        "threshold": threshold,
        "regions": [region.to_dict() for region in regions],
        "regions_total": len(regions) if regions_total is None else int(regions_total),
        "model": model,
        "policy": policy,
        "source": source,
        "snapshot": snapshot,
    }


def clear_payload(*, device: str, camera: str, frame_index: int, utc: datetime, score: float,
                  clears: str | None, normal_frames: int) -> dict:
    return {
        "event": "clear",
        "schema": SCHEMA,
        "event_id": str(uuid.uuid4()),
        "device": device,
        "camera": camera,
        "timestamp": utc_iso(utc),
        "frame_index": frame_index,
        "score": round(float(score), 6),
        "clears": clears,  # event_id of the alert this ends
        "normal_frames": normal_frames,
    }


def status_payload(state: str, *, device: str, camera: str, reason: str = "", model: dict | None = None,
                   timestamp: bool = True) -> dict:
    payload = {"event": "status", "schema": SCHEMA, "state": state, "device": device, "camera": camera,
               "version": __version__}
    if timestamp:
        payload["timestamp"] = utc_iso()
    if reason:
        payload["reason"] = reason
    if model:
        payload["model"] = model
    return payload


def heartbeat_payload(*, device: str, camera: str, stats: dict) -> dict:
    return {"event": "heartbeat", "schema": SCHEMA, "device": device, "camera": camera, "timestamp": utc_iso(),
            **stats}


def verdict_payload(*, event_id: str, device: str, camera: str, part_id: str, verdict: str, utc: datetime,
                    score: float | None, raw_score: float | None, threshold: dict, regions: list[Region],
                    regions_total: int, latency_ms: float, model: dict, trigger: str, source: str | None = None,
                    frame_index: int | None = None, error: str | None = None, snapshot: str | None = None) -> dict:
    """One part's answer: verdict OK | NOK | ERROR (not inspected: `error` says why); latency from trigger."""
    return {
        "event": "verdict",
        "schema": SCHEMA,
        "event_id": event_id,
        "device": device,
        "camera": camera,
        "part_id": part_id,
        "verdict": verdict,
        "timestamp": utc_iso(utc),
        "frame_index": frame_index,
        "score": None if score is None else round(float(score), 6),
        "raw_score": None if raw_score is None else round(float(raw_score), 6),
        "threshold": threshold,
        "regions": [region.to_dict() for region in regions],
        "regions_total": int(regions_total),
        "latency_ms": round(float(latency_ms), 2),
        "trigger": trigger,
        "model": model,
        "source": source,
        "snapshot": snapshot,
        "error": error,
    }
