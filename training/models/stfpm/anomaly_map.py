"""Per-tap teacher/student discrepancy, upsampled and combined into one map."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.models.upsample import resize_bilinear


def tap_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """0.5 * ||norm(t) - norm(s)||^2 per position: (N,C,h,w) -> (N,1,h,w).

    Features are L2-normalised along channels first, so the distance measures
    direction, not magnitude, as in the paper.
    """
    t = F.normalize(teacher, dim=1)
    s = F.normalize(student, dim=1)
    return 0.5 * (t - s).pow(2).sum(dim=1, keepdim=True)


COMBINES = ("product", "sum")


def anomaly_map(
    teacher_features: list[torch.Tensor],
    student_features: list[torch.Tensor],
    size: tuple[int, int],
    taps: tuple[int, ...] | None = None,
    combine: str = "product",
) -> torch.Tensor:
    """The per-tap maps at input resolution, of the chosen taps (default all), combined.

    product (the paper's): a defect must show at every scale; sum: a defect that shows at one scale
    (a small one at the finest) counts even where a coarse tap is blind to it.
    """
    if combine not in COMBINES:
        raise ValueError(f"map combine must be one of {COMBINES}, got {combine!r}")
    result = None
    for index, (teacher, student) in enumerate(zip(teacher_features, student_features)):
        if taps is not None and index not in taps:
            continue
        tap_map = resize_bilinear(tap_distance(teacher, student), size)
        if result is None:
            result = tap_map
        else:
            result = result * tap_map if combine == "product" else result + tap_map
    return result
