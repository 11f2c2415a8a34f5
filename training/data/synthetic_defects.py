"""Synthetic defects drawn on copies of held-out normal images: anomalies for choosing settings.

The validation split holds only normal images, and the test split may never choose anything.
Choices that need anomalies (which epoch to keep, which lever helps) are therefore made on
validation images against defective copies of themselves: a patch cut from the same image,
rotated and pasted elsewhere (CutPaste, Li et al. 2021), a thin scratch, or a small blob in a
colour the image does not have there. Defects land where the image has structure (sampled by
gradient magnitude), so on an object photographed on a plain background they hit the object,
and on a texture anywhere. Sizes are a share of the image side, small as real defects are.
"""

from __future__ import annotations

import cv2
import numpy as np

KINDS = ("cutpaste", "scratch", "blob")  # the default cycle
# warp: the part's own pixels pushed aside by a smooth bump (a dent, a bent thread): shape, not colour
ALL_KINDS = KINDS + ("warp",)
MIN_SIDE = 16


def _structure_point(gray: np.ndarray, rng: np.random.Generator, margin: int) -> tuple[int, int]:
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    weight = cv2.GaussianBlur(np.hypot(gx, gy), (0, 0), sigmaX=max(2.0, gray.shape[0] / 64))
    h, w = gray.shape
    weight[:margin] = weight[h - margin:] = 0
    weight[:, :margin] = weight[:, w - margin:] = 0
    flat = weight.ravel().astype(np.float64)
    if flat.sum() <= 0:
        return int(rng.integers(margin, h - margin)), int(rng.integers(margin, w - margin))
    index = int(rng.choice(flat.size, p=flat / flat.sum()))
    return divmod(index, w)


def add_synthetic_defect(image: np.ndarray, kind: str, rng: np.random.Generator,
                         strength: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 BGR (H,W,3) -> (defective copy, uint8 {0,1} mask of the changed pixels).

    strength scales the contrast of the defect (1: 60-110 grey levels for scratches and blobs, +-40 on a
    pasted patch): real defects on some parts are far fainter than the default ones.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"synthetic defect strength must be in (0, 1], got {strength}")
    if kind not in ALL_KINDS:
        raise ValueError(f"synthetic defect kind must be one of {ALL_KINDS}, got {kind!r}")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    h, w = image.shape[:2]
    side = min(h, w)
    if side < MIN_SIDE:
        raise ValueError(f"image is {w}x{h}: synthetic defects need at least {MIN_SIDE} px on each side")
    out = image.copy()
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    mask = np.zeros((h, w), dtype=np.uint8)
    size = max(3, int(rng.uniform(0.04, 0.10) * side))
    y, x = _structure_point(gray, rng, margin=size // 2 + 2)
    if kind == "cutpaste":
        sy, sx = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
        patch = image[sy:sy + size, sx:sx + size]
        rotation = cv2.getRotationMatrix2D((size / 2, size / 2), float(rng.uniform(0, 360)), 1.0)
        patch = cv2.warpAffine(patch, rotation, (size, size), borderMode=cv2.BORDER_REFLECT_101)
        patch = np.clip(patch.astype(np.int16) + round(strength * rng.integers(-40, 41)), 0, 255)
        y0, x0 = y - size // 2, x - size // 2
        region = out[y0:y0 + size, x0:x0 + size].astype(np.float32)
        out[y0:y0 + size, x0:x0 + size] = np.round(region + strength * (patch - region)).astype(np.uint8)
        mask[y0:y0 + size, x0:x0 + size] = 1
    elif kind == "warp":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        bump = np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * (size / 2.5) ** 2))
        angle = rng.uniform(0, 2 * np.pi)
        amplitude = strength * rng.uniform(0.15, 0.3) * size
        map_x = xx - np.float32(amplitude * np.cos(angle)) * bump
        map_y = yy - np.float32(amplitude * np.sin(angle)) * bump
        warped = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        mask = (bump > 0.02).astype(np.uint8)  # beyond it the shift is under 0.2 px: the image is kept
        out = np.where(mask[..., None].astype(bool), warped, image)
    else:
        local = float(gray[max(0, y - size):y + size, max(0, x - size):x + size].mean())
        value = int(np.clip(local + rng.choice([-1, 1]) * strength * rng.uniform(60, 110), 0, 255))
        color = (value, value, value)
        if kind == "scratch":
            angle = rng.uniform(0, np.pi)
            half = size * rng.uniform(0.8, 1.6)
            p1 = (int(x - half * np.cos(angle)), int(y - half * np.sin(angle)))
            p2 = (int(x + half * np.cos(angle)), int(y + half * np.sin(angle)))
            thickness = max(1, side // 200)
            cv2.line(out, p1, p2, color, thickness)
            cv2.line(mask, p1, p2, 1, thickness)
        else:
            axes = (max(2, size // 3), max(2, int(size // 3 * rng.uniform(0.4, 1.0))))
            angle = float(rng.uniform(0, 180))
            cv2.ellipse(out, (x, y), axes, angle, 0, 360, color, -1)
            cv2.ellipse(mask, (x, y), axes, angle, 0, 360, 1, -1)
    mask &= np.any(out != image, axis=2).astype(np.uint8)  # only pixels that really changed
    return out, mask


def synthetic_anomalies(images: list[np.ndarray], seed: int = 0, strength: float = 1.0,
                        kinds: tuple[str, ...] = KINDS) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One defective copy of each image, kinds in turn, reproducible from the seed."""
    rng = np.random.default_rng(seed)
    defective, masks = [], []
    for index, image in enumerate(images):
        copy, mask = add_synthetic_defect(image, kinds[index % len(kinds)], rng, strength)
        defective.append(copy)
        masks.append(mask)
    return defective, masks
