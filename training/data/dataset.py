"""Torch view of a list of samples: exactly the tensors the deployed model will see.

Every image goes through ``edge_ad.model.preprocess.preprocess`` (the one definition
shared with the runtime), so there is no training-only resize or color path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from edge_ad.sources.images import read_image
from edge_ad.model.preprocess import FrameError, PreprocessSpec, preprocess, preprocess_mask

from .errors import DatasetError
from .mvtec import Sample


class AnomalyDataset(Dataset):
    """Samples -> dicts of image (3,H,W) float [0,1], label, mask (1,H,W), has_mask, path.

    ``cache`` keeps the preprocessed arrays in memory: MVTec-sized categories are a
    few hundred images, and decoding 512x512 PNGs every epoch dominates training time.
    """

    def __init__(self, samples: Sequence[Sample], spec: PreprocessSpec, cache: bool = True) -> None:
        self.samples = list(samples)
        self.spec = spec
        self.cache = cache
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, bool]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, sample: Sample) -> tuple[np.ndarray, np.ndarray, bool]:
        frame = read_image(sample.path)  # ImageReadError names the file
        try:
            image = preprocess(frame, self.spec)
        except FrameError as exc:
            raise DatasetError(f"cannot use image {sample.path}: {exc}") from exc
        height, width = self.spec.height, self.spec.width
        if sample.mask_path is not None:
            raw = read_image(sample.mask_path, grayscale=True)
            if raw.shape[:2] != frame.shape[:2]:
                raise DatasetError(
                    f"mask {sample.mask_path} is {raw.shape[1]}x{raw.shape[0]} but its image "
                    f"{sample.path} is {frame.shape[1]}x{frame.shape[0]}"
                )
            mask = preprocess_mask(raw, self.spec)[None].astype(np.float32)
            has_mask = True
        else:
            mask = np.zeros((1, height, width), dtype=np.float32)
            has_mask = sample.label == 0  # a normal image's mask is known to be empty
        return image, mask, has_mask

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        loaded = self._cache.get(index)
        if loaded is None:
            loaded = self._load(sample)
            if self.cache:
                self._cache[index] = loaded
        image, mask, has_mask = loaded
        return {
            "image": torch.from_numpy(image.copy()),
            "label": torch.tensor(sample.label, dtype=torch.long),
            "mask": torch.from_numpy(mask.copy()),
            "has_mask": has_mask,
            "path": str(sample.path),
        }


def make_loader(
    samples: Sequence[Sample],
    spec: PreprocessSpec,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    cache: bool = True,
) -> DataLoader:
    """DataLoader whose shuffle order depends only on the seed, for reproducible runs."""
    if batch_size < 1:
        raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        AnomalyDataset(samples, spec, cache=cache),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,  # keeps each worker's cache across epochs
        drop_last=False,
    )
