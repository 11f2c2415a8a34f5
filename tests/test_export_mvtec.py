"""FP32 IR vs PyTorch parity on real MVTec bottle and screw images (pretrained features, 128 px).

Random-weight parity (test_export.py) can miss numerics that only show with real activations
(large pretrained feature magnitudes, a PCA fitted on real features); this checks them quickly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from prerequisites import missing

from deploy.export import export_ir, parity
from deploy.ir_eval import IrRunner
from edge_ad.sources.images import list_images, read_image
from edge_ad.model.preprocess import PreprocessSpec, preprocess
from training.backbones import build_backbone
from training.models.dfm import DfmModel
from training.models.stfpm import StfpmModel

CANDIDATES = [Path(__file__).resolve().parents[2] / "shared/data/mvtec_ad", Path("/work/shared/data/mvtec_ad")]
MVTEC = next((p for p in CANDIDATES if (p / "bottle").is_dir() and (p / "screw").is_dir()), None)
SPEC = PreprocessSpec.square(128)
TOLERANCE = 1e-4

pytestmark = pytest.mark.mvtec


@pytest.fixture(autouse=True)
def _needs_mvtec():
    if MVTEC is None:
        missing("mvtec", "needs ../shared/data/mvtec_ad with bottle and screw")


def test_images() -> np.ndarray:
    """Good and defective test images of both categories (bottle RGB, screw grayscale)."""
    paths = []
    for category, defects in (("bottle", ("good", "broken_large", "contamination")), ("screw", ("good", "scratch_head", "thread_top"))):
        for defect in defects:
            paths.append(list_images(MVTEC / category / "test" / defect)[0])
    return np.stack([preprocess(read_image(p), SPEC) for p in paths])


test_images.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return test_images()


def test_dfm_pretrained_parity_on_real_images(images, tmp_path):
    model = DfmModel(build_backbone("mobilenet_v2", pretrained=True), taps=(2,)).eval()
    train = np.stack([preprocess(read_image(p), SPEC) for p in list_images(MVTEC / "bottle" / "train" / "good")[:20]])
    with torch.no_grad():
        features = model.tap_features(torch.from_numpy(train))
    model.fit(features.reshape(len(train), -1).numpy())
    runner = IrRunner.open(export_ir(model, SPEC, tmp_path / "model.xml"))
    result = parity(model, runner, images)
    print(f"mvtec dfm mobilenet_v2: map {result.max_rel_map_error:.2e}, score {result.max_rel_score_error:.2e}")
    assert result.max_rel_map_error <= TOLERANCE
    assert result.max_rel_score_error <= TOLERANCE
    assert result.same_ranking


def test_stfpm_pretrained_teacher_parity_on_real_images(images, tmp_path):
    torch.manual_seed(0)
    model = StfpmModel(build_backbone("mobilenet_v2", pretrained=True), build_backbone("mobilenet_v2", pretrained=False)).eval()
    runner = IrRunner.open(export_ir(model, SPEC, tmp_path / "model.xml"))
    result = parity(model, runner, images)
    print(f"mvtec stfpm mobilenet_v2: map {result.max_rel_map_error:.2e}, score {result.max_rel_score_error:.2e}")
    assert result.max_rel_map_error <= TOLERANCE
    assert result.max_rel_score_error <= TOLERANCE
    assert result.same_ranking
