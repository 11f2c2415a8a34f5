"""Anomaly map -> (smoothed map, image score), shared by every model's exported graph.

The raw maxima of a map are single noisy pixels: a Gaussian blur (a fixed depthwise
convolution, exported like any other layer) suppresses isolated spikes, and the mean of
the top-k pixels lets a small defect that spans several pixels outrank a lone spike on a
normal image. Both are parts of the graph, so the runtime scores exactly as training did.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

REDUCTIONS = ("max", "topk")


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


class ImageScore(nn.Module):
    """Smooths an (N,1,H,W) map with sigma (0: off) and reduces it to (N,) by max or top-k mean."""

    def __init__(self, smooth_sigma: float = 0.0, reduction: str = "max", topk_fraction: float = 0.01):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"score reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if smooth_sigma < 0 or not math.isfinite(smooth_sigma):
            raise ValueError(f"smoothing sigma must be >= 0, got {smooth_sigma}")
        if not 0.0 < topk_fraction <= 1.0:
            raise ValueError(f"top-k fraction must be in (0, 1], got {topk_fraction}")
        self.smooth_sigma = float(smooth_sigma)
        self.reduction = reduction
        self.topk_fraction = float(topk_fraction)
        kernel = gaussian_kernel(smooth_sigma) if smooth_sigma > 0 else torch.ones(1)
        # Separable blur: a row and a column pass. Not persistent: derived from the config.
        self.register_buffer("kernel_x", kernel.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("kernel_y", kernel.view(1, 1, -1, 1), persistent=False)

    def smooth(self, amap: torch.Tensor) -> torch.Tensor:
        if self.smooth_sigma <= 0:
            return amap
        pad = self.kernel_x.shape[-1] // 2
        amap = F.conv2d(F.pad(amap, (pad, pad, 0, 0), mode="replicate"), self.kernel_x)
        return F.conv2d(F.pad(amap, (0, 0, pad, pad), mode="replicate"), self.kernel_y)

    def forward(self, amap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = self.smooth(amap)
        if self.reduction == "max":
            return amap, torch.amax(amap, dim=(1, 2, 3))
        flat = amap.flatten(1)
        # int(): under export tracing the shape is a tensor; the model input size is static, so k is a constant.
        k = max(1, int(self.topk_fraction * int(flat.shape[1]) + 0.5))
        return amap, torch.topk(flat, k, dim=1).values.mean(dim=1)

    def describe(self) -> dict:
        return {"smooth_sigma": self.smooth_sigma, "score_reduction": self.reduction,
                "topk_fraction": self.topk_fraction}


def image_score_from(config: dict) -> ImageScore:
    """The run's scoring settings; runs saved before these options existed scored by the plain max."""
    return ImageScore(
        smooth_sigma=float(config.get("smooth_sigma", 0.0)),
        reduction=config.get("score_reduction", "max"),
        topk_fraction=float(config.get("topk_fraction", 0.01)),
    )
