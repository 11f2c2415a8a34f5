"""FP32 OpenVINO IR vs PyTorch parity for every algorithm x backbone, and the IR's interface.

Real OpenVINO compiled models on CPU; random backbone weights (parity does not need
ImageNet features) at 64 px to keep the suite fast. FP16 exports are checked in
test_bundle.py (through export_run and the CLI), real pretrained features in test_export_mvtec.py.
"""

from __future__ import annotations

import functools

import numpy as np
import openvino as ov
import pytest
import torch
import torch.nn.functional as F

from deploy.export import ExportError, export_ir, parity
from deploy.ir_eval import IrRunner
from edge_ad.model.preprocess import PreprocessSpec, preprocess
from training.backbones import BACKBONES, build_backbone
from training.data.synthetic import add_defect, make_texture, to_uint8
from training.models.dfm import DfmModel
from training.models.image_score import ImageScore
from training.models.patch_memory import PatchMemory, locally_aware_patches
from training.models.stfpm import StfpmModel

SIZE = 64
SPEC = PreprocessSpec.square(SIZE)
FP32_TOLERANCE = 1e-4  # max |ov - torch| / max |torch|
CASES = [(algorithm, backbone) for backbone in BACKBONES for algorithm in ("stfpm", "dfm")] + [("stfpm-memory", "mobilenet_v2")]
# DFM's map is the same for both score types; the Gaussian NLL score is exported for one backbone.
DFM_SCORE_TYPE = {"resnet18": "nll", "mobilenet_v2": "map"}
# The recipe levers in the graph: a smoothed map with a top-k image score, and concatenated DFM taps.
SCORED = {"mobilenet_v2": dict(smooth_sigma=4.0, reduction="topk", topk_fraction=0.01)}
DFM_TAPS = {"mobilenet_v2": (1, 2)}
# STFPM's subspace term (a DFM on the teacher's features, the default recipe's), exported for one backbone.
STFPM_SUBSPACE = {"mobilenet_v2": 2.0}
# "stfpm-memory": the same plus the memory term (--memory-weight) on the full input, the student's terms on the
# input pooled by 2 (--student-pool 2), joining the image score by its own (--memory-fusion score: its per-term
# smoothing and top-k; the map fusion is the subspace case's sum).
MEMORY_WEIGHT = 3.0


def frames(seed: int = 1) -> list[np.ndarray]:
    """A handful of clearly different uint8 BGR/gray frames, so image scores are well separated."""
    rng = np.random.default_rng(seed)
    texture = make_texture(rng, 96)
    defective, _ = add_defect(make_texture(rng, 96), "blob", rng)
    ramp = np.tile(np.linspace(0, 255, 80, dtype=np.uint8), (80, 1))
    checker = ((np.indices((72, 72)).sum(axis=0) // 6) % 2 * 255).astype(np.uint8)
    return [
        to_uint8(texture),
        to_uint8(defective),
        rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),  # noise
        ramp,  # gray
        checker,
        np.full((50, 70, 3), (30, 160, 220), dtype=np.uint8),  # flat color
    ]


def batch(frame_list: list[np.ndarray]) -> np.ndarray:
    return np.stack([preprocess(frame, SPEC) for frame in frame_list])


@functools.cache
def backbone_instance(name: str, index: int) -> torch.nn.Module:
    """Random-weight backbones, built once per (name, index): wide_resnet50_2's init alone takes seconds.

    Index 0 serves as STFPM teacher and DFM extractor (neither changes it), 1 as STFPM student.
    """
    torch.manual_seed(index)
    return build_backbone(name, pretrained=False)


def build(algorithm: str, backbone: str) -> torch.nn.Module:
    scoring = ImageScore(**SCORED.get(backbone, {}))
    if algorithm in ("stfpm", "stfpm-memory"):
        weight = STFPM_SUBSPACE.get(backbone, 0.0)
        with_memory = algorithm == "stfpm-memory"
        student_pool = 2 if with_memory else 1
        subspace = (fitted(DfmModel(backbone_instance(backbone, 0), taps=(1,), pool=2, score_type="map"), student_pool)
                    if weight else None)
        memory = fitted_memory(backbone_instance(backbone, 0)) if with_memory else None
        model = StfpmModel(backbone_instance(backbone, 0), backbone_instance(backbone, 1), scoring,
                           subspace=subspace, subspace_weight=weight, memory=memory,
                           memory_weight=MEMORY_WEIGHT if with_memory else 0.0, student_pool=student_pool,
                           memory_fusion="score" if with_memory else "map").eval()
        if hasattr(model, "map_scales"):  # any scales: parity must hold for these too
            model.map_scales.copy_(torch.tensor([0.3, 2.0, 0.7][:len(model.map_scales)]))
        return model
    score_type = DFM_SCORE_TYPE.get(backbone, "fre")
    return fitted(DfmModel(backbone_instance(backbone, 0), taps=DFM_TAPS.get(backbone, (2,)), score_type=score_type,
                           image_score=scoring))


def normal_images() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(np.stack([preprocess(to_uint8(make_texture(rng, SIZE)), SPEC) for _ in range(8)]))


def fitted(model: DfmModel, student_pool: int = 1) -> DfmModel:
    normal = F.avg_pool2d(normal_images(), student_pool)  # as the STFPM whose term it is sees them
    with torch.no_grad():
        features = model.eval().tap_features(normal)
    model.fit(features.reshape(len(normal), -1).numpy())
    return model.eval()


def fitted_memory(teacher: torch.nn.Module) -> PatchMemory:
    """A memory of every patch of the normal textures (no coreset needed for parity)."""
    with torch.no_grad():
        patches = locally_aware_patches(teacher(normal_images()))
    memory = PatchMemory()
    memory.memory = patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1])
    return memory


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(algorithm, backbone) -> (torch model, compiled IR runner, xml path); each exported once."""
    cache: dict[tuple[str, str], tuple] = {}

    def get(algorithm: str, backbone: str):
        if (algorithm, backbone) not in cache:
            model = build(algorithm, backbone)
            xml = export_ir(model, SPEC, tmp_path_factory.mktemp(f"{algorithm}-{backbone}") / "model.xml")
            cache[(algorithm, backbone)] = (model, IrRunner.open(xml), xml)
        return cache[(algorithm, backbone)]

    yield get
    cache.clear()
    backbone_instance.cache_clear()  # release the wide_resnet50_2 weights for the rest of the session


@pytest.mark.parametrize("algorithm,backbone", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_fp32_ir_matches_pytorch(exported, algorithm, backbone):
    model, runner, _ = exported(algorithm, backbone)
    images = batch(frames())
    result = parity(model, runner, images)
    print(f"{algorithm}-{backbone}: max rel map err {result.max_rel_map_error:.2e}, score err {result.max_rel_score_error:.2e}")
    assert result.max_rel_map_error <= FP32_TOLERANCE
    assert result.max_rel_score_error <= FP32_TOLERANCE
    with torch.no_grad():
        torch_scores = model(torch.from_numpy(images))[1].numpy()
    gaps = np.diff(np.sort(torch_scores)) / np.abs(torch_scores).max()
    assert gaps.min() > 2 * FP32_TOLERANCE, "test images must have well separated scores for the ranking check"
    assert result.same_ranking

    # Frames of other sizes and layouts go through the runtime's preprocessing to the same IR.
    odd = [np.random.default_rng(2).integers(0, 256, (200, 300), dtype=np.uint8),  # 300x200 gray
           np.random.default_rng(3).integers(0, 256, (131, 97, 3), dtype=np.uint8)]  # 97x131 BGR
    result = parity(model, runner, batch(odd))
    assert result.max_rel_map_error <= FP32_TOLERANCE
    assert result.max_rel_score_error <= FP32_TOLERANCE


def test_ir_interface_names_shapes_and_types(exported):
    _, _, xml = exported("stfpm", "mobilenet_v2")
    model = ov.Core().read_model(xml)
    assert model.input().get_any_name() == "image"
    assert list(model.input().get_shape()) == [1, 3, SIZE, SIZE]
    assert model.input().get_element_type() == ov.Type.f32
    assert model.output("anomaly_map").get_shape() == ov.Shape([1, 1, SIZE, SIZE])
    assert model.output("score").get_shape() == ov.Shape([1])
    assert all(output.get_element_type() == ov.Type.f32 for output in model.outputs)
    assert xml.with_suffix(".bin").is_file()


def test_dynamic_batch_gives_the_same_results_as_one_by_one(exported, tmp_path):
    model, static_runner, _ = exported("dfm", "mobilenet_v2")
    xml = export_ir(model, SPEC, tmp_path / "model.xml", dynamic_batch=True)
    assert ov.Core().read_model(xml).input().get_partial_shape()[0].is_dynamic
    runner = IrRunner.open(xml)
    images = batch(frames())
    maps, scores = runner.infer(images)  # one request, whole batch
    one_maps, one_scores = static_runner.infer(images)  # static 1x3xHxW, image by image
    assert maps.shape == (len(images), SIZE, SIZE)
    np.testing.assert_allclose(scores, one_scores, rtol=1e-5)
    np.testing.assert_allclose(maps, one_maps, rtol=1e-5, atol=1e-6 * np.abs(one_maps).max())


def test_unknown_precision_is_refused(exported, tmp_path):
    model, _, _ = exported("stfpm", "mobilenet_v2")
    with pytest.raises(ExportError, match="precision"):
        export_ir(model, SPEC, tmp_path / "model.xml", precision="int8")
    assert not (tmp_path / "model.xml").exists()
