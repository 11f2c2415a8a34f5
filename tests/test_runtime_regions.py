"""Region extraction, ROI mask, thresholds in normalized units, normalization."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_ad.bundle import Thresholds
from edge_ad.normalization import normalize
from edge_ad.regions import RoiMask, extract_regions
from edge_ad.scoring import Scorer, raw_threshold

THRESHOLDS = Thresholds(image=0.15, pixel=0.25, image_min=0.0, image_max=0.3, pixel_min=0.0, pixel_max=0.5)


def square_map(size=64, boxes=(), value=0.5, background=0.0):
    amap = np.full((size, size), background, np.float32)
    for x, y, w, h in boxes:
        amap[y : y + h, x : x + w] = value
    return amap


def ident(raw):
    return raw


def test_regions_are_in_frame_pixels():
    amap = square_map(boxes=[(16, 8, 16, 12)])  # model pixels; frame is 4x wide, 3x high
    regions = extract_regions(amap, (192, 256), 0.25, ident)
    assert len(regions) == 1
    r = regions[0]
    assert (r.x, r.y, r.w, r.h) == (64, 24, 64, 36)
    assert 0.99 * 64 * 36 <= r.area <= 64 * 36  # bilinear upsampling rounds the corners
    assert r.peak == pytest.approx(0.5)


def test_two_regions_largest_first_and_min_area():
    amap = square_map(boxes=[(2, 2, 4, 4), (30, 30, 20, 10)])
    regions = extract_regions(amap, (64, 64), 0.25, ident)
    assert [(r.w, r.h) for r in regions] == [(20, 10), (4, 4)]
    assert [r.area for r in extract_regions(amap, (64, 64), 0.25, ident, min_area=17)] == [200]


def test_nothing_above_threshold_gives_no_regions():
    assert extract_regions(square_map(background=0.1), (100, 100), 0.25, ident) == []


def test_peak_is_normalized_and_per_region():
    amap = square_map(boxes=[(0, 0, 8, 8), (40, 40, 8, 8)])
    amap[44, 44] = 0.9
    regions = extract_regions(amap, (64, 64), 0.25, lambda raw: normalize(raw, 0.25, 0.0, 1.0))
    assert sorted(r.peak for r in regions) == [pytest.approx(0.75), pytest.approx(1.0)]


def test_roi_mask_limits_inspection(tmp_path):
    amap = square_map(boxes=[(4, 4, 8, 8), (40, 40, 8, 8)])
    mask = np.zeros((32, 32), np.uint8)  # any size: resized to the frame
    mask[16:, 16:] = 255
    cv2.imwrite(str(tmp_path / "roi.png"), mask)
    roi = RoiMask.load(tmp_path / "roi.png")
    regions = extract_regions(amap, (128, 128), 0.25, ident, roi=roi)
    assert [(r.x, r.y, r.w, r.h) for r in regions] == [(80, 80, 16, 16)]


def test_roi_mask_errors(tmp_path):
    cv2.imwrite(str(tmp_path / "zero.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="all zero"):
        RoiMask.load(tmp_path / "zero.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot decode"):
        RoiMask.load(tmp_path / "bad.png")


def test_scorer_decides_with_bundle_thresholds():
    scorer = Scorer(THRESHOLDS)
    normal = scorer.decide(square_map(background=0.01), 0.01, (64, 64))
    assert not normal.anomalous and normal.regions == [] and normal.score < 0.5
    defect = scorer.decide(square_map(boxes=[(10, 10, 10, 10)]), 0.5, (64, 64))
    assert defect.anomalous and len(defect.regions) == 1 and defect.score == 1.0
    at_threshold = scorer.decide(square_map(), 0.15, (64, 64))
    assert at_threshold.anomalous and at_threshold.score == pytest.approx(0.5)


def test_scorer_threshold_in_normalized_units():
    strict = Scorer(THRESHOLDS, image_threshold=0.8)
    assert strict.image_threshold_raw == pytest.approx(0.15 + 0.3 * 0.3)
    assert not strict.decide(square_map(), 0.2, (64, 64)).anomalous
    assert strict.threshold_info() == {"raw": pytest.approx(0.24), "normalized": 0.8,
                                       "pixel_raw": pytest.approx(0.25), "pixel_normalized": 0.5}


def test_scorer_with_roi_ignores_defects_outside(tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 1
    scorer = Scorer(THRESHOLDS, roi=RoiMask(mask))
    outside = scorer.decide(square_map(boxes=[(2, 2, 8, 8)]), 0.5, (64, 64))
    assert not outside.anomalous
    inside = scorer.decide(square_map(boxes=[(40, 2, 8, 8)]), 0.5, (64, 64))
    assert inside.anomalous


@given(st.floats(-10, 10), st.floats(-5, 5), st.floats(0.01, 5))
def test_raw_threshold_inverts_normalize(t, minimum, span):
    maximum = minimum + span
    threshold = minimum + span / 2
    for target in (0.2, 0.5, 0.9):
        raw = raw_threshold(target, threshold, minimum, maximum)
        assert normalize(raw, threshold, minimum, maximum) == pytest.approx(target, abs=1e-6)


def test_normalize_contract():
    assert normalize(0.15, 0.15, 0.0, 0.3) == 0.5
    assert normalize(10.0, 0.15, 0.0, 0.3) == 1.0
    assert normalize(-10.0, 0.15, 0.0, 0.3) == 0.0
    values = normalize(np.array([0.0, 0.15, 0.3]), 0.15, 0.0, 0.3)
    assert values.dtype == np.float32 and np.allclose(values, [0.0, 0.5, 1.0])
    assert normalize(1.0, 1.0, 2.0, 2.0) == 0.5  # degenerate span does not divide by zero
