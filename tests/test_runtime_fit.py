"""Non-square frames: stretch, letterbox and crop place the frame in the model input, and regions come
back in frame pixels, end to end through a compiled bundle (`edge-ad --images --per-part`)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_ad.model.preprocess import (FITS, PreprocessSpec, frame_aligned_map, placement, preprocess,
                                      preprocess_mask, resize_for_model)
from runtime_helpers import build_bundle, jsonl, run_cli

GRAY = 128  # the tiny model's "normal" (|x - 0.5| ~ 0)


def _frame(box, height=120, width=240) -> np.ndarray:
    image = np.full((height, width, 3), GRAY, np.uint8)
    x, y, w, h = box
    image[y:y + h, x:x + w] = 255
    return image


def test_letterbox_keeps_aspect_and_pads_black():
    spec = PreprocessSpec.square(64, "letterbox")
    out = resize_for_model(_frame((0, 0, 1, 1)), spec)
    assert out.shape == (64, 64, 3)
    assert placement(120, 240, spec).__dict__ == {"scaled_h": 32, "scaled_w": 64, "top": 16, "left": 0}
    assert (out[:16] == 0).all() and (out[48:] == 0).all()  # bars above and below
    assert (out[17:47, 1:63] == GRAY).all()  # the frame, not distorted


def test_crop_keeps_the_centre_at_full_height():
    spec = PreprocessSpec.square(64, "crop")
    frame = _frame((0, 0, 1, 1))
    frame[:, :60] = 0  # the outer quarters are cut off
    frame[:, 180:] = 0
    out = resize_for_model(frame, spec)
    assert out.shape == (64, 64, 3) and (out == GRAY).all()


@pytest.mark.parametrize("fit", FITS)
def test_masks_and_images_share_the_geometry(fit):
    spec = PreprocessSpec.square(64, fit)
    frame = _frame((100, 40, 40, 40))
    mask = (frame[:, :, 0] == 255).astype(np.uint8) * 255
    bright = preprocess(frame, spec)[0] > (GRAY + 255) / 2 / 255
    mask_at_model = preprocess_mask(mask, spec) > 0
    # Same place and size; only edge cells may differ (nearest for masks, area for images). A shift would not.
    assert bright.sum() > 50 and np.logical_xor(mask_at_model, bright).sum() <= 0.25 * bright.sum()


@pytest.mark.parametrize("fit", FITS)
def test_frame_aligned_map_has_the_frame_aspect(fit):
    spec = PreprocessSpec.square(64, fit)
    aligned = frame_aligned_map(np.arange(64 * 64, dtype=np.float32).reshape(64, 64), 120, 240, spec)
    expected = {"stretch": (64, 64), "letterbox": (32, 64), "crop": (64, 128)}[fit]
    assert aligned.shape == expected


@pytest.mark.parametrize("fit", FITS)
def test_regions_land_on_the_defect_in_frame_pixels(fit, tmp_path):
    """A bright box in a 2:1 frame is reported where it is, under each fit (crop: only inside the centre)."""
    bundle = build_bundle(tmp_path / "bundle", fit=fit)
    images = tmp_path / "images"
    images.mkdir()
    inside, outside = (130, 50, 40, 30), (5, 40, 30, 40)  # outside: in the left quarter that crop cuts off
    cv2.imwrite(str(images / "a_inside.png"), _frame(inside))
    cv2.imwrite(str(images / "b_outside.png"), _frame(outside))
    out = tmp_path / "verdicts.jsonl"
    result = run_cli("--images", images, "--per-part", "--model", bundle, "--jsonl", out, "--max-regions", "20")
    assert result.returncode == 0, result.stderr
    verdicts = {v["part_id"]: v for v in jsonl(out, "verdict")}
    assert set(verdicts) == {"a_inside.png", "b_outside.png"}, verdicts
    for name, box in (("a_inside.png", inside), ("b_outside.png", outside)):
        regions = verdicts[name]["regions"]
        if fit == "crop" and name == "b_outside.png":
            assert regions == [], regions  # the model never saw it
            continue
        assert len(regions) == 1, (name, regions)  # letterbox: the bars are not regions
        region, (x, y, w, h) = regions[0], box
        cell = 240 / (128 if fit == "crop" else 64)  # frame pixels per model pixel
        assert abs(region["x"] - x) <= 2 * cell and abs(region["y"] - y) <= 2 * cell, (name, region, box)
        assert abs(region["w"] - w) <= 3 * cell and abs(region["h"] - h) <= 3 * cell, (name, region, box)


def test_a_bundle_that_does_not_stretch_needs_a_runtime_that_knows_fit(tmp_path):
    """Schema 2 only for letterbox/crop: runtimes from before `fit` refuse it instead of stretching frames."""
    import json

    from edge_ad.model.bundle import read_bundle

    assert json.loads((build_bundle(tmp_path / "s") / "bundle.json").read_text())["schema_version"] == 1
    letterbox = build_bundle(tmp_path / "l", fit="letterbox")
    assert json.loads((letterbox / "bundle.json").read_text())["schema_version"] == 2
    assert read_bundle(letterbox).preprocess.fit == "letterbox"
