"""A small MVTec-layout dataset drawn from scratch, for tests and demos without downloads.

Normal images are a woven texture with per-image phase/rotation jitter, a lighting
gradient and sensor noise, so they are alike but never identical (a detector that
memorized pixels would fail). Defects are drawn with OpenCV primitives into the
image and, with the same primitive, into the mask, so the mask is exactly the
changed pixels. Texture values stay inside a band and defect colors outside it,
which guarantees every masked pixel differs from the clean texture.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import cv2
import numpy as np

DEFECT_TYPES = ("scratch", "blob", "missing")
TEXTURE_RANGE = (0.25, 0.78)  # texture intensities (0..1) stay inside this band
_DARK = (0.03, 0.15)  # defect colors are drawn from these bands, outside the texture band
_BRIGHT = (0.88, 1.0)
_TINT = np.array([0.96, 0.88, 0.74])  # beige fabric, RGB


def make_texture(rng: np.random.Generator, image_size: int, grayscale: bool = False) -> np.ndarray:
    """A normal image: float (H,W,3) RGB or (H,W) in TEXTURE_RANGE."""
    size = int(image_size)
    period = size / 8.0 * rng.uniform(0.97, 1.03)
    angle = np.deg2rad(rng.uniform(-2.0, 2.0))
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    xr = x * np.cos(angle) - y * np.sin(angle) + rng.uniform(0, period)
    yr = x * np.sin(angle) + y * np.cos(angle) + rng.uniform(0, period)
    u, v = 2 * np.pi * xr / period, 2 * np.pi * yr / period
    over = 0.5 + 0.5 * np.tanh(3.0 * np.sin(u) * np.sin(v))  # which thread lies on top
    threads = over * np.cos(4 * v) ** 2 + (1 - over) * np.cos(4 * u) ** 2  # fibres along each thread
    intensity = 0.42 + 0.14 * over + 0.10 * threads
    theta = rng.uniform(0, 2 * np.pi)
    ramp = ((x / size - 0.5) * np.cos(theta) + (y / size - 0.5) * np.sin(theta))
    intensity *= 1.0 + rng.uniform(0.06, 0.14) * ramp  # uneven lighting
    if grayscale:
        image = intensity + rng.normal(0.0, 0.015, intensity.shape)
    else:
        tint = _TINT + rng.uniform(-0.02, 0.02, 3)
        image = intensity[..., None] * tint + rng.normal(0.0, 0.015, (size, size, 3))
    return np.clip(image, *TEXTURE_RANGE)


def _defect_mask(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """Draw one defect shape (about 1-5 % of the image) into a uint8 mask."""
    mask = np.zeros((size, size), dtype=np.uint8)
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
    angle = rng.uniform(0, 180)
    if kind == "scratch":
        half = rng.uniform(0.22, 0.35) * size
        dx, dy = half * np.cos(np.deg2rad(angle)), half * np.sin(np.deg2rad(angle))
        p1 = (int(round(cx - dx)), int(round(cy - dy)))
        p2 = (int(round(cx + dx)), int(round(cy + dy)))
        cv2.line(mask, p1, p2, 255, thickness=max(2, round(size / 36)), lineType=cv2.LINE_8)
    elif kind == "blob":
        axes = (max(2, round(rng.uniform(0.06, 0.11) * size)), max(2, round(rng.uniform(0.06, 0.11) * size)))
        cv2.ellipse(mask, (int(round(cx)), int(round(cy))), axes, angle, 0, 360, 255, thickness=-1, lineType=cv2.LINE_8)
    elif kind == "missing":
        sides = rng.uniform(0.12, 0.2, 2) * size
        corners = cv2.boxPoints(((cx, cy), (sides[0], sides[1]), angle))
        cv2.fillConvexPoly(mask, np.round(corners).astype(np.int32), 255, lineType=cv2.LINE_8)
    else:
        raise ValueError(f"unknown defect type {kind!r}; known: {', '.join(DEFECT_TYPES)}")
    return mask


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint a defect into a float texture; returns (defective image, uint8 mask 0/255)."""
    mask = _defect_mask(rng, kind, image.shape[0])
    band = _DARK if rng.random() < 0.5 else _BRIGHT
    channels = 1 if image.ndim == 2 else image.shape[2]
    if kind == "blob" and channels == 3:
        # contamination: a colour no texture pixel has (one channel outside the band)
        color = np.array([rng.uniform(0.4, 0.6), rng.uniform(*_DARK), rng.uniform(*_DARK)])
        lo, hi = np.array([0.0, 0.0, 0.0]), np.array([1.0, _DARK[1], _DARK[1]])
    else:
        color = np.full(channels, rng.uniform(*band))
        lo, hi = np.full(channels, band[0]), np.full(channels, band[1])
    defective = image.copy()
    inside = mask > 0
    n = int(inside.sum())
    noise = rng.normal(0.0, 0.01, (n, channels))
    pixels = np.clip(color + noise, lo, hi)
    defective[inside] = pixels[:, 0] if image.ndim == 2 else pixels
    return defective, mask


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float RGB/gray in [0,1] -> uint8 BGR/gray, ready for cv2.imwrite."""
    quantized = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    return quantized if quantized.ndim == 2 else cv2.cvtColor(quantized, cv2.COLOR_RGB2BGR)


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"cannot write {path}")


def generate_synthetic_dataset(
    root: str | Path,
    category: str = "synthetic",
    image_size: int = 128,
    n_train: int = 40,
    n_test_good: int = 8,
    n_test_defect: int = 8,
    seed: int = 0,
    grayscale: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write <root>/<category>/{train,test,ground_truth}; returns the data root.

    Every image has its own random stream (seed, split, index), so changing one
    count does not change the other images. Defect types are assigned round-robin.
    """
    root = Path(root)
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 for visible defects, got {image_size}")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise ValueError("need n_train >= 1 and non-negative test counts")
    cat_dir = root / category
    if cat_dir.exists() and any(cat_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{cat_dir} already exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(cat_dir)

    for i in range(n_train):
        rng = np.random.default_rng([seed, 0, i])
        _write(cat_dir / "train" / "good" / f"{i:03d}.png", to_uint8(make_texture(rng, image_size, grayscale)))
    for i in range(n_test_good):
        rng = np.random.default_rng([seed, 1, i])
        _write(cat_dir / "test" / "good" / f"{i:03d}.png", to_uint8(make_texture(rng, image_size, grayscale)))
    counters = dict.fromkeys(DEFECT_TYPES, 0)
    for i in range(n_test_defect):
        kind = DEFECT_TYPES[i % len(DEFECT_TYPES)]
        stem = f"{counters[kind]:03d}"
        counters[kind] += 1
        rng = np.random.default_rng([seed, 2, i])
        image, mask = add_defect(make_texture(rng, image_size, grayscale), kind, rng)
        _write(cat_dir / "test" / kind / f"{stem}.png", to_uint8(image))
        _write(cat_dir / "ground_truth" / kind / f"{stem}_mask.png", mask)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.data.synthetic",
        description="Write a small synthetic MVTec-layout anomaly dataset (images + exact masks).",
    )
    parser.add_argument("--out", required=True, type=Path, help="data root to write into")
    parser.add_argument("--category", default="synthetic")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-test-good", type=int, default=8)
    parser.add_argument("--n-test-defect", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grayscale", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing category folder")
    args = parser.parse_args(argv)
    try:
        root = generate_synthetic_dataset(
            args.out,
            category=args.category,
            image_size=args.image_size,
            n_train=args.n_train,
            n_test_good=args.n_test_good,
            n_test_defect=args.n_test_defect,
            seed=args.seed,
            grayscale=args.grayscale,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(root / args.category)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
