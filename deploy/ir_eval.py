"""Run an OpenVINO IR over images: the one implementation used to re-measure IRs.

Export (FP32/FP16 metrics), INT8 calibration (accuracy check against FP32) and
site threshold recalibration all go through these functions, so every number in
a bundle comes from the same inference loop and the same preprocessing
(`edge_ad.model.preprocess.preprocess`). Only openvino and numpy are imported at module
level: the threshold path runs on machines without torch; `predict_ir` and
`measure_ir` import the training helpers (and with them torch) when called.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import openvino as ov

from edge_ad.sources.images import ImageReadError, read_image
from edge_ad.model.preprocess import FrameError, PreprocessSpec, preprocess

if TYPE_CHECKING:  # torch-dependent; imported lazily
    from training.data import Sample
    from training.predict import Predictions

log = logging.getLogger("deploy")

INPUT_NAME = "image"
MAP_OUTPUT = "anomaly_map"
SCORE_OUTPUT = "score"

# Measure the model as exported: CPUs with AVX512-BF16/AMX would otherwise run an
# FP32 IR in bf16 by default, and the re-measured metrics would not be the IR's.
ACCURATE_CPU_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


class IrError(RuntimeError):
    """An IR that cannot be read, compiled or run as an edge-ad model."""


def compile_ir(
    model: str | Path | ov.Model | ov.CompiledModel,
    device: str = "CPU",
    config: dict | None = None,
) -> ov.CompiledModel:
    """Path to model.xml, an ov.Model or an already compiled model -> compiled model.

    `config` defaults to full f32 precision on CPU (see ACCURATE_CPU_CONFIG).
    """
    if isinstance(model, ov.CompiledModel):
        return model
    core = ov.Core()
    if not isinstance(model, ov.Model):
        path = Path(model)
        if not path.is_file():
            raise IrError(f"IR file not found: {path}")
        try:
            model = core.read_model(str(path))
        except RuntimeError as exc:
            raise IrError(f"cannot read IR {path}: {str(exc).splitlines()[0]}") from exc
    if config is None:
        config = ACCURATE_CPU_CONFIG if device.upper().startswith("CPU") else {}
    try:
        return core.compile_model(model, device, config)
    except RuntimeError as exc:
        raise IrError(f"cannot compile the IR for {device}: {str(exc).splitlines()[0]}") from exc


def _port(compiled: ov.CompiledModel, name: str, index: int):
    """Output by name (as export sets them), else by position for foreign IRs."""
    try:
        return compiled.output(name)
    except RuntimeError:
        return compiled.outputs[index]


@dataclass
class IrRunner:
    """A compiled edge-ad IR and one infer request; batches go through one image at a time
    when the IR's batch is static 1 (the bundle default), whole when it is dynamic."""

    compiled: ov.CompiledModel

    def __post_init__(self) -> None:
        self.request = self.compiled.create_infer_request()
        self.map_port = _port(self.compiled, MAP_OUTPUT, 0)
        self.score_port = _port(self.compiled, SCORE_OUTPUT, 1)
        batch = self.compiled.inputs[0].get_partial_shape()[0]
        self.static_batch = batch.get_length() if batch.is_static else None

    @classmethod
    def open(cls, model: str | Path | ov.Model | ov.CompiledModel, device: str = "CPU") -> "IrRunner":
        return cls(compile_ir(model, device))

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """NCHW float32 [0,1] -> (maps (N,H,W) float32, scores (N,) float32), copied out."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim == 3:
            images = images[None]
        step = self.static_batch or len(images)
        maps, scores = [], []
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            if len(chunk) != step:
                raise IrError(f"the IR takes batches of {step}; got {len(chunk)} images")
            outputs = self.request.infer({0: chunk})
            # The request reuses its output buffers: copy before the next call.
            maps.append(np.array(outputs[self.map_port], dtype=np.float32).reshape(len(chunk), *chunk.shape[-2:]))
            scores.append(np.array(outputs[self.score_port], dtype=np.float32).reshape(len(chunk)))
        return np.concatenate(maps), np.concatenate(scores)


@dataclass
class FolderResult:
    """Scores and maps of the readable images of a folder, and what was skipped."""

    scores: np.ndarray  # (N,)
    maps: np.ndarray  # (N, H, W)
    paths: list[Path]
    skipped: list[tuple[Path, str]]


def infer_images(
    model: str | Path | ov.Model | ov.CompiledModel | IrRunner,
    paths: Iterable[Path],
    spec: PreprocessSpec,
    progress: Callable[[int, int], None] | None = None,
) -> FolderResult:
    """Read, preprocess and infer image files; unreadable ones are skipped and reported.

    No torch: used by site threshold recalibration on the edge PC.
    """
    runner = model if isinstance(model, IrRunner) else IrRunner.open(model)
    paths = list(paths)
    scores, maps, kept, skipped = [], [], [], []
    for index, path in enumerate(paths, 1):
        try:
            image = preprocess(read_image(path), spec)
        except (ImageReadError, FrameError) as exc:
            skipped.append((Path(path), str(exc)))
            continue
        amap, score = runner.infer(image[None])
        maps.append(amap[0])
        scores.append(score[0])
        kept.append(Path(path))
        if progress is not None:
            progress(index, len(paths))
    height, width = spec.height, spec.width
    return FolderResult(
        scores=np.asarray(scores, dtype=np.float32),
        maps=np.stack(maps) if maps else np.zeros((0, height, width), np.float32),
        paths=kept,
        skipped=skipped,
    )


def predict_ir(
    model: str | Path | ov.Model | ov.CompiledModel | IrRunner,
    samples: Sequence["Sample"],
    spec: PreprocessSpec,
    desc: str = "IR",
) -> "Predictions":
    """The IR over labelled samples -> training.predict.Predictions, like `predict` for torch.

    Images and masks are loaded by training's own AnomalyDataset, so the IR sees
    exactly the tensors (and masks) the PyTorch metrics were computed on.
    """
    from training.data import AnomalyDataset
    from training.predict import Predictions

    runner = model if isinstance(model, IrRunner) else IrRunner.open(model)
    dataset = AnomalyDataset(samples, spec, cache=False)
    scores, maps, labels, masks, has_mask, paths = [], [], [], [], [], []
    started = time.perf_counter()
    for index in range(len(dataset)):
        item = dataset[index]
        amap, score = runner.infer(item["image"].numpy()[None])
        scores.append(score[0])
        maps.append(amap[0])
        labels.append(int(item["label"]))
        masks.append(item["mask"][0].numpy().astype(np.uint8))
        has_mask.append(bool(item["has_mask"]))
        paths.append(item["path"])
        if index + 1 == len(dataset) or (index + 1) % 50 == 0:
            log.info("%s: %d/%d images (%.1f s)", desc, index + 1, len(dataset), time.perf_counter() - started)
    height, width = spec.height, spec.width
    return Predictions(
        scores=np.asarray(scores, dtype=np.float32),
        maps=np.stack(maps) if maps else np.zeros((0, height, width), np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        masks=np.stack(masks) if masks else np.zeros((0, height, width), np.uint8),
        has_mask=np.asarray(has_mask, dtype=bool),
        paths=paths,
    )


def measure_ir(
    model: str | Path | ov.Model | ov.CompiledModel | IrRunner,
    samples: Sequence["Sample"],
    spec: PreprocessSpec,
    image_threshold: float,
    has_masks: bool,
    desc: str = "IR",
) -> dict:
    """Test-split metrics of an IR, computed exactly as training computes the torch ones."""
    from training.pipeline import test_metrics

    predictions = predict_ir(model, samples, spec, desc=desc)
    return test_metrics(predictions, image_threshold, has_masks)
