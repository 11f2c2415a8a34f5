"""training.data: MVTec reader, validation split, torch Dataset, synthetic generator."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from prerequisites import missing
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_ad.sources.images import ImageReadError
from edge_ad.model.preprocess import PreprocessSpec
from training.data import (
    AnomalyDataset,
    DatasetError,
    Sample,
    available_categories,
    data_fingerprint,
    generate_synthetic_dataset,
    load_category,
    make_loader,
    split_validation,
)
from training.data.synthetic import DEFECT_TYPES, TEXTURE_RANGE, add_defect, main as synthetic_main, make_texture

MVTEC_ROOT = Path(__file__).resolve().parents[2] / "shared/data/mvtec_ad"


def _png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def _noise(h: int = 20, w: int = 24, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _layout(root: Path, n_train: int = 3, defects: dict[str, int] | None = None, masks: bool = True) -> Path:
    """Tiny hand-made category 'cat' with noise images; returns the category folder."""
    cat = root / "cat"
    for i in range(n_train):
        _png(cat / "train/good" / f"{i:03d}.png", _noise(seed=i))
    _png(cat / "test/good/000.png", _noise(seed=100))
    for defect, n in (defects or {"crack": 2}).items():
        for i in range(n):
            _png(cat / "test" / defect / f"{i:03d}.png", _noise(seed=200 + i))
            if masks:
                _png(cat / "ground_truth" / defect / f"{i:03d}_mask.png", np.full((20, 24), 255, np.uint8))
    return cat


# ---------------------------------------------------------------- reader


def test_load_synthetic_category(synthetic_root: Path) -> None:
    data = load_category(synthetic_root, "synthetic")
    assert data.category == "synthetic"
    assert len(data.train) == 40 and len(data.test) == 12
    assert data.has_masks
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in data.train)
    assert [s.path for s in data.train] == sorted(s.path for s in data.train)
    normal = [s for s in data.test if s.label == 0]
    anomalous = [s for s in data.test if s.label == 1]
    assert len(normal) == 6 and len(anomalous) == 6
    assert all(s.mask_path is None for s in normal)
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in anomalous)
    assert all(s.mask_path.name == f"{s.path.stem}_mask.png" for s in anomalous)
    assert set(data.defect_types) == set(DEFECT_TYPES)
    assert load_category(str(synthetic_root), "synthetic") == data  # str root, deterministic order


def test_missing_data_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="data root does not exist") as info:
        load_category(tmp_path / "nope", "bottle")
    assert str(tmp_path / "nope") in str(info.value)


def test_unknown_category_lists_found(tmp_path: Path) -> None:
    _layout(tmp_path)
    (tmp_path / "notes").mkdir()  # not a category: no train/test inside
    with pytest.raises(DatasetError) as info:
        load_category(tmp_path, "bottle")
    message = str(info.value)
    assert "unknown category 'bottle'" in message and "categories found: cat" in message
    assert "notes" not in message
    assert available_categories(tmp_path) == ["cat"]


def test_missing_train_good(tmp_path: Path) -> None:
    cat = _layout(tmp_path)
    shutil.rmtree(cat / "train/good")
    with pytest.raises(DatasetError, match=r"missing train folder .*train/good"):
        load_category(tmp_path, "cat")


def test_missing_test_folder(tmp_path: Path) -> None:
    cat = _layout(tmp_path)
    shutil.rmtree(cat / "test")
    shutil.rmtree(cat / "ground_truth")
    with pytest.raises(DatasetError, match=r"missing test folder .*test"):
        load_category(tmp_path, "cat")


def test_empty_test_folder(tmp_path: Path) -> None:
    cat = _layout(tmp_path, masks=False)
    shutil.rmtree(cat / "test")
    (cat / "test/good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no test images"):
        load_category(tmp_path, "cat")


def test_empty_train_set(tmp_path: Path) -> None:
    cat = _layout(tmp_path)
    for p in (cat / "train/good").iterdir():
        p.unlink()
    (cat / "train/good/readme.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=r"no training images in .*train/good"):
        load_category(tmp_path, "cat")


def test_mask_without_image(tmp_path: Path) -> None:
    cat = _layout(tmp_path)
    _png(cat / "ground_truth/crack/007_mask.png", np.zeros((20, 24), np.uint8))
    with pytest.raises(DatasetError, match="mask without its image") as info:
        load_category(tmp_path, "cat")
    assert "007_mask.png" in str(info.value) and "test/crack/007" in str(info.value)


def test_mask_for_unknown_defect_type(tmp_path: Path) -> None:
    cat = _layout(tmp_path)
    _png(cat / "ground_truth/dent/000_mask.png", np.zeros((20, 24), np.uint8))
    with pytest.raises(DatasetError, match=r"mask without its image: .*dent"):
        load_category(tmp_path, "cat")


def test_partial_masks_name_the_defect(tmp_path: Path) -> None:
    cat = _layout(tmp_path, defects={"crack": 2, "hole": 3})
    (cat / "ground_truth/hole/001_mask.png").unlink()
    with pytest.raises(DatasetError) as info:
        load_category(tmp_path, "cat")
    message = str(info.value)
    assert "'hole'" in message and "2 of 3" in message and "001_mask.png" in message
    assert "\n" not in message


def test_no_ground_truth_is_image_level_only(tmp_path: Path) -> None:
    _layout(tmp_path, masks=False)
    data = load_category(tmp_path, "cat")
    assert not data.has_masks
    assert all(s.mask_path is None for s in data.test)
    item = AnomalyDataset([s for s in data.test if s.label == 1], PreprocessSpec.square(16))[0]
    assert item["has_mask"] is False and item["label"].item() == 1
    assert item["mask"].shape == (1, 16, 16) and float(item["mask"].sum()) == 0.0


def test_defect_type_without_masks_means_no_pixel_labels(tmp_path: Path) -> None:
    cat = _layout(tmp_path, defects={"crack": 2, "hole": 2})
    shutil.rmtree(cat / "ground_truth/hole")
    data = load_category(tmp_path, "cat")
    assert not data.has_masks
    assert sum(s.mask_path is not None for s in data.test) == 2


def test_other_suffixes_and_non_images(tmp_path: Path) -> None:
    cat = _layout(tmp_path, n_train=1)
    cv2.imwrite(str(cat / "train/good/b.jpg"), _noise())
    cv2.imwrite(str(cat / "train/good/c.BMP"), _noise())
    (cat / "train/good/notes.txt").write_text("x")
    cv2.imwrite(str(cat / "ground_truth/crack/000_mask.bmp"), np.zeros((20, 24), np.uint8))
    (cat / "ground_truth/crack/000_mask.png").unlink()
    data = load_category(tmp_path, "cat")
    assert [p.path.name for p in data.train] == ["000.png", "b.jpg", "c.BMP"]
    assert data.has_masks and data.test[0].mask_path.suffix == ".bmp"


def test_duplicate_stems_are_ambiguous(tmp_path: Path) -> None:
    cat = _layout(tmp_path)
    cv2.imwrite(str(cat / "test/crack/000.jpg"), _noise())
    with pytest.raises(DatasetError, match="two images share the name '000'"):
        load_category(tmp_path, "cat")


def test_fingerprint(tmp_path: Path, synthetic_root: Path) -> None:
    data = load_category(synthetic_root, "synthetic")
    fp = data_fingerprint(data.train)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert data_fingerprint(list(reversed(data.train))) == fp
    moved = shutil.copytree(synthetic_root, tmp_path / "elsewhere")
    assert data_fingerprint(load_category(moved, "synthetic").train) == fp
    assert data_fingerprint(data.train[:-1]) != fp
    assert data_fingerprint(data.test) != fp
    moved_data = load_category(moved, "synthetic")
    with open(moved_data.train[0].path, "ab") as f:
        f.write(b"\0")
    assert data_fingerprint(moved_data.train) != fp


# ---------------------------------------------------------------- dataset


def test_rgb_gray_odd_sizes_become_chw_float(tmp_path: Path) -> None:
    rgb = _png(tmp_path / "rgb.png", _noise(200, 300, 3))
    gray = _png(tmp_path / "gray.png", _noise(200, 300, 1))
    small = _png(tmp_path / "small.png", _noise(37, 51, 3))
    rgba = _png(tmp_path / "rgba.png", _noise(33, 45, 4))
    samples = [Sample(p, 0, "good", None) for p in (rgb, gray, small, rgba)]
    spec = PreprocessSpec(height=48, width=64)
    dataset = AnomalyDataset(samples, spec)
    for i in range(len(dataset)):
        item = dataset[i]
        image = item["image"]
        assert image.dtype == torch.float32 and image.shape == (3, 48, 64)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert item["mask"].shape == (1, 48, 64) and item["mask"].dtype == torch.float32
        assert item["has_mask"] is True and item["label"].dtype == torch.long
        assert item["path"] == str(samples[i].path)
    gray_image = dataset[1]["image"]
    assert torch.equal(gray_image[0], gray_image[1]) and torch.equal(gray_image[1], gray_image[2])
    # RGB order: a pure blue BGR file gives channel 2 (blue) high
    blue = np.zeros((10, 10, 3), np.uint8)
    blue[..., 0] = 255
    item = AnomalyDataset([Sample(_png(tmp_path / "blue.png", blue), 0, "good")], PreprocessSpec.square(8))[0]
    assert item["image"][2].min() == 1.0 and item["image"][:2].max() == 0.0


def test_masks_align_with_images(tmp_path: Path) -> None:
    image = np.zeros((200, 300, 3), np.uint8)
    mask = np.zeros((200, 300), np.uint8)
    for target in (image, mask):
        cv2.rectangle(target, (60, 40), (179, 119), (255, 255, 255), thickness=-1)
    sample = Sample(_png(tmp_path / "img.png", image), 1, "box", _png(tmp_path / "img_mask.png", mask))
    item = AnomalyDataset([sample], PreprocessSpec(height=100, width=150))[0]
    m = item["mask"][0]
    assert set(torch.unique(m).tolist()) == {0.0, 1.0}
    assert item["has_mask"] is True
    bright = item["image"].mean(dim=0) > 0.5
    assert torch.equal(bright, m > 0.5)
    assert int(m.sum()) == 60 * 40


def test_mask_size_mismatch(tmp_path: Path) -> None:
    sample = Sample(
        _png(tmp_path / "a.png", _noise(20, 24)), 1, "crack", _png(tmp_path / "a_mask.png", np.zeros((10, 12), np.uint8))
    )
    with pytest.raises(DatasetError, match=r"mask .*a_mask.png is 12x10 but its image .*a.png is 24x20"):
        AnomalyDataset([sample], PreprocessSpec.square(16))[0]


@pytest.mark.parametrize("content", [b"", b"not a png at all", "truncated"])
def test_corrupt_image_names_the_file(tmp_path: Path, content: bytes | str) -> None:
    good = _png(tmp_path / "good.png", _noise(64, 64))
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:40] if content == "truncated" else content)
    dataset = AnomalyDataset([Sample(good, 0, "good"), Sample(bad, 0, "good")], PreprocessSpec.square(16))
    assert dataset[0]["image"].shape == (3, 16, 16)
    with pytest.raises(ImageReadError, match="bad.png"):
        dataset[1]


def test_too_small_image_is_a_dataset_error(tmp_path: Path) -> None:
    tiny = _png(tmp_path / "tiny.png", np.zeros((1, 5), np.uint8))
    with pytest.raises(DatasetError, match="tiny.png"):
        AnomalyDataset([Sample(tiny, 0, "good")], PreprocessSpec.square(8))[0]


def test_cache_keeps_preprocessed_arrays(tmp_path: Path) -> None:
    path = _png(tmp_path / "a.png", _noise())
    cached = AnomalyDataset([Sample(path, 0, "good")], PreprocessSpec.square(16))
    uncached = AnomalyDataset([Sample(path, 0, "good")], PreprocessSpec.square(16), cache=False)
    first = cached[0]["image"]
    uncached[0]
    first.zero_()  # callers mutating a batch must not corrupt the cache
    path.unlink()
    assert float(cached[0]["image"].sum()) > 0
    with pytest.raises(ImageReadError):
        uncached[0]


def test_make_loader_batches_and_seeded_shuffle(synthetic_root: Path) -> None:
    data = load_category(synthetic_root, "synthetic")
    spec = PreprocessSpec.square(32)
    loader = make_loader(data.test, spec, batch_size=5, shuffle=False)
    batches = list(loader)
    assert [len(b["path"]) for b in batches] == [5, 5, 2]
    batch = batches[0]
    assert batch["image"].shape == (5, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (5, 1, 32, 32) and batch["label"].dtype == torch.long
    assert batch["has_mask"].dtype == torch.bool
    labels = torch.cat([b["label"] for b in batches])
    masks = torch.cat([b["mask"] for b in batches])
    assert torch.equal(labels, torch.tensor([s.label for s in data.test]))
    assert torch.equal(masks.flatten(1).amax(1) > 0, labels == 1)  # defects visible at 32 px

    def order(seed: int) -> list[str]:
        return [p for b in make_loader(data.train, spec, 8, shuffle=True, seed=seed) for p in b["path"]]

    assert order(3) == order(3)
    assert order(3) != order(4)
    assert sorted(order(3)) == sorted(str(s.path) for s in data.train)
    with pytest.raises(DatasetError, match="batch_size"):
        make_loader(data.train, spec, 0, shuffle=False)


# ---------------------------------------------------------------- split


def _samples(n: int, root: str = "/data/cat/train/good") -> list[Sample]:
    return [Sample(Path(root) / f"{i:03d}.png", 0, "good") for i in range(n)]


def test_split_deterministic_disjoint_covering() -> None:
    samples = _samples(209)
    train, val = split_validation(samples, 0.15, seed=0)
    assert len(val) == 31 and len(train) == 178
    assert not {s.path for s in train} & {s.path for s in val}
    assert {s.path for s in train} | {s.path for s in val} == {s.path for s in samples}
    assert [s.path for s in val] == sorted(s.path for s in val)
    assert split_validation(samples, 0.15, seed=0) == (train, val)
    shuffled = list(samples)
    np.random.default_rng(1).shuffle(shuffled)
    assert split_validation(shuffled, 0.15, seed=0) == (train, val)
    assert split_validation(samples, 0.15, seed=1)[1] != val


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 300), fraction=st.floats(0.001, 0.5), seed=st.integers(0, 2**32 - 1))
def test_split_properties(n: int, fraction: float, seed: int) -> None:
    samples = _samples(n)
    train, val = split_validation(samples, fraction, seed)
    assert len(train) >= 1 and len(val) >= 1 and len(train) + len(val) == n
    assert {s.path for s in train}.isdisjoint({s.path for s in val})
    assert abs(len(val) - n * fraction) <= 1.0


@pytest.mark.parametrize("fraction", [0.0, -0.1, 0.51, 1.0, math.nan, "0.2"])
def test_split_rejects_fraction(fraction: float) -> None:
    with pytest.raises(DatasetError, match=r"fraction must be in \(0, 0.5\]"):
        split_validation(_samples(10), fraction)


@pytest.mark.parametrize("n", [0, 1])
def test_split_needs_two_images(n: int) -> None:
    with pytest.raises(DatasetError, match=f"at least 2 .* got {n}"):
        split_validation(_samples(n))


def test_split_refuses_anomalous_and_duplicates() -> None:
    with pytest.raises(DatasetError, match="normal images only"):
        split_validation(_samples(5) + [Sample(Path("/data/cat/test/crack/000.png"), 1, "crack")])
    with pytest.raises(DatasetError, match="listed twice"):
        split_validation(_samples(5) + _samples(1))


# ---------------------------------------------------------------- synthetic


def test_synthetic_layout(synthetic_root: Path) -> None:
    cat = synthetic_root / "synthetic"
    assert len(list((cat / "train/good").glob("*.png"))) == 40
    assert len(list((cat / "test/good").glob("*.png"))) == 6
    for kind in DEFECT_TYPES:
        images = sorted(p.stem for p in (cat / "test" / kind).glob("*.png"))
        masks = sorted(p.stem for p in (cat / "ground_truth" / kind).glob("*.png"))
        assert len(images) == 2 and masks == [f"{s}_mask" for s in images]
    image = cv2.imread(str(cat / "train/good/000.png"), cv2.IMREAD_UNCHANGED)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8


def test_synthetic_masks_are_exactly_the_defect_pixels(synthetic_root: Path) -> None:
    lo, hi = round(TEXTURE_RANGE[0] * 255), round(TEXTURE_RANGE[1] * 255)
    for sample in load_category(synthetic_root, "synthetic").test:
        image = cv2.imread(str(sample.path), cv2.IMREAD_UNCHANGED)
        off_texture = ((image < lo) | (image > hi)).any(axis=2)
        if sample.label == 0:
            assert not off_texture.any()
            continue
        mask = cv2.imread(str(sample.mask_path), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(mask).tolist()) == {0, 255}
        assert np.array_equal(off_texture, mask > 0), sample.path
        assert 0.008 <= (mask > 0).mean() <= 0.06, sample.path


@pytest.mark.parametrize("kind", DEFECT_TYPES)
@pytest.mark.parametrize("grayscale", [False, True])
def test_add_defect_changes_exactly_the_mask(kind: str, grayscale: bool) -> None:
    for seed in range(5):
        rng = np.random.default_rng(seed)
        clean = make_texture(rng, 96, grayscale)
        defective, mask = add_defect(clean, kind, rng)
        changed = defective != clean
        changed = changed if grayscale else changed.any(axis=2)
        assert np.array_equal(changed, mask > 0)
        assert 0.008 <= (mask > 0).mean() <= 0.06
        # visible: far from the texture in at least one channel
        diff = np.abs(defective - clean)
        assert (diff if grayscale else diff.max(axis=2))[mask > 0].min() > 0.08


def test_normal_images_alike_but_not_identical(synthetic_root: Path) -> None:
    paths = sorted((synthetic_root / "synthetic/train/good").glob("*.png"))[:4]
    images = [cv2.imread(str(p)).astype(np.float32) / 255 for p in paths]
    for other in images[1:]:
        assert not np.array_equal(images[0], other)
        assert np.abs(images[0].mean(axis=(0, 1)) - other.mean(axis=(0, 1))).max() < 0.05
    assert all(0.05 < img.std() < 0.2 for img in images)  # textured, not flat


def test_synthetic_deterministic_and_grayscale(tmp_path: Path) -> None:
    kwargs = dict(image_size=32, n_train=2, n_test_good=1, n_test_defect=3)
    a = generate_synthetic_dataset(tmp_path / "a", seed=5, **kwargs)
    b = generate_synthetic_dataset(tmp_path / "b", seed=5, **kwargs)
    c = generate_synthetic_dataset(tmp_path / "c", seed=6, **kwargs)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 2 + 1 + 3 + 3
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)

    g = generate_synthetic_dataset(tmp_path / "g", category="gray", grayscale=True, **kwargs)
    image = cv2.imread(str(g / "gray/test/blob/000.png"), cv2.IMREAD_UNCHANGED)
    assert image.ndim == 2
    data = load_category(g, "gray")
    item = AnomalyDataset(data.test, PreprocessSpec.square(32))[0]  # test/blob/000
    assert item["image"].shape == (3, 32, 32) and item["label"] == 1 and item["mask"].sum() > 0


def test_synthetic_refuses_to_mix_with_existing(tmp_path: Path) -> None:
    generate_synthetic_dataset(tmp_path, image_size=32, n_train=3, n_test_good=1, n_test_defect=1)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_synthetic_dataset(tmp_path, image_size=32, n_train=1, n_test_good=1, n_test_defect=1)
    generate_synthetic_dataset(tmp_path, image_size=32, n_train=1, n_test_good=1, n_test_defect=1, overwrite=True)
    assert len(load_category(tmp_path, "synthetic").train) == 1
    with pytest.raises(ValueError, match="image_size"):
        generate_synthetic_dataset(tmp_path / "x", image_size=8)


def test_synthetic_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--out", str(tmp_path), "--image-size", "32", "--n-train", "3", "--n-test-good", "1", "--n-test-defect", "2"]
    assert synthetic_main(args + ["--category", "cli"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    data = load_category(tmp_path, "cli")
    assert len(data.train) == 3 and len(data.test) == 3 and data.has_masks
    with pytest.raises(SystemExit) as info:
        synthetic_main(args + ["--category", "cli"])
    assert info.value.code == 2 and "already exists" in capsys.readouterr().err


# ---------------------------------------------------------------- real MVTec AD


@pytest.mark.mvtec
def test_real_mvtec_categories() -> None:
    if not MVTEC_ROOT.is_dir():
        missing("mvtec", f"needs {MVTEC_ROOT}")
    bottle = load_category(MVTEC_ROOT, "bottle")
    assert len(bottle.train) == 209 and len(bottle.test) == 83 and bottle.has_masks
    assert bottle.defect_types == ["broken_large", "broken_small", "contamination"]
    screw = load_category(MVTEC_ROOT, "screw")
    assert not screw.has_masks and len(screw.train) == 200 and len(screw.test) == 100
    assert len(data_fingerprint(bottle.train)) == 16
    train, val = split_validation(bottle.train, 0.15, seed=0)
    assert len(val) == 31 and len(train) == 178
    spec = PreprocessSpec.square(64)
    anomalous = next(s for s in bottle.test if s.label == 1)
    item = AnomalyDataset([anomalous, screw.test[-1]], spec)
    assert item[0]["has_mask"] is True and item[0]["mask"].sum() > 0
    assert item[1]["image"].shape == (3, 64, 64) and item[1]["has_mask"] is False
    with pytest.raises(DatasetError, match="categories found: bottle, screw"):
        load_category(MVTEC_ROOT, "carpet")
