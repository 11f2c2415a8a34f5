"""The memory term's graph: locally aware patches -> distance to the nearest remembered normal patch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.models.upsample import resize_bilinear

TAPS = (1, 2)  # stride 8 and 16: PatchCore's mid-level features, fine enough for a defect of a few pixels


def locally_aware_patches(taps: list[torch.Tensor]) -> torch.Tensor:
    """Stride-8 and stride-16 taps, each averaged over 3x3 neighbours, concatenated on the stride-8 grid."""
    fine, coarse = (F.avg_pool2d(taps[i], 3, stride=1, padding=1) for i in TAPS)
    coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([fine, coarse], dim=1)


def patch_rows(patches: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) patches -> (N*h*w, C), one row per patch: what the coreset selects from."""
    return patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1])


class PatchMemory(nn.Module):
    """Normal patches kept as a buffer; the map is each location's distance to its nearest one.

    Why in STFPM: a patch matches anywhere in the memory, so a part at any angle needs no posed copies,
    and a defect is a patch no normal image had, which a student cannot learn to imitate. Fitted once
    (training.stfpm.fit_memory), never trained.
    """

    def __init__(self, size: int = 0, channels: int = 0):
        super().__init__()
        self.register_buffer("memory", torch.zeros(size, channels))

    @property
    def size(self) -> int:
        return int(self.memory.shape[0])

    def error_map(self, taps: list[torch.Tensor], size) -> torch.Tensor:
        """Backbone taps -> (N, 1, H, W) nearest-patch distance map at the input size."""
        return self.error_map_of_patches(locally_aware_patches(taps), size)

    def error_map_of_patches(self, patches: torch.Tensor, size) -> torch.Tensor:
        """`error_map` from `locally_aware_patches` already taken: a benchmark refitting several memories takes
        each image's patches once."""
        return resize_bilinear(nearest_distance(patches, self.memory), size)


def nearest_distance(patches: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) patches, (M, C) memory -> (N, 1, h, w) Euclidean distance of each patch to its nearest."""
    n, c, h, w = patches.shape
    queries = patches.flatten(2).transpose(1, 2)  # (N, hw, C)
    # ||q - m||^2 = ||q||^2 + (||m||^2 - 2 q.m). The bracket is a product with a bias, which OpenVINO runs as one
    # FullyConnected; its minimum over the memory comes first, so ||q||^2 is added to hw values, not hw x M.
    # The product stays a batched (rank-3) MatMul, which INT8 calibration leaves FP32 (calibration.int8
    # compresses only rank-2 feature products): INT8 weights would shift small distances by more than a defect adds.
    nearest = (torch.matmul(queries, -2 * memory.T) + memory.pow(2).sum(1)).amin(dim=2)
    return (queries.pow(2).sum(2) + nearest).clamp_min(0).sqrt().reshape(n, 1, h, w)
