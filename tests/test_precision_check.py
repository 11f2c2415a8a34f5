"""deploy.precision_check: bf16 vs f32 against the INT8 tolerances, recorded in bundle.json at export."""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest

from deploy.precision_check import compare
from edge_ad.model.bundle import read_bundle
from edge_ad.model.precision import cpu_has_bf16

RNG = np.random.default_rng(0)
TEST = RNG.random(40)
VAL = RNG.random(20) * 0.5  # normal images, below the threshold 0.6
METRICS = {"image_auroc": 0.95, "pixel_auroc": 0.97}


def check(test_scores=TEST, val_scores=VAL, metrics=METRICS):
    return compare("bf16", "test CPU", 0.6, METRICS, metrics, TEST, test_scores, VAL, val_scores)


def test_small_noise_passes_with_every_figure_recorded():
    result = check(TEST * 1.002, VAL * 1.002, {"image_auroc": 0.949, "pixel_auroc": 0.9705})
    assert result.verified and result.measured and result.reason.startswith("bf16 verified on test CPU")
    assert result.image_auroc_delta == pytest.approx(-0.001) and result.pixel_auroc_delta == pytest.approx(0.0005)
    assert result.spearman == 1.0 and result.validation_decisions_agree
    assert result.max_score_deviation == pytest.approx(np.max(TEST) * 0.002 / 0.6, abs=1e-6)
    assert result.max_validation_deviation == pytest.approx(np.max(VAL) * 0.002 / 0.6, abs=1e-6)
    assert (result.validation_images, result.test_images) == (20, 40)


@pytest.mark.parametrize("kwargs,failure", [
    ({"metrics": {"image_auroc": 0.93, "pixel_auroc": 0.97}}, "image AUROC -0.0200"),
    ({"metrics": {"image_auroc": 0.95, "pixel_auroc": 0.95}}, "pixel AUROC -0.0200"),
    ({"test_scores": RNG.random(40)}, "Spearman"),
    ({"val_scores": np.where(np.arange(20) == 3, 0.61, VAL)}, "validation decisions differ"),  # one flips
])
def test_each_tolerance_can_fail_it(kwargs, failure):
    result = check(**kwargs)
    assert not result.verified and result.measured and failure in result.reason


def test_export_records_the_bf16_check(tiny_fp32_bundle):
    """The tiny STFPM bundle exported on this CPU: measured if it has bf16, 'not verified' otherwise."""
    recorded = read_bundle(tiny_fp32_bundle).precision_checks["bf16"]
    if not cpu_has_bf16(ov.Core()):
        assert not recorded.measured and not recorded.verified and "no bf16" in recorded.reason
        return
    assert recorded.measured and recorded.test_images == 12 and recorded.validation_images > 0
    assert recorded.spearman is not None and recorded.image_auroc_delta is not None
    assert recorded.validation_decisions_agree is not None and recorded.max_score_deviation >= 0
    assert recorded.verified == (recorded.reason.startswith("bf16 verified"))
