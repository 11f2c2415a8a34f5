"""A Detector whose compiled model can be replaced while frames flow, at a frame boundary, losing none.

The switch happens where frames start, in frame order (`start`, one thread at a
time): every frame started before it runs on the old model, every frame after
on the new one, and results keep their sequence numbers, so the in-order
consumer sees one clean boundary. Each result carries the model that produced
it (`result.model`), so the decision thread can switch thresholds exactly at
the first result of the new model (`edge_ad.ops.control`). The old model keeps
its own request queue until its in-flight frames are done, then is released.
A frame prepared for the old model's input but started after the switch is
prepared again when the two inputs differ (another size), so nothing is lost.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import openvino as ov

from edge_ad.model.inference import CompiledBundle, Detector, Result, _first_line
from edge_ad.model.shared_queue import QueueView, SharedInferQueue
from edge_ad.sources.capture import Frame

try:  # letterbox/crop bundles: the map is aligned to the frame, as Detector does
    from edge_ad.model.preprocess import frame_aligned_map
except ImportError:  # pragma: no cover
    frame_aligned_map = None


@dataclass(eq=False)
class LoadedModel:
    """One compiled bundle with its own request queue; `generation` counts swaps (0 = the start-up model)."""

    built: CompiledBundle
    folder: Path
    queue: ov.AsyncInferQueue
    generation: int
    in_flight: int = 0
    map_port: object = None
    score_port: object = None
    idle: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        model = self.built.bundle.model
        self.map_port = self.built.compiled.output(model.outputs[0])
        self.score_port = self.built.compiled.output(model.outputs[1])
        self.idle.set()

    @property
    def input_contract(self) -> tuple:
        """What the host hands the model: tensors prepared for one contract fit any model with the same one."""
        return self.built.host_input, self.built.bundle.preprocess, self.built.bundle.model.input_name


@dataclass
class Prepared:
    """A frame's model input and the model it was prepared for (what `try_prepare` hands to `start`)."""

    model: LoadedModel
    tensor: object


@dataclass
class ModelResult(Result):
    model: LoadedModel | None = None


class SwappableDetector(Detector):
    """`Detector` plus `swap(compiled_bundle)`; same interface for the pipeline and `edge-ad bench`."""

    def __init__(self, bundle_dir: str | Path, *args, **kwargs):
        super().__init__(bundle_dir, *args, **kwargs)
        built = CompiledBundle(self.bundle, self.compiled, self._prepare_image, self.host_input,
                               self.optimal_requests, self.precision, self.streams)
        if hasattr(self, "precision_reason"):
            built.precision_reason = self.precision_reason
        self.current = LoadedModel(built, Path(bundle_dir), self.queue, 0)
        self._retired: list[LoadedModel] = []
        self.swaps = 0

    # -- preparing and starting (pipeline threads) --------------------------------------------------
    def prepare(self, frame: Frame):
        model = self.current
        return model.built.prepare(frame.image, model.built.bundle.preprocess)[None]

    def try_prepare(self, frame: Frame):
        model = self.current
        tensor = super().try_prepare(frame)
        return None if tensor is None else Prepared(model, tensor)

    def start(self, frame: Frame, tensor) -> bool:
        prepared_for = tensor.model if isinstance(tensor, Prepared) else None
        tensor = tensor.tensor if isinstance(tensor, Prepared) else tensor
        with self._lock:
            model = self.current
            if prepared_for is not None and prepared_for is not model \
                    and prepared_for.input_contract != model.input_contract:
                tensor = None  # prepared for the old model's input: again, below, for this one
            job = (self._seq, frame, tensor, time.monotonic(), model)
            self._seq += 1
            self._in_flight += 1
            model.in_flight += 1
            model.idle.clear()
        try:
            if tensor is None:
                tensor = model.built.prepare(frame.image, model.built.bundle.preprocess)[None]
                job = (*job[:2], tensor, *job[3:])
            model.queue.start_async({model.built.bundle.model.input_name: tensor}, userdata=job, share_inputs=True)
        except Exception as exc:  # noqa: BLE001
            self._finish(ModelResult(job[0], frame, None, float("nan"), 0.0, error=_first_line(exc), model=model),
                         model)
            return False
        with self._lock:
            self.submitted += 1
        return True

    def _on_done(self, request: ov.InferRequest, job) -> None:
        seq, frame, _tensor, started, model = job
        latency = time.monotonic() - started
        try:
            amap = request.get_tensor(model.map_port).data.astype("float32", copy=True)
            score = float(request.get_tensor(model.score_port).data.reshape(-1)[0])
            amap = amap.reshape(amap.shape[-2:])
            spec = model.built.bundle.preprocess
            if frame_aligned_map is not None and getattr(spec, "fit", "stretch") != "stretch":
                amap = frame_aligned_map(amap, frame.image.shape[0], frame.image.shape[1], spec)
            result = ModelResult(seq, frame, amap, score, latency, model=model)
        except Exception as exc:  # keep the sequence complete so the consumer never waits forever
            result = ModelResult(seq, frame, None, float("nan"), latency, error=_first_line(exc), model=model)
        self._finish(result, model)

    def _finish(self, result: Result, model: LoadedModel | None = None) -> None:
        try:
            self.results.put(result)
        finally:
            with self._lock:
                self._in_flight -= 1
                if model is not None:
                    model.in_flight -= 1
                    if model.in_flight == 0:
                        model.idle.set()

    def drain(self) -> None:
        for model in [*self._retired, self.current]:
            model.queue.wait_all()

    # -- swapping (a command thread) ----------------------------------------------------------------
    def swap(self, built: CompiledBundle, folder: str | Path, timeout: float = 60.0) -> dict:
        """Make `built` the model of every frame started from now on; wait (up to `timeout`) for the old
        model's frames, then release it. Returns where the boundary fell and how long the switch took."""
        if isinstance(self.queue, QueueView):  # a camera of several: its callbacks must still never block
            queue = SharedInferQueue(built.compiled, self.requests).view()
            queue.deliver_to(self.results)
        else:
            queue = ov.AsyncInferQueue(built.compiled, self.requests)  # (the caller ran it once: warm)
        queue.set_callback(self._on_done)
        began = time.monotonic()
        with self._lock:
            old = self.current
            new = LoadedModel(built, Path(folder), queue, old.generation + 1)
            self.current = new
            boundary, old_in_flight = self._seq, old.in_flight
            self.bundle, self.compiled, self._prepare_image = built.bundle, built.compiled, built.prepare
            self.host_input, self.precision, self.streams = built.host_input, built.precision, built.streams
            self.precision_reason = getattr(built, "precision_reason", "")
            self.optimal_requests = built.optimal_requests
            self.queue = queue
            self._input = built.bundle.model.input_name
            self._retired.append(old)
            self.swaps += 1
        switched = time.monotonic() - began
        drained = old.idle.wait(timeout)
        if drained:
            old.queue.wait_all()
            with self._lock:
                self._retired.remove(old)
        return {"first_frame_seq": boundary, "switch_s": switched, "old_drain_s": time.monotonic() - began,
                "old_in_flight_at_switch": old_in_flight, "old_released": drained, "generation": new.generation}
