"""Feature reconstruction error per location, upsampled to the input."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_map(squared_error: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N,C,h,w) squared error -> (N,1,H,W): sum over channels, bilinear to input size."""
    per_location = squared_error.sum(dim=1, keepdim=True)
    return F.interpolate(per_location, size=size, mode="bilinear", align_corners=False)
