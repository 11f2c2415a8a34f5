"""The STFPM graph that is trained, exported and used as the parity reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.models.dfm import DfmModel
from training.models.image_score import ImageScore
from training.models.patch_memory import PatchMemory
from training.models.stfpm.anomaly_map import anomaly_map

FUSIONS = ("map", "score")


def combine_terms(maps: list[torch.Tensor], scales, weights: list[float]) -> torch.Tensor:
    """Sum of each term's map over its scale (its mean image score on validation normals), weighted."""
    combined = maps[0] / scales[0]
    for index in range(1, len(maps)):
        combined = combined + weights[index] * maps[index] / scales[index]
    return combined


def fuse_terms(maps: list[torch.Tensor], scales, weights: list[float], image_score: ImageScore,
               last_by_score: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(smoothed map, image score) of several terms. The map is always their scaled, weighted sum. The image
    score is that sum's; with last_by_score, that of the other terms' sum plus the last term's own image
    score, scaled and weighted the same way."""
    if not last_by_score:
        return image_score(combine_terms(maps, scales, weights))
    amap, score = image_score(combine_terms(maps[:-1], scales[:-1], weights[:-1]))
    last_map, last_score = image_score(maps[-1])
    return amap + weights[-1] * last_map / scales[-1], score + weights[-1] * last_score / scales[-1]


def term_scales(image_score: ImageScore, *maps: torch.Tensor) -> torch.Tensor:
    """Each term's mean image score over normal images' (N,1,H,W) maps: the scales that make a term's
    weight mean the same on every category and backbone."""
    return torch.stack([image_score(term)[1].mean() for term in maps]).clamp_min(1e-12)


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

    With a `memory` (training.models.patch_memory), `+ memory_weight * nearest-patch distance / scale`
    as well, computed on the teacher's features of the full input, while student, teacher and subspace
    see it average-pooled by `student_pool` (2: a 512 px input, the student's terms at 256 px). Why: the
    few-pixel defects of a small part need the finer grid (docs/TRAINING.md, round 11); the student's
    terms were chosen at 256 px and lose at 384 px.

    `memory_fusion` says how the memory joins the image score: through the summed map ("map"), or by its own
    image score added to the score of the student's terms' map ("score"; the map is the same). Why try
    "score": the memory peaks on the full grid, the student's terms on the pooled one, and a sum of maps lets
    each term's normal background dilute the other's peak. On screw the synthetic signal ties them (round 12).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, image_score: ImageScore | None = None,
                 map_taps: tuple[int, ...] | None = None, map_combine: str = "product",
                 subspace: DfmModel | None = None, subspace_weight: float = 0.0,
                 memory: PatchMemory | None = None, memory_weight: float = 0.0, student_pool: int = 1,
                 memory_fusion: str = "map"):
        super().__init__()
        if memory_fusion not in FUSIONS:
            raise ValueError(f"memory fusion must be one of {', '.join(FUSIONS)}, got {memory_fusion!r}")
        self.memory_fusion = memory_fusion
        if (subspace is None) != (subspace_weight == 0.0):
            raise ValueError("a subspace term needs a weight > 0, and a weight needs a subspace")
        if (memory is None) != (memory_weight == 0.0):
            raise ValueError("a memory term needs a weight > 0, and a weight needs a memory")
        if student_pool < 1:
            raise ValueError(f"student_pool must be >= 1, got {student_pool}")
        self.subspace = subspace
        self.subspace_weight = float(subspace_weight)
        self.memory = memory
        self.memory_weight = float(memory_weight)
        self.student_pool = int(student_pool)
        terms = 1 + (subspace is not None) + (memory is not None)
        if terms > 1:  # not trained: set on held-out normal images (training.stfpm.calibrate_map_scales)
            self.register_buffer("map_scales", torch.ones(terms))
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

    def student_input(self, images: torch.Tensor) -> torch.Tensor:
        """The image as the student's terms see it: area-averaged by `student_pool` (at an integer factor the
        same as resizing the source to that size with cv2.INTER_AREA, the package's preprocessing)."""
        return F.avg_pool2d(images, self.student_pool) if self.student_pool > 1 else images

    def features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Teacher and student features of the student's input: what the loss compares."""
        small = self.student_input(images)
        with torch.no_grad():
            teacher_features = self.teacher(small)
        return teacher_features, self.student(small)

    def term_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The unscaled maps: student discrepancy, then the subspace error and the memory distance where present."""
        return self.term_maps_from_features(*self.features(images), images)

    def term_maps_from_features(self, teacher_features: list[torch.Tensor], student_features: list[torch.Tensor],
                                images: torch.Tensor) -> list[torch.Tensor]:
        """`term_maps` from the student's features already computed (validation reuses the loss pass's)."""
        size = images.shape[-2:]
        maps = [anomaly_map(teacher_features, student_features, size=size, taps=self.map_taps,
                            combine=self.map_combine)]
        if self.subspace is not None:
            maps.append(self.subspace.error_map(teacher_features, size))
        if self.memory is not None:
            with torch.no_grad():
                full = teacher_features if self.student_pool == 1 else self.teacher(images)
            maps.append(self.memory.error_map(full, size))
        return maps

    @property
    def term_weights(self) -> list[float]:
        """Each term's weight, in `term_maps`' order (the discrepancy's is 1)."""
        return [1.0] + [self.subspace_weight] * (self.subspace is not None) + [self.memory_weight] * (self.memory is not None)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.term_maps(images)
        if len(maps) == 1:
            return self.image_score(maps[0])
        memory_by_score = self.memory is not None and self.memory_fusion == "score"  # the memory is the last term
        return fuse_terms(maps, self.map_scales, self.term_weights, self.image_score, memory_by_score)
