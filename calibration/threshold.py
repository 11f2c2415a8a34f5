"""Recalibrate a bundle's thresholds on normal images captured on site.

    python -m calibration.threshold BUNDLE_DIR --images DIR [--target-fpr 0.01] [--pixel-fpr 0.001] [--out NEW_DIR]

Lighting, camera and part finish on the line differ from the training photos, so the
raw score distribution of normal parts shifts. Thresholds and normalization are data
in bundle.json (never baked into the graph): this runs the bundle's IR compiled as the
runtime compiles it over the site images and rewrites only bundle.json; model.xml/model.bin
and their checksums stay as they are. A thin front end (a folder of site images, --out) to
`edge-ad teach`'s helpers (edge_ad.ops.teach) and so to the one estimator,
edge_ad.decide.thresholds.estimate_thresholds. In place, the previous bundle.json is kept as
bundle.json.vN (`edge-ad teach --model BUNDLE --revert` restores it). Needs openvino and
numpy only (no torch), so it runs on the edge PC.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2

from edge_ad.model.bundle import BUNDLE_FILE, Bundle, BundleError, read_bundle, write_bundle
from edge_ad.model.signing import add_sign_key_option, signing
from edge_ad.errors import EdgeAdError
from edge_ad.ops.teach import FrameScorer, commit_thresholds, compare_with_validation, fit_thresholds, score_frames
from edge_ad.sources.capture import Frame
from edge_ad.sources.images import ImageReadError, list_images, read_image
from edge_ad.ops.tool_cli import run_tool
from edge_ad.decide.thresholds import DEFAULT_IMAGE_FPR, DEFAULT_PIXEL_FPR, describe_outliers

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
    if not 0.0 < config.target_fpr < 1.0 or not 0.0 < config.pixel_fpr < 1.0:
        raise ThresholdError("--target-fpr and --pixel-fpr must be in (0, 1), i.e. [0, 1) without 0")
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

    # One path for site thresholds: the runtime's own compiled model and edge_ad's teach-in helpers.
    scorer = FrameScorer(config.bundle_dir, config.device)
    skipped: list[str] = []

    def frames():
        for index, path in enumerate(paths):
            try:
                image = read_image(path)
            except ImageReadError as exc:
                skipped.append(str(exc))
                continue
            yield Frame(index=index, image=image, timestamp=0.0, name=path.name)

    scores, pixels, names = score_frames(scorer, frames(), len(paths))
    for reason in skipped[:5]:
        log.warning("skipped: %s", reason)
    if skipped:
        log.warning("skipped %d of %d files as unreadable", len(skipped), len(paths))
    n = int(scores.size)
    if n < config.min_images:
        raise ThresholdError(f"only {n} readable images in {images_dir} ({len(skipped)} unreadable); need at least {config.min_images}")
    if n * config.target_fpr < 1:
        log.warning("%d images for a %.3g false-positive target: the image threshold is close to the largest normal score", n, config.target_fpr)
    warning = compare_with_validation(bundle.thresholds, scores)
    if warning:
        log.warning("%s", warning)

    previous = asdict(bundle.thresholds)
    thresholds = fit_thresholds(bundle, scores, pixels, config.target_fpr, config.pixel_fpr,
                                source=f"site:{images_dir}, {n} images")
    outliers = describe_outliers(thresholds.fit, names)
    if outliers:
        log.warning("%s", outliers)
    record = {
        "images": str(images_dir),
        "n_images": n,
        "n_skipped": len(skipped),
        "target_fpr": config.target_fpr,
        "pixel_fpr": config.pixel_fpr,
        "outliers": outliers,
        "previous": previous,
        "recalibrated_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out = Path(config.out) if config.out is not None else Path(config.bundle_dir)
    if out.resolve() == Path(config.bundle_dir).resolve():
        kept = commit_thresholds(out, bundle, thresholds, record, record_key="thresholds")  # reversible
        log.info("previous bundle.json kept as %s (edge-ad teach --model %s --revert restores it)", kept.name, out)
    else:
        _copy_bundle(Path(config.bundle_dir), bundle, out, config.force)
        expected = dict(bundle.files)
        bundle.thresholds = thresholds
        bundle.calibration = {**(bundle.calibration or {}), "thresholds": record}
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
    add_sign_key_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Unreadable files are counted and reported below; OpenCV's own decoder chatter is noise.
    cv2_logging = getattr(getattr(cv2, "utils", None), "logging", None)
    if cv2_logging is not None:
        cv2_logging.setLogLevel(cv2_logging.LOG_LEVEL_SILENT)
    sign_key = vars(args).pop("sign_key")
    config = RecalibrationConfig(**vars(args))
    return run_tool(signing(lambda: recalibrate(config)[0], sign_key),
                    (ThresholdError, BundleError, EdgeAdError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
