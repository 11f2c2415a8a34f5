"""The DFM graph: backbone tap -> PCA subspace -> reconstruction error / Gaussian NLL."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.models.dfm.anomaly_map import reconstruction_map
from training.models.image_score import ImageScore

SCORE_TYPES = ("fre", "nll", "map")


class DfmModel(nn.Module):
    """Frozen pretrained features of one or more taps, each image flattened into one vector.

    The PCA (mean, components, explained variances) is fitted once on normal
    images and kept as buffers, so the fitted model is a plain exportable graph.
    score "fre": total squared reconstruction error; "nll": negative log-likelihood
    of the projection under the (diagonal, by construction) Gaussian of the training
    projections; "map": the image score of the reconstruction-error map (`image_score`: top-k
    mean or max), which lets a small defect count instead of being averaged over the image.
    The map is the per-location reconstruction error in every case. Several taps are average-
    pooled to the coarsest one's grid and concatenated along channels.
    """

    def __init__(
        self,
        extractor: nn.Module,
        taps: tuple[int, ...] = (2,),
        pool: int = 1,
        score_type: str = "fre",
        feature_dim: int = 0,
        n_components: int = 0,
        image_score: ImageScore | None = None,
    ):
        super().__init__()
        if score_type not in SCORE_TYPES:
            raise ValueError(f"score_type must be one of {SCORE_TYPES}, got {score_type!r}")
        self.extractor = extractor.eval()
        for parameter in self.extractor.parameters():
            parameter.requires_grad_(False)
        self.taps = tuple(int(tap) for tap in taps)
        if not self.taps or any(tap not in (0, 1, 2) for tap in self.taps):
            raise ValueError(f"DFM taps must be among 0, 1, 2 (stride 4, 8, 16), got {taps}")
        self.pool = pool
        self.image_score = image_score or ImageScore()
        self.score_type = score_type
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("components", torch.zeros(n_components, feature_dim))
        self.register_buffer("variances", torch.ones(n_components))

    def train(self, mode: bool = True) -> "DfmModel":
        super().train(mode)
        self.extractor.eval()  # never update the backbone's BatchNorm statistics
        return self

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    def tap_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.select_taps(self.extractor(images))

    def select_taps(self, all_features: list[torch.Tensor]) -> torch.Tensor:
        """The backbone's tap outputs -> the pooled (N, C, h, w) features the PCA sees."""
        grid = all_features[max(self.taps)].shape[-2:]
        parts = []
        for tap in self.taps:
            features = all_features[tap]
            if features.shape[-2:] != grid:  # finer tap: average onto the coarsest tap's grid
                features = F.adaptive_avg_pool2d(features, [int(grid[0]), int(grid[1])])
            parts.append(features)
        features = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if self.pool > 1:
            features = F.avg_pool2d(features, kernel_size=self.pool)
        return features

    @torch.no_grad()
    def fit(self, features: np.ndarray, variance_ratio: float = 0.97) -> None:
        """Fit the PCA on flattened normal-image features (N, D) with scikit-learn."""
        from sklearn.decomposition import PCA

        if features.shape[0] < 2:
            raise ValueError("DFM needs at least 2 training images to fit a PCA")
        pca = PCA(n_components=variance_ratio, svd_solver="full")
        pca.fit(features.astype(np.float64))
        self.mean = torch.as_tensor(pca.mean_, dtype=torch.float32)
        self.components = torch.as_tensor(pca.components_, dtype=torch.float32)
        # Floor tiny variances so the NLL stays finite.
        floor = max(float(pca.explained_variance_.max()) * 1e-6, 1e-12)
        self.variances = torch.as_tensor(np.maximum(pca.explained_variance_, floor), dtype=torch.float32)

    def reconstruction_error(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, h, w) features -> (projection (N, k), squared reconstruction error (N, C, h, w))."""
        batch = features.shape[0]
        centered = features.reshape(batch, -1) - self.mean
        # OpenVINO stores `components` twice (as is and transposed) so both products run as fast
        # fully-connected layers; a one-copy graph was measured slower (benchmarks/README_SECTION_speed.md).
        projection = centered @ self.components.T
        residual = centered - projection @ self.components
        return projection, residual.pow(2).reshape(features.shape)

    def error_map(self, all_features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """The unsmoothed reconstruction-error map of already computed backbone features (STFPM's
        teacher features, when this model is STFPM's subspace term)."""
        return reconstruction_map(self.reconstruction_error(self.select_taps(all_features))[1], size=size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.tap_features(images)
        projection, squared_error = self.reconstruction_error(features)
        amap, map_score = self.image_score(reconstruction_map(squared_error, size=images.shape[-2:]))
        if self.score_type == "map":
            score = map_score
        elif self.score_type == "fre":
            score = squared_error.flatten(1).sum(dim=1)
        else:
            log_det = torch.log(self.variances).sum()
            score = 0.5 * (projection.pow(2) / self.variances).sum(dim=1) + 0.5 * log_det
            score = score + 0.5 * self.n_components * math.log(2 * math.pi)
        return amap, score
