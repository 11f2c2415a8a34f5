"""Fit DFM: python -m training.dfm --category screw"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.backbones import build_backbone
from training.config import DfmConfig, parse_config, parse_taps
from training.crossfit import check_folds, out_of_fold_scores, subspace_term
from training.data.augment import Augmentation
from training.models.dfm import DfmModel
from training.models.image_score import image_score_from
from training.pipeline import (
    evaluate_and_save, loader, prepare_data, resolve_device, run_cli, seed_everything, validation_predictions,
)

log = logging.getLogger("training")


def build_model(config: DfmConfig | dict, pretrained: bool = True) -> DfmModel:
    """An unfitted model when pretrained; a fitted run's shapes come from its config."""
    config = config if isinstance(config, dict) else config.to_dict()
    extractor = build_backbone(config["backbone"], pretrained=pretrained, weights=config.get("weights") if pretrained else None)
    return DfmModel(
        extractor,
        taps=parse_taps(config["taps"] if "taps" in config else str(config["tap"])),  # runs before taps= have tap=
        pool=config["pool"],
        score_type=config["score_type"],
        feature_dim=config.get("feature_dim", 0),
        n_components=config.get("n_components", 0),
        image_score=image_score_from(config),
    )


@torch.no_grad()
def collect_features(model: DfmModel, batches, device: torch.device, desc: str = "features",
                     input_transform=None) -> np.ndarray:
    chunks = []
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
        images = batch["image"].to(device)
        features = model.tap_features(images if input_transform is None else input_transform(images))
        chunks.append(features.reshape(len(features), -1).cpu().numpy())
    return np.concatenate(chunks)


def fit_subspace(model: DfmModel, data, config: DfmConfig, device: torch.device,
                 input_transform=None) -> tuple[np.ndarray, np.ndarray]:
    """Fit the PCA on the training images (and posed copies with --augment). Returns the features and the training
    image each row comes from, for refitting without some of them (training.crossfit).

    Shared by DFM and by STFPM's subspace term, which fits the same recipe on its teacher (on the images as
    its student sees them: `input_transform`)."""
    passes = [collect_features(model, loader(data.train, data, config), device, input_transform=input_transform)]
    if Augmentation.parse(config.augment).active:
        posed = loader(data.train, data, config, augment=True)  # not shuffled: rows follow data.train in every pass
        passes += [collect_features(model, posed, device, desc=f"augmented pass {i + 1}", input_transform=input_transform)
                   for i in range(config.posed_copies)]
    features = np.concatenate(passes)
    model.fit(features, variance_ratio=config.variance_ratio)
    model.to(device)
    log.info("PCA on %d images x %d features kept %d components", *features.shape, model.n_components)
    return features, np.tile(np.arange(len(data.train)), len(passes))


def train(config: DfmConfig) -> Path:
    parse_taps(config.taps)
    if config.posed_copies < 0:
        raise ValueError(f"--posed-copies must be >= 0, got {config.posed_copies}")
    seed_everything(config.seed)
    device = resolve_device(config.device)
    data = prepare_data(config)
    check_folds(config.threshold_folds, len(data.train))
    model = build_model(config).to(device).eval()
    started = time.perf_counter()
    features, owners = fit_subspace(model, data, config, device)
    train_time = time.perf_counter() - started
    validation = validation_predictions(model, data, config, device)
    if config.threshold_folds:
        out_of_fold = out_of_fold_scores(subspace_term(model, features, owners, config.variance_ratio, device), data,
                                         config, device, lambda samples: loader(samples, data, config),
                                         validation.scores, additive=config.score_type == "nll")
    else:
        out_of_fold = None
    del features  # every posed pass: not needed any more
    return evaluate_and_save(
        model, config, data, device, train_time,
        extra_config={"feature_dim": int(model.mean.numel()), "n_components": model.n_components},
        out_of_fold=out_of_fold, validation=validation,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_config(DfmConfig, "Fit DFM on an MVTec-AD-layout category.", argv)
    return run_cli(train, config)


if __name__ == "__main__":
    sys.exit(main())
