"""DFM: Deep Feature Modeling (Ahuja et al., 2019): PCA + Gaussian on pretrained features."""

from training.models.dfm.torch_model import DfmModel

__all__ = ["DfmModel"]
