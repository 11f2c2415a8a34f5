"""A patch memory (PatchCore, Roth et al. 2022) on frozen backbone features: STFPM's memory term."""

from training.models.patch_memory.coreset import greedy_coreset
from training.models.patch_memory.torch_model import PatchMemory, locally_aware_patches, patch_rows

__all__ = ["PatchMemory", "greedy_coreset", "locally_aware_patches", "patch_rows"]
