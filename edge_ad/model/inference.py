"""The bundle on OpenVINO: verified, compiled for a device, run through an AsyncInferQueue.

Capture (caller's thread), inference (OpenVINO's threads) and publishing (a
consumer of `results`) overlap. The number of in-flight requests is bounded by
the queue size: a live source that outpaces the model has its new frame dropped
(and counted) instead of building up latency; a file source blocks until a
request is free, so every frame is processed.

The compiled model takes the resized frame as it is, uint8 NHWC BGR: colour
order, float conversion, scaling and layout are prepended to the graph with
OpenVINO's PrePostProcessor, so the host only resizes (`resize_for_model`)
and the rest runs on the inference threads, fused with the first layer.
On CPU, inference precision is f32 unless the bundle verified bf16 and the CPU has
it (`auto`, edge_ad.model.precision): on CPUs with bf16 (AMX, AVX512-BF16) OpenVINO
would otherwise run FP32 IRs in bf16 unchecked, and field scores would no longer
match the bundle's measured FP32 metrics and thresholds.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import openvino as ov
import openvino.properties as props
import openvino.properties.hint as hints
from openvino.preprocess import ColorFormat, PrePostProcessor

from edge_ad.model.bundle import Bundle, BundleError, read_bundle, safe_member
from edge_ad.errors import InferenceError, UsageError
from edge_ad.model.precision import choose_precision
from edge_ad.model.preprocess import FITS, FrameError, PreprocessSpec, frame_aligned_map, preprocess, resize_for_model
from edge_ad.sources.capture import Frame

log = logging.getLogger("edge_ad.inference")

PERFORMANCE_MODES = {"latency": hints.PerformanceMode.LATENCY, "throughput": hints.PerformanceMode.THROUGHPUT}
VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")
PRECISIONS = ("auto", "f32", "bf16", "f16")  # INFERENCE_PRECISION_HINT; for compile_options auto = OpenVINO's choice
_PRECISION_TYPES = {"f32": ov.Type.f32, "bf16": ov.Type.bf16, "f16": ov.Type.f16}


@dataclass
class Result:
    """One finished request: raw outputs for one frame, in submission order `seq`."""

    seq: int
    frame: Frame
    anomaly_map: np.ndarray | None  # (H, W) raw, model size; letterbox/crop: aligned to the frame (frame_aligned_map)
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
    if spec.fit not in FITS:
        raise BundleError(f"bundle.json preprocess.fit must be one of {', '.join(FITS)}, got {spec.fit!r}")
    thresholds = bundle.thresholds
    for name in ("image", "pixel", "image_min", "image_max", "pixel_min", "pixel_max"):
        value = getattr(thresholds, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BundleError(f"bundle.json thresholds.{name} must be a finite number, got {value!r}")


def default_precision(device: str) -> str:
    """f32 on CPU (bf16-capable CPUs would otherwise silently run FP32 IRs in bf16); the device's choice elsewhere."""
    return "f32" if device.split(".")[0].strip().upper() == "CPU" else "auto"


def compile_options(device: str, mode: str, precision: str | None = None) -> dict:
    """The compile configuration: performance hint for `mode`, inference precision (None = default_precision)."""
    precision = precision or default_precision(device)
    if precision not in PRECISIONS:
        raise UsageError(f"inference precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    options = {hints.performance_mode: PERFORMANCE_MODES[mode]}
    if precision != "auto":
        options[hints.inference_precision] = _PRECISION_TYPES[precision]
    return options


def compile_model(core: ov.Core, model: ov.Model, device: str, mode: str,
                  precision: str | None = None) -> ov.CompiledModel:
    """Compile with the performance hint for `mode` ("latency" | "throughput") and the inference precision."""
    check_device(core, device)
    try:
        return core.compile_model(model, device, compile_options(device, mode, precision))
    except RuntimeError as exc:
        raise InferenceError(f"OpenVINO cannot compile the model for {device}: {_first_line(exc)}") from None


def with_uint8_input(model: ov.Model, spec: PreprocessSpec, input_name: str) -> ov.Model:
    """The model with `spec`'s pixel conversion in front: input 1xHxWx3 uint8 BGR (a resized frame as is).

    Same arithmetic as `edge_ad.model.preprocess.preprocess` after its resize: uint8 -> f32,
    BGR -> RGB when the bundle wants RGB, times the float32 scale, NHWC -> NCHW.
    """
    ppp = PrePostProcessor(model)
    port = ppp.input(input_name)
    port.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_color_format(ColorFormat.BGR)
    port.model().set_layout(ov.Layout("NCHW"))
    # Transpose and swap channels while the data is still uint8 (a quarter of the bytes): about 0.4 ms less
    # per 256x256 frame than converting to float first, which matters for very fast models.
    steps = port.preprocess().convert_layout(ov.Layout("NCHW"))
    if spec.color == "RGB":
        steps.convert_color(ColorFormat.RGB)
    steps.convert_element_type(ov.Type.f32)
    scale = ov.op.Constant(np.array(spec.scale, dtype=np.float32))
    steps.custom(lambda node: ov.opset13.multiply(node, scale).output(0))  # x * float32(scale), as preprocess() does
    element = model.input(input_name).get_element_type()
    if element != ov.Type.f32:
        steps.convert_element_type(element)
    return ppp.build()


@dataclass
class CompiledBundle:
    """A bundle's model compiled the way the runtime runs it (also what `edge-ad bench` measures)."""

    bundle: Bundle
    compiled: ov.CompiledModel
    prepare: Callable[[np.ndarray, PreprocessSpec], np.ndarray]  # frame -> one model input, without batch axis
    host_input: str  # what the host hands the model, for logs and reports
    optimal_requests: int
    precision: str  # the compiled model's INFERENCE_PRECISION_HINT
    streams: int | None
    precision_reason: str = ""  # why that precision (edge_ad.model.precision.choose_precision)

    def example_input(self, seed: int = 0) -> np.ndarray:
        """A random input of the right type and shape (batch of one), for warm-up and benchmarks."""
        spec = self.bundle.preprocess
        frame = np.random.default_rng(seed).integers(0, 256, (spec.height, spec.width, 3), dtype=np.uint8)
        return self.prepare(frame, spec)[None]


def compile_bundle(bundle_dir: str | Path, device: str = "CPU", mode: str = "latency", precision: str | None = None,
                   core: ov.Core | None = None) -> CompiledBundle:
    """Read, verify and compile a bundle with uint8 input; falls back to host preprocessing if the IR refuses it."""
    core = core or ov.Core()
    bundle, model = load_model(bundle_dir, core)
    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"inference precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    precision, reason = choose_precision(precision, device, bundle, core)
    spec = bundle.preprocess
    prepare, host_input = resize_for_model, "uint8 NHWC BGR (pixel conversion in the model)"
    try:
        model = with_uint8_input(model, spec, bundle.model.input_name)
    except (RuntimeError, ValueError) as exc:
        log.warning("cannot move the pixel conversion into the model (%s); preprocessing on the host", _first_line(exc))
        prepare, host_input = preprocess, "float32 NCHW (host preprocessing)"
    compiled = compile_model(core, model, device, mode, precision)
    optimal = max(1, int(compiled.get_property(props.optimal_number_of_infer_requests)))
    try:
        used = compiled.get_property(hints.inference_precision).get_type_name()
    except RuntimeError:  # devices without the property
        used = precision or default_precision(device)
    try:
        streams = int(compiled.get_property(props.num_streams))
    except (RuntimeError, TypeError, ValueError):
        streams = None
    log.info("inference precision %s: %s", used, reason)
    return CompiledBundle(bundle, compiled, prepare, host_input, optimal, used, streams, reason)


class Detector:
    """A compiled bundle plus an AsyncInferQueue; finished results land in `results`.

    `submit` prepares and starts one frame in the caller's thread. The pipeline
    splits the two (`prepare` on its preprocessing threads, then `start` in frame
    order) so that decoding the next frame overlaps resizing this one.
    """

    def __init__(self, bundle_dir: str | Path | None, device: str = "CPU", mode: str = "latency", requests: int = 0,
                 result_queue_size: int = 64, precision: str | None = None, built: CompiledBundle | None = None,
                 infer_queue=None):
        """`built`: a model compiled already (cameras of one process share it, each with its own results, so its
        frames stay in order); bundle_dir and precision are then not used. `infer_queue`: a camera's view of a
        queue shared with the other cameras (edge_ad.model.shared_queue) instead of a queue of its own."""
        self.core = ov.Core() if built is None else None
        self.device, self.mode = device, mode
        built = built or compile_bundle(bundle_dir, device, mode, precision, self.core)
        self.bundle, self.compiled = built.bundle, built.compiled
        self._prepare_image = built.prepare
        self.host_input, self.precision, self.streams = built.host_input, built.precision, built.streams
        self.precision_reason = built.precision_reason
        self.optimal_requests = built.optimal_requests
        self.requests = requests or built.optimal_requests
        self.queue = infer_queue if infer_queue is not None else ov.AsyncInferQueue(self.compiled, self.requests)
        self.queue.set_callback(self._on_done)
        self._input = self.bundle.model.input_name
        self._map_port = self.compiled.output(self.bundle.model.outputs[0])
        self._score_port = self.compiled.output(self.bundle.model.outputs[1])
        self.results: queue.Queue[Result | None] = queue.Queue(maxsize=max(result_queue_size, 2 * self.requests))
        if hasattr(self.queue, "deliver_to"):  # a shared queue's callbacks must not block on a full `results`
            self.queue.deliver_to(self.results)
        self._seq = 0
        self._lock = threading.Lock()
        self._in_flight = 0  # started, callback not yet finished
        self.submitted = 0
        self.dropped = 0
        self.failed = 0

    @property
    def spec(self):
        return self.bundle.preprocess

    @property
    def next_seq(self) -> int:
        """The sequence number the next started frame gets (results come back with theirs)."""
        return self._seq

    @property
    def in_flight(self) -> int:
        """Requests started whose results are not yet queued."""
        with self._lock:
            return self._in_flight

    def prepare(self, frame: Frame) -> np.ndarray:
        """The model input (batch of one) for a frame; FrameError for a frame that cannot be one.

        Normally the resized frame, 1xHxWx3 uint8 BGR; the compiled model does the rest.
        Thread-safe: OpenCV releases the GIL, so several frames can be prepared at once.
        """
        return self._prepare_image(frame.image, self.spec)[None]

    def try_prepare(self, frame: Frame) -> np.ndarray | None:
        """`prepare`, with an unusable frame (odd shape or dtype, empty) counted in `failed` and logged
        (the first few, then every 100th) instead of raised."""
        try:
            return self.prepare(frame)
        except FrameError as exc:
            with self._lock:
                self.failed += 1
                failed = self.failed
            if failed <= 5 or failed % 100 == 0:
                log.warning("skipping frame %d (%d unusable so far): %s", frame.index, failed, exc)
            return None

    def drop(self) -> None:
        with self._lock:
            self.dropped += 1

    def start(self, frame: Frame, tensor: np.ndarray) -> bool:
        """Start inference on a prepared input; blocks while every request is busy.

        Frames must be started in order by one thread at a time: the sequence number
        the consumer reorders results by is taken here. If OpenVINO refuses the
        request, an error result takes its place (the consumer counts and logs it;
        a missing number would stall the in-order consumer) and False is returned.
        """
        with self._lock:
            job = (self._seq, frame, tensor, time.monotonic())
            self._seq += 1
            self._in_flight += 1
        try:
            # share_inputs: zero-copy; `tensor` stays referenced by `job` until the callback runs.
            self.queue.start_async({self._input: tensor}, userdata=job, share_inputs=True)
        except Exception as exc:  # noqa: BLE001
            self._finish(Result(job[0], frame, None, float("nan"), 0.0, error=_first_line(exc)))
            return False
        with self._lock:
            self.submitted += 1
        return True

    def _on_done(self, request: ov.InferRequest, job) -> None:
        seq, frame, _tensor, started = job
        latency = time.monotonic() - started
        try:
            amap = np.array(request.get_tensor(self._map_port).data, dtype=np.float32, copy=True)
            score = float(np.asarray(request.get_tensor(self._score_port).data).reshape(-1)[0])
            amap = amap.reshape(amap.shape[-2:])
            spec = self.bundle.preprocess
            if spec.fit != "stretch":  # letterbox/crop: from here on the map's grid covers exactly the frame
                amap = frame_aligned_map(amap, frame.image.shape[0], frame.image.shape[1], spec)
            result = Result(seq, frame, amap, score, latency)
        except Exception as exc:  # keep the sequence complete so the consumer never waits forever
            result = Result(seq, frame, None, float("nan"), latency, error=_first_line(exc))
        self._finish(result)

    def _finish(self, result: Result) -> None:
        """Queue a result (blocks while the consumer is behind: that keeps the request busy, so
        live sources drop frames instead of piling them up), then free its slot."""
        try:
            self.results.put(result)
        finally:
            with self._lock:
                self._in_flight -= 1

    def drain(self) -> None:
        """Wait for every in-flight request to finish (their results are queued)."""
        self.queue.wait_all()
