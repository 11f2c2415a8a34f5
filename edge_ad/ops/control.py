"""What the remote commands do to a running camera: thresholds, reload, snapshot, teach-in, deploy.

Everything that changes decisions takes effect at a frame boundary in the decision
thread (`before_decide`, called by the pipeline before each frame's decision): a
threshold change applies from the next decided frame on, and a swapped model's
thresholds apply exactly from the first frame the new model scored (each result
names its model, `edge_ad.model.swap`), so no frame is ever judged by one model
with the other's thresholds. The shared Scorer and model-identity dict are updated
in place, so alerts, verdicts and the status carry the new values at once.
Snapshot and teach-in read frames as they are decided (`after_frame`, a pipeline
observer) and do their slow work (JPEG, threshold fit) on the command thread.

In a multi-camera process cameras may share one bundle folder: a teach-in or revert (which rewrites
bundle.json) is then refused, since it would change the other cameras' thresholds too; deploy a copy of the
folder to the one camera first (it lands in that camera's own store), then teach that.

Threshold changes are persisted (thresholds-<device>-<camera>.json in the state
dir) and re-applied at start-up, logged, until `set-thresholds {"reset": true}`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from edge_ad.decide.scoring import Scorer
from edge_ad.decide.thresholds import describe_outliers
from edge_ad.deliver.events import Topics, model_identity
from edge_ad.deliver.outbox import state_name
from edge_ad.deliver.snapshots import overlay
from edge_ad.model.bundle import BundleError, read_bundle
from edge_ad.atomic import write_atomic
from edge_ad.model.rollout import Rollout, RolloutError, redact
from edge_ad.errors import EdgeAdError
from edge_ad.model.preprocess import placement
from edge_ad.model.signing import check_bundle
from edge_ad.model.swap import SwappableDetector
from edge_ad.ops.commands import CommandError, Interrupted

log = logging.getLogger("edge_ad.control")

APPLY_WAIT = 2.0  # seconds a threshold command waits to report the frame it took effect on
SWITCH_WAIT = 10.0  # ... a deploy waits to report the first frame of the new model


@dataclass
class _Pending:
    apply: Callable[[], dict]
    done: threading.Event = field(default_factory=threading.Event)
    outcome: dict = field(default_factory=dict)


@dataclass
class _Snapshot:
    done: threading.Event = field(default_factory=threading.Event)
    capture: dict | None = None


@dataclass
class _Teach:
    frames: int
    every: int
    generation: int
    stride: int
    spec: object = None  # the model's PreprocessSpec: which part of a frame-aligned map the model saw
    scores: list = field(default_factory=list)
    pixels: list = field(default_factory=list)
    seen: int = 0
    failed: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


def _number(args: dict, name: str, default, low, high, integer: bool = False):
    value = args.get(name, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise CommandError(f"args.{name} must be {kind} in [{low}, {high}], got {value!r}")
    return int(value) if integer else float(value)


def _model_region(amap: np.ndarray, frame_hw: tuple, spec) -> np.ndarray:
    """The part of a frame-aligned map (edge_ad.model.preprocess.frame_aligned_map) the model saw.

    `edge-ad teach` and training fit the pixel threshold on model-size maps; for `fit: crop` the aligned map
    adds the unseen frame border filled with the map minimum (up to half the pixels), which would drag the
    pixel quantile down. Letterbox maps are already only the image (bars cut off: the runtime never judges them,
    while `edge-ad teach` still samples them); stretch is the model map."""
    where = placement(frame_hw[0], frame_hw[1], spec) if spec is not None else None
    if where is None or (where.top >= 0 and where.left >= 0) or amap.shape != (where.scaled_h, where.scaled_w):
        return amap
    top, left = -where.top, -where.left
    return amap[top:top + spec.height, left:left + spec.width]


def _only(args: dict, allowed: set[str]) -> None:
    extra = set(args) - allowed
    if extra:
        raise CommandError(f"unknown args {sorted(extra)}; this command takes {sorted(allowed) or 'none'}")


class RuntimeControl:
    """The command handlers of one camera, and its two pipeline hooks (`before_decide`, `after_frame`)."""

    def __init__(self, detector: SwappableDetector, scorer: Scorer, model: dict, topics: Topics, rollout: Rollout,
                 publish_bytes: Callable[[str, bytes], None], configured_model: str, image_threshold: float,
                 pixel_threshold: float, state_dir: Path, drift=None, public_key: str | None = None,
                 device: str = "CPU", mode: str = "latency", precision: str | None = None,
                 stop: threading.Event | None = None, announce: Callable[[], None] | None = None):
        self.detector, self.scorer, self.model, self.topics, self.rollout = detector, scorer, model, topics, rollout
        self.publish_bytes, self.configured_model, self.drift = publish_bytes, configured_model, drift
        self.public_key, self.device, self.mode, self.precision = public_key, device, mode, precision
        self.stop = stop or threading.Event()
        self.announce = announce or (lambda: None)
        self.configured = (float(image_threshold), float(pixel_threshold))
        self.image_threshold, self.pixel_threshold = self.configured  # applied (decision thread)
        self.desired = self.configured  # the latest commanded: applied at the next decided frame, persisted
        self.generation = detector.current.generation
        self.switched_at: dict[int, int] = {}  # generation -> frame index of its first decided frame
        self._lock = threading.Lock()
        self._pending: list[_Pending] = []
        self._snapshots: list[_Snapshot] = []
        self._teach: _Teach | None = None
        self.overrides = Path(state_dir) / f"thresholds-{state_name(topics.device, topics.camera)}.json"
        self._load_overrides()

    def handlers(self) -> dict:
        return {"set-thresholds": self.set_thresholds, "reload": self.reload, "snapshot": self.snapshot,
                "teach": self.teach, "deploy": self.deploy}

    # -- decision thread ---------------------------------------------------------------------------
    def before_decide(self, result) -> None:
        """Frame boundary: switch to the thresholds of the model that scored this frame, apply queued changes."""
        try:
            loaded = getattr(result, "model", None)
            if loaded is not None and loaded.generation != self.generation:
                self.generation = loaded.generation
                self._rescore(loaded.built.bundle.thresholds)
                self.model.update(model_identity(loaded.built.bundle))
                if "inference_precision" in self.model:
                    self.model["inference_precision"] = loaded.built.precision
                self.switched_at[loaded.generation] = result.frame.index
                log.info("frame %d is the first one decided by the new model %s (bundle %s)", result.frame.index,
                         loaded.folder, self.model["bundle_hash"])
                self.announce()
            with self._lock:
                pending, self._pending = self._pending, []
            for item in pending:
                item.outcome = {**item.apply(), "applied_at_frame": result.frame.index}
                item.done.set()
        except Exception:  # noqa: BLE001  the frame must still be decided
            log.exception("applying a command at frame %s failed", getattr(result.frame, "index", "?"))

    def after_frame(self, result, decision) -> None:
        """Pipeline observer: hand the frame to a waiting snapshot, collect teach-in scores."""
        if self._snapshots:
            with self._lock:
                waiting, self._snapshots = self._snapshots, []
            regions = decision.regions
            if regions is None:
                regions = self.scorer.regions(result.anomaly_map, result.frame.image.shape[:2])[0]
            capture = {"image": result.frame.image, "map": self.scorer.normalize_pixels(result.anomaly_map),
                       "regions": regions, "frame_index": result.frame.index, "utc": result.frame.utc,
                       "score": decision.score, "raw_score": decision.raw_score, "anomalous": decision.anomalous}
            for snap in waiting:
                snap.capture = capture
                snap.done.set()
        teach = self._teach
        if teach is not None and not teach.done.is_set():
            loaded = getattr(result, "model", None)
            if loaded is not None and loaded.generation != teach.generation:
                teach.failed = "the model changed during teach-in"
                teach.done.set()
                return
            teach.seen += 1
            if (teach.seen - 1) % teach.every == 0:
                teach.scores.append(float(result.score))
                amap = _model_region(np.asarray(result.anomaly_map, np.float32), result.frame.image.shape[:2],
                                     teach.spec)
                teach.pixels.append(amap.ravel()[::teach.stride].copy())
                if len(teach.scores) >= teach.frames:
                    teach.done.set()

    def _rescore(self, thresholds=None) -> dict:
        """Re-initialise the shared Scorer in place (decision thread or before the run), drift reference too."""
        s = self.scorer
        s.__init__(thresholds or s.thresholds, self.image_threshold, self.pixel_threshold, s.min_area, s.roi,
                   s.max_regions)
        if self.drift is not None:
            from edge_ad.decide.drift import DriftReference

            with self.drift._lock:
                self.drift.reference = DriftReference.from_thresholds(s.thresholds, s.image_threshold_raw)
                self.drift._scores.clear()
            if self.drift.drifting:
                self.drift.drifting = False
                self.drift.on_change(None)
        return {"threshold": s.threshold_info()}

    def _queue(self, apply: Callable[[], dict], wait: float = APPLY_WAIT) -> dict:
        item = _Pending(apply)
        with self._lock:
            self._pending.append(item)
        if item.done.wait(wait):
            return item.outcome
        return {"applied_at_frame": None, "note": "no frame decided yet: applies from the next frame"}

    def _wait(self, event: threading.Event, timeout: float, what: str) -> bool:
        deadline = time.monotonic() + timeout
        while not event.is_set():
            if self.stop.is_set():
                raise Interrupted(f"edge-ad is stopping: {what} not finished")
            if time.monotonic() >= deadline:
                return False
            event.wait(min(0.2, max(0.0, deadline - time.monotonic())))
        return True

    # -- set-thresholds ----------------------------------------------------------------------------------
    def _load_overrides(self) -> None:
        try:
            data = json.loads(self.overrides.read_text())
            image, pixel = float(data["image_threshold"]), float(data["pixel_threshold"])
            if not (0 < image < 1 and 0 < pixel < 1):
                raise ValueError("thresholds out of (0, 1)")
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.error("ignoring the remote threshold record %s: %s", self.overrides, exc)
            return
        self.image_threshold, self.pixel_threshold = self.desired = image, pixel
        self._rescore()
        log.warning("thresholds set remotely (%s, command %s): image %.4g, pixel %.4g instead of the configured "
                    "%.4g, %.4g; the command set-thresholds {\"reset\": true} returns to the configured ones",
                    self.overrides, data.get("command_id"), image, pixel, *self.configured)

    def set_thresholds(self, args: dict, ident: str) -> dict:
        """args: image and/or pixel (normalized, 0..1 exclusive; 0.5 = the bundle's raw threshold), or reset."""
        _only(args, {"image", "pixel", "reset"})
        if args.get("reset") is True:
            if len(args) > 1:
                raise CommandError("reset takes no other args")
            image, pixel = self.configured
            self.overrides.unlink(missing_ok=True)
            persisted = None
            self.desired = image, pixel
        else:
            if "reset" in args:
                raise CommandError("args.reset must be true (or left out)")
            if not args:
                raise CommandError("give args.image and/or args.pixel (normalized thresholds, 0.5 = the bundle's)")
            # omitted ones keep the latest commanded value, not the applied one: a previous command may still
            # wait for its frame (per-part mode), and must not be undone by this one
            image = _number(args, "image", self.desired[0], 1e-6, 1 - 1e-6)
            pixel = _number(args, "pixel", self.desired[1], 1e-6, 1 - 1e-6)
            record = {"image_threshold": image, "pixel_threshold": pixel, "command_id": ident,
                      "utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            try:
                write_atomic(self.overrides, json.dumps(record) + "\n")
            except OSError as exc:
                raise CommandError(f"cannot persist the thresholds in {self.overrides}: {exc.strerror or exc}; "
                                   "thresholds unchanged") from None
            persisted = str(self.overrides)
            self.desired = image, pixel

        def apply() -> dict:
            self.image_threshold, self.pixel_threshold = image, pixel
            return self._rescore()

        outcome = self._queue(apply)
        return {"image_threshold": image, "pixel_threshold": pixel, "persisted": persisted, **outcome}

    # -- reload and deploy ---------------------------------------------------------------------------------
    def _build(self, folder: Path, timings: dict):
        """Verify, compile and test-run a bundle; CommandError (one line, "still running ...") if it cannot."""
        from edge_ad.model.inference import compile_bundle

        began = time.monotonic()
        try:
            check_bundle(folder, self.public_key)
            built = compile_bundle(folder, self.device, self.mode, self.precision, self.detector.core)
            request = built.compiled.create_infer_request()  # the model must run, not only compile
            request.infer({built.bundle.model.input_name: built.example_input()})
        except (EdgeAdError, BundleError, RuntimeError, OSError, ValueError, KeyError, TypeError) as exc:
            # EdgeAdError: compile_bundle's InferenceError / UsageError (unsupported device, precision...)
            reason = (str(exc).splitlines() or [""])[0] or type(exc).__name__
            raise CommandError(f"bundle {folder} cannot be used: {reason}; "
                               f"still running {self.model['bundle_hash']} from {self.detector.current.folder}") \
                from None
        timings["compile_s"] = round(time.monotonic() - began, 3)
        return built

    def _compile_and_swap(self, folder: Path, timings: dict, built=None) -> dict:
        built = built if built is not None else self._build(folder, timings)
        swap = self.detector.swap(built, folder)
        timings["switch_ms"] = round(swap["switch_s"] * 1000, 3)
        timings["old_model_drained_s"] = round(swap["old_drain_s"], 3)
        deadline = time.monotonic() + SWITCH_WAIT
        while swap["generation"] not in self.switched_at and time.monotonic() < deadline and not self.stop.is_set():
            time.sleep(0.01)
        first = self.switched_at.get(swap["generation"])
        return {"bundle": str(folder), "model": model_identity(built.bundle), "first_frame": first,
                "frames_started_before": swap["first_frame_seq"],
                **({} if first is not None else {"note": "no frame decided yet: the next frame uses it"})}

    def reload(self, args: dict, ident: str) -> dict:
        """Re-read the active bundle from disk (e.g. after a teach-in elsewhere), verify, compile, swap."""
        _only(args, set())
        timings: dict = {}
        outcome = self._compile_and_swap(self.detector.current.folder, timings)
        return {**outcome, "timings": timings}

    def deploy(self, args: dict, ident: str) -> dict:
        """args: url (http(s)://, file:// or a path: a .tar.gz/.zip of the bundle folder, or a folder), sha256."""
        _only(args, {"url", "sha256"})
        url = args.get("url")
        if not isinstance(url, str) or not url:
            raise CommandError("args.url must name the bundle archive (http(s)://..., file://... or a path)")
        if args.get("sha256") is not None and not isinstance(args.get("sha256"), str):
            raise CommandError("args.sha256 must be a string of 64 hexadecimal digits")
        timings: dict = {}
        began = time.monotonic()
        try:
            folder = self.rollout.stage(url, args.get("sha256"), timings)
        except (RolloutError, OSError) as exc:  # OSError: the state dir itself (permissions, disk)
            reason = exc if isinstance(exc, RolloutError) else f"{exc.strerror or exc} ({exc.filename or ''})"
            raise CommandError(f"deploy refused: {reason}; still running {self.model['bundle_hash']}") from None
        try:
            built = self._build(folder, timings)
        except BaseException:  # refused (or stopping): nothing of it stays in the store
            shutil.rmtree(folder, ignore_errors=True)
            raise
        outcome = self._compile_and_swap(folder, timings, built)
        shown = redact(url)
        try:
            self.rollout.activate(folder, self.configured_model, url, args.get("sha256"), ident)
        except Exception as exc:  # noqa: BLE001  the new model runs: say so, not "failed"
            reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [""])[0] or type(exc).__name__
            warning = (f"running, but not recorded as active: {reason} ({self.rollout.pointer}); the next start "
                       "uses the previously recorded bundle or --model")
            log.error("deployed %s from %s: %s", folder, shown, warning)
            timings["total_s"] = round(time.monotonic() - began, 3)
            return {**outcome, "timings": timings, "active_record": None, "warning": warning}
        timings["total_s"] = round(time.monotonic() - began, 3)
        log.info("deployed %s from %s (%s)", folder, shown, ", ".join(f"{k} {v}" for k, v in timings.items()))
        return {**outcome, "timings": timings, "active_record": str(self.rollout.pointer)}

    # -- snapshot --------------------------------------------------------------------------------------------
    def snapshot(self, args: dict, ident: str) -> dict:
        """The next decided frame as a JPEG (heatmap overlay and defect boxes unless overlay=false) on
        `<camera>/snapshot`; the answer describes it."""
        _only(args, {"overlay", "max_width", "quality", "timeout"})
        with_overlay = args.get("overlay", True)
        if not isinstance(with_overlay, bool):
            raise CommandError("args.overlay must be true or false")
        max_width = _number(args, "max_width", 1280, 0, 16384, integer=True)
        quality = _number(args, "quality", 85, 1, 100, integer=True)
        timeout = _number(args, "timeout", 10.0, 0.1, 600.0)
        snap = _Snapshot()
        with self._lock:
            self._snapshots.append(snap)
        if not self._wait(snap.done, timeout, "snapshot"):
            with self._lock:
                if snap in self._snapshots:
                    self._snapshots.remove(snap)
            raise CommandError(f"no frame was decided within {timeout:g} s (per-part mode: trigger one)")
        cap = snap.capture
        image = overlay(cap["image"], cap["map"], cap["regions"]) if with_overlay else cap["image"]
        height, width = image.shape[:2]
        if max_width and width > max_width:
            height, width = max(1, round(height * max_width / width)), max_width
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise CommandError("JPEG encoding failed")
        payload = data.tobytes()
        self.publish_bytes(self.topics.snapshot, payload)
        return {"topic": self.topics.snapshot, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
                "width": width, "height": height, "overlay": with_overlay, "frame_index": cap["frame_index"],
                "frame_utc": cap["utc"].isoformat(timespec="milliseconds"), "score": round(float(cap["score"]), 6),
                "raw_score": round(float(cap["raw_score"]), 6), "anomalous": bool(cap["anomalous"]),
                "regions": [r.to_dict() for r in cap["regions"]]}

    # -- teach-in ----------------------------------------------------------------------------------------------
    def teach(self, args: dict, ident: str) -> dict:
        """Teach-in on the next frames of this camera (normal parts only!), as `edge-ad teach` does, or revert.

        args: frames (default 200), every (use every k-th frame), min_frames (30), target_fpr, pixel_fpr,
        confidence, dry_run, timeout (s, default 600); or revert: true (the previous bundle.json back)."""
        from edge_ad.decide.thresholds import DEFAULT_CONFIDENCE, DEFAULT_IMAGE_FPR, DEFAULT_PIXEL_FPR
        from edge_ad.ops import teach as teaching

        _only(args, {"frames", "every", "min_frames", "target_fpr", "pixel_fpr", "confidence", "dry_run", "timeout",
                     "revert"})
        folder = self.detector.current.folder
        dry_run = args.get("dry_run", False)
        if not isinstance(dry_run, bool) or not isinstance(args.get("revert", False), bool):
            raise CommandError("args.dry_run and args.revert must be true or false")
        if self.public_key is not None and not dry_run:
            raise CommandError("a bundle public key is configured: teach-in would change bundle.json and break the "
                               "signature, so the next start would refuse the bundle; teach with dry_run, then "
                               "re-sign the bundle where the key is and deploy it")
        sharing = getattr(self.detector, "sharing", None)  # edge_ad.multicamera: cameras on the same bundle
        others = sharing(folder) if sharing is not None and not dry_run else []
        if others:
            raise CommandError(f"bundle {folder} is also used by camera(s) {', '.join(others)} of this process: "
                               "changing its thresholds would change theirs too; teach with dry_run, or first "
                               f"deploy a copy to this camera (deploy {{\"url\": \"{folder}\"}}) and teach that")
        if args.get("revert"):
            if len(args) > 1:
                raise CommandError("revert takes no other args")
            try:
                teaching.revert(folder)
                thresholds = read_bundle(folder).thresholds
            except (teaching.TeachError, BundleError, OSError) as exc:
                raise CommandError(f"revert failed: {exc}") from None
            applied = self._queue(lambda: self._rescore(thresholds))
            return {"reverted": True, "bundle": str(folder), "image_raw": thresholds.image,
                    "pixel_raw": thresholds.pixel, **applied}
        min_frames = _number(args, "min_frames", teaching.MIN_FRAMES, 10, teaching.MAX_FRAMES, integer=True)
        frames = _number(args, "frames", max(teaching.DEFAULT_FRAMES, min_frames), min_frames, teaching.MAX_FRAMES,
                         integer=True)
        every = _number(args, "every", 1, 1, 10**6, integer=True)
        target_fpr = _number(args, "target_fpr", DEFAULT_IMAGE_FPR, 1e-9, 1 - 1e-9)
        pixel_fpr = _number(args, "pixel_fpr", DEFAULT_PIXEL_FPR, 1e-9, 1 - 1e-9)
        confidence = _number(args, "confidence", DEFAULT_CONFIDENCE, 0.5, 1 - 1e-9)
        timeout = _number(args, "timeout", 600.0, 1.0, 86400.0)
        spec = self.detector.current.built.bundle.preprocess
        stride = max(1, math.ceil(frames * spec.height * spec.width / teaching.MAX_PIXELS))
        job = _Teach(frames, every, self.detector.current.generation, stride, spec)
        with self._lock:
            if self._teach is not None and not self._teach.done.is_set():
                raise CommandError("a teach-in is already running")
            self._teach = job
        try:
            finished = self._wait(job.done, timeout, "teach-in")
        finally:
            job.done.set()
            self._teach = None
        if job.failed:
            raise CommandError(f"teach-in stopped: {job.failed}; thresholds unchanged")
        n = len(job.scores)
        if not finished and n < min_frames:
            raise CommandError(f"only {n} frame(s) in {timeout:g} s; teach-in needs at least {min_frames} "
                               "(min_frames); thresholds unchanged")
        scores, pixels = np.asarray(job.scores, np.float64), np.concatenate(job.pixels)
        try:
            bundle = read_bundle(folder)
        except BundleError as exc:
            raise CommandError(f"cannot read the active bundle: {exc}") from None
        previous = bundle.thresholds
        source = f"teach command {ident}: {self.topics.camera}, {n} frames"
        try:
            thresholds = teaching.fit_thresholds(bundle, scores, pixels, target_fpr, pixel_fpr, source, confidence)
        except teaching.TeachError as exc:
            raise CommandError(f"teach-in failed: {exc}") from None
        warning = teaching.compare_with_validation(previous, scores)
        outliers = describe_outliers(thresholds.fit, [f"teach frame {i + 1}" for i in range(n)])
        flagged = int(np.sum(scores >= previous.image))
        outcome = {"bundle": str(folder), "frames": n, "flagged_by_previous": flagged, "warning": warning,
                   "outliers": outliers,
                   "previous": {"image_raw": previous.image, "pixel_raw": previous.pixel},
                   "new": {"image_raw": thresholds.image, "pixel_raw": thresholds.pixel}, "dry_run": dry_run}
        if dry_run:
            return outcome
        record = {"source": source, "frames": n, "skipped": 0, "target_fpr": target_fpr, "pixel_fpr": pixel_fpr,
                  "confidence": confidence, "flagged_by_previous": flagged, "warning": warning,
                  "outliers": outliers, "previous": asdict(previous), "utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            kept = teaching.commit_thresholds(folder, bundle, thresholds, record)
        except (BundleError, OSError) as exc:
            raise CommandError(f"cannot write the new thresholds into {folder}: {exc}") from None
        applied = self._queue(lambda: self._rescore(thresholds))
        return {**outcome, "kept": kept.name, **applied}


# -- wiring (edge_ad.app, per camera) ---------------------------------------------------------------------
def camera_state_dir(config) -> Path:
    """Where a camera's remote-control state lives: beside the outbox (default $STATE_DIRECTORY or
    ~/.local/state/edge-ad), as the watched-folder ledger does."""
    from edge_ad.deliver.outbox import state_dir

    return Path(config.outbox).parent if config.outbox else state_dir()


def rollout_for(config, device: str, camera: str) -> Rollout:
    return Rollout(camera_state_dir(config), device, camera, config.bundle_public_key,
                   int(getattr(config, "deploy_max_mb", 2048) * 1024 * 1024))


def startup_model(config) -> str:
    """--model, or the bundle a remote deploy made active for this camera (logged)."""
    import socket

    from edge_ad.ops.camera_config import camera_ids
    from edge_ad.sources.capture import safe_id

    if not config.mqtt_host or not getattr(config, "commands", True):
        return config.model
    device = config.device_id or safe_id(socket.gethostname()) or "edge"
    return rollout_for(config, device, camera_ids([config])[0]).startup_model(config.model)


@dataclass
class Remote:
    """A camera's command service and control, and the pipeline hooks to install."""

    service: object
    control: RuntimeControl

    @property
    def before_decide(self) -> list:
        return [self.control.before_decide]

    @property
    def observers(self) -> list:
        return [self.control.after_frame]

    def close(self) -> None:
        self.control.stop.set()
        self.service.close()


def attach(config, detector, scorer: Scorer, model: dict, topics: Topics, mqtt_sink, drift=None,
           announce: Callable[[], None] | None = None) -> Remote | None:
    """Subscribe `<camera>/cmd` and answer on `<camera>/cmd/result` (None: no MQTT, or commands off)."""
    from edge_ad.ops.commands import CommandService, Record

    if mqtt_sink is None or not getattr(config, "commands", True):
        return None
    if not isinstance(detector, SwappableDetector):
        log.warning("remote commands off for %s: its detector cannot swap models", topics.camera)
        return None
    state = camera_state_dir(config)
    stop = threading.Event()
    control = RuntimeControl(detector, scorer, model, topics, rollout_for(config, topics.device, topics.camera),
                             lambda topic, data: mqtt_sink.client.publish(topic, data, qos=1),
                             str(Path(config.model).resolve()), config.image_threshold, config.pixel_threshold,
                             state, drift=drift, public_key=config.bundle_public_key, device=config.device,
                             mode=config.mode, precision=config.inference_precision, stop=stop, announce=announce)

    def publish(answer: dict) -> None:
        mqtt_sink.client.publish(topics.cmd_result, json.dumps(answer, separators=(",", ":"), allow_nan=False), qos=1)

    service = CommandService(control.handlers(), publish, topics.device, topics.camera,
                             Record(state / f"commands-{state_name(topics.device, topics.camera)}.json"), stop)
    mqtt_sink.subscribe(topics.cmd, service.on_message)
    log.info("remote commands on %s (answers on %s): %s", topics.cmd, topics.cmd_result,
             ", ".join(sorted(control.handlers())))
    return Remote(service, control)
