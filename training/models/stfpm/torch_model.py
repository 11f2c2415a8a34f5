"""The STFPM graph that is trained, exported and used as the parity reference."""

from __future__ import annotations

import torch
from torch import nn

from training.models.image_score import ImageScore
from training.models.stfpm.anomaly_map import anomaly_map


class StfpmModel(nn.Module):
    """Frozen pretrained teacher + student of the same architecture trained from scratch.

    forward(images in [0,1], NCHW) -> (anomaly_map (N,1,H,W), score (N,)), raw values; the map is
    smoothed and reduced to the score by `image_score` (plain max when not given).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, image_score: ImageScore | None = None,
                 map_taps: tuple[int, ...] | None = None, map_combine: str = "product"):
        super().__init__()
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

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        teacher_features, student_features = self.features(images)
        return self.image_score(anomaly_map(teacher_features, student_features, size=images.shape[-2:],
                                            taps=self.map_taps, combine=self.map_combine))
