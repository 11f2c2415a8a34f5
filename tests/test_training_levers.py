"""The training levers: synthetic defects, augmentation, map scoring, DFM taps, epoch selection."""

import json

import numpy as np
import pytest
import torch

from training.data.augment import Augmentation
from training.data.synthetic_defects import ALL_KINDS, add_synthetic_defect, synthetic_anomalies
from training.models.image_score import ImageScore


def _object_on_plain_background(size=128):
    image = np.full((size, size, 3), 120, np.uint8)
    import cv2

    cv2.rectangle(image, (80, 20), (110, 110), (30, 200, 60), -1)  # the "part" sits on the right
    return image


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_synthetic_defect_mask_is_exactly_the_changed_pixels_on_the_part(kind):
    image = _object_on_plain_background()
    rng = np.random.default_rng(0)
    defective, mask = add_synthetic_defect(image, kind, rng)
    changed = np.any(defective != image, axis=2)
    assert mask.any()
    np.testing.assert_array_equal(mask.astype(bool), changed)
    ys, xs = np.nonzero(mask)
    # placed where the image has structure (the part's outline), not in the plain left half
    assert xs.mean() > 55, xs.mean()


def test_synthetic_anomalies_are_reproducible_and_cycle_kinds():
    images = [_object_on_plain_background() for _ in range(6)]
    first, masks = synthetic_anomalies(images, seed=3)
    again, _ = synthetic_anomalies(images, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(m.any() for m in masks)
    with pytest.raises(ValueError, match="kind"):
        add_synthetic_defect(images[0], "rust", np.random.default_rng(0))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_fainter_synthetic_defects_change_the_same_pixels_less(kind):
    import cv2

    image = _object_on_plain_background()
    strong, strong_mask = add_synthetic_defect(image, kind, np.random.default_rng(5))
    faint, faint_mask = add_synthetic_defect(image, kind, np.random.default_rng(5), strength=0.3)
    where = strong_mask.astype(bool) & faint_mask.astype(bool)
    assert where.sum() > 0.5 * strong_mask.sum()  # same place and shape, drawn from the same draws
    gray = lambda out: cv2.cvtColor(out, cv2.COLOR_BGR2GRAY).astype(int)
    difference = lambda out: np.abs(gray(out) - gray(image))[where]
    assert difference(faint).mean() < 0.5 * difference(strong).mean()
    with pytest.raises(ValueError, match="strength"):
        add_synthetic_defect(image, kind, np.random.default_rng(0), strength=0.0)


def test_augmentation_parses_and_keeps_shape():
    assert not Augmentation.parse("none").active
    augment = Augmentation.parse("rotate,hflip")
    assert augment.rotate and augment.hflip and not augment.vflip
    image = np.random.default_rng(0).random((3, 32, 48)).astype(np.float32)
    out = augment(image, np.random.default_rng(1))
    assert out.shape == image.shape and out.dtype == np.float32 and not np.allclose(out, image)
    flipped = Augmentation.parse("hflip")(image, np.random.default_rng(0))
    assert np.allclose(flipped, image) or np.allclose(flipped, image[:, :, ::-1])
    with pytest.raises(ValueError, match="unknown operation"):
        Augmentation.parse("rotate,shear")


def test_image_score_topk_and_smoothing():
    amap = torch.zeros(2, 1, 20, 20)
    amap[0, 0, 5, 5] = 10.0  # a lone spike
    amap[1, 0, 10:13, 10:13] = 3.0  # a 9-pixel defect
    _, score_max = ImageScore()(amap)
    assert score_max.tolist() == [10.0, 3.0]
    _, score_topk = ImageScore(reduction="topk", topk_fraction=9 / 400)(amap)
    assert score_topk[1] > score_topk[0]  # the defect now outranks the spike
    smoothed, _ = ImageScore(smooth_sigma=1.5)(torch.full((1, 1, 16, 16), 2.0))
    assert torch.allclose(smoothed, torch.full_like(smoothed, 2.0), atol=1e-6)  # a constant map stays constant
    spread, _ = ImageScore(smooth_sigma=1.5)(amap)
    assert spread[0, 0, 5, 5] < 10.0 and spread[0, 0, 5, 6] > 0
    with pytest.raises(ValueError):
        ImageScore(reduction="mean")


def test_dfm_concatenates_taps_on_the_coarsest_grid():
    from training.backbones import build_backbone
    from training.models.dfm import DfmModel

    model = DfmModel(build_backbone("mobilenet_v2", pretrained=False), taps=(1, 2))
    features = model.tap_features(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, 32 + 96, 4, 4)
    with pytest.raises(ValueError, match="taps"):
        DfmModel(build_backbone("mobilenet_v2", pretrained=False), taps=(3,))


def test_stfpm_synthetic_selection_keeps_the_epoch_with_the_best_synthetic_auroc(synthetic_root, tmp_path):
    from training.config import StfpmConfig
    from training.stfpm import train

    config = StfpmConfig(category="synthetic", data_root=str(synthetic_root), epochs=3, image_size=64, batch_size=8,
                         device="cpu", out=str(tmp_path), select="synthetic", lr_schedule="cosine",
                         augment="hflip", score_reduction="topk", smooth_sigma=1.0)
    run = train(config)
    metrics = json.loads((run / "metrics.json").read_text())
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    aurocs = [h["synthetic_validation_auroc"] for h in history]
    best = max(range(3), key=lambda i: (aurocs[i], -history[i]["validation_loss"]))
    assert metrics["best_epoch"] == best + 1
    assert metrics["synthetic_validation_auroc"] == aurocs[best]
    for key in ("fpr_deployed", "recall_deployed", "image_f1_deployed", "image_f1_optimal"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["thresholds"]["fit"]["method"].endswith("normal tolerance bound")
    saved = json.loads((run / "config.json").read_text())
    assert saved["score_reduction"] == "topk" and saved["smooth_sigma"] == 1.0


def test_bad_lever_options_are_one_line_errors(synthetic_root, tmp_path, capsys):
    from training.stfpm import main

    assert main(["--category", "synthetic", "--data-root", str(synthetic_root), "--out", str(tmp_path),
                 "--select", "best"]) == 2
    assert "--select" in capsys.readouterr().err
    assert main(["--category", "synthetic", "--data-root", str(synthetic_root), "--out", str(tmp_path),
                 "--augment", "twirl"]) == 2
    assert main(["--category", "synthetic", "--data-root", str(synthetic_root), "--out", str(tmp_path),
                 "--subspace-weight", "-1"]) == 2
    assert "--subspace-weight" in capsys.readouterr().err
    assert main(["--category", "synthetic", "--data-root", str(synthetic_root), "--out", str(tmp_path),
                 "--subspace-posed-copies", "-1"]) == 2
    assert "--subspace-posed-copies" in capsys.readouterr().err


def test_synthetic_defects_on_small_and_grayscale_images():
    rng = np.random.default_rng(0)
    for kind in ALL_KINDS:
        gray = np.random.default_rng(1).integers(0, 256, (16, 40), dtype=np.uint8)
        defective, mask = add_synthetic_defect(gray, kind, rng)
        assert defective.shape == (16, 40, 3) and mask.shape == (16, 40)
    with pytest.raises(ValueError, match="at least"):
        add_synthetic_defect(np.zeros((10, 10, 3), np.uint8), "blob", rng)


def test_dfm_taps_at_an_input_size_that_is_not_a_multiple_of_16():
    from training.backbones import build_backbone
    from training.models.dfm import DfmModel

    model = DfmModel(build_backbone("mobilenet_v2", pretrained=False), taps=(1, 2))
    assert model.tap_features(torch.rand(1, 3, 200, 200)).shape[1] == 32 + 96


@pytest.mark.parametrize("posed_copies, augment, passes", [(2, "rotate", 3), (0, "rotate", 1), (5, "none", 1)])
def test_the_pca_sees_each_training_image_and_its_posed_copies(synthetic_root, posed_copies, augment, passes):
    """--posed-copies sets how many randomly posed copies of each training image the PCA sees (with
    --augment only): pose coverage is what the subspace learns for parts that lie at any angle."""
    from training.config import DfmConfig
    from training.crossfit import subspace_term
    from training.dfm import build_model, fit_subspace
    from training.pipeline import prepare_data

    config = DfmConfig(category="synthetic", data_root=str(synthetic_root), image_size=64, augment=augment,
                       posed_copies=posed_copies)
    data = prepare_data(config)
    model = build_model(config, pretrained=False).eval()
    seen = {}
    model.fit = lambda features, variance_ratio: seen.update(shape=features.shape, features=features)
    model.to = lambda device: model
    features, owners = fit_subspace(model, data, config, torch.device("cpu"))
    assert seen["shape"][0] == passes * len(data.train)
    term = subspace_term(model, features, owners, config.variance_ratio, torch.device("cpu"))
    rows_of = {i: seen["features"][[i + p * len(data.train) for p in range(passes)]] for i in range(len(data.train))}
    term.refit(np.array([0, 3]))  # the out-of-fold refit drops each held-out image's rows in every pass, and only those
    kept = seen["features"]
    assert kept.shape[0] == passes * (len(data.train) - 2)
    for i, rows in rows_of.items():
        present = [any(np.array_equal(row, other) for other in kept) for row in rows]
        assert present == [i not in (0, 3)] * passes, i


def test_negative_posed_copies_is_a_one_line_error(synthetic_root, tmp_path, capsys):
    from training.dfm import main

    assert main(["--category", "synthetic", "--data-root", str(synthetic_root), "--out", str(tmp_path),
                 "--posed-copies", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--posed-copies" in err and "Traceback" not in err
