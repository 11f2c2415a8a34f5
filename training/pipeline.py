"""What every training run shares: data and split, device, evaluation, the run folder."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_ad.decide.thresholds import describe_outliers, estimate_thresholds
from edge_ad.model.preprocess import FITS, PreprocessSpec, as_bgr_uint8
from edge_ad.sources.images import read_image
from training import run_dir as runs
from training.config import TrainConfig
from training.crossfit import OutOfFold
from training.data import Sample, data_fingerprint, load_category, make_loader, split_validation
from training.data.augment import Augmentation
from training.data.dataset import FrameDataset
from training.data.synthetic_defects import KINDS, synthetic_anomalies
from training.metrics import compute_metrics, image_auroc
from training.predict import Predictions, predict

log = logging.getLogger("training")


@dataclass
class RunData:
    spec: PreprocessSpec
    train: list[Sample]
    validation: list[Sample]
    test: list[Sample]
    has_masks: bool
    fingerprint: str


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
    return device


def autocast(device: torch.device):
    """Mixed precision where it is safe: bf16 autocast on CUDA (no loss scaling needed), off on CPU,
    where bf16 convolutions are slower than f32 on most CPUs and change the scores."""
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_data(config: TrainConfig) -> RunData:
    if config.fit not in FITS:
        raise ValueError(f"--fit must be one of {', '.join(FITS)}, got {config.fit!r}")
    if config.synthetic_copies < 1:
        raise ValueError(f"--synthetic-copies must be >= 1, got {config.synthetic_copies}")
    category = load_category(config.data_root, config.category)
    train, validation = split_validation(category.train, fraction=config.validation_fraction, seed=config.validation_seed)
    log.info(
        "%s/%s: %d train, %d validation (held-out normal), %d test images (%d anomalous)%s",
        config.data_root, config.category, len(train), len(validation), len(category.test),
        sum(s.label for s in category.test), "" if category.has_masks else "; no masks: image-level metrics only",
    )
    return RunData(
        spec=PreprocessSpec.square(config.image_size, config.fit),
        train=train,
        validation=validation,
        test=category.test,
        has_masks=category.has_masks,
        fingerprint=data_fingerprint(category.train + category.test),
    )


def loader(samples: list[Sample], data: RunData, config: TrainConfig, shuffle: bool = False, augment: bool = False):
    return make_loader(samples, data.spec, batch_size=config.batch_size, shuffle=shuffle, seed=config.seed,
                       augment=Augmentation.parse(config.augment) if augment else None)


def synthetic_validation(data: RunData, config: TrainConfig, strength: float = 1.0,
                         kinds: tuple[str, ...] = KINDS, copies: int | None = None):
    """Validation images and `copies` (default: config.synthetic_copies) copies of each with a synthetic defect
    (training.data.synthetic_defects); each further copy has its own seed and the next kind in turn. Why several:
    30 validation images give 30 defects per copy, and on screw one draw of 30 moved the signal by more than the
    0.01 a lever must gain (round 13, docs/TRAINING.md); four copies also followed the test split better there.

    The anomalies that choices may see: made from held-out normal images, never from the test split.
    """
    copies = config.synthetic_copies if copies is None else copies
    if copies < 1:
        raise ValueError(f"synthetic copies must be >= 1, got {copies}")
    frames = [as_bgr_uint8(read_image(sample.path)) for sample in data.validation]  # grayscale parts too
    defective, masks, names = [], [], [f"{s.path}" for s in data.validation]
    for copy in range(copies):
        turn = copy % len(kinds)
        drawn, drawn_masks = synthetic_anomalies(frames, seed=config.validation_seed + copy, strength=strength,
                                                 kinds=kinds[turn:] + kinds[:turn])
        defective += drawn
        masks += drawn_masks
        names += [f"{s.path}#synthetic" + (f"{copy}" if copy else "") for s in data.validation]
    dataset = FrameDataset(frames + defective, [None] * len(frames) + masks,
                           [0] * len(frames) + [1] * len(defective), data.spec, names)
    return make_loader(dataset, data.spec, batch_size=config.batch_size, shuffle=False)


def validation_predictions(model: torch.nn.Module, data: RunData, config: TrainConfig, device: torch.device) -> Predictions:
    """Computed once per run: the image threshold and the out-of-fold scale use the same scores."""
    return predict(model, loader(data.validation, data, config), device, desc="validation")


def synthetic_auroc(model: torch.nn.Module, batches, device: torch.device) -> float:
    """Image AUROC of validation images against their synthetically defective copies."""
    predictions = predict(model, batches, device, desc="synthetic")
    return image_auroc(predictions.labels, predictions.scores)


def evaluate_and_save(
    model: torch.nn.Module,
    config: TrainConfig,
    data: RunData,
    device: torch.device,
    train_time_s: float,
    extra_config: dict | None = None,
    extra_metrics: dict | None = None,
    out_of_fold: OutOfFold | None = None,
    validation: Predictions | None = None,
) -> Path:
    """Thresholds from validation (and the training images' `out_of_fold` scores), metrics on test, then write the
    run folder. `validation`: the model's validation predictions where the caller has them already."""
    if validation is None:
        validation = validation_predictions(model, data, config, device)
    fitted_scores, fitted_paths, source = validation.scores, list(validation.paths), "validation"
    if out_of_fold is not None:
        fitted_scores = np.concatenate([validation.scores, out_of_fold.scores])
        fitted_paths += out_of_fold.paths
        source = f"validation + out-of-fold training images ({out_of_fold.folds} folds)"
    # The pixel threshold stays on the validation maps: thousands of pixels per image are plenty.
    thresholds = estimate_thresholds(fitted_scores, validation.maps, config.target_fpr, config.pixel_fpr,
                                     source=source, confidence=config.threshold_confidence)
    if out_of_fold is not None:
        thresholds.fit["out_of_fold"] = out_of_fold.record(validation.scores)
    outliers = describe_outliers(thresholds.fit, fitted_paths)
    if outliers:
        log.warning("%s: %s", source, outliers)
    test = predict(model, loader(data.test, data, config), device, desc="test")
    metrics = test_metrics(test, thresholds.image, data.has_masks)
    # Measured on the saved model (for STFPM with --select synthetic it must equal the kept epoch's value).
    metrics["synthetic_validation_auroc"] = synthetic_auroc(model, synthetic_validation(data, config), device)

    run_dir = runs.new_run_dir(config.out, config.algorithm, config.backbone, config.category)
    # An absolute data root lets export and calibration find the data from any working directory.
    saved_config = config.to_dict() | {"data_root": str(Path(config.data_root).resolve())} | (extra_config or {})
    if out_of_fold is None:
        saved_config["threshold_folds"] = 0  # off, interrupted or re-scored: config.json says what the run holds
    metrics_json = {
        **metrics,
        "thresholds": thresholds.__dict__,
        "train_time_s": round(train_time_s, 1),
        # CPU seconds of this process so far: comparable across machines loaded by other work
        "process_cpu_s": round(time.process_time(), 1),
        "data_fingerprint": data.fingerprint,
        "device": str(device),
        "torch_version": torch.__version__,
        **({"out_of_fold_s": round(out_of_fold.seconds, 1)} if out_of_fold is not None else {}),
        **{k: v for k, v in (extra_metrics or {}).items() if k != "synthetic_validation_auroc"},
    }
    split = {
        "train": [str(s.path) for s in data.train],
        "validation": [str(s.path) for s in data.validation],
    }
    runs.save_run(run_dir, model.cpu(), saved_config, split, metrics_json)
    report(config, metrics_json, run_dir)
    from training import report as training_report  # matplotlib only when a run is written

    print(f"report: {training_report.write(run_dir, validation, test, None if out_of_fold is None else out_of_fold.scores)}")
    return run_dir


def test_metrics(test: Predictions, image_threshold: float, has_masks: bool) -> dict:
    use_pixels = has_masks and test.all_masked
    metrics = compute_metrics(
        test.labels, test.scores, image_threshold,
        masks=test.masks if use_pixels else None,
        maps=test.maps if use_pixels else None,
    )
    return metrics.to_dict()


def report(config: TrainConfig, metrics: dict, run_dir: Path) -> None:
    pixel = metrics["pixel_auroc"]
    print(
        f"{config.algorithm} {config.backbone} {config.category}: "
        f"image AUROC {metrics['image_auroc']:.3f}, "
        f"pixel AUROC {'n/a' if pixel is None else f'{pixel:.3f}'}; at the deployed threshold: "
        f"image F1 {metrics['image_f1_deployed']:.3f}, false positives {metrics['fpr_deployed']:.1%} "
        f"(target {config.target_fpr:.1%}), recall {metrics['recall_deployed']:.1%}; "
        f"train time {metrics['train_time_s']:.0f}s\nrun folder: {run_dir}"
    )


def run_cli(train_fn, config: TrainConfig) -> int:
    """Clear one-line errors for bad input instead of tracebacks."""
    from edge_ad.sources.images import ImageReadError
    from edge_ad.ops.tool_cli import run_tool
    from training.backbones import BackboneWeightsError
    from training.data import DatasetError

    def train() -> None:
        started = time.perf_counter()
        train_fn(config)
        log.info("done in %.0fs", time.perf_counter() - started)

    return run_tool(train, (DatasetError, ImageReadError, BackboneWeightsError, ValueError))
