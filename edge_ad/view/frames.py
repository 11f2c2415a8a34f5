"""One camera as the live view sees it: the latest frame's result, recent scores, the last alerts.

`observe` runs in the pipeline's decision thread for every frame, so it only keeps a
reference to the latest (result, decision) and appends (time, score) to a ring buffer:
without viewers the view costs that and nothing else. The JPEG (frame + heatmap +
regions) is rendered when a viewer asks, at most once per frame however many ask.
`alerts` is a Sink that keeps the last alerts of this camera (and their snapshot paths).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

import cv2
from edge_ad.decide.scoring import Scorer
from edge_ad.deliver.sinks import Sink
from edge_ad.deliver.snapshots import overlay
from edge_ad.ops.stats import RuntimeStats
from edge_ad.view.roi_editor import RoiEditor

BUCKET_S = 0.1  # frames closer together share one history point (its highest score)
HISTORY = 6000  # history points kept: 10 minutes, whatever the frame rate
MAX_WIDTH = 1280  # frames wider than this are shown scaled down (JPEG size, encoding time)
STATUS_FIELDS = ("state", "reason", "fps", "fps_avg", "latency_ms", "e2e_latency_ms", "processed", "dropped",
                 "skipped", "anomalous", "alerts", "clears", "errors", "broker_connected", "outbox_pending",
                 "outbox_dropped", "alerts_unstored", "uptime_s")


class AlertLog(Sink):
    """The last `keep` alerts of one camera, newest first (a Sink beside MQTT and JSON lines)."""

    def __init__(self, camera: str, keep: int = 20):
        self.camera = camera
        self._alerts: deque[dict] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def publish(self, event: str, payload: dict) -> None:
        if event == "alert" and payload.get("camera", self.camera) == self.camera:
            with self._lock:
                self._alerts.appendleft(payload)

    def recent(self) -> list[dict]:
        with self._lock:
            return list(self._alerts)

    def snapshot_path(self, event_id: str) -> str | None:
        """Only files named by a recorded alert are ever served."""
        with self._lock:
            return next((a.get("snapshot") for a in self._alerts if a.get("event_id") == event_id), None)


class CameraView:
    def __init__(self, camera: str, scorer: Scorer, stats: RuntimeStats, health: Callable[[], dict] | None,
                 roi: RoiEditor, jpeg_quality: int = 80):
        self.camera, self.scorer, self.stats, self.health, self.roi = camera, scorer, stats, health, roi
        self.alerts = AlertLog(camera)
        self.jpeg_quality = int(jpeg_quality)
        self._latest = None  # (result, decision): replaced, never copied
        self._history: deque[tuple[float, float, bool]] = deque(maxlen=HISTORY)
        self._history_lock = threading.Lock()
        self._render_lock = threading.Lock()
        self._rendered: tuple[dict, bytes] | None = None

    # -- decision thread -----------------------------------------------------------------------------
    def observe(self, result, decision) -> None:
        """Pipeline observer: one reference store and one ring-buffer update."""
        self._latest = (result, decision)
        now, score, anomalous = time.monotonic(), float(decision.score), bool(decision.anomalous)
        with self._history_lock:
            history = self._history
            if history and now - history[-1][0] < BUCKET_S:
                start, top, any_anomalous = history[-1]
                history[-1] = (start, max(top, score), any_anomalous or anomalous)
            else:
                history.append((now, score, anomalous))

    # -- HTTP threads --------------------------------------------------------------------------------
    def frame_jpeg(self) -> tuple[dict, bytes] | None:
        """({index, score, anomalous, regions} of the latest frame, its JPEG with heatmap and region boxes),
        or None before the first frame."""
        latest = self._latest
        if latest is None:
            return None
        result, decision = latest
        index = result.frame.index
        with self._render_lock:  # concurrent viewers share one encoding per frame
            if self._rendered is not None and self._rendered[0]["index"] == index:
                return self._rendered
            image = result.frame.image
            regions, _ = self.scorer.regions(result.anomaly_map, image.shape[:2])
            picture = overlay(image, self.scorer.normalize_pixels(result.anomaly_map), regions)
            if picture.shape[1] > MAX_WIDTH:
                scale = MAX_WIDTH / picture.shape[1]
                picture = cv2.resize(picture, (MAX_WIDTH, max(1, round(picture.shape[0] * scale))),
                                     interpolation=cv2.INTER_AREA)
            ok, data = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
            if not ok:
                return None
            info = {"index": index, "score": round(float(decision.score), 4), "anomalous": bool(decision.anomalous),
                    "regions": len(regions)}
            self._rendered = (info, data.tobytes())
            return self._rendered

    def history(self, seconds: float = 300.0, points: int = 600) -> list[list]:
        """[[seconds ago, score, anomalous], ...] over the last `seconds`, at most `points` of them: each
        bucket keeps its highest score, so a one-frame spike survives the thinning."""
        now = time.monotonic()
        with self._history_lock:
            recent = [item for item in self._history if now - item[0] <= seconds]
        if len(recent) > points:
            size = len(recent) / points
            thinned = []
            for b in range(points):
                bucket = recent[int(b * size):max(int(b * size) + 1, int((b + 1) * size))]
                thinned.append(max(bucket, key=lambda item: item[1]))
            recent = thinned
        return [[round(now - t, 2), round(float(s), 4), bool(a)] for t, s, a in recent]

    def state(self, seconds: float = 300.0) -> dict:
        """Everything the page shows besides the frame, as JSON."""
        latest = self._latest
        last = None
        if latest is not None:
            result, decision = latest
            height, width = result.frame.image.shape[:2]
            last = {"index": result.frame.index, "score": round(float(decision.score), 4),
                    "raw_score": round(float(decision.raw_score), 6), "anomalous": bool(decision.anomalous),
                    "width": int(width), "height": int(height), "utc": result.frame.utc.isoformat()}
        fields = self.stats.snapshot()
        if self.health is not None:
            try:
                fields.update(self.health())
            except Exception as exc:  # noqa: BLE001  the page still shows what it has
                fields["reason"] = f"status unavailable: {exc}"
        alerts = [{key: alert.get(key) for key in ("event_id", "timestamp", "frame_index", "score", "regions_total")}
                  | {"snapshot": bool(alert.get("snapshot"))} for alert in self.alerts.recent()]
        return {"camera": self.camera, "last": last, "threshold": self.scorer.image_threshold,
                "history": self.history(seconds), "alerts": alerts, "roi": self.roi.current(),
                "roi_file": str(self.roi.path), "status": {k: fields[k] for k in STATUS_FIELDS if k in fields}}
