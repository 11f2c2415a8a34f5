"""Per-tap teacher/student discrepancy, upsampled and multiplied into one map."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tap_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """0.5 * ||norm(t) - norm(s)||^2 per position: (N,C,h,w) -> (N,1,h,w).

    Features are L2-normalised along channels first, so the distance measures
    direction, not magnitude, as in the paper.
    """
    t = F.normalize(teacher, dim=1)
    s = F.normalize(student, dim=1)
    return 0.5 * (t - s).pow(2).sum(dim=1, keepdim=True)


def anomaly_map(
    teacher_features: list[torch.Tensor],
    student_features: list[torch.Tensor],
    size: tuple[int, int],
) -> torch.Tensor:
    """Product of the per-tap maps at input resolution: a defect must show at every scale."""
    result = None
    for teacher, student in zip(teacher_features, student_features):
        tap_map = F.interpolate(tap_distance(teacher, student), size=size, mode="bilinear", align_corners=False)
        result = tap_map if result is None else result * tap_map
    return result
