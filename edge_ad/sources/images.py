"""Reading still images from disk, with one clear error for anything unreadable."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageReadError(OSError):
    """An image file that is missing, empty, truncated or not an image."""


def read_image(path: str | Path, grayscale: bool = False) -> np.ndarray:
    """Read an image as uint8 BGR (or grayscale HxW when the file is, or when asked)."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image not found: {path}")
    try:
        data = np.fromfile(str(path), dtype=np.uint8)  # also handles non-ASCII paths
    except OSError as exc:  # permissions, I/O errors, a file removed meanwhile
        raise ImageReadError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if data.size == 0:
        raise ImageReadError(f"image file is empty: {path}")
    flags = cv2.IMREAD_GRAYSCALE if grayscale else cv2.IMREAD_UNCHANGED
    try:
        image = cv2.imdecode(data, flags)
    except cv2.error as exc:  # e.g. more pixels than OpenCV allows (a decompression bomb)
        raise ImageReadError(f"cannot decode image {path}: {str(exc).strip().splitlines()[-1]}") from None
    if image is None or image.size == 0:
        raise ImageReadError(f"cannot decode image (corrupt or not an image): {path}")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif image.ndim == 3 and image.shape[2] == 2:  # gray + alpha
        image = np.ascontiguousarray(image[:, :, 0])
    return image


def list_images(folder: str | Path) -> list[Path]:
    """Image files in a folder, sorted by name (not recursive)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
