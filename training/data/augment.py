"""Augmentation of normal training images, for parts whose pose varies on the line.

A screw lies at any angle; a bottle is always upright. Rotations and flips teach the model
that pose is normal, which helps the first and can hurt the second (a flipped label is a
defect there), so it is off by default and chosen per category. Rotation reflects the border
instead of filling black corners the test images never have. Validation images are never
augmented: they estimate the thresholds on what the camera really delivers.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

OPERATIONS = ("rotate", "hflip", "vflip")


@dataclass(frozen=True)
class Augmentation:
    rotate: bool = False
    hflip: bool = False
    vflip: bool = False

    @classmethod
    def parse(cls, text: str) -> "Augmentation":
        parts = {p.strip() for p in str(text).split(",") if p.strip()} - {"none"}
        unknown = parts - set(OPERATIONS)
        if unknown:
            raise ValueError(f"--augment: unknown operation(s) {', '.join(sorted(unknown))}; use {', '.join(OPERATIONS)} or none")
        return cls(**{name: name in parts for name in OPERATIONS})

    @property
    def active(self) -> bool:
        return self.rotate or self.hflip or self.vflip

    def __call__(self, chw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A (3,H,W) float image -> a randomly rotated/flipped copy."""
        image = np.ascontiguousarray(np.transpose(chw, (1, 2, 0)))
        if self.hflip and rng.random() < 0.5:
            image = image[:, ::-1]
        if self.vflip and rng.random() < 0.5:
            image = image[::-1]
        if self.rotate:
            h, w = image.shape[:2]
            matrix = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(0, 360)), 1.0)
            image = cv2.warpAffine(np.ascontiguousarray(image), matrix, (w, h), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REFLECT_101)
        return np.ascontiguousarray(np.transpose(image, (2, 0, 1)))
