"""Train STFPM: python -m training.stfpm --category screw"""

from __future__ import annotations

import copy
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from training.backbones import build_backbone
from training.config import StfpmConfig, parse_config
from training.models.stfpm import StfpmModel, stfpm_loss
from training.pipeline import evaluate_and_save, loader, prepare_data, resolve_device, run_cli, seed_everything

log = logging.getLogger("training")

STUDENT_BN_MOMENTUM = 0.1  # PyTorch's default; the TF-style 0.01 leaves a fresh student's stats stale


def build_model(config: StfpmConfig | dict, pretrained: bool = True) -> StfpmModel:
    config = config if isinstance(config, dict) else config.to_dict()
    teacher = build_backbone(config["backbone"], pretrained=pretrained, weights=config.get("weights") if pretrained else None)
    student = build_backbone(config["backbone"], pretrained=False, bn_momentum=STUDENT_BN_MOMENTUM)
    return StfpmModel(teacher, student)


@torch.no_grad()
def validation_loss(model: StfpmModel, batches, device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        images = batch["image"].to(device)
        total += float(stfpm_loss(*model.features(images))) * len(images)
        count += len(images)
    return total / max(count, 1)


def train(config: StfpmConfig) -> Path:
    seed_everything(config.seed)
    device = resolve_device(config.device)
    data = prepare_data(config)
    model = build_model(config).to(device)
    optimizer = torch.optim.SGD(
        model.student.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    train_batches = loader(data.train, data, config, shuffle=True)
    validation_batches = loader(data.validation, data, config)
    log.info("training STFPM (%s) on %s for %d epochs", config.backbone, device, config.epochs)

    best_loss, best_state, best_epoch, history = float("inf"), None, -1, []
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        running, seen = 0.0, 0
        progress = tqdm(train_batches, desc=f"epoch {epoch}/{config.epochs}", unit="batch", leave=False)
        for batch in progress:
            images = batch["image"].to(device)
            loss = stfpm_loss(*model.features(images))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(images)
            seen += len(images)
            progress.set_postfix(loss=f"{running / seen:.4f}")
        val_loss = validation_loss(model, validation_batches, device)
        history.append({"epoch": epoch, "train_loss": running / max(seen, 1), "validation_loss": val_loss})
        improved = val_loss < best_loss
        if improved:
            best_loss, best_state, best_epoch = val_loss, copy.deepcopy(model.student.state_dict()), epoch
        log.info("epoch %d: train loss %.4f, validation loss %.4f%s", epoch, running / max(seen, 1), val_loss, " (best)" if improved else "")
    train_time = time.perf_counter() - started
    if best_state is not None:
        model.student.load_state_dict(best_state)
    log.info("kept epoch %d (lowest validation loss %.4f)", best_epoch, best_loss)
    return evaluate_and_save(
        model, config, data, device, train_time,
        extra_metrics={"best_epoch": best_epoch, "best_validation_loss": best_loss, "history": history},
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_config(StfpmConfig, "Train STFPM on an MVTec-AD-layout category.", argv)
    return run_cli(train, config)


if __name__ == "__main__":
    sys.exit(main())
