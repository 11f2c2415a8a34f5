"""Quantize an FP32 bundle to INT8 with NNCF:

    python -m calibration.quantize BUNDLE_DIR --out INT8_BUNDLE [--data-root ROOT] [--category NAME]
        [--mode ptq|accuracy-control] [--max-drop 0.01] [--subset-size N] [--recipe NAME]

Calibration uses the held-out validation images of the run (normal images from train/good,
the split training used, reproduced from bundle.json's seed and fraction or read from the
run's split.json with --run-dir), never test images. Afterwards the INT8 IR is re-measured
on the test split beside the FP32 IR, the thresholds are recomputed from the INT8 model's
validation outputs (INT8 shifts raw values a little, and the runtime compares raw values
with bundle.json's thresholds; a run's out-of-fold training scores join them, carried over
from FP32 by the line through the paired validation scores), and single-frame latency FP32 vs INT8 is recorded: INT8
only pays off if it keeps accuracy *and* is faster.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from calibration.emulate import emulate_fake_quantize
from calibration.int8 import (
    DEFAULT_RECIPE,
    MODES,
    RECIPES,
    Fp32Reference,
    QuantizeError,
    count_fake_quantize,
    infer_all,
    measure_latency,
    quantize_accuracy_control,
    quantize_ptq,
    spearman,
)

log = logging.getLogger("calibration")

# Targets of project issue #3: INT8 may lose at most this much AUROC against the FP32 IR,
# and must rank test images like the FP32 IR. Reported in bundle.json; the CLI warns when missed.
MAX_AUROC_DROP = 0.01
MIN_SPEARMAN = 0.95
DEFAULT_MAX_DROP = 0.01
DEFAULT_LATENCY_RUNS = 100
KERNEL_AGREEMENT_WARNING = 0.9


@dataclass
class QuantizeConfig:
    """What the command line asks for."""

    bundle_dir: Path
    out: Path
    data_root: Path | None = None  # default: bundle.json training.data_root
    category: str | None = None  # default: bundle.json training.category (must match it)
    run_dir: Path | None = None  # read the validation list from this run's split.json
    mode: str = "ptq"
    max_drop: float = DEFAULT_MAX_DROP
    subset_size: int | None = None  # default: every validation image
    recipe: str | None = None  # default: calibration.int8.DEFAULT_RECIPE
    latency_runs: int = DEFAULT_LATENCY_RUNS
    force: bool = False


# --- calibration images -------------------------------------------------------------------------


def _relative_key(path: Path) -> str:
    """category/train/good/file: survives moving the data root (same key as the data fingerprint)."""
    return "/".join(Path(path).parts[-4:])


def images_digest(paths: list[Path]) -> str:
    """sha256 over the sorted relative paths and file contents of the calibration images."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=_relative_key):
        digest.update(_relative_key(path).encode())
        digest.update(b"\0")
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()


def validation_samples(bundle, data_root: Path, category: str, run_dir: Path | None):
    """The run's held-out validation samples and where the list came from.

    With --run-dir the run's split.json is authoritative (its paths are re-rooted under
    data_root if the data moved); otherwise the split is reproduced with training's own
    split_validation from bundle.json's seed and validation fraction.
    """
    from training.data import DatasetError, load_category, split_validation

    loaded = load_category(data_root, category)
    if run_dir is not None:
        split_file = Path(run_dir) / "split.json"
        if not split_file.is_file():
            raise QuantizeError(f"--run-dir {run_dir} has no split.json")
        try:
            listed = json.loads(split_file.read_text())["validation"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise QuantizeError(f"{split_file} has no validation list: {exc}") from exc
        by_key = {_relative_key(s.path): s for s in loaded.train}
        missing = [p for p in listed if _relative_key(Path(p)) not in by_key]
        if missing:
            raise QuantizeError(f"{len(missing)} validation images of {split_file} are not under {data_root}/{category}/train/good, e.g. {missing[0]}")
        validation = [by_key[_relative_key(Path(p))] for p in listed]
        source = f"split.json of {run_dir}"
    else:
        try:
            _, validation = split_validation(
                loaded.train, fraction=bundle.training.validation_fraction, seed=bundle.training.validation_seed
            )
        except DatasetError as exc:
            raise QuantizeError(f"cannot reproduce the training split: {exc}") from exc
        source = f"split_validation(seed={bundle.training.validation_seed}, fraction={bundle.training.validation_fraction})"
    test_files = {Path(s.path).resolve() for s in loaded.test}
    leaked = [s.path for s in validation if Path(s.path).resolve() in test_files or s.label != 0]
    if leaked:  # cannot happen with an MVTec layout; refuse loudly if a custom one tries
        raise QuantizeError(f"calibration must use normal validation images only, got {leaked[0]}")
    return loaded, validation, source


def load_images(samples, spec) -> np.ndarray:
    """Samples -> (N,3,H,W) float32 through edge_ad.model.preprocess (training's AnomalyDataset)."""
    from training.data import AnomalyDataset

    dataset = AnomalyDataset(samples, spec, cache=False)
    return np.stack([dataset[i]["image"].numpy() for i in range(len(dataset))]).astype(np.float32)


# --- the command --------------------------------------------------------------------------------


def _prepare_out(source: Path, out: Path, force: bool) -> None:
    if out.resolve() == source.resolve():
        raise QuantizeError("--out must differ from the FP32 bundle folder: the FP32 bundle stays as it is")
    if out.exists() and not out.is_dir():
        raise QuantizeError(f"output path exists and is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise QuantizeError(f"output folder is not empty: {out} (use --force to overwrite its bundle files)")
        for name in ("bundle.json", "model.xml", "model.bin"):  # only our files: never wipe a folder
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _check_config(config: QuantizeConfig) -> None:
    if config.mode not in MODES:
        raise QuantizeError(f"--mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    if not 0.0 < config.max_drop < 1.0:
        raise QuantizeError(f"--max-drop must be in (0, 1), got {config.max_drop}")
    if config.subset_size is not None and config.subset_size < 1:
        raise QuantizeError(f"--subset-size must be >= 1, got {config.subset_size}")
    if config.recipe is not None and config.recipe not in RECIPES:
        raise QuantizeError(f"unknown --recipe {config.recipe!r}; known: {', '.join(RECIPES)}")
    if config.latency_runs < 0:
        raise QuantizeError(f"--latency-runs must be >= 0, got {config.latency_runs}")


def carried_out_of_fold(fp32_record: dict | None, fp32_validation: np.ndarray, int8_validation: np.ndarray) -> dict | None:
    """The FP32 threshold's out-of-fold training scores (training.crossfit) on the INT8 model's scale; None without.

    The fold models cannot be refitted here, so the FP32 scores are carried by the line through the paired validation scores
    (INT8 moves raw values a little, in step: Spearman >= 0.95 is a target). A line, not crossfit's ratio of means:
    here every validation image has both scores, and quantization can shift them as well as scale them."""
    if not fp32_record or not fp32_record.get("scores"):
        return None
    fp32_validation, int8_validation = (np.asarray(v, dtype=np.float64) for v in (fp32_validation, int8_validation))
    slope, intercept = (np.polyfit(fp32_validation, int8_validation, 1) if np.ptp(fp32_validation) > 0
                        else (1.0, float(np.mean(int8_validation - fp32_validation))))
    mapped = float(slope) * np.asarray(fp32_record["scores"], dtype=np.float64) + float(intercept)
    return {**fp32_record, "scores": [round(float(v), 6) for v in mapped], "median": float(np.median(mapped)),
            "validation_median": float(np.median(int8_validation)),
            "mapped_from_fp32": {"slope": float(slope), "intercept": float(intercept)}}


def quantize_bundle(config: QuantizeConfig):
    """FP32 bundle -> INT8 bundle; returns (out folder, Bundle). See the module docstring."""
    import openvino as ov

    from deploy.ir_eval import IrRunner, predict_ir
    from deploy.precision_check import check_bf16
    from training.pipeline import test_metrics
    from edge_ad.model.bundle import read_bundle, write_bundle
    from training.data import data_fingerprint
    from edge_ad.decide.thresholds import describe_outliers, estimate_thresholds

    _check_config(config)
    started = time.perf_counter()
    source = Path(config.bundle_dir)
    bundle = read_bundle(source)  # refuses tampered files and unknown schemas
    if bundle.model.precision != "fp32":
        raise QuantizeError(f"{source} is an {bundle.model.precision} bundle; quantize the FP32 bundle (python -m deploy.export RUN --precision fp32)")
    category_name = config.category or bundle.training.category
    if category_name != bundle.training.category:
        raise QuantizeError(f"--category {category_name!r} differs from the category the model was trained on ({bundle.training.category!r})")
    data_root = Path(config.data_root or bundle.training.data_root).expanduser()
    recipe = RECIPES[config.recipe or DEFAULT_RECIPE]
    if config.mode == "accuracy-control" and recipe.weights_only:
        raise QuantizeError("--mode accuracy-control needs a full quantization recipe, not weights-only")
    if Path(config.out).resolve() == source.resolve():
        raise QuantizeError("--out must differ from the FP32 bundle folder: the FP32 bundle stays as it is")

    category, samples, split_source = validation_samples(bundle, data_root, category_name, config.run_dir)
    fingerprint = data_fingerprint(category.train + category.test)
    if bundle.training.data_fingerprint and fingerprint != bundle.training.data_fingerprint:
        if config.run_dir is None:
            raise QuantizeError(
                f"the data under {data_root}/{category_name} changed since training (fingerprint {fingerprint}, "
                f"bundle has {bundle.training.data_fingerprint}): the validation split cannot be reproduced; pass --run-dir to use its split.json"
            )
        log.warning("the data changed since training (fingerprint %s vs %s): test metrics are not comparable with the bundle's", fingerprint, bundle.training.data_fingerprint)
    _prepare_out(source, Path(config.out), config.force)
    subset = len(samples) if config.subset_size is None else config.subset_size
    if subset > len(samples):
        log.warning("--subset-size %d > %d validation images: calibrating on all %d", subset, len(samples), len(samples))
        subset = len(samples)
    calibration_samples = samples[:subset]
    if len(calibration_samples) < 10:
        log.warning("only %d calibration images: activation ranges may be poorly estimated", len(calibration_samples))
    spec = bundle.preprocess
    log.info("calibration: %d validation images of %s/%s (%s)", len(calibration_samples), data_root, category_name, split_source)
    images = load_images(calibration_samples, spec)
    all_validation = images if subset == len(samples) else load_images(samples, spec)

    core = ov.Core()
    fp32_model = core.read_model(str(source / bundle.model.xml))
    fp32_runner = IrRunner.open(fp32_model)
    ref_maps, ref_scores = infer_all(fp32_runner.compiled, all_validation)
    reference = Fp32Reference.from_outputs(ref_maps, ref_scores)

    log.info("quantizing with recipe %r (%s), mode %s", recipe.name, recipe.summary, config.mode)
    q_started = time.perf_counter()
    if config.mode == "ptq":
        quantized, scope = quantize_ptq(fp32_model, images, recipe)
        method = "nncf.compress_weights" if recipe.weights_only else "nncf.quantize"
    else:
        cal_reference = reference if subset == len(samples) else Fp32Reference.from_outputs(ref_maps[:subset], ref_scores[:subset])
        quantized, scope = quantize_accuracy_control(fp32_model, images, recipe, cal_reference, config.max_drop)
        method = "nncf.quantize_with_accuracy_control"
    quantize_s = time.perf_counter() - q_started
    n_fq = count_fake_quantize(quantized)
    log.info("quantized in %.0f s: %d FakeQuantize nodes", quantize_s, n_fq)
    if n_fq == 0 and not recipe.weights_only:
        raise QuantizeError("NNCF inserted no quantizers (accuracy control reverted all of them?): the model would run in FP32; not writing an INT8 bundle")

    out = Path(config.out)
    ov.save_model(quantized, str(out / bundle.model.xml), compress_to_fp16=False)
    int8_runner = IrRunner.open(out / bundle.model.xml)

    # Validation: agreement with FP32 and the INT8 model's own thresholds.
    q_maps, q_scores = infer_all(int8_runner.compiled, all_validation)
    agreement = reference.agreement_all(q_maps, q_scores)
    kernel_check = None
    if not recipe.weights_only:
        # Same quantization grid computed in FP32 vs this CPU's INT8 kernels (see calibration.emulate).
        emulated = IrRunner.open(emulate_fake_quantize(quantized))
        e_maps, e_scores = infer_all(emulated.compiled, all_validation)
        kernel_agreement = float(Fp32Reference.from_outputs(e_maps, e_scores).agreement_all(q_maps, q_scores).mean())
        kernel_check = {
            "int8_kernels_vs_fp32_emulation": round(kernel_agreement, 6),
            "emulation_vs_fp32": round(float(reference.agreement_all(e_maps, e_scores).mean()), 6),
            "cpu": core.get_property("CPU", "FULL_DEVICE_NAME"),
            "cpu_capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
        }
        log.info("validation agreement with FP32: %.4f (INT8 kernels vs FP32 emulation of the same grid: %.4f)", agreement.mean(), kernel_agreement)
        if kernel_agreement < KERNEL_AGREEMENT_WARNING:
            log.warning("this CPU's INT8 kernels deviate from the quantization grid (agreement %.3f): int16 saturation? "
                        "use a recipe with overflow_fix='enable'", kernel_agreement)
    train_config = bundle.training.config or {}
    fitted_scores, names, source = q_scores, [str(sample.path) for sample in samples], "validation (INT8 IR)"
    out_of_fold = carried_out_of_fold((bundle.thresholds.fit or {}).get("out_of_fold"), ref_scores, q_scores)
    if out_of_fold is not None:
        fitted_scores = np.concatenate([q_scores, out_of_fold["scores"]])
        names += out_of_fold.get("paths") or [f"training image {i + 1} (out-of-fold)" for i in range(len(out_of_fold["scores"]))]
        source = "validation (INT8 IR) + out-of-fold training images (FP32, mapped)"
    thresholds = estimate_thresholds(
        fitted_scores, q_maps, float(train_config.get("target_fpr", bundle.thresholds.target_fpr or 0.01)),
        float(train_config.get("pixel_fpr", 0.001)), source=source,
        confidence=float(train_config.get("threshold_confidence", 0.9)),
    )
    if out_of_fold is not None:
        thresholds.fit["out_of_fold"] = out_of_fold
    outliers = describe_outliers(thresholds.fit, names)
    if outliers:
        log.warning("%s: %s", source, outliers)

    # Test split: FP32 and INT8 IR through the same measurement code.
    test = category.test
    fp32_pred = predict_ir(fp32_runner, test, spec, desc="fp32 IR test")
    fp32_test = test_metrics(fp32_pred, bundle.thresholds.image, category.has_masks)
    int8_pred = predict_ir(int8_runner, test, spec, desc="int8 IR test")
    int8_test = test_metrics(int8_pred, thresholds.image, category.has_masks)
    rho = spearman(fp32_pred.scores, int8_pred.scores)
    image_drop = fp32_test["image_auroc"] - int8_test["image_auroc"]
    pixel_drop = None if fp32_test["pixel_auroc"] is None else fp32_test["pixel_auroc"] - int8_test["pixel_auroc"]
    int8_test.update(
        data_fingerprint=fingerprint,
        image_auroc_drop_vs_fp32_ir=round(image_drop, 6),
        pixel_auroc_drop_vs_fp32_ir=None if pixel_drop is None else round(pixel_drop, 6),
        spearman_vs_fp32_ir=round(rho, 6),
    )
    log.info(
        "test: image AUROC fp32 %.4f -> int8 %.4f, pixel AUROC %s, Spearman of scores %.4f",
        fp32_test["image_auroc"], int8_test["image_auroc"],
        "n/a" if pixel_drop is None else f"{fp32_test['pixel_auroc']:.4f} -> {int8_test['pixel_auroc']:.4f}", rho,
    )

    latency = {}
    if config.latency_runs:
        shape = (1, 3, spec.height, spec.width)
        measured = measure_latency({"fp32": fp32_model, "int8": core.read_model(str(out / bundle.model.xml))}, shape, runs=config.latency_runs)
        latency = {name: asdict(value) for name, value in measured.items()}
        latency["speedup"] = round(measured["fp32"].median_ms / measured["int8"].median_ms, 3)
        log.info("latency (median of %d single frames): fp32 %.2f ms, int8 %.2f ms (x%.2f)",
                 measured["int8"].runs, measured["fp32"].median_ms, measured["int8"].median_ms, latency["speedup"])

    meets = image_drop <= MAX_AUROC_DROP and (pixel_drop is None or pixel_drop <= MAX_AUROC_DROP) and rho >= MIN_SPEARMAN
    faster = bool(latency) and latency["speedup"] > 1.0
    if not meets:
        log.warning("INT8 misses the accuracy targets (AUROC drop <= %.2f, Spearman >= %.2f): keep the FP32 bundle or try --mode accuracy-control", MAX_AUROC_DROP, MIN_SPEARMAN)
    elif latency and not faster:
        log.warning("INT8 is not faster than FP32 on this CPU: it does not pay off here")

    # The INT8 IR's f32 parts (head, first convolution) in bf16 vs f32, at the INT8 thresholds.
    bf16_check = check_bf16(out / bundle.model.xml, test, all_validation, spec, thresholds.image, category.has_masks,
                            int8_pred, q_scores, core)

    previous_thresholds = asdict(bundle.thresholds)
    existing = dict(bundle.metrics)
    existing.setdefault("fp32_ir", {**fp32_test, "data_fingerprint": fingerprint})
    existing["int8_ir"] = int8_test
    bundle.metrics = existing
    bundle.thresholds = thresholds
    bundle.model.precision = "int8"
    bundle.precision_checks = {"bf16": bf16_check}  # the FP32 bundle's check is not this model's
    bundle.calibration = {
        "method": method,
        "mode": config.mode,
        "recipe": recipe.settings(),
        "preset": recipe.preset,
        "target_device": "CPU",
        "subset_size": len(calibration_samples),
        "images": {
            "split": "validation (held-out normal images of train/good)",
            "source": split_source,
            "data_root": str(data_root),
            "count": len(calibration_samples),
            "sha256": images_digest([s.path for s in calibration_samples]),
            "paths": [_relative_key(s.path) for s in calibration_samples],
        },
        "ignored_scope": scope,
        "fake_quantize_nodes": n_fq,
        "accuracy_control": {
            "metric": "mean over validation images of 1 - (NMSE(map) + NMSE(score)) / 2 vs the FP32 IR (NMSE = mean squared error / mean square of the FP32 output)",
            "max_drop": config.max_drop,
        } if config.mode == "accuracy-control" else None,
        "kernel_check": kernel_check,
        "validation_agreement": {
            "mean": round(float(agreement.mean()), 6),
            "min": round(float(agreement.min()), 6),
            "spearman_scores": round(spearman(ref_scores, q_scores), 6) if len(ref_scores) >= 3 else None,
            "n_images": len(all_validation),
        },
        "targets": {"max_auroc_drop": MAX_AUROC_DROP, "min_spearman": MIN_SPEARMAN, "met": bool(meets)},
        "latency_ms": latency or None,
        "pays_off": bool(meets and faster) if latency else None,
        "thresholds_fp32": previous_thresholds,
        "source_bundle": str(source),
        "source_files": dict(bundle.files),
        "quantize_time_s": round(quantize_s, 1),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    bundle.versions = {**bundle.versions, **_versions()}
    bundle.created_utc = ""
    write_bundle(out, bundle)
    log.info("wrote INT8 bundle %s in %.0f s", out, time.perf_counter() - started)
    return out, bundle


def _versions() -> dict[str, str]:
    import importlib.metadata

    import openvino as ov

    try:
        nncf_version = importlib.metadata.version("nncf")
    except importlib.metadata.PackageNotFoundError:
        nncf_version = "not installed"
    return {"openvino": ov.get_version(), "nncf": nncf_version}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m calibration.quantize",
        description="Quantize an FP32 edge-ad bundle to INT8 with NNCF, calibrated on the run's held-out normal images.",
    )
    parser.add_argument("bundle_dir", type=Path, help="FP32 bundle folder (from python -m deploy.export)")
    parser.add_argument("--out", required=True, type=Path, help="INT8 bundle folder to write (new or empty)")
    parser.add_argument("--data-root", type=Path, default=None, help="MVTec-layout data root (default: the bundle's training data root)")
    parser.add_argument("--category", default=None, help="category (default and only allowed value: the bundle's)")
    parser.add_argument("--run-dir", type=Path, default=None, help="training run folder: take the validation list from its split.json")
    parser.add_argument("--mode", default="ptq", help="ptq (default) or accuracy-control")
    parser.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP, help="accuracy-control: largest allowed drop of FP32 agreement on validation images (default %(default)s)")
    parser.add_argument("--subset-size", type=int, default=None, help="calibrate on the first N validation images (default: all)")
    parser.add_argument("--recipe", default=None, help=f"quantization recipe: {', '.join(RECIPES)} (default {DEFAULT_RECIPE})")
    parser.add_argument("--latency-runs", type=int, default=DEFAULT_LATENCY_RUNS, help="single-frame runs timed per model after warm-up; 0 skips (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite the bundle files in a non-empty --out folder")
    from edge_ad.model.signing import add_sign_key_option

    add_sign_key_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from deploy.ir_eval import IrError
    from edge_ad.model.bundle import BundleError
    from edge_ad.sources.images import ImageReadError
    from training.data import DatasetError

    from calibration.graph import GraphError

    from edge_ad.ops.tool_cli import run_tool
    from edge_ad.model.signing import signing

    args = build_parser().parse_args(argv)
    sign_key = vars(args).pop("sign_key")
    return run_tool(signing(lambda: quantize_bundle(QuantizeConfig(**vars(args)))[0], sign_key),
                    (QuantizeError, GraphError, BundleError, IrError, DatasetError, ImageReadError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
