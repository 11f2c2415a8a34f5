"""`edge-ad teach`: new thresholds from normal frames of the line, on the edge PC (no torch, no training package).

    edge-ad teach --camera 0 --model BUNDLE --frames 200       # any source: --video, --images too
    edge-ad teach --model BUNDLE --revert                      # back to the previous bundle.json

Lighting, optics and part finish at the station differ from the training
photos, so normal scores sit elsewhere than on the validation images. Teach-in
runs the bundle exactly as `edge-ad run` does (same compiled model, uint8
input, f32 on CPU) over frames of normal parts, and sets the image and pixel
thresholds and the normalization with `estimate_thresholds`, the estimator
training uses. Only bundle.json changes: the model files and their checksums
stay as they are. The bundle.json in force is kept beside as bundle.json.vN
(N counting up), so `--revert` restores it, step by step.

It refuses too few frames, and warns when the frames score unlike the
bundle's validation images (median far from the validation median, in units
of the validation spread): wrong camera, wrong light, or parts that are not
normal would otherwise become the new "normal".
"""

from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np

from edge_ad.atomic import write_atomic
from edge_ad.decide.thresholds import (DEFAULT_CONFIDENCE, DEFAULT_IMAGE_FPR, DEFAULT_PIXEL_FPR, MIN_NORMAL_SCORES,
                                       ThresholdEstimateError, describe_outliers, estimate_thresholds)
from edge_ad.errors import UsageError
from edge_ad.model.bundle import BUNDLE_FILE, Bundle, BundleError, Thresholds, read_bundle, verify_files, write_bundle
from edge_ad.sources.capture import Frame

log = logging.getLogger("edge_ad.teach")

DEFAULT_FRAMES = 200
MIN_FRAMES = 30  # below this the fitted tail is mostly the tolerance margin, not the data
MAX_FRAMES = 20000
MAX_PIXELS = 16_000_000  # pixel samples kept for the pixel threshold (a 200-frame 256x256 teach-in keeps all)
UNLIKE_SPREADS = 3.0  # teach median this many validation (p95 - p50) spreads from the validation median: warn
_VERSION = re.compile(r"^bundle\.json\.v(\d+)$")


class TeachError(UsageError):
    """Frames or options that cannot give thresholds (exit 2)."""


@dataclass
class TeachConfig:
    """What `edge-ad teach` was asked for."""

    model: str
    camera: int | None = None
    video: str | None = None
    images: str | None = None
    frames: int = DEFAULT_FRAMES
    min_frames: int = MIN_FRAMES
    target_fpr: float = DEFAULT_IMAGE_FPR
    pixel_fpr: float = DEFAULT_PIXEL_FPR
    confidence: float = DEFAULT_CONFIDENCE
    device: str = "CPU"
    inference_precision: str | None = None
    source_retries: int = 3
    every: int = 1  # use every k-th frame: a live camera's consecutive frames often show the same part
    dry_run: bool = False


@dataclass
class TeachReport:
    folder: Path
    frames: int
    skipped: int
    previous: Thresholds
    thresholds: Thresholds
    flagged_before: int  # teach frames at or above the previous image threshold
    version: Path | None  # where the previous bundle.json was kept (None: dry run)
    warning: str | None

    def lines(self) -> list[str]:
        old, new = self.previous, self.thresholds
        out = [f"teach-in on {self.frames} frame(s) ({self.skipped} unreadable skipped): image threshold "
               f"{old.image:.6g} -> {new.image:.6g}, pixel threshold {old.pixel:.6g} -> {new.pixel:.6g}",
               f"the previous threshold flagged {self.flagged_before} of these {self.frames} normal frames"]
        if self.version is not None:
            out.append(f"wrote {self.folder / BUNDLE_FILE}; the previous one is kept as {self.version.name} "
                       f"(edge-ad teach --model {self.folder} --revert restores it)")
        else:
            out.append("dry run: bundle.json not changed")
        return out


# -- scoring --------------------------------------------------------------------------------------------
class FrameScorer:
    """The bundle compiled as `edge-ad run` compiles it, one synchronous request (teach-in is not timed)."""

    def __init__(self, bundle_dir: str | Path, device: str = "CPU", precision: str | None = None):
        from edge_ad.model.inference import compile_bundle  # OpenVINO: only when scoring

        self.built = compile_bundle(bundle_dir, device, "latency", precision)
        self.bundle = self.built.bundle
        compiled = self.built.compiled
        self.request = compiled.create_infer_request()
        self._input = self.bundle.model.input_name
        self._map = compiled.output(self.bundle.model.outputs[0])
        self._score = compiled.output(self.bundle.model.outputs[1])

    def __call__(self, image: np.ndarray) -> tuple[float, np.ndarray]:
        """(raw score, raw model-size anomaly map) of one frame."""
        self.request.infer({self._input: self.built.prepare(image, self.bundle.preprocess)[None]})
        amap = np.array(self.request.get_tensor(self._map).data, dtype=np.float32, copy=True)
        score = float(np.asarray(self.request.get_tensor(self._score).data).reshape(-1)[0])
        return score, amap.reshape(amap.shape[-2:])


def score_frames(scorer: FrameScorer, frames: Iterable[Frame], limit: int,
                 every: int = 1) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Raw scores of up to `limit` frames (every `every`-th one), a sample of their map pixels (all of
    them up to MAX_PIXELS), and each scored frame's name (its file, else "frame <index>") for the log."""
    spec = scorer.bundle.preprocess
    stride = max(1, math.ceil(limit * spec.height * spec.width / MAX_PIXELS))
    scores, pixels, names = [], [], []
    for position, frame in enumerate(frames):
        if position % max(1, every):
            continue
        score, amap = scorer(frame.image)
        scores.append(score)
        pixels.append(amap.ravel()[::stride])
        names.append(frame.name or f"frame {frame.index}")
        if len(scores) % 50 == 0:
            log.info("%d/%d frames scored", len(scores), limit)
        if len(scores) >= limit:
            break
    if not scores:
        return np.zeros(0), np.zeros(0, np.float32), []
    return np.asarray(scores, np.float64), np.concatenate(pixels), names


def compare_with_validation(previous: Thresholds, scores: np.ndarray) -> str | None:
    """A warning when the teach-in scores look unlike the bundle's validation scores; None when they fit."""
    site_p50 = float(np.median(scores))
    fit = previous.fit or {}
    p50, p95 = fit.get("p50"), fit.get("p95")
    if isinstance(p50, (int, float)) and isinstance(p95, (int, float)) and p95 > p50:
        spreads = (site_p50 - p50) / (p95 - p50)
        if abs(spreads) > UNLIKE_SPREADS:
            return (f"the teach-in frames score unlike the bundle's validation images: median raw score "
                    f"{site_p50:.4g} vs validation {p50:.4g} ({spreads:+.1f} validation spreads, p95-p50). "
                    "Check that they show normal parts, with the line's camera and light; if so, the new "
                    "thresholds fit this station (--revert undoes them)")
        return None
    if site_p50 >= previous.image:
        return (f"most teach-in frames score above the bundle's threshold (median {site_p50:.4g} >= "
                f"{previous.image:.4g}); the bundle records no validation figures to compare with. Check that "
                "they show normal parts")
    return None


# -- bundle versions -----------------------------------------------------------------------------------
def versions(folder: Path) -> list[tuple[int, Path]]:
    """Kept earlier bundle.json files, oldest first."""
    found = []
    for path in Path(folder).iterdir():
        match = _VERSION.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def commit_thresholds(folder: Path, bundle: Bundle, thresholds: Thresholds, record: dict,
                      record_key: str = "teach") -> Path:
    """Keep the bundle.json in force as bundle.json.vN, write the new one; returns the kept file."""
    folder = Path(folder)
    current = folder / BUNDLE_FILE
    number = (versions(folder)[-1][0] + 1) if versions(folder) else 1
    kept = folder / f"{BUNDLE_FILE}.v{number}"
    write_atomic(kept, current.read_bytes())
    expected = dict(bundle.files)
    bundle.thresholds = thresholds
    calibration = dict(bundle.calibration or {})
    calibration[record_key] = {**record, "previous_version": kept.name}
    bundle.calibration = calibration
    try:
        write_bundle(folder, bundle)
        if bundle.files != expected:  # write_bundle re-hashes: the model files must be the ones verified
            raise BundleError(f"model files in {folder} changed during teach-in; restored the previous bundle.json")
    except BaseException:
        kept.replace(current)
        raise
    return kept


def revert(folder: str | Path) -> Path:
    """Put the newest kept bundle.json.vN back in force (its model checksums must still match)."""
    folder = Path(folder)
    if not (folder / BUNDLE_FILE).is_file():
        raise TeachError(f"not a bundle (no {BUNDLE_FILE}): {folder}")
    kept = versions(folder)
    if not kept:
        raise TeachError(f"nothing to revert: {folder} keeps no earlier bundle.json (bundle.json.vN)")
    number, path = kept[-1]
    import json

    try:
        verify_files(folder, Bundle.from_dict(json.loads(path.read_text())))
    except (ValueError, BundleError) as exc:
        raise TeachError(f"cannot revert to {path.name}: {exc}") from None
    path.replace(folder / BUNDLE_FILE)
    read_bundle(folder)  # refuses what the runtime would refuse
    log.info("restored %s as %s (%d earlier version(s) left)", path.name, BUNDLE_FILE, len(kept) - 1)
    return folder / BUNDLE_FILE


# -- teach-in --------------------------------------------------------------------------------------------
def _check(config: TeachConfig) -> None:
    sources = [n for n in ("camera", "video", "images") if getattr(config, n) is not None]
    if len(sources) != 1:
        raise TeachError("give exactly one frame source: --camera N, --video PATH_OR_URL or --images DIR_OR_GLOB")
    if not MIN_NORMAL_SCORES <= config.min_frames <= MAX_FRAMES:
        raise TeachError(f"--min-frames must be {MIN_NORMAL_SCORES}..{MAX_FRAMES}, got {config.min_frames}")
    if not 1 <= config.every <= 10**6:
        raise TeachError(f"--every must be 1..1000000, got {config.every}")
    if not config.min_frames <= config.frames <= MAX_FRAMES:
        raise TeachError(f"--frames must be {config.min_frames} (--min-frames) .. {MAX_FRAMES}, got {config.frames}")
    for name in ("target_fpr", "pixel_fpr"):
        if not 0.0 < getattr(config, name) < 1.0:
            raise TeachError(f"--{name.replace('_', '-')} must be in (0, 1), got {getattr(config, name)}")
    if not 0.5 <= config.confidence < 1.0:
        raise TeachError(f"--confidence must be in [0.5, 1), got {config.confidence}")


def fit_thresholds(bundle: Bundle, scores: np.ndarray, pixels: np.ndarray, target_fpr: float, pixel_fpr: float,
                   source: str, confidence: float = DEFAULT_CONFIDENCE) -> Thresholds:
    try:
        return estimate_thresholds(scores, pixels, target_fpr, pixel_fpr, source=source, confidence=confidence)
    except ThresholdEstimateError as exc:
        raise TeachError(str(exc)) from None


def teach(config: TeachConfig, stop: threading.Event | None = None) -> TeachReport:
    """Collect normal frames, fit thresholds, write the new bundle.json (keeping the old one)."""
    from edge_ad.backoff import Backoff
    from edge_ad.ops.credentials import stream_url
    from edge_ad.sources.capture import open_source

    _check(config)
    folder = Path(config.model)
    read_bundle(folder)  # refuse a tampered bundle before anything else
    scorer = FrameScorer(folder, config.device, config.inference_precision)
    bundle = scorer.bundle
    source = open_source(config.camera, stream_url(config.video, None), config.images, backoff=Backoff(config.source_retries, 1.0, 10.0),
                         stop=stop or threading.Event())
    source.open()
    log.info("teach-in: scoring up to %d frames from %s with %s", config.frames, source.description, folder)
    try:
        scores, pixels, names = score_frames(scorer, source, config.frames, config.every)
    finally:
        source.close()
    n = int(scores.size)
    if n < config.min_frames:
        raise TeachError(f"only {n} usable frame(s) from {source.description} ({source.skipped} unreadable); "
                         f"teach-in needs at least {config.min_frames} frames of normal parts (--min-frames)")
    previous = bundle.thresholds
    warning = compare_with_validation(previous, scores)
    if warning:
        log.warning("%s", warning)
    thresholds = fit_thresholds(bundle, scores, pixels, config.target_fpr, config.pixel_fpr,
                                f"teach-in: {source.description}, {n} frames", config.confidence)
    outliers = describe_outliers(thresholds.fit, names)
    if outliers:
        log.warning("teach-in: %s", outliers)
    flagged = int(np.sum(scores >= previous.image))
    record = {"source": source.description, "frames": n, "skipped": source.skipped, "target_fpr": config.target_fpr,
              "pixel_fpr": config.pixel_fpr, "confidence": config.confidence, "flagged_by_previous": flagged,
              "warning": warning, "outliers": outliers, "previous": asdict(previous),
              "utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    kept = None if config.dry_run else commit_thresholds(folder, bundle, thresholds, record)
    if kept is not None and (folder / "manifest.sha256").exists():
        log.warning("%s is signed: its new bundle.json no longer matches manifest.sha256, so a device configured "
                    "with a public key refuses it until it is re-signed where the key is "
                    "(python -m deploy.keys --sign %s --sign-key KEY)", folder, folder)
    report = TeachReport(folder, n, source.skipped, previous, thresholds, flagged, kept, warning)
    for line in report.lines():
        log.info("%s", line)
    return report
