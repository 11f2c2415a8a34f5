"""Region extraction, ROI mask, thresholds in normalized units, normalization."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_ad.model.bundle import Thresholds
from edge_ad.decide.normalization import normalize
from edge_ad.decide.regions import RoiMask, find_regions
from edge_ad.decide.scoring import Scorer, raw_threshold

THRESHOLDS = Thresholds(image=0.15, pixel=0.25, image_min=0.0, image_max=0.3, pixel_min=0.0, pixel_max=0.5)


def regions_only(*args, **kwargs):
    """The regions of `find_regions`, without their total."""
    return find_regions(*args, **kwargs)[0]


def square_map(size=64, boxes=(), value=0.5, background=0.0):
    amap = np.full((size, size), background, np.float32)
    for x, y, w, h in boxes:
        amap[y : y + h, x : x + w] = value
    return amap


def ident(raw):
    return raw


def test_regions_are_in_frame_pixels():
    amap = square_map(boxes=[(16, 8, 16, 12)])  # model pixels; frame is 4x wide, 3x high
    regions = regions_only(amap, (192, 256), 0.25, ident)
    assert len(regions) == 1
    r = regions[0]
    assert (r.x, r.y, r.w, r.h) == (64, 24, 64, 36)
    assert 0.99 * 64 * 36 <= r.area <= 64 * 36  # bilinear upsampling rounds the corners
    assert r.peak == pytest.approx(0.5)


def test_two_regions_largest_first_and_min_area():
    amap = square_map(boxes=[(2, 2, 4, 4), (30, 30, 20, 10)])
    regions = regions_only(amap, (64, 64), 0.25, ident)
    assert [(r.w, r.h) for r in regions] == [(20, 10), (4, 4)]
    assert [r.area for r in regions_only(amap, (64, 64), 0.25, ident, min_area=17)] == [200]


def test_nothing_above_threshold_gives_no_regions():
    assert regions_only(square_map(background=0.1), (100, 100), 0.25, ident) == []


def test_peak_is_normalized_and_per_region():
    amap = square_map(boxes=[(0, 0, 8, 8), (40, 40, 8, 8)])
    amap[44, 44] = 0.9
    regions = regions_only(amap, (64, 64), 0.25, lambda raw: normalize(raw, 0.25, 0.0, 1.0))
    assert sorted(r.peak for r in regions) == [pytest.approx(0.75), pytest.approx(1.0)]


def test_roi_mask_limits_inspection(tmp_path):
    amap = square_map(boxes=[(4, 4, 8, 8), (40, 40, 8, 8)])
    mask = np.zeros((32, 32), np.uint8)  # any size: resized to the frame
    mask[16:, 16:] = 255
    cv2.imwrite(str(tmp_path / "roi.png"), mask)
    roi = RoiMask.load(tmp_path / "roi.png")
    regions = regions_only(amap, (128, 128), 0.25, ident, roi=roi)
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


def test_boxes_are_quantized_to_the_model_grid_and_min_area_is_in_frame_pixels():
    """Components are found at model resolution: a model pixel is frame/model frame pixels wide."""
    amap = square_map(boxes=[(10, 20, 4, 6)])  # 24 model pixels
    (r,) = regions_only(amap, (480, 640), 0.25, ident)  # one model pixel = 10 x 7.5 frame pixels
    assert (r.x, r.y, r.w, r.h) == (100, 150, 40, 45) and r.area == 24 * 75
    assert len(regions_only(amap, (480, 640), 0.25, ident, min_area=1800)) == 1
    assert regions_only(amap, (480, 640), 0.25, ident, min_area=1801) == []
    (small,) = regions_only(amap, (32, 32), 0.25, ident)  # frames smaller than the model work too
    assert (small.x, small.y, small.w, small.h) == (5, 10, 2, 3) and small.area == 6


def test_a_noisy_map_is_capped_fast_and_counted():
    """3,893 regions (a speck on every other pixel, plus one defect): the alert carries the 10 largest and
    the total, and extraction costs milliseconds, not the ~0.5 s the per-region loop took."""
    amap = np.zeros((128, 128), np.float32)
    amap[::2, ::2] = 0.3
    amap[38:62, 38:72] = 0.0  # a clear margin, so no speck touches the defect
    amap[40:60, 40:70] = 0.9
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        regions, total = find_regions(amap, (1080, 1920), 0.25, ident)
        timings.append(time.perf_counter() - start)
    specks = 64 * 64 - 12 * 17
    assert total == specks + 1 and len(regions) == 10
    assert regions[0].peak == pytest.approx(0.9) and regions[0].w == 30 * 15 and regions[0].h == 20 * 1080 // 128
    assert all(r.area == round(1920 / 128 * 1080 / 128) for r in regions[1:])
    assert len(find_regions(amap, (1080, 1920), 0.25, ident, max_regions=3)[0]) == 3
    assert len(find_regions(amap, (1080, 1920), 0.25, ident, max_regions=None)[0]) == total
    assert min(timings) < 0.1, timings


def test_equal_areas_rank_by_peak():
    amap = square_map(boxes=[(2, 2, 4, 4), (20, 20, 4, 4), (40, 40, 4, 4)])
    amap[21, 21] = 0.8
    amap[42, 42] = 0.7
    regions, total = find_regions(amap, (64, 64), 0.25, ident, max_regions=2)
    assert total == 3 and [(r.x, r.peak) for r in regions] == [(20, pytest.approx(0.8)), (40, pytest.approx(0.7))]


def reference_regions(amap, frame_size, threshold, min_area):
    """The obvious per-region loop at model resolution (slow, but plainly right)."""
    height, width = frame_size
    sx, sy = width / amap.shape[1], height / amap.shape[0]
    count, labels, stats, _ = cv2.connectedComponentsWithStats((amap >= threshold).astype(np.uint8), connectivity=8)
    found = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area * (sx * sy) < min_area:  # the same float expression as the implementation (x.5 rounding)
            continue
        box = (min(width - 1, int(x * sx + 0.5)), min(height - 1, int(y * sy + 0.5)))
        end = (min(width, int((x + w) * sx + 0.5)), min(height, int((y + h) * sy + 0.5)))
        found.append((box[0], box[1], max(1, end[0] - box[0]), max(1, end[1] - box[1]),
                      max(1, int(area * (sx * sy) + 0.5)), round(float(amap[labels == label].max()), 4)))
    return sorted(found, key=lambda r: (-r[4], -r[5]))


@settings(max_examples=60, deadline=None)
@given(st.integers(4, 40), st.integers(4, 40), st.integers(1, 300), st.integers(1, 300), st.integers(0, 2**32 - 1),
       st.integers(1, 50))
def test_vectorized_regions_match_the_per_region_loop(model_h, model_w, frame_h, frame_w, seed, min_area):
    amap = np.random.default_rng(seed).random((model_h, model_w), dtype=np.float32)
    regions, total = find_regions(amap, (frame_h, frame_w), 0.7, ident, min_area=min_area, max_regions=None)
    expected = reference_regions(amap, (frame_h, frame_w), 0.7, min_area)
    assert total == len(expected)
    got = [(r.x, r.y, r.w, r.h, r.area, r.peak) for r in regions]
    assert sorted(got) == sorted(expected)
    assert [r[4] for r in got] == sorted((r[4] for r in got), reverse=True)  # largest first
    for r in regions:
        assert 0 <= r.x < frame_w and 0 <= r.y < frame_h and r.x + r.w <= frame_w and r.y + r.h <= frame_h


def test_roi_mask_is_applied_at_model_size():
    mask = np.zeros((480, 640), np.uint8)
    mask[:, 320:] = 255  # right half of the frame
    roi = RoiMask(mask)
    assert roi.at(64, 64).shape == (64, 64) and roi.at(64, 64)[:, :32].sum() == 0 and roi.at(64, 64)[:, 32:].all()
    amap = square_map(boxes=[(4, 4, 8, 8), (30, 30, 8, 8)])  # the second straddles the ROI border at x=32
    (r,) = regions_only(amap, (480, 640), 0.25, ident, roi=roi)
    assert (r.x, r.y, r.w, r.h) == (320, 225, 60, 60)
    thin = np.zeros((480, 640), np.uint8)
    thin[:, 100] = 1  # thinner than half a model pixel: kept (any overlap) rather than inspecting nothing
    assert RoiMask(thin).at(64, 64).any()


def test_regions_can_be_left_for_the_alert():
    scorer = Scorer(THRESHOLDS)
    lazy = scorer.decide(square_map(boxes=[(10, 10, 10, 10)]), 0.5, (64, 64), with_regions=False)
    assert lazy.anomalous and lazy.regions is None
    regions, total = scorer.regions(square_map(boxes=[(10, 10, 10, 10)]), (64, 64))
    assert total == 1 and (regions[0].w, regions[0].h) == (10, 10)
    normal = scorer.decide(square_map(background=0.01), 0.01, (64, 64), with_regions=False)
    assert not normal.anomalous and normal.regions == []
    # an ROI (or a minimum area) decides anomalous-ness, so it needs the regions at once
    roi_scorer = Scorer(THRESHOLDS, roi=RoiMask(np.ones((8, 8), np.uint8)), max_regions=1)
    decided = roi_scorer.decide(square_map(boxes=[(2, 2, 4, 4), (30, 30, 8, 8)]), 0.5, (64, 64), with_regions=False)
    assert decided.anomalous and len(decided.regions) == 1 and decided.regions_total == 2


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
