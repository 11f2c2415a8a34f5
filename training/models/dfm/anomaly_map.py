"""Feature reconstruction error per location, upsampled to the input."""

from __future__ import annotations

import torch

from training.models.upsample import resize_bilinear


def reconstruction_map(squared_error: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N,C,h,w) squared error -> (N,1,H,W): sum over channels, bilinear to input size."""
    per_location = squared_error.sum(dim=1, keepdim=True)
    return resize_bilinear(per_location, size)
