"""The STFPM graph that is trained, exported and used as the parity reference."""

from __future__ import annotations

import torch
from torch import nn

from training.models.dfm import DfmModel
from training.models.image_score import ImageScore
from training.models.stfpm.anomaly_map import anomaly_map


def add_subspace_term(discrepancy: torch.Tensor, subspace_error: torch.Tensor, scales, weight: float) -> torch.Tensor:
    """Each term over its mean image score on validation normals, the subspace term weighted."""
    return discrepancy / scales[0] + weight * subspace_error / scales[1]


def term_scales(image_score: ImageScore, discrepancy: torch.Tensor, subspace_error: torch.Tensor) -> torch.Tensor:
    """Each term's mean image score over normal images' (N,1,H,W) maps: the scales that make a subspace
    weight mean the same on every category and backbone."""
    return torch.stack([image_score(term)[1].mean() for term in (discrepancy, subspace_error)]).clamp_min(1e-12)


class StfpmModel(nn.Module):
    """Frozen pretrained teacher + student of the same architecture trained from scratch.

    forward(images in [0,1], NCHW) -> (anomaly_map (N,1,H,W), score (N,)), raw values; the map is
    smoothed and reduced to the score by `image_score` (plain max when not given).

    With a `subspace` (a DFM fitted on the teacher's own features, sharing the teacher), the map is
    student discrepancy / scale + subspace_weight * reconstruction error / scale, each term divided
    by its mean image score on held-out normal images (`map_scales`). Why: a student trained from
    scratch also learns to imitate the teacher on defects it never saw (on MVTec screw it ranks
    them barely above chance), while a defect that breaks the normal images' feature subspace
    cannot be imitated. The teacher's features are computed anyway: the term costs two matmuls, but
    their PCA matrices add 7-9 MB (INT8 weights) to 30 MB (FP32) to a bundle.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, image_score: ImageScore | None = None,
                 map_taps: tuple[int, ...] | None = None, map_combine: str = "product",
                 subspace: DfmModel | None = None, subspace_weight: float = 0.0):
        super().__init__()
        if (subspace is None) != (subspace_weight == 0.0):
            raise ValueError("a subspace term needs a weight > 0, and a weight needs a subspace")
        self.subspace = subspace
        self.subspace_weight = float(subspace_weight)
        if subspace is not None:  # not trained: set on held-out normal images (training.stfpm.calibrate_map_scales)
            self.register_buffer("map_scales", torch.ones(2))
        self.map_taps = None if map_taps is None else tuple(int(t) for t in map_taps)
        self.map_combine = map_combine
        self.teacher = teacher
        self.student = student
        self.image_score = image_score or ImageScore()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True) -> "StfpmModel":
        # The teacher's BatchNorm statistics must never move.
        super().train(mode)
        self.teacher.eval()
        return self

    def features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with torch.no_grad():
            teacher_features = self.teacher(images)
        return teacher_features, self.student(images)

    def term_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The unscaled student-discrepancy map and the subspace error map (None without a subspace)."""
        return self.term_maps_from_features(*self.features(images), size=images.shape[-2:])

    def term_maps_from_features(self, teacher_features: list[torch.Tensor], student_features: list[torch.Tensor],
                                size) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`term_maps` from features already computed (validation reuses the loss pass's)."""
        discrepancy = anomaly_map(teacher_features, student_features, size=size, taps=self.map_taps,
                                  combine=self.map_combine)
        if self.subspace is None:
            return discrepancy, None
        return discrepancy, self.subspace.error_map(teacher_features, size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        discrepancy, subspace_error = self.term_maps(images)
        if subspace_error is None:
            return self.image_score(discrepancy)
        return self.image_score(add_subspace_term(discrepancy, subspace_error, self.map_scales, self.subspace_weight))
