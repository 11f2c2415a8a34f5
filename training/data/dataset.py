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

from .augment import Augmentation
from .errors import DatasetError
from .mvtec import Sample


class AnomalyDataset(Dataset):
    """Samples -> dicts of image (3,H,W) float [0,1], label, mask (1,H,W), has_mask, path.

    ``cache`` keeps the preprocessed arrays in memory: MVTec-sized categories are a
    few hundred images, and decoding 512x512 PNGs every epoch dominates training time.
    ``augment`` (training images only) is applied after the cache, so every epoch sees new poses.
    """

    def __init__(self, samples: Sequence[Sample], spec: PreprocessSpec, cache: bool = True,
                 augment: Augmentation | None = None, seed: int = 0) -> None:
        self.samples = list(samples)
        self.spec = spec
        self.cache = cache
        self.augment = augment if augment is not None and augment.active else None
        self._rng = np.random.default_rng(seed)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, bool]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray, bool]:
        sample = self.samples[index]
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
            loaded = self._load(index)
            if self.cache:
                self._cache[index] = loaded
        image, mask, has_mask = loaded
        if self.augment is not None:
            image = self.augment(image, self._rng)
        return {
            "image": torch.from_numpy(image.copy()),
            "label": torch.tensor(sample.label, dtype=torch.long),
            "mask": torch.from_numpy(mask.copy()),
            "has_mask": has_mask,
            "path": str(sample.path),
        }


class FrameDataset(AnomalyDataset):
    """Frames already in memory (synthetic defects drawn on validation images), same tensors as from disk."""

    def __init__(self, frames: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], labels: Sequence[int],
                 spec: PreprocessSpec, names: Sequence[str]) -> None:
        samples = [Sample(path=name, label=int(label), defect_type="synthetic" if label else "good")
                   for name, label in zip(names, labels)]
        super().__init__(samples, spec, cache=True)
        self.frames, self.masks = list(frames), list(masks)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray, bool]:
        image = preprocess(self.frames[index], self.spec)
        mask = self.masks[index]
        if mask is None:
            return image, np.zeros((1, self.spec.height, self.spec.width), dtype=np.float32), True
        return image, preprocess_mask(mask, self.spec)[None].astype(np.float32), True


def make_loader(
    samples: Sequence[Sample] | AnomalyDataset,
    spec: PreprocessSpec,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    cache: bool = True,
    augment: Augmentation | None = None,
) -> DataLoader:
    """DataLoader whose shuffle and augmentation depend only on the seed, for reproducible runs."""
    if batch_size < 1:
        raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    dataset = samples if isinstance(samples, AnomalyDataset) else AnomalyDataset(
        samples, spec, cache=cache, augment=augment, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,  # keeps each worker's cache across epochs
        drop_last=False,
    )
