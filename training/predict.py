"""Run a model over a dataset and collect scores and maps for evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm


@dataclass
class Predictions:
    scores: np.ndarray  # (N,)
    maps: np.ndarray  # (N, H, W) float32
    labels: np.ndarray  # (N,)
    masks: np.ndarray  # (N, H, W) uint8
    has_mask: np.ndarray  # (N,) bool
    paths: list[str]

    @property
    def all_masked(self) -> bool:
        """Pixel metrics are only meaningful when every anomalous image has a mask."""
        return bool(np.all(self.has_mask | (self.labels == 0)))


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, desc: str = "predict") -> Predictions:
    model.eval()
    scores, maps, labels, masks, has_mask, paths = [], [], [], [], [], []
    for batch in tqdm(loader, desc=desc, leave=False, unit="batch"):
        amap, score = model(batch["image"].to(device))
        scores.append(score.float().cpu().numpy())
        maps.append(amap[:, 0].float().cpu().numpy())
        labels.append(batch["label"].numpy())
        masks.append(batch["mask"][:, 0].numpy().astype(np.uint8))
        has_mask.append(np.asarray(batch["has_mask"], dtype=bool))
        paths.extend(batch["path"])
    return Predictions(
        scores=np.concatenate(scores),
        maps=np.concatenate(maps),
        labels=np.concatenate(labels),
        masks=np.concatenate(masks),
        has_mask=np.concatenate(has_mask),
        paths=paths,
    )
