"""Train STFPM: python -m training.stfpm --category screw"""

from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.backbones import build_backbone
from training.config import DfmConfig, StfpmConfig, TrainConfig, parse_config, parse_taps
from training.crossfit import RefittableTerm, check_folds, out_of_fold_scores
from training.dfm import fit_subspace
from training.models.dfm import DfmModel
from training.models.image_score import image_score_from
from training.models.stfpm import StfpmModel, stfpm_loss
from training.models.patch_memory import PatchMemory, greedy_coreset, locally_aware_patches, patch_rows
from training.models.stfpm.torch_model import FUSIONS, term_scales
from training.models.stfpm.anomaly_map import COMBINES
from training.data.augment import Augmentation
from training.pipeline import (
    autocast, evaluate_and_save, loader, prepare_data, resolve_device, run_cli, seed_everything, synthetic_auroc,
    synthetic_validation, validation_predictions,
)

log = logging.getLogger("training")

SELECTIONS = ("loss", "synthetic")
SCHEDULES = ("constant", "cosine")
STUDENT_BN_MOMENTUM = 0.1  # PyTorch's default; the TF-style 0.01 leaves a fresh student's stats stale


# What the subspace term takes from DFM's own defaults rather than from the STFPM run's settings.
DFM_RECIPE_FIELDS = {"augment", "smooth_sigma", "score_reduction", "topk_fraction", "algorithm"}


def subspace_recipe(config: StfpmConfig) -> DfmConfig:
    """The subspace term is the default DFM recipe (taps, pooling, augmentation, variance kept) on the
    teacher: one recipe, chosen once (benchmarks/levers.py), for DFM and for this term; only the number of
    posed copies is the term's own (--subspace-posed-copies)."""
    shared = {f.name: getattr(config, f.name) for f in fields(TrainConfig) if f.name not in DFM_RECIPE_FIELDS}
    return DfmConfig(**shared, posed_copies=config.subspace_posed_copies)


MIN_MEMORY = 256  # patches: a small data set's memory still covers its normal variety
MAX_MEMORY = 20_000  # patches: a 512 px frame is then 4096 x 20k distances (1.3 GB at batch 4), selection ~15 s


@torch.no_grad()
def memory_patches(model: StfpmModel, data, config: StfpmConfig, device: torch.device) -> torch.Tensor:
    """(P, C) float16 rows: every training image's locally aware patches (teacher features of the full input)."""
    patches = []
    for batch in tqdm(loader(data.train, data, config), desc="memory patches", unit="batch", leave=False):
        patches.append(patch_rows(locally_aware_patches(model.teacher(batch["image"].to(device)))).half().cpu())
    return torch.cat(patches)


def fit_memory(model: StfpmModel, data, config: StfpmConfig, device: torch.device,
               patches: torch.Tensor | None = None) -> dict:
    """The memory term: a k-centre coreset of the training images' patches (`memory_patches`, extracted here unless
    given: a benchmark refitting several coresets extracts them once). Returns config.json's "memory" record (its
    shape, for rebuilding the run)."""
    if patches is None:
        patches = memory_patches(model, data, config, device)
    size = min(len(patches), max(MIN_MEMORY, round(config.memory_fraction * len(patches))))
    if size > MAX_MEMORY:
        raise ValueError(f"--memory-fraction {config.memory_fraction:g} keeps {size} of {len(patches)} patches, more than "
                         f"{MAX_MEMORY} (each frame would compare every patch with all of them): lower it")
    model.memory.memory = greedy_coreset(patches, size, seed=config.seed).to(device)
    log.info("memory term: kept %d of %d training patches (%d features each)", model.memory.size, len(patches),
             patches.shape[1])
    return {"size": model.memory.size, "channels": int(patches.shape[1]), "fraction": config.memory_fraction}


def subspace_record(model: StfpmModel, recipe: DfmConfig) -> dict:
    """config.json's "subspace": what rebuilding the fitted term needs (taps, pool, shapes), and how it was fitted."""
    subspace = model.subspace
    return {"taps": ",".join(map(str, subspace.taps)), "pool": subspace.pool,
            "feature_dim": int(subspace.mean.numel()), "n_components": subspace.n_components,
            "augment": recipe.augment, "posed_copies": recipe.posed_copies, "variance_ratio": recipe.variance_ratio}


def stfpm_fields(config: dict) -> dict:
    return {k: v for k, v in config.items() if k in {f.name for f in fields(StfpmConfig)}}


def fitted_term_record(config: dict, term: str, pretrained: bool) -> dict | None:
    """config.json's record of a fitted term (its shapes); a saved run cannot be rebuilt without it."""
    record = config.get(term)
    if record is None and not pretrained:
        raise ValueError(f"the run's config.json has {term}_weight > 0 but no \"{term}\" record of the fitted "
                         "term: it cannot be rebuilt")
    return record


def build_model(config: StfpmConfig | dict, pretrained: bool = True) -> StfpmModel:
    """An untrained model when pretrained; a trained run's shapes (and its terms') come from its config."""
    config = config if isinstance(config, dict) else config.to_dict()
    teacher = build_backbone(config["backbone"], pretrained=pretrained, weights=config.get("weights") if pretrained else None)
    student = build_backbone(config["backbone"], pretrained=False, bn_momentum=STUDENT_BN_MOMENTUM)
    # runs saved before a term existed have no weight for it
    weight, memory_weight = (float(config.get(f"{term}_weight", 0.0)) for term in ("subspace", "memory"))
    subspace = memory = None
    if weight > 0:
        record = fitted_term_record(config, "subspace", pretrained) or \
            subspace_recipe(StfpmConfig(**stfpm_fields(config))).to_dict()
        subspace = DfmModel(teacher, taps=parse_taps(record["taps"]), pool=record["pool"], score_type="map",
                            feature_dim=record.get("feature_dim", 0), n_components=record.get("n_components", 0))
    if memory_weight > 0:
        record = fitted_term_record(config, "memory", pretrained)
        memory = PatchMemory(**({"size": record["size"], "channels": record["channels"]} if record else {}))
    return StfpmModel(teacher, student, image_score_from(config),
                      map_taps=parse_taps(config.get("map_taps", "0,1,2"), "--map-taps"),
                      map_combine=config.get("map_combine", "product"), subspace=subspace, subspace_weight=weight,
                      memory=memory, memory_weight=memory_weight, student_pool=int(config.get("student_pool", 1)),
                      memory_fusion=config.get("memory_fusion", "map"))


@torch.no_grad()
def validation_pass(model: StfpmModel, batches, device: torch.device, calibrate_scales: bool = False) -> float:
    """The validation loss; with calibrate_scales, also each term's scale (`term_scales`) from the same
    teacher and student features, so an epoch that needs both runs the networks over validation once."""
    model.eval()
    total, count, terms = 0.0, 0, []
    for batch in batches:
        images = batch["image"].to(device)
        teacher_features, student_features = model.features(images)
        total += float(stfpm_loss(teacher_features, student_features)) * len(images)
        count += len(images)
        if calibrate_scales and hasattr(model, "map_scales"):
            terms.append(model.term_maps_from_features(teacher_features, student_features, images))
    if terms:
        model.map_scales.copy_(term_scales(model.image_score, *(torch.cat(maps) for maps in zip(*terms))))
    return total / max(count, 1)


def calibrate_map_scales(model: StfpmModel, batches, device: torch.device) -> None:
    """Set each term's scale from the held-out normal images; nothing to do (no pass) with one term."""
    if hasattr(model, "map_scales"):
        validation_pass(model, batches, device, calibrate_scales=True)


def preload(batches, device: torch.device) -> list[dict]:
    """Batches evaluated every epoch, collated once and kept on the device (the GPU when training there)."""
    return [{**batch, "image": batch["image"].to(device, non_blocking=True)} for batch in batches]


def training_batches(data, config: StfpmConfig, device: torch.device):
    """Per-epoch training batches. On CUDA without augmentation the whole set lives on the GPU and
    is shuffled there; otherwise a seeded DataLoader (pinned memory on CUDA) feeds it."""
    batches = loader(data.train, data, config, shuffle=True, augment=True)
    if device.type != "cuda" or Augmentation.parse(config.augment).active:
        return lambda epoch: batches
    images = torch.cat([batch["image"] for batch in loader(data.train, data, config)]).to(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)

    def on_device(epoch: int):
        order = torch.randperm(len(images), device=device, generator=generator)
        return [{"image": images[order[i:i + config.batch_size]]} for i in range(0, len(images), config.batch_size)]

    return on_device


def check_config(config: StfpmConfig) -> None:
    """Every setting, before any data is read: a bad one is a one-line error, not a traceback minutes in."""
    if config.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {config.epochs}")
    if config.select not in SELECTIONS:
        raise ValueError(f"--select must be one of {', '.join(SELECTIONS)}, got {config.select!r}")
    if config.lr_schedule not in SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {config.lr_schedule!r}")
    if config.subspace_weight < 0:
        raise ValueError(f"--subspace-weight must be >= 0, got {config.subspace_weight}")
    if config.subspace_posed_copies < 0:
        raise ValueError(f"--subspace-posed-copies must be >= 0, got {config.subspace_posed_copies}")
    if config.memory_weight < 0:
        raise ValueError(f"--memory-weight must be >= 0, got {config.memory_weight}")
    if not 0.0 < config.memory_fraction <= 1.0:
        raise ValueError(f"--memory-fraction must be in (0, 1], got {config.memory_fraction}")
    if config.student_pool < 1 or config.image_size % config.student_pool or config.image_size // config.student_pool < 32:
        raise ValueError(f"--student-pool must be >= 1 and divide --image-size into at least 32 px, got "
                         f"{config.student_pool} for {config.image_size} px")
    if not 0.0 <= config.hard_quantile < 1.0:
        raise ValueError(f"--hard-quantile must be in [0, 1), got {config.hard_quantile}")
    Augmentation.parse(config.augment)
    parse_taps(config.map_taps, "--map-taps")
    if config.memory_fusion not in FUSIONS:
        raise ValueError(f"--memory-fusion must be one of {', '.join(FUSIONS)}, got {config.memory_fusion!r}")
    if config.memory_fusion == "score" and config.memory_weight == 0:
        raise ValueError("--memory-fusion score needs --memory-weight > 0 (it says how the memory term joins the score)")
    if config.map_combine not in COMBINES:
        raise ValueError(f"--map-combine must be one of {', '.join(COMBINES)}, got {config.map_combine!r}")


@dataclass
class Fitted:
    model: StfpmModel
    train_time_s: float
    metrics: dict  # kept epoch and history, for metrics.json
    config: dict | None  # the fitted terms' records, for config.json


def fit(config: StfpmConfig, data, device: torch.device) -> Fitted:
    """Train the student and fit the terms on data.train; data.validation picks the epoch and sets the term scales."""
    model = build_model(config).to(device)
    optimizer = torch.optim.SGD(
        model.student.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
                 if config.lr_schedule == "cosine" else None)
    epoch_batches = training_batches(data, config, device)
    validation_batches = preload(loader(data.validation, data, config), device)
    started = time.perf_counter()  # the training time includes the subspace term's PCA fit and the memory's coreset
    extra_config = None
    if model.subspace is not None:
        recipe = subspace_recipe(config)
        log.info("fitting the subspace term (DFM on the teacher's features, weight %g)", config.subspace_weight)
        fit_subspace(model.subspace, data, recipe, device, input_transform=model.student_input)
        extra_config = {"subspace": subspace_record(model, recipe)}
    if model.memory is not None:
        log.info("fitting the memory term (patches of the %d px input, weight %g)", config.image_size, config.memory_weight)
        extra_config = {**(extra_config or {}), "memory": fit_memory(model, data, config, device)}
    synthetic_batches = preload(synthetic_validation(data, config), device) if config.select == "synthetic" else None
    log.info("training STFPM (%s) on %s for %d epochs, keeping the epoch with the %s", config.backbone, device,
             config.epochs, "best AUROC on synthetic validation defects" if synthetic_batches else "lowest validation loss")

    best_key, best_state, best_epoch, history = None, None, -1, []
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        model.train()
        running, seen = 0.0, 0
        progress = tqdm(epoch_batches(epoch), desc=f"epoch {epoch}/{config.epochs}", unit="batch", leave=False)
        for batch in progress:
            images = batch["image"].to(device, non_blocking=True)
            with autocast(device):
                loss = stfpm_loss(*model.features(images), hard_quantile=config.hard_quantile)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(images)
            seen += len(images)
            progress.set_postfix(loss=f"{running / seen:.4f}")
        if scheduler is not None:
            scheduler.step()
        # synthetic selection scores the full map, which needs this epoch's term scales
        val_loss = validation_pass(model, validation_batches, device, calibrate_scales=synthetic_batches is not None)
        record = {"epoch": epoch, "train_loss": running / max(seen, 1), "validation_loss": val_loss}
        if synthetic_batches is not None:
            record["synthetic_validation_auroc"] = synthetic_auroc(model, synthetic_batches, device)
            key = (record["synthetic_validation_auroc"], -val_loss)  # ties: the lower loss
        else:
            key = (-val_loss,)
        record["epoch_s"] = round(time.perf_counter() - epoch_started, 1)
        history.append(record)
        improved = best_key is None or key > best_key
        if improved:
            best_key, best_state, best_epoch = key, copy.deepcopy(model.student.state_dict()), epoch
        synthetic = f", synthetic AUROC {record['synthetic_validation_auroc']:.3f}" if synthetic_batches else ""
        log.info("epoch %d: train loss %.4f, validation loss %.4f%s, %.1fs%s", epoch, record["train_loss"], val_loss,
                 synthetic, record["epoch_s"], " (best)" if improved else "")
    train_time = time.perf_counter() - started
    if best_state is not None:
        model.student.load_state_dict(best_state)
    calibrate_map_scales(model, validation_batches, device)
    kept = history[best_epoch - 1]
    log.info("kept epoch %d (validation loss %.4f%s)", best_epoch, kept["validation_loss"],
             f", synthetic AUROC {kept['synthetic_validation_auroc']:.3f}" if synthetic_batches else "")
    extra = {"best_epoch": best_epoch, "best_validation_loss": kept["validation_loss"], "history": history}
    return Fitted(model, train_time, extra, extra_config)


def retrained_without(config: StfpmConfig, data, device: torch.device) -> RefittableTerm:
    """The whole model fitted again without some training images, for their out-of-fold scores: the student has seen
    its training images' rare parts as the subspace term has, so keeping it leaves their tail short (round 16). Each
    fold starts from the run's seed, as the final model did."""

    def refit(held_out: np.ndarray) -> torch.nn.Module:
        seed_everything(config.seed)
        dropped = set(held_out.tolist())
        kept = [sample for i, sample in enumerate(data.train) if i not in dropped]
        return fit(config, replace(data, train=kept), device).model

    return RefittableTerm("student and fitted terms", refit, lambda: None)


def train(config: StfpmConfig) -> Path:
    check_config(config)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    data = prepare_data(config)
    check_folds(config.threshold_folds, len(data.train))
    fitted = fit(config, data, device)
    validation = validation_predictions(fitted.model, data, config, device)
    out_of_fold = out_of_fold_scores(retrained_without(config, data, device), data, config, device,
                                     lambda samples: loader(samples, data, config), validation.scores)
    return evaluate_and_save(fitted.model, config, data, device, fitted.train_time_s, extra_metrics=fitted.metrics,
                             extra_config=fitted.config, out_of_fold=out_of_fold, validation=validation)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(StfpmConfig, "Train STFPM on an MVTec-AD-layout category.", argv)
    return run_cli(train, config)


if __name__ == "__main__":
    sys.exit(main())
