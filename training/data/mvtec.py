"""Reader for the MVTec AD folder layout, the interchange format for all training data.

Layout (``good`` = normal)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png   (optional)

Problems are reported up front with one clear line each, because a silently
half-read dataset gives a model whose metrics look fine and mean nothing.
Images themselves are only decoded later (by the Dataset), so a corrupt file
surfaces as ``edge_ad.sources.images.ImageReadError`` naming that file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from edge_ad.sources.images import IMAGE_SUFFIXES, list_images

from .errors import DatasetError

NORMAL = "good"
MASK_SUFFIX = "_mask"


@dataclass(frozen=True)
class Sample:
    """One image and what is known about it."""

    path: Path
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" for normal images
    mask_path: Path | None = None


@dataclass
class MVTecCategory:
    """One category's train (normal only) and test samples."""

    root: Path
    category: str
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    has_masks: bool = False  # every anomalous test image has a pixel mask

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect_type for s in self.test if s.label == 1})


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_by_stem(folder: Path) -> dict[str, Path]:
    """Images keyed by stem; two files with one stem would make mask matching ambiguous."""
    by_stem: dict[str, Path] = {}
    for path in list_images(folder):
        if path.stem in by_stem:
            raise DatasetError(f"two images share the name {path.stem!r} in {folder}: {by_stem[path.stem].name}, {path.name}")
        by_stem[path.stem] = path
    return by_stem


def _image_stem_of_mask(mask: Path) -> str:
    stem = mask.stem
    return stem[: -len(MASK_SUFFIX)] if stem.endswith(MASK_SUFFIX) else stem


def _read_masks(gt_dir: Path, test_images: dict[str, dict[str, Path]]) -> dict[Path, Path]:
    """Image path -> mask path, refusing masks that point at no image."""
    masks: dict[Path, Path] = {}
    for defect_dir in _subdirs(gt_dir):
        defect = defect_dir.name
        if defect == NORMAL:  # normal images have all-zero masks by definition
            continue
        images = test_images.get(defect, {})
        for mask in list_images(defect_dir):
            image = images.get(_image_stem_of_mask(mask))
            if image is None:
                raise DatasetError(
                    f"mask without its image: {mask} (expected test/{defect}/{_image_stem_of_mask(mask)}"
                    f"{{{','.join(IMAGE_SUFFIXES)}}})"
                )
            if image in masks:
                raise DatasetError(f"two masks for one image {image}: {masks[image].name}, {mask.name}")
            masks[image] = mask
    return masks


def available_categories(data_root: str | Path) -> list[str]:
    """Category folders under a data root (those with a train or test folder)."""
    root = Path(data_root)
    if not root.is_dir():
        return []
    return [p.name for p in _subdirs(root) if (p / "train").is_dir() or (p / "test").is_dir()]


def load_category(data_root: str | Path, category: str) -> MVTecCategory:
    """List and check one category; a missing ground_truth folder means image-level labels only."""
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data root does not exist or is not a folder: {root}")
    cat_dir = root / category
    if not category or not cat_dir.is_dir():
        found = available_categories(root)
        listing = ", ".join(found) if found else "none"
        raise DatasetError(f"unknown category {category!r} in {root}; categories found: {listing}")

    train_dir = cat_dir / "train" / NORMAL
    if not train_dir.is_dir():
        raise DatasetError(f"missing train folder {train_dir} (normal training images go in train/{NORMAL}/)")
    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        raise DatasetError(f"missing test folder {test_dir} (test/{NORMAL}/ and test/<defect>/ subfolders)")

    train = [Sample(path, 0, NORMAL, None) for path in list_images(train_dir)]
    if not train:
        raise DatasetError(f"no training images in {train_dir} (suffixes: {' '.join(IMAGE_SUFFIXES)})")

    test_images = {d.name: _images_by_stem(d) for d in _subdirs(test_dir)}
    if not any(test_images.values()):
        raise DatasetError(f"no test images in {test_dir}/<defect>/ (suffixes: {' '.join(IMAGE_SUFFIXES)})")

    gt_dir = cat_dir / "ground_truth"
    masks = _read_masks(gt_dir, test_images) if gt_dir.is_dir() else {}

    test: list[Sample] = []
    all_masked = True
    for defect, images in sorted(test_images.items()):
        if defect == NORMAL:
            test.extend(Sample(p, 0, NORMAL, None) for p in sorted(images.values()))
            continue
        paths = sorted(images.values())
        unmasked = [p for p in paths if p not in masks]
        if unmasked and len(unmasked) < len(paths):
            raise DatasetError(
                f"defect type {defect!r} has masks for {len(paths) - len(unmasked)} of {len(paths)} images; "
                f"missing e.g. {gt_dir / defect / (unmasked[0].stem + MASK_SUFFIX + '.png')}"
            )
        all_masked = all_masked and not unmasked
        test.extend(Sample(p, 1, defect, masks.get(p)) for p in paths)

    has_anomalies = any(s.label == 1 for s in test)
    return MVTecCategory(root=root, category=category, train=train, test=test, has_masks=has_anomalies and all_masked)


def _relative_key(path: Path) -> str:
    """category/split/defect/file: the part of a path that survives moving the data root."""
    return "/".join(path.parts[-4:])


def data_fingerprint(samples: list[Sample]) -> str:
    """Short hash of which files (and masks) a run saw, to tell whether two runs used the same data.

    Relative paths and file sizes only: cheap enough for every run, independent of
    where the data root lives, of sample order and of file modification times.
    """
    digest = hashlib.sha256()
    rows = []
    for sample in samples:
        row = f"{_relative_key(sample.path)}\t{sample.path.stat().st_size}\t{sample.label}"
        if sample.mask_path is not None:
            row += f"\t{_relative_key(sample.mask_path)}\t{sample.mask_path.stat().st_size}"
        rows.append(row)
    for row in sorted(rows):
        digest.update(row.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:16]
