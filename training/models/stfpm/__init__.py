"""STFPM: Student-Teacher Feature Pyramid Matching (Wang et al., 2021)."""

from training.models.stfpm.loss import stfpm_loss
from training.models.stfpm.torch_model import StfpmModel

__all__ = ["StfpmModel", "stfpm_loss"]
