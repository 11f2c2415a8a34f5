"""The bundle on OpenVINO: verified, compiled for a device, run through an AsyncInferQueue.

Capture (caller's thread), inference (OpenVINO's threads) and publishing (a
consumer of `results`) overlap. The number of in-flight requests is bounded by
the queue size: a live source that outpaces the model has its new frame dropped
(and counted) instead of building up latency; a file source blocks until a
request is free, so every frame is processed.
"""

from __future__ import annotations

import logging
import math
import queue
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.properties as props
import openvino.properties.hint as hints

from edge_ad.bundle import Bundle, BundleError, read_bundle, safe_member
from edge_ad.errors import InferenceError, UsageError
from edge_ad.preprocess import FrameError, preprocess
from edge_ad.sources import Frame

log = logging.getLogger("edge_ad.inference")

PERFORMANCE_MODES = {"latency": hints.PerformanceMode.LATENCY, "throughput": hints.PerformanceMode.THROUGHPUT}
VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")


@dataclass
class Result:
    """One finished request: raw outputs for one frame, in submission order `seq`."""

    seq: int
    frame: Frame
    anomaly_map: np.ndarray | None  # (H, W) raw, model size
    score: float  # raw
    latency: float  # seconds from submission to completion
    error: str | None = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_device(core: ov.Core, device: str) -> None:
    """Refuse a device OpenVINO does not see, naming the ones it does."""
    available = core.available_devices
    names = [part.split("(")[0].strip() for part in device.replace(":", ",").split(",") if part.strip()]
    for name in names:
        if name.upper() in VIRTUAL_DEVICES:
            continue
        if name not in available and name.split(".")[0] not in {d.split(".")[0] for d in available}:
            raise UsageError(f"OpenVINO device {name!r} is not available on this machine (available: {', '.join(available)})")


def load_model(bundle_dir: str | Path, core: ov.Core) -> tuple[Bundle, ov.Model]:
    """Read and verify the bundle (checksums, schema) and its IR; check the I/O contract."""
    bundle_dir = Path(bundle_dir)
    bundle = read_bundle(bundle_dir)  # BundleError: missing, tampered, unknown schema, names leaving the folder
    check_runtime_fields(bundle)
    try:
        model = core.read_model(safe_member(bundle_dir, bundle.model.xml), safe_member(bundle_dir, bundle.model.bin))
    except RuntimeError as exc:
        raise BundleError(f"cannot read the IR in {bundle_dir}: {_first_line(exc)}") from None
    inputs = {name for port in model.inputs for name in port.get_names()}
    outputs = {name for port in model.outputs for name in port.get_names()}
    if bundle.model.input_name not in inputs:
        raise BundleError(f"model in {bundle_dir} has no input {bundle.model.input_name!r} (has {sorted(inputs)})")
    missing = [name for name in bundle.model.outputs if name not in outputs]
    if missing:
        raise BundleError(f"model in {bundle_dir} lacks outputs {missing} (has {sorted(outputs)})")
    shape = model.input(bundle.model.input_name).get_partial_shape()
    spec = bundle.preprocess
    if shape.is_static and tuple(shape.to_shape())[2:] != (spec.height, spec.width):
        raise BundleError(f"model input shape {shape} does not match the bundle's preprocessing {spec.height}x{spec.width}")
    return bundle, model


def check_runtime_fields(bundle: Bundle) -> None:
    """What the runtime takes from bundle.json must be sane numbers before any frame depends on it."""
    spec = bundle.preprocess
    for name in ("height", "width"):
        value = getattr(spec, name)
        if type(value) is not int or not 1 <= value <= 16384:
            raise BundleError(f"bundle.json preprocess.{name} must be an integer 1..16384, got {value!r}")
    if not isinstance(spec.scale, (int, float)) or not math.isfinite(spec.scale) or spec.scale <= 0:
        raise BundleError(f"bundle.json preprocess.scale must be a positive number, got {spec.scale!r}")
    if spec.color not in ("RGB", "BGR"):
        raise BundleError(f"bundle.json preprocess.color must be RGB or BGR, got {spec.color!r}")
    thresholds = bundle.thresholds
    for name in ("image", "pixel", "image_min", "image_max", "pixel_min", "pixel_max"):
        value = getattr(thresholds, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BundleError(f"bundle.json thresholds.{name} must be a finite number, got {value!r}")


def compile_model(core: ov.Core, model: ov.Model, device: str, mode: str) -> ov.CompiledModel:
    """Compile with the performance hint for `mode` ("latency" | "throughput")."""
    check_device(core, device)
    try:
        return core.compile_model(model, device, {hints.performance_mode: PERFORMANCE_MODES[mode]})
    except RuntimeError as exc:
        raise InferenceError(f"OpenVINO cannot compile the model for {device}: {_first_line(exc)}") from None


class Detector:
    """A compiled bundle plus an AsyncInferQueue; finished results land in `results`."""

    def __init__(self, bundle_dir: str | Path, device: str = "CPU", mode: str = "latency", requests: int = 0,
                 result_queue_size: int = 64):
        self.core = ov.Core()
        self.bundle, model = load_model(bundle_dir, self.core)
        self.device, self.mode = device, mode
        self.compiled = compile_model(self.core, model, device, mode)
        optimal = int(self.compiled.get_property(props.optimal_number_of_infer_requests))
        self.requests = requests or max(1, optimal)
        self.queue = ov.AsyncInferQueue(self.compiled, self.requests)
        self.queue.set_callback(self._on_done)
        self._input = self.bundle.model.input_name
        self._map_port = self.compiled.output(self.bundle.model.outputs[0])
        self._score_port = self.compiled.output(self.bundle.model.outputs[1])
        self.results: queue.Queue[Result | None] = queue.Queue(maxsize=max(result_queue_size, 2 * self.requests))
        self._seq = 0
        self.submitted = 0
        self.dropped = 0
        self.failed = 0

    @property
    def spec(self):
        return self.bundle.preprocess

    def prepare(self, frame: Frame) -> np.ndarray:
        """The model input (1x3xHxW float32) for a frame; FrameError for a frame that cannot be one."""
        return preprocess(frame.image, self.spec)[None]

    def submit(self, frame: Frame, block: bool) -> bool:
        """Start inference on a frame; without `block`, drop it when every request is busy.

        An unusable frame (odd shape or dtype, empty) is skipped and counted in
        `failed`, with a warning for the first few and then every 100th.
        """
        if not block and not self.queue.is_ready():
            self.dropped += 1
            return False
        try:
            tensor = self.prepare(frame)
        except FrameError as exc:
            self.failed += 1
            if self.failed <= 5 or self.failed % 100 == 0:
                log.warning("skipping frame %d (%d unusable so far): %s", frame.index, self.failed, exc)
            return False
        job = (self._seq, frame, tensor, time.monotonic())
        self._seq += 1
        # share_inputs: zero-copy; `tensor` stays referenced by `job` until the callback runs.
        self.queue.start_async({self._input: tensor}, userdata=job, share_inputs=True)
        self.submitted += 1
        return True

    def _on_done(self, request: ov.InferRequest, job) -> None:
        seq, frame, _tensor, started = job
        latency = time.monotonic() - started
        try:
            amap = np.array(request.get_tensor(self._map_port).data, dtype=np.float32, copy=True)
            score = float(np.asarray(request.get_tensor(self._score_port).data).reshape(-1)[0])
            result = Result(seq, frame, amap.reshape(amap.shape[-2:]), score, latency)
        except Exception as exc:  # keep the sequence complete so the consumer never waits forever
            result = Result(seq, frame, None, float("nan"), latency, error=_first_line(exc))
        self.results.put(result)

    def drain(self) -> None:
        """Wait for every in-flight request to finish (their results are queued)."""
        self.queue.wait_all()
