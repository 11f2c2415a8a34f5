"""`edge-ad run`: assemble source, model, decisions and outputs from a RunConfig, then run.

Start-up order is chosen so operators learn about problems early and from
the right place: bad options and bundles fail before anything connects; the
broker comes before the camera, so a camera that needs retries shows up as
`degraded` on the status topic. The status is `degraded` while the camera or
the broker is away (heartbeats say so too). SIGINT/SIGTERM stop capture, drain
requests, flush alerts and publish `offline`; a second Ctrl-C aborts.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from pathlib import Path

from edge_ad.ops.config import RunConfig
from edge_ad.errors import ConfigError
from edge_ad.deliver.events import Topics, model_identity, status_payload
from edge_ad.model.inference import Detector
from edge_ad.model.swap import SwappableDetector
from edge_ad.ops.control import attach as attach_commands, startup_model
from edge_ad.deliver.mqtt import MqttSettings
from edge_ad.deliver.outbox import Outbox, default_path
from edge_ad.pipeline import Pipeline
from edge_ad.decide.policy import AlertPolicy
from edge_ad.decide.regions import RoiMask
from edge_ad.decide.scoring import Scorer
from edge_ad.deliver.sinks import Sink, Sinks
from edge_ad.deliver.jsonl_sink import JsonlSink
from edge_ad.deliver.mqtt_sink import MqttSink
from edge_ad.deliver.snapshots import SnapshotWriter
from edge_ad.sources.capture import Backoff, safe_id, open_source
from edge_ad.model.signing import check_bundle
from edge_ad.ops.credentials import stream_url, warn_cleartext
from edge_ad.ops.metrics import CameraMetrics, MetricsServer
from edge_ad.ops.stats import RuntimeStats
from edge_ad.ops.statusline import StatusLine
from edge_ad.decide.drift import DriftReference, DriftWatch
from edge_ad.decide.part_policy import PartInspector
from edge_ad.deliver.outbox import state_dir
from edge_ad.sources.trigger import TriggeredSource, read_stdin_triggers
from edge_ad.sources.watch import WatchedFolderSource, default_ledger
from edge_ad.view.server import LiveView

log = logging.getLogger("edge_ad")
MB = 1024 * 1024


def mqtt_settings(config: RunConfig, client_id: str) -> MqttSettings:
    return MqttSettings(
        host=config.mqtt_host, port=config.port, client_id=config.mqtt_client_id or client_id,
        username=config.mqtt_username, password_file=config.mqtt_password_file, tls=config.tls_enabled,
        ca=config.mqtt_ca, cert=config.mqtt_cert, key=config.mqtt_key, keepalive=config.mqtt_keepalive,
        retries=config.mqtt_retries, retry_delay=config.mqtt_retry_delay, retry_max_delay=config.mqtt_retry_max_delay,
        version=config.mqtt_version,
    )


class _Signals:
    """First SIGINT/SIGTERM asks for a clean stop; a second one aborts (KeyboardInterrupt)."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()
        log.info("%s received: draining in-flight frames and flushing alerts (again to abort)",
                 signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def run(config: RunConfig, detector: Detector | None = None, stop: threading.Event | None = None,
        status_line: StatusLine | None = None, stats: RuntimeStats | None = None) -> int:
    """Run detection until the source ends, --max-frames, or a signal; returns the exit code. One camera: several
    in one process (edge_ad.multicamera) pass a detector on a shared compiled model, their stop and status line."""
    stop = stop or threading.Event()
    roi = None
    if config.roi_mask:
        try:
            roi = RoiMask.load(config.roi_mask)
        except ValueError as exc:
            raise ConfigError(f"--roi-mask: {exc}") from None
    if detector is None:
        model_dir = startup_model(config)  # a bundle deployed by a remote command replaces --model (logged)
        check_bundle(model_dir, config.bundle_public_key)  # with a key configured: signed, by it, unchanged
        detector = SwappableDetector(model_dir, device=config.device, mode=config.mode, requests=config.requests,
                                     precision=config.inference_precision)
    bundle = detector.bundle
    log.info("model %s/%s %s from %s on %s (%s mode, %d request(s) in flight, OpenVINO optimum %d, %s streams, "
             "inference precision %s, input %s)", bundle.model.algorithm, bundle.model.backbone,
             bundle.model.precision, config.model, config.device, config.mode, detector.requests,
             detector.optimal_requests, detector.streams if detector.streams is not None else "?",
             detector.precision, detector.host_input)
    scorer = Scorer(bundle.thresholds, config.image_threshold, config.pixel_threshold, config.min_area, roi,
                    config.max_regions)
    try:
        policy = AlertPolicy(config.alert_n, config.alert_m, config.cooldown_value, config.clear_after)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    sinks = Sinks([])
    status = _StatusReporter(sinks, {**model_identity(bundle), "inference_precision": detector.precision})
    source = open_source(config.camera, stream_url(config.video, config.video_password_file), config.images,
                         realtime=config.realtime,
                         backoff=Backoff(config.source_retries, config.retry_delay, config.retry_max_delay),
                         stop=stop, on_state=status.camera)
    topics = Topics(config.topic_root, config.device_id or safe_id(socket.gethostname()) or "edge",
                    config.camera_id or source.default_id)
    status.topics = topics
    source = _part_source(config, source, topics, stop)
    try:
        snapshots = SnapshotWriter(config.snapshots, config.snapshot_quality, max_files=config.snapshot_max_files,
                                   max_bytes=int(config.snapshot_max_mb * MB),
                                   reserve_bytes=int(config.disk_reserve_mb * MB)) if config.snapshots else None
    except OSError as exc:
        raise ConfigError(f"cannot create --snapshots folder {config.snapshots}: {exc.strerror or exc}") from None
    stats = stats or RuntimeStats()
    parts, drift, health = _part_mode(config, source, sinks, topics, status, scorer, snapshots)
    with _Signals(stop):
        reason = "shutdown"
        metrics = view = remote = camera_view = None
        try:
            view = LiveView.for_config(config)  # --http: one live view for every camera of the process
            metrics = MetricsServer.for_config(config)  # before anything connects: a port in use is a ConfigError
            if config.jsonl or not config.mqtt_host:
                sinks.sinks.append(JsonlSink(config.jsonl or "-", max_bytes=int(config.jsonl_max_mb * MB),
                                             backups=config.jsonl_backups))
            if config.mqtt_host:
                settings = mqtt_settings(config, f"edge-ad-{topics.device}-{topics.camera}")
                warn_cleartext(settings)
                outbox = Outbox(config.outbox or default_path(topics.device, topics.camera), config.outbox_max)
                try:
                    mqtt_sink = MqttSink(settings, topics, outbox, model=status.model, stop=stop,
                                         on_health=lambda problem: status.set("broker", problem))
                except BaseException:
                    outbox.close()
                    raise
                # First: an alert is committed to the outbox before its line reaches the JSONL mirror. A line
                # means "raised"; one the outbox could not store is counted (heartbeat alerts_unstored).
                sinks.sinks.insert(0, mqtt_sink)
                status.extra = mqtt_sink.health
                if config.trigger == "mqtt":
                    mqtt_sink.subscribe(topics.trigger, source.on_message)
                    log.info("per-part: one frame per message on %s", topics.trigger)
                remote = attach_commands(config, detector, scorer, status.model, topics, mqtt_sink, drift,
                                         announce=status.refresh)  # <camera>/cmd: edge_ad.ops.control
            if config.opcua_url:  # last: it only records values; its own thread writes them
                from edge_ad.deliver.opcua_sink import OpcUaSettings, OpcUaSink  # optional extra (asyncua)

                sinks.sinks.append(OpcUaSink(
                    OpcUaSettings(config.opcua_url, config.opcua_namespace, config.opcua_node_prefix,
                                  config.opcua_username, config.opcua_password_file),
                    on_health=lambda problem: status.set("opcua", problem)))
            if metrics is not None:  # per camera: read at scrape time, nothing added to the frame path
                delivery = mqtt_sink.delivery if config.mqtt_host else None
                metrics.add(CameraMetrics(topics.device, topics.camera, stats, status.model, health=health,
                                          camera_up=lambda: "camera" not in status.problems,
                                          delivered=(lambda: delivery.delivered) if delivery else None))
            camera_view = view and view.add_camera(topics, scorer, stats, health, config.roi_mask)
            if camera_view:  # the page's last alerts; its observer keeps the latest frame (no cost without viewers)
                sinks.sinks.append(camera_view.alerts)
            status("online")
            source.open()
            if config.trigger == "stdin":
                read_stdin_triggers(source)
            with status_line or StatusLine(sys.stderr, config.status_interval) as line:
                pipeline = Pipeline(detector=detector, source=source, scorer=scorer, policy=policy, sinks=sinks,
                                    topics=topics, model=status.model, stop=stop, stats=stats,
                                    snapshots=snapshots, max_frames=config.max_frames, heartbeat=config.heartbeat,
                                    status_line=line, health=health, parts=parts, drift=drift,
                                    observers=[camera_view.observe] if camera_view else [],
                                    before_decide=remote.before_decide if remote else [])
                pipeline.observers += remote.observers if remote else []
                pipeline.run()
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            raise
        finally:
            if remote is not None:
                remote.close()
            status("offline", reason)
            sinks.close()
            if metrics is not None:
                metrics.release(topics.device, topics.camera)
            if view is not None:
                view.release(camera_view)  # only this run's entry
    log.info("done: %s", stats.line())
    if sinks.unstored:
        log.error("%d alert(s)/all-clear(s) could not be stored by every output (see the errors above)",
                  sinks.unstored)
    if stop.is_set():
        log.info("stopped on request")
    return 0


class _StatusReporter:
    """Publishes device status when it changes: online; degraded while the camera or the broker has a problem
    (the reasons joined); offline at the end. Called from the capture, MQTT and delivery threads."""

    def __init__(self, sinks: Sink, model: dict):
        self.sinks, self.model = sinks, model
        self.topics: Topics | None = None
        self.extra = None  # () -> dict of heartbeat fields (outbox)
        self.problems: dict[str, str] = {}
        self._final: tuple[str, str] | None = None
        self._last: tuple[str, str] | None = None
        self._lock = threading.RLock()  # health() reads `problems` from the ticker thread while others change it

    def current(self) -> tuple[str, str]:
        with self._lock:
            if self._final is not None:
                return self._final
            if self.problems:
                return "degraded", "; ".join(self.problems[k] for k in sorted(self.problems))
            return "online", ""

    def set(self, component: str, problem: str | None) -> None:
        with self._lock:
            if problem:
                self.problems[component] = problem
            else:
                self.problems.pop(component, None)
            self._publish()

    def camera(self, state: str, reason: str = "") -> None:
        """The sources' on_state callback."""
        self.set("camera", (reason or "camera unavailable") if state == "degraded" else None)

    def __call__(self, state: str, reason: str = "") -> None:
        """`online` at start-up (with whatever problems are known), `offline` at the end."""
        with self._lock:
            self._final = (state, reason) if state == "offline" else None
            self._publish()

    def _publish(self) -> None:
        state, reason = self.current()
        if self.topics is None or (state, reason) == self._last:
            return
        self._last = (state, reason)
        self.sinks.publish("status", status_payload(state, device=self.topics.device, camera=self.topics.camera,
                                                    reason=reason, model=self.model))

    def refresh(self) -> None:
        """Publish the status again (the model changed: a remote deploy)."""
        with self._lock:
            self._last = None
            self._publish()

    def health(self) -> dict:
        """Heartbeat fields: state (and why), alerts no output could store, outbox figures."""
        state, reason = self.current()
        fields = {"state": state, "reason": reason} if reason else {"state": state}
        fields["alerts_unstored"] = getattr(self.sinks, "unstored", 0)
        if self.extra is not None:
            fields.update(self.extra())
        return fields


def _part_source(config: RunConfig, source, topics: Topics, stop: threading.Event):
    """Per-part mode's sources: a watched folder, or triggers in front of the configured source."""
    if config.watch:
        ledger = (Path(config.watch_state) if config.watch_state else
                  default_ledger(Path(config.outbox).parent if config.outbox else state_dir(), topics.device,
                                 topics.camera))
        return WatchedFolderSource(config.images, stop, ledger, config.watch_poll, config.watch_settle)
    if config.trigger is not None:
        return TriggeredSource(source, stop, config.trigger_queue)
    return source


def _part_mode(config: RunConfig, source, sinks: Sink, topics: Topics, status: "_StatusReporter", scorer: Scorer,
               snapshots):
    """(verdict inspector or None, drift watch, heartbeat fields): wired to the source's callbacks."""
    reference = DriftReference.from_thresholds(scorer.thresholds, scorer.image_threshold_raw)

    def drift_changed(problem: str | None) -> None:
        if problem:
            log.warning("%s", problem)
        else:
            log.info("normal scores are back within the drift bound")
        status.set("drift", problem)

    drift = DriftWatch(reference, config.drift_bound, config.drift_window, on_change=drift_changed)
    if reference is None and config.drift_bound > 0:
        log.info("drift watch off: the bundle records no validation score percentiles (edge-ad teach adds them)")
    parts = None
    if config.part_mode:
        parts = PartInspector(sinks, topics, status.model, scorer, snapshots, source.description,
                              on_done=getattr(source, "mark_done", None))
        if isinstance(source, WatchedFolderSource):
            source.on_unreadable = parts.error_frame
        if isinstance(source, TriggeredSource):
            source.on_dropped = lambda trig, reason: parts.error(
                trig.part_id, reason, trigger=trig.origin, since=trig.received, dropped=reason.startswith("dropped"))
        log.info("per-part inspection: one verdict per part on %s (NOK also on %s)", topics.verdict, topics.alert)

    def health() -> dict:
        fields = status.health()
        fields.update(drift.fields())
        if parts is not None:
            fields.update(parts.fields())
        return fields

    return parts, drift, health
