"""STFPM training loss."""

from __future__ import annotations

import torch

from training.models.stfpm.anomaly_map import tap_distance


def stfpm_loss(teacher_features: list[torch.Tensor], student_features: list[torch.Tensor]) -> torch.Tensor:
    """Sum over taps of the mean over positions (and batch) of 0.5*||norm(t)-norm(s)||^2."""
    return sum(tap_distance(t, s).mean() for t, s in zip(teacher_features, student_features))
