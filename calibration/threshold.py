"""Recalibrate a bundle's thresholds on normal images captured on site.

    python -m calibration.threshold BUNDLE_DIR --images DIR [--target-fpr 0.01] [--pixel-fpr 0.001] [--out NEW_DIR]

Lighting, camera and part finish on the line differ from the training photos, so the
raw score distribution of normal parts shifts. Thresholds and normalization are data
in bundle.json (never baked into the graph): this runs the bundle's own IR over the
site images and rewrites only bundle.json; model.xml/model.bin and their checksums
stay as they are. Needs openvino and numpy only (no torch), so it runs on the edge PC.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2

from deploy.ir_eval import IrError, IrRunner, infer_images
from edge_ad.model.bundle import BUNDLE_FILE, Bundle, BundleError, read_bundle, write_bundle
from edge_ad.sources.images import list_images
from edge_ad.ops.tool_cli import run_tool
from edge_ad.decide.thresholds import DEFAULT_IMAGE_FPR, DEFAULT_PIXEL_FPR, estimate_thresholds

log = logging.getLogger("calibration")

MIN_IMAGES = 10


class ThresholdError(RuntimeError):
    """Site images or options that cannot give thresholds; the message says why."""


@dataclass
class RecalibrationConfig:
    """What the command line asks for."""

    bundle_dir: Path
    images: Path
    out: Path | None = None  # None: rewrite bundle.json in place
    target_fpr: float = DEFAULT_IMAGE_FPR
    pixel_fpr: float = DEFAULT_PIXEL_FPR
    min_images: int = MIN_IMAGES
    force: bool = False
    device: str = "CPU"


def _copy_bundle(source: Path, bundle: Bundle, out: Path, force: bool) -> None:
    """Copy the model files into a new bundle folder (bundle.json is written afterwards)."""
    if out.resolve() == source.resolve():
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise ThresholdError(f"output folder is not empty: {out} (use --force to overwrite its bundle files)")
        (out / BUNDLE_FILE).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in bundle.files:
        shutil.copy2(source / name, out / name)


def recalibrate(config: RecalibrationConfig) -> tuple[Path, Bundle]:
    """Run the IR over the site images, recompute thresholds, write bundle.json; returns (folder, bundle)."""
    if not 0.0 <= config.target_fpr < 1.0 or not 0.0 <= config.pixel_fpr < 1.0:
        raise ThresholdError("--target-fpr and --pixel-fpr must be in [0, 1)")
    bundle = read_bundle(config.bundle_dir)  # refuses tampered files and unknown schemas
    images_dir = Path(config.images)
    if not images_dir.is_dir():
        raise ThresholdError(f"image folder not found: {images_dir}")
    paths = list_images(images_dir)
    if len(paths) < config.min_images:
        raise ThresholdError(
            f"{len(paths)} images in {images_dir}; need at least {config.min_images} normal images "
            "(ideally 100 or more for a 1% false-positive target)"
        )

    started = time.perf_counter()
    runner = IrRunner.open(Path(config.bundle_dir) / bundle.model.xml, config.device)
    shape = runner.compiled.inputs[0].get_partial_shape()
    spec = bundle.preprocess
    if shape.rank.is_static and shape.rank.get_length() == 4 and shape[2].is_static and shape[3].is_static:
        if (shape[2].get_length(), shape[3].get_length()) != (spec.height, spec.width):
            raise ThresholdError(f"the IR takes {shape[3]}x{shape[2]} images but bundle.json says {spec.width}x{spec.height}")

    def progress(done: int, total: int) -> None:
        if done % 50 == 0 or done == total:
            log.info("%d/%d images (%.1f s)", done, total, time.perf_counter() - started)

    result = infer_images(runner, paths, bundle.preprocess, progress=progress)
    for path, reason in result.skipped[:5]:
        log.warning("skipped: %s", reason)
    if result.skipped:
        log.warning("skipped %d of %d files as unreadable", len(result.skipped), len(paths))
    n = len(result.paths)
    if n < config.min_images:
        raise ThresholdError(f"only {n} readable images in {images_dir} ({len(result.skipped)} unreadable); need at least {config.min_images}")
    if config.target_fpr > 0 and n * config.target_fpr < 1:
        log.warning("%d images for a %.3g false-positive target: the image threshold is close to the largest normal score", n, config.target_fpr)

    previous = asdict(bundle.thresholds)
    bundle.thresholds = estimate_thresholds(
        result.scores, result.maps, config.target_fpr, config.pixel_fpr, source=f"site:{images_dir}, {n} images"
    )
    calibration = dict(bundle.calibration or {})
    calibration["thresholds"] = {
        "images": str(images_dir),
        "n_images": n,
        "n_skipped": len(result.skipped),
        "target_fpr": config.target_fpr,
        "pixel_fpr": config.pixel_fpr,
        "previous": previous,
        "recalibrated_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    bundle.calibration = calibration

    out = Path(config.out) if config.out is not None else Path(config.bundle_dir)
    _copy_bundle(Path(config.bundle_dir), bundle, out, config.force)
    expected = dict(bundle.files)
    write_bundle(out, bundle)
    if bundle.files != expected:  # write_bundle re-hashes; the model files must be the ones verified above
        raise ThresholdError(f"model files in {out} changed during recalibration")
    log.info(
        "image threshold %.6g -> %.6g, pixel threshold %.6g -> %.6g (%d images)",
        previous["image"], bundle.thresholds.image, previous["pixel"], bundle.thresholds.pixel, n,
    )
    return out, bundle


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m calibration.threshold",
        description="Recompute a bundle's thresholds and normalization statistics from normal images captured on site.",
    )
    parser.add_argument("bundle_dir", type=Path, help="bundle folder (model.xml, model.bin, bundle.json)")
    parser.add_argument("--images", required=True, type=Path, help="folder of normal (defect-free) site images")
    parser.add_argument("--target-fpr", type=float, default=DEFAULT_IMAGE_FPR, help="image false-positive rate on these images (default %(default)s)")
    parser.add_argument("--pixel-fpr", type=float, default=DEFAULT_PIXEL_FPR, help="pixel false-positive rate (default %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="write a new bundle folder instead of updating BUNDLE_DIR in place")
    parser.add_argument("--min-images", type=int, default=MIN_IMAGES, help="refuse fewer readable images than this (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty --out folder")
    parser.add_argument("--device", default="CPU", help="OpenVINO device (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Unreadable files are counted and reported below; OpenCV's own decoder chatter is noise.
    cv2_logging = getattr(getattr(cv2, "utils", None), "logging", None)
    if cv2_logging is not None:
        cv2_logging.setLogLevel(cv2_logging.LOG_LEVEL_SILENT)
    config = RecalibrationConfig(**vars(args))
    return run_tool(lambda: recalibrate(config)[0], (ThresholdError, BundleError, IrError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
