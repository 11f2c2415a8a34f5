"""Prometheus `/metrics` (`--metrics-port`): the heartbeat's figures, read when Prometheus scrapes.

Pull, not push: a custom collector reads each camera's RuntimeStats and heartbeat
fields (state, outbox, broker) at scrape time, so the frame path does no extra
work except counting each frame's latency bucket (ops/stats.py Histogram).
Every sample has `device` and `camera` labels; cameras are registered one by one,
so one process may serve several. The model identity is the labels of
`edge_ad_model_info` (join on camera), not of every series, so a model swap does
not start new series. The server listens on 127.0.0.1 unless told otherwise: the
figures are not secret, but a scrape endpoint on every interface is a choice.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

from edge_ad import __version__
from edge_ad.errors import ConfigError
from edge_ad.ops.shared_server import SharedServers
from edge_ad.ops.stats import RuntimeStats

log = logging.getLogger("edge_ad.metrics")
_SHARED: SharedServers["MetricsServer"] = SharedServers()  # port -> the process's server on it

LABELS = ("device", "camera")
MODEL_LABELS = ("algorithm", "backbone", "precision", "bundle_hash", "inference_precision")
# (heartbeat field, metric name, help) of the frame and event counters
COUNTERS = (
    ("captured", "frames_captured", "Frames read from the source"),
    ("processed", "frames_processed", "Frames inferred and decided"),
    ("dropped", "frames_dropped", "Live frames dropped because every inference request was busy"),
    ("skipped", "frames_skipped", "Unreadable or unusable frames and images"),
    ("anomalous", "frames_anomalous", "Frames scored at or above the image threshold"),
    ("errors", "frame_errors", "Frames that failed in preprocessing, inference or decision"),
    ("alerts", "alerts", "Alerts raised (per-part mode: NOK verdicts)"),
    ("clears", "clears", "All-clears raised"),
)


@dataclass
class CameraMetrics:
    """What one camera exposes; the callables are read at scrape time (from the HTTP server's thread)."""

    device: str
    camera: str
    stats: RuntimeStats
    model: dict  # events.model_identity()
    health: Callable[[], dict] | None = None  # the heartbeat's extra fields (state, outbox_*, broker_connected)
    camera_up: Callable[[], bool] | None = None
    delivered: Callable[[], int] | None = None  # outbox rows the broker acknowledged (None: no broker)


class RuntimeCollector:
    """A prometheus_client collector (describe/collect, duck-typed: prometheus_client is imported only when a
    server starts) over the registered cameras."""

    def __init__(self):
        self._cameras: dict[tuple[str, str], CameraMetrics] = {}
        self._lock = threading.Lock()

    def add(self, camera: CameraMetrics) -> None:
        with self._lock:
            self._cameras[(camera.device, camera.camera)] = camera

    def remove(self, device: str, camera: str) -> None:
        with self._lock:
            self._cameras.pop((device, camera), None)

    def describe(self) -> list:
        return []  # names are not checked against other collectors; avoids a collect() at registration

    def collect(self) -> Iterator:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                            InfoMetricFamily)

        with self._lock:
            cameras = list(self._cameras.values())
        counters = {field: CounterMetricFamily(f"edge_ad_{name}", text, labels=LABELS)
                    for field, name, text in COUNTERS}
        gauge = lambda name, text: GaugeMetricFamily(f"edge_ad_{name}", text, labels=LABELS)  # noqa: E731
        fps = gauge("fps", "Frames decided per second, last 5 s")
        camera_up = gauge("camera_up", "1 while the camera or stream delivers frames, 0 while it is reconnecting")
        broker_up = gauge("broker_up", "1 while connected to the MQTT broker (absent without --mqtt-host)")
        degraded = gauge("degraded", "1 while the status is degraded (reason in the status topic)")
        pending = gauge("outbox_pending", "Alerts, all-clears and verdicts waiting in the outbox for the broker")
        refused = gauge("outbox_refused", "Outbox rows the broker refused (MQTT v5 reason codes, e.g. ACL)")
        outbox_dropped = CounterMetricFamily("edge_ad_outbox_dropped", "Oldest outbox rows dropped because it was "
                                             "full", labels=LABELS)
        delivered = CounterMetricFamily("edge_ad_events_delivered", "Alerts, all-clears and verdicts the broker "
                                        "acknowledged (this process)", labels=LABELS)
        unstored = CounterMetricFamily("edge_ad_alerts_unstored", "Alerts and all-clears some output could not "
                                       "store", labels=LABELS)
        latency = HistogramMetricFamily("edge_ad_inference_latency_seconds", "Inference request latency",
                                        labels=LABELS)
        e2e = HistogramMetricFamily("edge_ad_e2e_latency_seconds", "Capture to decision latency", labels=LABELS)
        info = InfoMetricFamily("edge_ad_model", "The model a camera runs", labels=(*LABELS, *MODEL_LABELS,
                                                                                    "edge_ad_version"))
        for cam in cameras:
            labels = [cam.device, cam.camera]
            snap = cam.stats.snapshot()
            hists = cam.stats.histograms()
            fields = _safe(cam.health, {}) or {}
            for field, family in counters.items():
                family.add_metric(labels, snap[field])
            fps.add_metric(labels, snap["fps"])
            camera_up.add_metric(labels, 1.0 if _safe(cam.camera_up, True) else 0.0)
            degraded.add_metric(labels, 1.0 if fields.get("state") == "degraded" else 0.0)
            unstored.add_metric(labels, fields.get("alerts_unstored", 0))
            if "broker_connected" in fields:
                broker_up.add_metric(labels, 1.0 if fields["broker_connected"] else 0.0)
            for key, family in (("outbox_pending", pending), ("outbox_refused", refused),
                                ("outbox_dropped", outbox_dropped)):
                if key in fields:
                    family.add_metric(labels, fields[key])
            count = _safe(cam.delivered, None)
            if count is not None:
                delivered.add_metric(labels, count)
            for family, (buckets, total) in ((latency, hists["latency"]), (e2e, hists["e2e"])):
                family.add_metric(labels, [(_le(bound), n) for bound, n in buckets], sum_value=total)
            info.add_metric([*labels, *(str(cam.model.get(k, "")) for k in MODEL_LABELS), __version__], {})
        yield from counters.values()
        yield from (fps, camera_up, broker_up, degraded, pending, refused, outbox_dropped, delivered, unstored,
                    latency, e2e, info)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _safe(read: Callable | None, fallback):
    """A figure that cannot be read is left out of this scrape, never an HTTP 500 for all the others."""
    if read is None:
        return fallback
    try:
        return read()
    except Exception as exc:  # noqa: BLE001
        log.debug("metrics: %s: %s", type(exc).__name__, exc)
        return fallback


class MetricsServer:
    """`/metrics` over HTTP on its own daemon thread, with process figures (CPU, memory) beside ours."""

    def __init__(self, host: str, port: int):
        try:
            from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, start_http_server
        except ImportError:
            raise ConfigError("--metrics-port needs prometheus_client (pip install prometheus_client)") from None
        self.collector = RuntimeCollector()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise ConfigError(f"--metrics-port {port}: cannot listen on {host}:{port} "
                              f"({exc.strerror or exc}; is another edge-ad or exporter using it?)") from None
        self.host, self.port = host, self._httpd.server_address[1]
        log.info("Prometheus metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", self.port)

    @classmethod
    def for_config(cls, config) -> "MetricsServer | None":
        """The process's server for config.metrics_port (None without one): the first camera starts it, the
        others of the same process join it, so a PC is one scrape target. Pair every call with `release`."""
        if not config.metrics_port:
            return None
        host, port = config.metrics_host, config.metrics_port

        def join(server: "MetricsServer") -> None:
            if server.host != host:
                raise ConfigError(f"--metrics-port {port}: the cameras of one process must use one --metrics-host "
                                  f"for it (got {server.host} and {host})")
        return _SHARED.acquire(port, lambda: cls(host, port), join)

    def add(self, camera: CameraMetrics) -> None:
        self.collector.add(camera)

    def release(self, device: str | None = None, camera: str | None = None) -> None:
        """A camera's run ended: its series go; the last camera stops the server."""
        if camera is not None:
            self.collector.remove(device, camera)
        _SHARED.release(self, self.close)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(2)
