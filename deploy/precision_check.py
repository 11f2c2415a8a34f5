"""Is the bundle's IR as good in bf16 as in f32? Measured at export and INT8 calibration.

OpenVINO runs FP32 IRs in bf16 on CPUs with AVX512-BF16 or AMX when asked (and by default if
not pinned): about twice the speed, but raw scores move, and the bundle's thresholds were set
on f32 scores. Here the IR compiled with INFERENCE_PRECISION_HINT=bf16 is compared with the same
IR in f32 on the images the INT8 check uses (the test split for AUROC and rank agreement, the
held-out validation images for the deployed threshold's decisions), against the INT8
tolerances. The result goes into bundle.json `precision_checks["bf16"]`; the runtime's
`--inference-precision auto` runs bf16 only when it says `verified` (edge_ad.model.precision).
A CPU without bf16 cannot measure it: the bundle then records "not verified".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import openvino as ov

from deploy.ir_eval import IrRunner, compile_ir, predict_ir
from edge_ad.model.bundle import PrecisionCheck
from edge_ad.model.precision import BF16, cpu_has_bf16
from edge_ad.model.preprocess import PreprocessSpec

log = logging.getLogger("deploy")

# The INT8 targets (calibration.quantize MAX_AUROC_DROP, MIN_SPEARMAN): same bar for bf16.
MAX_AUROC_DROP = 0.01
MIN_SPEARMAN = 0.95


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return None
    value = spearmanr(np.asarray(a, np.float64), np.asarray(b, np.float64)).statistic
    return float(value) if np.isfinite(value) else 0.0


def _delta(f32: dict, other: dict, key: str) -> float | None:
    if f32.get(key) is None or other.get(key) is None:
        return None
    return round(float(other[key]) - float(f32[key]), 6)


def compare(precision: str, cpu: str, threshold: float, f32_test: dict, test: dict,
            f32_test_scores: np.ndarray, test_scores: np.ndarray,
            f32_val_scores: np.ndarray, val_scores: np.ndarray) -> PrecisionCheck:
    """The check from both precisions' test metrics and scores (test and validation images)."""
    f32_test_scores, test_scores = np.asarray(f32_test_scores, np.float64), np.asarray(test_scores, np.float64)
    f32_val_scores, val_scores = np.asarray(f32_val_scores, np.float64), np.asarray(val_scores, np.float64)
    image_delta, pixel_delta = _delta(f32_test, test, "image_auroc"), _delta(f32_test, test, "pixel_auroc")
    rho = _spearman(f32_test_scores, test_scores)
    deviations = np.abs(np.concatenate([test_scores - f32_test_scores, val_scores - f32_val_scores]))
    scale = max(abs(float(threshold)), 1e-30)
    deviation = float(deviations.max()) / scale if len(deviations) else None
    val_deviation = float(np.abs(val_scores - f32_val_scores).max()) / scale if len(val_scores) else None
    # The runtime's decision: raw score >= image threshold (edge_ad.decide.scoring).
    val_agree = bool(np.array_equal(val_scores >= threshold, f32_val_scores >= threshold)) if len(val_scores) else None
    test_agree = float(np.mean((test_scores >= threshold) == (f32_test_scores >= threshold))) if len(test_scores) else None
    failed = []
    if image_delta is None or -image_delta > MAX_AUROC_DROP:
        failed.append(f"image AUROC {'not measured' if image_delta is None else f'{image_delta:+.4f}'}")
    if pixel_delta is not None and -pixel_delta > MAX_AUROC_DROP:
        failed.append(f"pixel AUROC {pixel_delta:+.4f}")
    if rho is None or rho < MIN_SPEARMAN:
        failed.append(f"Spearman {'n/a' if rho is None else f'{rho:.4f}'}")
    if not val_agree:
        failed.append("validation decisions " + ("not measured" if val_agree is None else "differ"))
    pixel_text = "" if pixel_delta is None else f", pixel AUROC {pixel_delta:+.4f}"
    summary = (f"image AUROC {image_delta:+.4f}{pixel_text}, Spearman {rho:.4f}, score deviation up to "
               f"{deviation:.1%} of the threshold ({val_deviation:.1%} on validation images)"
               if image_delta is not None and rho is not None and deviation is not None and val_deviation is not None
               else "")
    reason = (f"bf16 verified on {cpu}: {summary}" if not failed else
              f"bf16 failed on {cpu}: {', '.join(failed)}")
    return PrecisionCheck(
        precision=precision, measured=True, verified=not failed, reason=reason, cpu=cpu,
        image_auroc_delta=image_delta, pixel_auroc_delta=pixel_delta,
        spearman=None if rho is None else round(rho, 6),
        max_score_deviation=None if deviation is None else round(deviation, 6),
        max_validation_deviation=None if val_deviation is None else round(val_deviation, 6),
        validation_decisions_agree=val_agree,
        test_decision_agreement=None if test_agree is None else round(test_agree, 6),
        validation_images=len(val_scores), test_images=len(test_scores),
        tolerances={"max_auroc_drop": MAX_AUROC_DROP, "min_spearman": MIN_SPEARMAN,
                    "validation_decisions": "all agree"},
    )


def not_verified(reason: str, cpu: str = "") -> PrecisionCheck:
    return PrecisionCheck(precision=BF16, measured=False, verified=False, reason=reason, cpu=cpu)


def check_bf16(model: ov.Model | str, test_samples: Sequence, validation_images: np.ndarray, spec: PreprocessSpec,
               threshold: float, has_masks: bool, f32_test, f32_val_scores: np.ndarray,
               core: ov.Core | None = None) -> PrecisionCheck:
    """The IR in bf16 vs its f32 results (`f32_test`: training.predict.Predictions of the test split)."""
    from training.pipeline import test_metrics

    core = core or ov.Core()
    cpu = str(core.get_property("CPU", "FULL_DEVICE_NAME"))
    if not cpu_has_bf16(core):
        log.info("bf16 not verified: this CPU (%s) has no bf16; the runtime will run f32", cpu)
        return not_verified(f"not verified: the exporting CPU ({cpu}) has no bf16", cpu)
    compiled = compile_ir(model, "CPU", {"INFERENCE_PRECISION_HINT": BF16})
    used = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    if used != BF16:
        return not_verified(f"not verified: OpenVINO compiled {used}, not bf16, on {cpu}", cpu)
    runner = IrRunner(compiled)
    test = predict_ir(runner, test_samples, spec, desc="bf16 IR test")
    _, val_scores = runner.infer(validation_images) if len(validation_images) else (None, np.zeros(0, np.float32))
    check = compare(BF16, cpu, threshold, test_metrics(f32_test, threshold, has_masks),
                    test_metrics(test, threshold, has_masks), f32_test.scores, test.scores, f32_val_scores, val_scores)
    (log.info if check.verified else log.warning)("%s", check.reason)
    return check


def validation_images(train_samples: Sequence, fraction: float, seed: int, spec: PreprocessSpec) -> np.ndarray:
    """The run's held-out validation images (training's seeded split), (N,3,H,W) float32."""
    from training.data import AnomalyDataset, split_validation

    _, validation = split_validation(list(train_samples), fraction=fraction, seed=seed)
    dataset = AnomalyDataset(validation, spec, cache=False)
    return np.stack([dataset[i]["image"].numpy() for i in range(len(dataset))]).astype(np.float32)
