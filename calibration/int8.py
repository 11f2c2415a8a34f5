"""INT8 recipes for edge-ad IRs: NNCF post-training quantization, accuracy control against the
FP32 model on normal images, and the latency check that decides whether INT8 pays off.

Why this is not a one-liner: an anomaly map is a small difference of features (STFPM: teacher
minus student; DFM: features minus their PCA reconstruction). What was measured on MVTec bottle
(calibration/README_SECTION.md has the table):
- Quantizers inside the map head (normalize, distance, upsample, product) destroy the signal:
  the head stays FP32 (found from the graph's topology, calibration.graph).
- Most of the remaining loss was not rounding noise but int16 saturation in the CPU's INT8
  kernels: without VNNI, oneDNN multiplies u8 activations by s8 weights with vpmaddubsw, which
  saturates the sum of two products at 32767. The same quantized model emulated in FP32
  arithmetic is as accurate as FP32; NNCF's OverflowFix.ENABLE (weights on a 7-bit grid, so
  2 x 255 x 64 < 32767) makes the real kernels agree with the emulation, on any x86 CPU.
- Input-side noise is amplified by every later layer (DFM's PCA residual sums it over 28k
  features): keeping the first convolution FP32 and full BiasCorrection remove most of it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import openvino as ov

from calibration.graph import split_graph

log = logging.getLogger("calibration")

PRESETS = ("performance", "mixed")
MODES = ("ptq", "accuracy-control")


class QuantizeError(RuntimeError):
    """Inputs or settings that cannot give an INT8 model; the message says why."""


@dataclass(frozen=True)
class Recipe:
    """One way to quantize an edge-ad IR. Every field is recorded in bundle.json's calibration."""

    name: str
    summary: str
    preset: str = "mixed"  # "performance": symmetric activations; "mixed": asymmetric activations
    keep_head_fp32: bool = True  # everything after the last convolution (see calibration.graph)
    tap_conv_depth: int = 0  # also keep the last N convolutions before each feature tap FP32
    keep_first_conv_fp32: bool = False
    fast_bias_correction: bool = True  # False: NNCF's full BiasCorrection (slower, layer-by-layer)
    overflow_fix: str | None = None  # None: NNCF's default ("first_layer_only"); "disable"; "enable"
    activations_range: str | None = None  # None: NNCF default; a RangeEstimatorParametersSet name
    weights_only: bool = False  # nncf.compress_weights INT8 (activations stay FP32) instead
    compress_head_matmuls: bool = False  # PCA MatMuls (DFM, STFPM's subspace term): INT8 weights, FP32 activations

    def settings(self) -> dict:
        return asdict(self)


# The steps measured on MVTec bottle (README_SECTION.md), in the order they were tried.
# "recommended" is the CLI default: every step that measurably helped, nothing that did not.
RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe("plain", "nncf.quantize of the whole graph, NNCF defaults (PERFORMANCE preset)",
               preset="performance", keep_head_fp32=False),
        Recipe("head-fp32", "anomaly head kept FP32 (IgnoredScope), PERFORMANCE preset", preset="performance"),
        Recipe("head-fp32-mixed", "anomaly head FP32, MIXED preset (asymmetric activations)"),
        Recipe("head-fp32-mixed-w7", "+ OverflowFix.ENABLE: every weight on a 7-bit grid, so u8 x s8 pair sums "
               "cannot saturate int16 on CPUs without VNNI", overflow_fix="enable"),
        Recipe("head-fp32-mixed-w7-bc", "7-bit weights + full BiasCorrection, first convolution quantized "
               "(the step a validation-only choice takes, see README_SECTION.md)",
               overflow_fix="enable", fast_bias_correction=False),
        Recipe("head-fp32-mixed-w7-first", "+ first convolution(s) kept FP32 (input quantization noise)",
               overflow_fix="enable", keep_first_conv_fp32=True),
        Recipe("head-fp32-mixed-w7-first-bc", "+ full BiasCorrection (fast_bias_correction=False)",
               overflow_fix="enable", keep_first_conv_fp32=True, fast_bias_correction=False),
        Recipe("recommended", "anomaly head and first convolution FP32, MIXED preset, 7-bit weights "
               "(OverflowFix.ENABLE), full BiasCorrection; head MatMul weights (the PCA) INT8 weight-only",
               overflow_fix="enable", keep_first_conv_fp32=True, fast_bias_correction=False, compress_head_matmuls=True),
        Recipe("recommended-w8", "'recommended' with 8-bit weights (OverflowFix.DISABLE): full weight resolution, "
               "only for CPUs whose INT8 kernels do not saturate int16 (VNNI, AMX)",
               overflow_fix="disable", keep_first_conv_fp32=True, fast_bias_correction=False, compress_head_matmuls=True),
        Recipe("weights-only", "nncf.compress_weights INT8_ASYM: weights INT8, activations FP32 (size, not speed)",
               weights_only=True),
    )
}
DEFAULT_RECIPE = "recommended"


def ignored_scope(model: ov.Model, recipe: Recipe) -> tuple[object | None, dict]:
    """The nncf.IgnoredScope for a recipe, and a JSON description of what it keeps FP32."""
    import nncf

    parts = split_graph(model, tap_conv_depth=max(recipe.tap_conv_depth, 1))
    names: list[str] = []
    if recipe.keep_head_fp32:
        names += parts.head
    kept_convs = [name for level in parts.tap_convs[: recipe.tap_conv_depth] for name in level]
    names += kept_convs
    if recipe.keep_first_conv_fp32:
        names += parts.first_convs
    names = sorted(set(names))
    described = {
        "head_nodes": len(parts.head) if recipe.keep_head_fp32 else 0,
        "fp32_convolutions": sorted(set(kept_convs + (parts.first_convs if recipe.keep_first_conv_fp32 else []))),
        "total_convolutions": parts.convolutions,
        "taps": parts.taps,
        "head": parts.head,
        "names": names,
    }
    if not names:
        return None, described
    # validate=False: head nodes NNCF would not quantize anyway (Reshape, ShapeOf...) are not errors.
    return nncf.IgnoredScope(names=names, validate=False), described


class _DropIgnoredNodeLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Not adding activation input quantizer")


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF logs one INFO line per ignored node (dozens): drop those, keep its other lines."""
    import nncf

    logger = logging.getLogger(nncf.nncf_logger.name)
    dropper = _DropIgnoredNodeLines()
    logger.addFilter(dropper)
    try:
        yield
    finally:
        logger.removeFilter(dropper)


def compress_head_matmuls(model: ov.Model, head: list[str]) -> tuple[ov.Model, list[str]]:
    """INT8 weight-only compression of the head's MatMuls (the PCA projection and reconstruction of DFM and of
    STFPM's subspace term).

    Those matmuls read ~18 MB of FP32 components per frame each: memory-bound, so INT8 weights
    with FP32 activations cut their time without putting quantizers into the small residual
    (measured on bottle: agreement with FP32 1.00000 for this step alone). No-op without MatMuls.
    """
    import nncf

    head_names = set(head)
    matmuls = [op.get_friendly_name() for op in model.get_ordered_ops()
               if op.get_type_name() == "MatMul" and op.get_friendly_name() in head_names and _is_feature_product(op)]
    if not matmuls:
        return model, []
    others = [
        op.get_friendly_name() for op in model.get_ordered_ops()
        if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul") and op.get_friendly_name() not in matmuls
    ]
    with _quiet_nncf():
        compressed = nncf.compress_weights(
            model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=nncf.IgnoredScope(names=others, validate=False)
        )
    return compressed, matmuls


def _is_feature_product(matmul: ov.Node) -> bool:
    """A PCA product multiplies flattened (N, D) features; the map's bilinear resize
    (training.models.upsample) multiplies (N, 1, h, w) maps by small interpolation matrices, which
    INT8 weights would only blur, and STFPM's memory term (training.models.patch_memory) multiplies
    (N, hw, C) patches by the memory, where INT8 weights would shift the small nearest distances: rank > 2,
    so those stay FP32."""
    return all(port.get_partial_shape().rank.is_static and port.get_partial_shape().rank.get_length() <= 2
               for port in matmul.inputs())


def _advanced(recipe: Recipe):
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    kwargs = {}
    if recipe.overflow_fix is not None:
        kwargs["overflow_fix"] = OverflowFix(recipe.overflow_fix)
    if recipe.activations_range is not None:
        try:
            kwargs["activations_range_estimator_params"] = getattr(RangeEstimatorParametersSet, recipe.activations_range.upper())
        except AttributeError as exc:
            raise QuantizeError(f"unknown activations range estimator {recipe.activations_range!r}") from exc
    return AdvancedQuantizationParameters(**kwargs)


def _common_kwargs(model: ov.Model, recipe: Recipe, subset_size: int) -> tuple[dict, dict]:
    import nncf

    if recipe.preset not in PRESETS:
        raise QuantizeError(f"preset must be one of {', '.join(PRESETS)}, got {recipe.preset!r}")
    scope, described = ignored_scope(model, recipe)
    kwargs = dict(
        preset=nncf.QuantizationPreset(recipe.preset),
        target_device=nncf.TargetDevice.CPU,
        subset_size=subset_size,
        fast_bias_correction=recipe.fast_bias_correction,
        ignored_scope=scope,
    )
    return kwargs, described


def _check_images(images: np.ndarray, model: ov.Model) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or len(images) == 0:
        raise QuantizeError(f"calibration images must be a non-empty (N,3,H,W) array, got shape {images.shape}")
    shape = model.inputs[0].get_partial_shape()
    if shape.rank.is_static and shape.rank.get_length() == 4 and shape[2].is_static and shape[3].is_static:
        expected = (shape[2].get_length(), shape[3].get_length())
        if tuple(images.shape[2:]) != expected:
            raise QuantizeError(f"the IR takes {expected[1]}x{expected[0]} images, calibration images are {images.shape[3]}x{images.shape[2]}")


def quantize_ptq(model: ov.Model, images: np.ndarray, recipe: Recipe, subset_size: int | None = None) -> tuple[ov.Model, dict]:
    """nncf.quantize (or compress_weights) of an FP32 ov.Model on calibration images (N,3,H,W)."""
    import nncf

    _check_images(images, model)
    subset = len(images) if subset_size is None else min(int(subset_size), len(images))
    items = [np.ascontiguousarray(image[None], dtype=np.float32) for image in images]
    if recipe.weights_only:
        scope, described = ignored_scope(model, recipe)
        with _quiet_nncf():
            quantized = nncf.compress_weights(model.clone(), mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=scope)
        return quantized, described
    kwargs, described = _common_kwargs(model, recipe, subset)
    log.info("%d nodes kept FP32 (%d head nodes, %d convolutions), calibrating on %d images",
             len(described["names"]), described["head_nodes"], len(described["fp32_convolutions"]), subset)
    with _quiet_nncf():
        quantized = nncf.quantize(model.clone(), nncf.Dataset(items), advanced_parameters=_advanced(recipe), **kwargs)
    return _finish(quantized, recipe, described)


def _finish(quantized: ov.Model, recipe: Recipe, described: dict) -> tuple[ov.Model, dict]:
    described["int8_weight_only"] = []
    if recipe.compress_head_matmuls:
        quantized, described["int8_weight_only"] = compress_head_matmuls(quantized, described["head"])
    return quantized, described


# --- agreement with the FP32 model on normal images ---------------------------------------------


@dataclass
class Fp32Reference:
    """FP32 IR outputs on the validation (normal) images: the yardstick of accuracy control.

    The validation split has no anomalies, so no AUROC can be computed on it. What normal
    images can measure is how faithfully the INT8 model reproduces the FP32 model:
    per image, agreement = 1 - (NMSE(map) + NMSE(score)) / 2, with the usual normalized MSE
    NMSE(x) = mean((x_int8 - x_fp32)^2) / mean(x_fp32^2). 1 means identical outputs, 0 means
    the INT8 error carries as much power as the FP32 output itself. It is computed per image
    (NNCF's accuracy control evaluates single images when ranking quantizers) and averaged.
    On MVTec bottle the recommended recipe scores 0.96-0.98, weights-only INT8 0.97-0.99, and
    the recipes that lose test AUROC score below 0 (see README_SECTION.md).
    """

    maps: np.ndarray  # (N, H, W)
    scores: np.ndarray  # (N,)

    @classmethod
    def from_outputs(cls, maps: np.ndarray, scores: np.ndarray) -> "Fp32Reference":
        return cls(maps=np.asarray(maps, dtype=np.float64), scores=np.asarray(scores, dtype=np.float64))

    def agreement(self, index: int, amap: np.ndarray, score: float) -> float:
        reference = self.maps[index]
        error = np.asarray(amap, np.float64).reshape(reference.shape) - reference
        map_nmse = float(np.mean(error**2)) / max(float(np.mean(reference**2)), 1e-30)
        ref_score = float(self.scores[index])
        score_nmse = (float(score) - ref_score) ** 2 / max(ref_score**2, 1e-30)
        return 1.0 - 0.5 * (map_nmse + score_nmse)

    def agreement_all(self, maps: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return np.array([self.agreement(i, maps[i], scores[i]) for i in range(len(self.scores))])


def infer_all(compiled: ov.CompiledModel, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,3,H,W) -> maps (N,H,W), scores (N,), one image per request (the IR's static batch 1)."""
    request = compiled.create_infer_request()
    maps, scores = [], []
    for image in images:
        out = request.infer({0: np.ascontiguousarray(image[None], dtype=np.float32)})
        maps.append(np.array(out[compiled.output(0)], dtype=np.float32).reshape(image.shape[-2:]))
        scores.append(float(np.array(out[compiled.output(1)]).reshape(-1)[0]))
    return np.stack(maps), np.asarray(scores, dtype=np.float32)


def quantize_accuracy_control(
    model: ov.Model,
    images: np.ndarray,
    recipe: Recipe,
    reference: Fp32Reference,
    max_drop: float,
    subset_size: int | None = None,
    max_iterations: int = 30,
) -> tuple[ov.Model, dict]:
    """nncf.quantize_with_accuracy_control with the FP32-agreement metric (see Fp32Reference).

    NNCF quantizes with the recipe, and while the mean agreement on the validation images is
    more than max_drop below the FP32 model's (1.0), it ranks the quantizer groups by how much
    reverting each one restores agreement and reverts the worst to FP32, one at a time.
    """
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    if recipe.weights_only:
        raise QuantizeError("accuracy control needs a full quantization recipe, not weights-only")
    if not 0.0 < max_drop < 1.0:
        raise QuantizeError(f"--max-drop must be in (0, 1), got {max_drop}")
    _check_images(images, model)
    if len(reference.scores) != len(images):
        raise QuantizeError("the FP32 reference does not match the validation images")
    subset = len(images) if subset_size is None else min(int(subset_size), len(images))
    items = [(index, np.ascontiguousarray(image[None], dtype=np.float32)) for index, image in enumerate(images)]

    def validate(compiled: ov.CompiledModel, data: Sequence[tuple[int, np.ndarray]]) -> tuple[float, list[float]]:
        request = compiled.create_infer_request()
        values = []
        for index, image in data:
            out = request.infer({0: image})
            values.append(reference.agreement(index, out[compiled.output(0)], np.array(out[compiled.output(1)]).reshape(-1)[0]))
        return float(np.mean(values)), values

    kwargs, described = _common_kwargs(model, recipe, subset)
    calibration = nncf.Dataset(items, lambda item: item[1])
    log.info("%d nodes kept FP32 (%d head nodes, %d convolutions); accuracy control: max agreement drop %.3g on %d images",
             len(described["names"]), described["head_nodes"], len(described["fp32_convolutions"]), max_drop, len(items))
    with _quiet_nncf():
        quantized = nncf.quantize_with_accuracy_control(
            model.clone(),
            calibration_dataset=calibration,
            validation_dataset=nncf.Dataset(items),
            validation_fn=validate,
            max_drop=max_drop,
            drop_type=nncf.DropType.ABSOLUTE,
            advanced_quantization_parameters=_advanced(recipe),
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(max_num_iterations=max_iterations),
            **kwargs,
        )
    return quantized, described


def count_fake_quantize(model: ov.Model) -> int:
    """Number of FakeQuantize nodes: zero means nothing runs in INT8."""
    return sum(1 for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize")


# --- latency ----------------------------------------------------------------------------------


@dataclass
class Latency:
    median_ms: float
    p90_ms: float
    runs: int
    warmup: int
    config: dict = field(default_factory=dict)


def measure_latency(
    models: dict[str, ov.Model],
    shape: tuple[int, ...],
    runs: int = 100,
    warmup: int = 10,
    rounds: int = 10,
    config: dict | None = None,
) -> dict[str, Latency]:
    """Single-frame latency (one synchronous request, batch 1) of each model on CPU.

    Models are timed in interleaved rounds (A, B, A, B, ...) so that load from other
    processes on the machine hits every model alike; the median is taken over all runs.
    """
    if runs < 1 or warmup < 0 or rounds < 1:
        raise QuantizeError("latency runs must be >= 1, warm-up >= 0")
    config = dict(config if config is not None else {"PERFORMANCE_HINT": "LATENCY"})
    core = ov.Core()
    frame = np.random.default_rng(0).random(shape, dtype=np.float32)
    requests = {}
    for name, model in models.items():
        request = core.compile_model(model, "CPU", config).create_infer_request()
        for _ in range(warmup):
            request.infer({0: frame})
        requests[name] = request
    timings: dict[str, list[float]] = {name: [] for name in models}
    per_round = max(1, -(-runs // rounds))
    for _ in range(rounds):
        for name, request in requests.items():
            for _ in range(per_round):
                started = time.perf_counter()
                request.infer({0: frame})
                timings[name].append((time.perf_counter() - started) * 1000.0)
    return {
        name: Latency(
            median_ms=round(float(np.median(t)), 3),
            p90_ms=round(float(np.percentile(t, 90)), 3),
            runs=len(t),
            warmup=warmup,
            config=config,
        )
        for name, t in timings.items()
    }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two score vectors (ties averaged)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if len(a) != len(b) or len(a) < 3:
        raise QuantizeError("Spearman correlation needs two score vectors of equal length >= 3")
    value = spearmanr(a, b).statistic
    return float(value) if np.isfinite(value) else 0.0
