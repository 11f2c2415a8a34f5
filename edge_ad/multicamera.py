"""Several cameras in one `edge-ad` process: a config file with a `cameras` list (edge_ad/ops/camera_config.py).

Why one process: one OpenVINO core and one compiled model per bundle serve every camera that uses it
(weights in memory and compile time once; the CPU plugin's streams shared instead of each process
sizing its own for the whole machine), each camera with an infer request queue of its own on it (in the
whole pipeline mostly faster than one queue the cameras share: see SharedModels). Otherwise each camera
runs exactly as a single-camera `edge-ad` (edge_ad.app.run, in its own thread): its own source, its own
request queue and its own results (its frames stay in order), decisions, alert policy, snapshots, outbox,
MQTT connection with its own last will, status topic and heartbeats. A camera that fails (its source gone
beyond the retries, a bad file) publishes `offline` with the reason on its own status topic and the others go on;
the exit code says whether any failed. SIGINT/SIGTERM drain every camera; a second one aborts.
Bad configuration (options, ROI masks, bundles, metrics and live-view ports) fails before any camera starts.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field

import openvino as ov

from edge_ad import app
from edge_ad.errors import EXIT_RUNTIME, EXIT_USAGE, ConfigError, EdgeAdError
from edge_ad.decide.regions import RoiMask
from edge_ad.model.bundle import BundleError
from edge_ad.model.inference import CompiledBundle, Detector, compile_bundle
from edge_ad.model.shared_queue import SharedInferQueue
from edge_ad.model.signing import check_bundle
from edge_ad.model.swap import SwappableDetector
from edge_ad.ops.camera_config import camera_ids
from edge_ad.ops.config import RunConfig
from edge_ad.ops.control import startup_model
from edge_ad.ops.metrics import MetricsServer
from edge_ad.ops.stats import RuntimeStats
from edge_ad.ops.statusline import StatusLine
from edge_ad.view.server import LiveView

log = logging.getLogger("edge_ad")
THREAD_PREFIX = "edge-ad-camera-"


class SharedModels:
    """One OpenVINO core; one compiled model per distinct bundle (and device, mode, precision), however many
    cameras use it, each camera with its own infer request queue on it. Why not one shared queue
    (shared_queue=True): on the model alone it is about as fast, but in the whole pipeline (decode, resize
    and decisions beside inference) a queue per camera was faster in 16 of 18 paired runs, -2 to +16 %
    (`python -m benchmarks.multicamera`, 2-core AMD EPYCs with and without AVX-512; FP32, bf16, INT8).
    Either way each camera's queue is an edge_ad.model.shared_queue view, whose callbacks never block.
    `compiled` counts compilations."""

    def __init__(self, core: ov.Core | None = None, shared_queue: bool = False):
        self.core = core or ov.Core()
        self.shared_queue = shared_queue
        self.models: dict[tuple, CompiledBundle] = {}
        self.queues: dict[tuple, SharedInferQueue] = {}
        self.users: dict[tuple, list[str]] = {}
        self._checked: set[tuple] = set()
        self.compiled = 0
        self.detectors: dict[str, SwappableDetector] = {}  # camera -> its detector (who runs which bundle now)

    def detector(self, config: RunConfig, camera: str) -> SwappableDetector:
        """A detector of its own (requests, results, counters) on the shared compiled model; a remote deploy
        later swaps only this camera's model."""
        model_dir = startup_model(config)  # a bundle deployed by a remote command replaces --model (logged)
        path = os.path.realpath(model_dir)
        if (path, config.bundle_public_key) not in self._checked:
            check_bundle(model_dir, config.bundle_public_key)  # with a key configured: signed, by it, unchanged
            self._checked.add((path, config.bundle_public_key))
        key = (path, config.device, config.mode, config.inference_precision)
        if key not in self.models:
            self.models[key] = compile_bundle(model_dir, config.device, config.mode, config.inference_precision,
                                              self.core)
            self.compiled += 1
        self.users.setdefault(key, []).append(camera)
        # A queue of its own is a view all the same: the completion callbacks of every camera on this compiled
        # model run on threads they share, so one camera's must never block on its full results queue.
        infer_queue = self.queues.get(key) if self.shared_queue else None
        if infer_queue is None:  # sized by this camera's `requests` (default: OpenVINO's optimum); shared: the first's
            built = self.models[key]
            infer_queue = SharedInferQueue(built.compiled, config.requests or built.optimal_requests)
            if self.shared_queue:
                self.queues[key] = infer_queue
        view = infer_queue.view()
        detector = SwappableDetector(model_dir, device=config.device, mode=config.mode, requests=config.requests,
                                     built=self.models[key], infer_queue=view)
        detector.core = self.core  # a remote deploy/reload compiles on this core, not a fresh one
        detector.sharing = lambda folder, me=camera: self.sharing(folder, me)  # teach-in must not change theirs
        self.detectors[camera] = detector
        return detector

    def sharing(self, folder, camera: str) -> list[str]:
        """The other cameras whose current bundle is `folder` (a per-camera change to it would reach them)."""
        path = os.path.realpath(folder)
        return sorted(name for name, detector in self.detectors.items()
                      if name != camera and os.path.realpath(detector.current.folder) == path)

    def report(self) -> None:
        for key, cameras in self.users.items():
            path, device, mode, _ = key
            queue = (f"one queue of {self.queues[key].requests} requests" if self.shared_queue
                     else "a queue per camera")
            log.info("bundle %s: compiled once (%s, %s mode) for %d camera(s): %s; %s", path, device, mode,
                     len(cameras), ", ".join(cameras), queue)


class _Total:
    """Frames decided by every camera, and the process's CPU time between the first and the latest."""

    def __init__(self):
        self._lock = threading.Lock()
        self.frames = 0
        self.first: float | None = None
        self.last: float | None = None
        self._cpu_first = self._cpu_last = 0.0

    def frame(self) -> int:
        now, cpu = time.monotonic(), time.process_time()
        with self._lock:
            self.frames += 1
            if self.first is None:
                self.first, self._cpu_first = now, cpu
            self.last, self._cpu_last = now, cpu
            return self.frames

    def summary(self) -> str:
        with self._lock:
            frames, first, last, cpu = self.frames, self.first, self.last, self._cpu_last - self._cpu_first
        if first is None or last is None or last <= first or frames < 2:
            return f"processed={frames} elapsed_s=- fps_avg=- cpu_ms_per_frame=-"
        return (f"processed={frames} elapsed_s={last - first:.4f} fps_avg={(frames - 1) / (last - first):.2f} "
                f"cpu_ms_per_frame={cpu * 1000.0 / (frames - 1):.2f}")


class CameraStats(RuntimeStats):
    """A camera's counters; its `cpu_ms_per_frame` divides the process's CPU time by the frames of every camera
    decided meanwhile: the cameras share one process, and one camera's frames alone would carry the others' work."""

    def __init__(self, total: _Total):
        super().__init__()
        self._total = total
        self._total_first = self._total_last = 0  # the all-camera frame count at this camera's first / latest frame

    def frame_done(self, latency: float, e2e: float, anomalous: bool) -> None:  # the one deciding thread
        count = self._total.frame()
        super().frame_done(latency, e2e, anomalous)
        self._total_first = self._total_first or count
        self._total_last = count

    def run_rate(self) -> tuple[float, float | None, float | None]:
        elapsed, fps_avg, cpu_ms = super().run_rate()
        others = self._total_last - self._total_first  # frames of all cameras after this camera's first
        if cpu_ms is not None and others > 0 and fps_avg is not None:
            cpu_ms = cpu_ms * fps_avg * elapsed / others  # fps_avg * elapsed = this camera's frames after its first
        return elapsed, fps_avg, cpu_ms


class StatusBoard:
    """One status line for all cameras (`cam0: 12.1 fps | ...  ||  cam1: ...`), fed by each camera's ticker."""

    def __init__(self, cameras: list[str], interval: float, stream=None):
        self.line = StatusLine(stream or sys.stderr, interval)
        self._texts = {camera: "starting" for camera in cameras}
        self._lock = threading.Lock()

    def __enter__(self) -> "StatusBoard":
        self.line.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.line.__exit__(*exc)

    def view(self, camera: str) -> "_BoardView":
        return _BoardView(self, camera)

    def update(self, camera: str, text: str, force: bool = False) -> None:
        with self._lock:
            self._texts[camera] = text
            combined = "  ||  ".join(f"{name}: {shown}" for name, shown in self._texts.items())
        if self.line.tty:
            combined = combined[: max(20, shutil.get_terminal_size().columns - 1)]  # a wrapped line cannot be redrawn
        self.line.update(combined, force)


@dataclass
class _BoardView:
    """What app.run takes for its status line: one camera's slot on the board."""

    board: StatusBoard
    camera: str

    def __enter__(self) -> "_BoardView":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, text: str, force: bool = False) -> None:
        self.board.update(self.camera, text, force)

    def wipe(self) -> None:
        pass


class _CameraTag(logging.Filter):
    """Prefixes `[camera]` to records logged from a camera's thread, so interleaved start-up and summary
    lines say whose they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.threadName.startswith(THREAD_PREFIX) and not getattr(record, "camera_tagged", False):
            tag = record.threadName[len(THREAD_PREFIX):]
            record.msg = f"[{tag.replace('%', '%%') if record.args else tag}] {record.msg}"
            record.camera_tagged = True
        return True


@dataclass
class _Camera:
    id: str
    config: RunConfig
    detector: Detector
    stats: CameraStats
    exit_code: int | None = None
    error: str = ""
    thread: threading.Thread | None = field(default=None, repr=False)

    def run(self, stop: threading.Event, board: StatusBoard) -> None:
        try:
            app.run(self.config, detector=self.detector, stop=stop, status_line=board.view(self.id), stats=self.stats)
            self.exit_code = 0
            return
        except EdgeAdError as exc:
            self.exit_code, self.error = exc.exit_code, str(exc)
        except BundleError as exc:
            self.exit_code, self.error = EXIT_USAGE, str(exc)
        except Exception as exc:  # noqa: BLE001  one camera's bug must not take the others down
            self.exit_code, self.error = EXIT_RUNTIME, f"unexpected failure: {type(exc).__name__}: {exc}"
            log.debug("camera %s", self.id, exc_info=True)
        log.error("camera failed: %s (exit code %d; the other cameras go on)", self.error, self.exit_code)  # [id] tag


def _prefixed(camera: str, exc: Exception) -> Exception:
    """The same one-line error, saying which camera's configuration it is about."""
    if isinstance(exc, EdgeAdError):
        return type(exc)(f"camera {camera}: {exc}", exc.exit_code)
    return ConfigError(f"camera {camera}: {exc}")


def prepare(configs: list[RunConfig], models: SharedModels, total: _Total) -> list[_Camera]:
    """Check what fails before anything connects (ROI masks, bundles) and compile each bundle once."""
    cameras = []
    for camera, config in zip(camera_ids(configs), configs):
        try:
            if config.roi_mask:
                try:
                    RoiMask.load(config.roi_mask)
                except ValueError as exc:
                    raise ConfigError(f"--roi-mask: {exc}") from None
            detector = models.detector(config, camera)
        except (EdgeAdError, BundleError) as exc:
            raise _prefixed(camera, exc) from None
        cameras.append(_Camera(camera, config, detector, CameraStats(total)))
    models.report()
    return cameras


def hold_servers(cameras: list[_Camera]) -> list:
    """Start (or join) every camera's metrics and live-view server before any camera starts, so a port in use,
    two view tokens or one port with two hosts fail the start-up, not a camera thread after others started;
    each camera's run joins them. Returns the releases to call once every camera has ended."""
    releases = []
    try:
        for camera in cameras:
            try:
                for server in (LiveView.for_config(camera.config), MetricsServer.for_config(camera.config)):
                    if server is not None:
                        releases.append(server.release)
            except EdgeAdError as exc:
                raise _prefixed(camera.id, exc) from None
    except BaseException:
        release_servers(releases)
        raise
    return releases


def release_servers(releases: list) -> None:
    for release in reversed(releases):
        release()


def run_cameras(configs: list[RunConfig], models: SharedModels | None = None) -> int:
    """Run every camera until each ends (or a signal); 0 if all ended cleanly, else a failed camera's code
    (1 when any failure is one a restart may cure, else 2)."""
    total = _Total()
    cameras = prepare(configs, models or SharedModels(), total)
    held = hold_servers(cameras)
    stop = threading.Event()
    tag = _CameraTag()
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(tag)
    board = StatusBoard([camera.id for camera in cameras], configs[0].status_interval)
    log.info("running %d cameras in one process: %s", len(cameras), ", ".join(camera.id for camera in cameras))
    try:
        with app._Signals(stop), board:
            for camera in cameras:
                camera.thread = threading.Thread(target=camera.run, args=(stop, board), daemon=True,
                                                 name=THREAD_PREFIX + camera.id)
                camera.thread.start()
            for camera in cameras:
                while camera.thread.is_alive():
                    camera.thread.join(0.2)  # short waits: the main thread must stay free for SIGINT/SIGTERM
    finally:
        for handler in handlers:
            handler.removeFilter(tag)
        release_servers(held)
    failed = [camera for camera in cameras if camera.exit_code]
    log.info("all cameras: %s cameras=%d failed=%d", total.summary(), len(cameras), len(failed))
    if not failed:
        return 0
    log.error("%d of %d camera(s) failed: %s", len(failed), len(cameras),
              "; ".join(f"{camera.id}: {camera.error}" for camera in failed))
    return EXIT_RUNTIME if any(camera.exit_code == EXIT_RUNTIME for camera in failed) else failed[0].exit_code
