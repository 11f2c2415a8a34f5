"""STFPM training loss."""

from __future__ import annotations

import torch

from training.models.stfpm.anomaly_map import tap_distance


def stfpm_loss(teacher_features: list[torch.Tensor], student_features: list[torch.Tensor],
               hard_quantile: float = 0.0) -> torch.Tensor:
    """Sum over taps of the mean over positions (and batch) of 0.5*||norm(t)-norm(s)||^2.

    hard_quantile > 0 averages only the positions at or above that quantile of each tap's distances
    in the batch (EfficientAD's hard feature loss, Batzner et al. 2024): the student stops spending
    its capacity on the plain background it already imitates, and learns the part itself.
    """
    if not 0.0 <= hard_quantile < 1.0:
        raise ValueError(f"hard quantile must be in [0, 1), got {hard_quantile}")
    total = 0.0
    for teacher, student in zip(teacher_features, student_features):
        distance = tap_distance(teacher, student)
        if hard_quantile > 0.0:
            cutoff = torch.quantile(distance.detach().float().flatten(), hard_quantile)
            distance = distance[distance >= cutoff.to(distance.dtype)]
        total = total + distance.mean()
    return total
