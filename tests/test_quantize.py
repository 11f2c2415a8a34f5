"""INT8 quantization of a bundle (python -m calibration.quantize).

Fast tests: a tiny STFPM bundle on generated 64-px data (conftest's tiny_fp32_bundle): the INT8
bundle is complete and valid, the anomaly head really stays FP32, errors are one clear line.
Slow tests (real MVTec bottle, skipped where absent): the issue's accuracy targets for STFPM
and DFM, INT8 IR against FP32 IR, and INT8 single-frame latency against FP32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from calibration.graph import CONV_TYPES, split_graph
from calibration.int8 import RECIPES, Fp32Reference, count_fake_quantize
from calibration.quantize import images_digest, main
from edge_ad.model.bundle import read_bundle

def copy_bundle(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def fq_consumers(model: ov.Model) -> set[str]:
    """Friendly names of the nodes a FakeQuantize feeds."""
    return {
        target.get_node().get_friendly_name()
        for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
        for target in op.output(0).get_target_inputs()
    }


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# --- fast: generated data ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_bundle(tiny_fp32_bundle: Path, tmp_path_factory) -> Path:
    """The CLI on the tiny FP32 bundle (in-process), default recipe, 5 latency runs to keep it short."""
    out = tmp_path_factory.mktemp("int8") / "bundle"
    assert main([str(tiny_fp32_bundle), "--out", str(out), "--latency-runs", "5"]) == 0
    return out


def test_int8_bundle_is_complete_and_verifies(int8_bundle, tiny_fp32_bundle, tiny_stfpm_run):
    fp32 = read_bundle(tiny_fp32_bundle)
    bundle = read_bundle(int8_bundle)  # verifies both sha256 and the schema
    assert bundle.model.precision == "int8"
    assert count_fake_quantize(ov.Core().read_model(str(int8_bundle / "model.xml"))) > 0

    # metrics side by side; the FP32 bundle's torch and fp32_ir entries kept as they were
    assert set(bundle.metrics) == {"torch", "fp32_ir", "int8_ir"}
    assert bundle.metrics["torch"] == fp32.metrics["torch"]
    assert bundle.metrics["fp32_ir"] == fp32.metrics["fp32_ir"]
    int8 = bundle.metrics["int8_ir"]
    for key in ("image_auroc", "pixel_auroc", "spearman_vs_fp32_ir", "image_auroc_drop_vs_fp32_ir", "pixel_auroc_drop_vs_fp32_ir"):
        assert isinstance(int8[key], float), key
    assert int8["image_auroc_drop_vs_fp32_ir"] == pytest.approx(fp32.metrics["fp32_ir"]["image_auroc"] - int8["image_auroc"], abs=1e-5)

    # calibrated on exactly the run's held-out validation images, never test images
    calibration = bundle.calibration
    split = json.loads((tiny_stfpm_run / "split.json").read_text())
    assert calibration["images"]["count"] == len(split["validation"]) == calibration["subset_size"]
    assert sorted(calibration["images"]["paths"]) == sorted("/".join(Path(p).parts[-4:]) for p in split["validation"])
    assert all("/train/good/" in p for p in calibration["images"]["paths"])
    assert calibration["images"]["sha256"] == images_digest([Path(p) for p in split["validation"]])
    assert calibration["method"] == "nncf.quantize" and calibration["mode"] == "ptq"
    assert calibration["recipe"] == RECIPES["recommended"].settings()
    assert calibration["preset"] == "mixed" and calibration["ignored_scope"]["names"]
    assert calibration["fake_quantize_nodes"] > 0
    assert set(calibration["latency_ms"]) == {"fp32", "int8", "speedup"}
    assert calibration["latency_ms"]["int8"]["runs"] >= 5 and calibration["latency_ms"]["int8"]["median_ms"] > 0
    assert calibration["source_files"] == fp32.files
    kernel = calibration["kernel_check"]
    assert isinstance(kernel["int8_kernels_vs_fp32_emulation"], float) and isinstance(kernel["emulation_vs_fp32"], float)
    assert kernel["cpu"] and kernel["cpu_capabilities"]

    # thresholds re-derived from the INT8 model on validation, the FP32 ones kept for reference
    assert bundle.thresholds.source == "validation (INT8 IR)"
    assert calibration["thresholds_fp32"]["image"] == fp32.thresholds.image
    assert bundle.versions["nncf"] != "not installed"

    read_bundle(tiny_fp32_bundle)  # the FP32 bundle is untouched
    assert fp32.model.precision == "fp32"


def test_int8_bundle_records_its_own_bf16_check(int8_bundle, tiny_fp32_bundle):
    """The INT8 IR's f32 parts in bf16 vs f32, on the validation and test images: not the FP32 bundle's check."""
    from edge_ad.model.precision import cpu_has_bf16

    check, fp32_check = (read_bundle(b).precision_checks["bf16"] for b in (int8_bundle, tiny_fp32_bundle))
    assert check.measured == cpu_has_bf16(ov.Core())
    if check.measured:
        assert check.validation_images == read_bundle(int8_bundle).calibration["validation_agreement"]["n_images"]
        assert check.test_images == 12 and check != fp32_check


def test_anomaly_head_and_first_convolution_stay_fp32(int8_bundle, tiny_fp32_bundle):
    """No quantizer feeds the map head (normalize, distance, upsample, product, max) or the first convs."""
    parts = split_graph(ov.Core().read_model(str(tiny_fp32_bundle / "model.xml")))
    quantized = ov.Core().read_model(str(int8_bundle / "model.xml"))
    fed = fq_consumers(quantized)
    assert fed, "no FakeQuantize at all"
    assert not fed & set(parts.head), sorted(fed & set(parts.head))
    assert not fed & set(parts.first_convs)
    # ...while the backbone convolutions do run in INT8
    convs = {op.get_friendly_name() for op in quantized.get_ordered_ops() if op.get_type_name() in CONV_TYPES}
    assert len(fed & convs) >= parts.convolutions // 2


def test_fp32_emulation_has_no_quantizers_and_matches_its_grid(int8_bundle, tiny_fp32_bundle):
    """The emulated model is FP32 only; on the FP32 input grid it reproduces the INT8 model closely."""
    from calibration.emulate import emulate_fake_quantize
    from calibration.int8 import infer_all

    quantized = ov.Core().read_model(str(int8_bundle / "model.xml"))
    emulated = emulate_fake_quantize(quantized)
    assert count_fake_quantize(emulated) == 0 and count_fake_quantize(quantized) > 0
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64)).astype(np.float32) / 255
    core = ov.Core()
    e_maps, e_scores = infer_all(core.compile_model(emulated, "CPU"), images)
    q_maps, _ = infer_all(core.compile_model(quantized, "CPU"), images)
    assert np.all(np.isfinite(e_maps)) and np.all(np.isfinite(e_scores))
    assert np.corrcoef(e_maps.ravel(), q_maps.ravel())[0, 1] > 0.5


def test_int8_ir_runs_like_the_runtime_loads_it(int8_bundle, synthetic_root):
    from deploy.ir_eval import infer_images

    bundle = read_bundle(int8_bundle)
    images = sorted((synthetic_root / "synthetic" / "test").rglob("*.png"))[:3]
    result = infer_images(int8_bundle / "model.xml", images, bundle.preprocess)
    assert result.maps.shape == (3, 64, 64) and np.all(np.isfinite(result.maps)) and np.all(np.isfinite(result.scores))


def test_graph_split_finds_the_head_of_both_algorithms():
    import torch

    from deploy.export import convert
    from edge_ad.model.preprocess import PreprocessSpec
    from training.backbones import build_backbone
    from training.models.dfm import DfmModel
    from training.models.image_score import ImageScore
    from training.models.stfpm import StfpmModel

    torch.manual_seed(0)
    spec = PreprocessSpec.square(64)
    stfpm = StfpmModel(build_backbone("mobilenet_v2", pretrained=False), build_backbone("mobilenet_v2", pretrained=False))
    dfm = DfmModel(build_backbone("mobilenet_v2", pretrained=False), taps=(2,), feature_dim=96 * 4 * 4, n_components=4)
    # A smoothed, top-k scored map: the blur's constant 1->1 convolutions belong to the head (kept FP32).
    smoothed = StfpmModel(build_backbone("mobilenet_v2", pretrained=False), build_backbone("mobilenet_v2", pretrained=False),
                          ImageScore(smooth_sigma=4.0, reduction="topk"))
    teacher = build_backbone("mobilenet_v2", pretrained=False)
    with_subspace = StfpmModel(teacher, build_backbone("mobilenet_v2", pretrained=False),
                               subspace=DfmModel(teacher, taps=(1,), pool=2, score_type="map",
                                                 feature_dim=32 * 4 * 4, n_components=4), subspace_weight=2.0)
    # The maps' bilinear resize is two MatMuls (training.models.upsample), part of the head like the PCA's.
    cases = ((stfpm, {"ReduceL2", "Subtract", "MatMul", "Multiply", "ReduceMax"}, 0),
             (with_subspace, {"ReduceL2", "MatMul", "Add", "ReduceMax"}, 0),
             (dfm, {"MatMul"}, 0),
             (smoothed, {"ReduceL2", "Subtract", "MatMul", "Multiply", "TopK"}, 2))
    for model, head_types, blur_convs in cases:
        ov_model = convert(model.eval(), spec)
        parts = split_graph(ov_model)
        types = {op.get_friendly_name(): op.get_type_name() for op in ov_model.get_ordered_ops()}
        head = {types[name] for name in parts.head}
        assert head_types <= head, head
        assert "Interpolate" not in head, head
        assert sum(types[name] in CONV_TYPES for name in parts.head) == blur_convs
        assert parts.taps and parts.tap_convs and parts.first_convs
        # both outputs are produced inside the head
        for result in ov_model.get_results():
            assert result.input_value(0).get_node().get_friendly_name() in parts.head


def test_only_the_pca_products_get_int8_weights():
    """The PCA's (N, D) products are compressed; the maps' small resize matrices stay FP32 (exact)."""
    import torch

    from calibration.int8 import compress_head_matmuls
    from deploy.export import convert
    from edge_ad.model.preprocess import PreprocessSpec
    from training.backbones import build_backbone
    from training.models.dfm import DfmModel

    torch.manual_seed(0)
    dfm = DfmModel(build_backbone("mobilenet_v2", pretrained=False), taps=(2,), feature_dim=96 * 4 * 4, n_components=4)
    ov_model = convert(dfm.eval(), PreprocessSpec.square(64))
    matmuls = {op.get_friendly_name(): op for op in ov_model.get_ordered_ops() if op.get_type_name() == "MatMul"}
    # The PCA's products are those with a constant holding the components: one side is the feature size.
    feature_products = {name for name, op in matmuls.items()
                        if any(port.get_source_output().get_node().get_type_name() == "Constant"
                               and 96 * 4 * 4 in port.get_partial_shape().to_shape() for port in op.inputs())}
    assert len(feature_products) == 2 and len(matmuls) == 4  # projection, reconstruction; resize rows, columns
    _, compressed = compress_head_matmuls(ov_model, split_graph(ov_model).head)
    assert set(compressed) == feature_products


def test_the_memory_terms_distances_keep_fp32_weights():
    """STFPM's memory term multiplies (N, hw, C) patches by the memory: INT8 weights there would shift the small
    nearest distances, so only the subspace's PCA products are compressed."""
    import torch

    from calibration.int8 import compress_head_matmuls
    from deploy.export import convert
    from edge_ad.model.preprocess import PreprocessSpec
    from training.backbones import build_backbone
    from training.models.dfm import DfmModel
    from training.models.patch_memory import PatchMemory
    from training.models.stfpm import StfpmModel

    torch.manual_seed(0)
    teacher = build_backbone("mobilenet_v2", pretrained=False)
    subspace = DfmModel(teacher, taps=(2,), score_type="map", feature_dim=96 * 2 * 2, n_components=3)
    memory = PatchMemory(size=37, channels=128)
    memory.memory = torch.randn(37, 128)
    model = StfpmModel(teacher, build_backbone("mobilenet_v2", pretrained=False), subspace=subspace, subspace_weight=2.0,
                       memory=memory, memory_weight=4.0, student_pool=2).eval()
    ov_model = convert(model, PreprocessSpec.square(64))
    matmuls = {op.get_friendly_name(): op for op in ov_model.get_ordered_ops() if op.get_type_name() == "MatMul"}
    memory_products = {name for name, op in matmuls.items()
                       if any(37 in port.get_partial_shape().to_shape() for port in op.inputs())}
    pca_products = {name for name, op in matmuls.items()
                    if any(96 * 2 * 2 in port.get_partial_shape().to_shape() for port in op.inputs())}
    assert len(memory_products) == 1 and len(pca_products) == 2
    _, compressed = compress_head_matmuls(ov_model, split_graph(ov_model).head)
    assert set(compressed) == pca_products  # the memory product is not among them


def test_agreement_metric():
    maps = np.random.default_rng(0).random((3, 8, 8)) + 0.1
    scores = maps.max(axis=(1, 2))
    reference = Fp32Reference.from_outputs(maps, scores)
    assert np.allclose(reference.agreement_all(maps, scores), 1.0)
    # 10 % too large everywhere: NMSE 0.01 for map and score -> 0.99
    assert reference.agreement(0, maps[0] * 1.1, scores[0] * 1.1) == pytest.approx(0.99)
    # error as large as the signal -> 0
    assert reference.agreement(1, maps[1] * 2, scores[1] * 2) == pytest.approx(0.0)


def test_accuracy_control_mode_with_the_runs_split_json(tiny_fp32_bundle, tiny_stfpm_run, tmp_path):
    """quantize_with_accuracy_control on FP32 agreement: the result meets the drop it was given."""
    out = tmp_path / "ac"
    args = ["--mode", "accuracy-control", "--max-drop", "0.05", "--latency-runs", "0", "--run-dir", str(tiny_stfpm_run)]
    assert main([str(tiny_fp32_bundle), "--out", str(out), *args]) == 0
    bundle = read_bundle(out)
    calibration = bundle.calibration
    assert calibration["images"]["source"] == f"split.json of {tiny_stfpm_run}"
    split = json.loads((tiny_stfpm_run / "split.json").read_text())
    assert calibration["images"]["paths"] == ["/".join(Path(p).parts[-4:]) for p in split["validation"]]
    assert calibration["method"] == "nncf.quantize_with_accuracy_control"
    assert calibration["accuracy_control"]["max_drop"] == 0.05
    assert "NMSE" in calibration["accuracy_control"]["metric"]
    assert calibration["validation_agreement"]["mean"] >= 1.0 - 0.05 - 1e-6
    assert calibration["latency_ms"] is None and bundle.model.precision == "int8"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode", "fast"], "--mode must be one of ptq, accuracy-control"),
        (["--max-drop", "0"], "--max-drop must be in (0, 1)"),
        (["--max-drop", "1.5"], "--max-drop must be in (0, 1)"),
        (["--subset-size", "0"], "--subset-size must be >= 1"),
        (["--recipe", "magic"], "unknown --recipe 'magic'"),
        (["--category", "screw"], "differs from the category the model was trained on"),
        (["--data-root", "/nonexistent/data"], "data root does not exist"),
        (["--mode", "accuracy-control", "--recipe", "weights-only"], "needs a full quantization recipe"),
    ],
)
def test_bad_options_are_one_clear_line(tiny_fp32_bundle, tmp_path, capsys, args, message):
    assert main([str(tiny_fp32_bundle), "--out", str(tmp_path / "out"), *args]) == 2
    assert message in error_line(capsys)


def test_changed_data_is_refused_without_the_runs_split(tiny_fp32_bundle, synthetic_root, tmp_path, capsys):
    """A changed dataset would silently give another validation split: refuse, name the remedy."""
    moved = tmp_path / "data"
    shutil.copytree(synthetic_root, moved)
    sorted((moved / "synthetic" / "train" / "good").iterdir())[0].unlink()
    assert main([str(tiny_fp32_bundle), "--out", str(tmp_path / "out"), "--data-root", str(moved)]) == 2
    err = error_line(capsys)
    assert "changed since training" in err and "--run-dir" in err
    assert not (tmp_path / "out").exists()


def test_bad_bundles_are_one_clear_line(tiny_fp32_bundle, int8_bundle, tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "a")]) == 2
    assert "bundle folder not found" in error_line(capsys)

    assert main([str(int8_bundle), "--out", str(tmp_path / "b")]) == 2
    assert "is an int8 bundle; quantize the FP32 bundle" in error_line(capsys)

    tampered = copy_bundle(tiny_fp32_bundle, tmp_path / "tampered")
    with open(tampered / "model.bin", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02\x03")
    assert main([str(tampered), "--out", str(tmp_path / "c")]) == 2
    assert "checksum mismatch" in error_line(capsys)

    assert main([str(tiny_fp32_bundle), "--out", str(tiny_fp32_bundle)]) == 2
    assert "--out must differ from the FP32 bundle folder" in error_line(capsys)

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert main([str(tiny_fp32_bundle), "--out", str(busy)]) == 2
    assert "output folder is not empty" in error_line(capsys)
    assert (busy / "notes.txt").read_text() == "keep me"


# --- slow: real MVTec bottle ---------------------------------------------------------------------

# The models are conftest's session fixtures bottle_stfpm_run (MobileNetV2 STFPM, 256 px, 10 epochs:
# the README's reference settings) and bottle_dfm_run (EfficientNet-Lite0 DFM), shared with
# test_accuracy_mvtec.py. Measured alternative: STFPM with 3 epochs is quicker but is a weak model
# (FP32 pixel AUROC 0.925) whose INT8 image AUROC drop (0.0087) sits at the limit: not a fair test.


@pytest.fixture(scope="module")
def bottle_int8(request, tmp_path_factory):
    """algorithm -> INT8 bundle.json data; each model exported and quantized once per module."""
    from deploy.export import export_run

    cache: dict[str, dict] = {}

    def get(algorithm: str) -> dict:
        if algorithm not in cache:
            run = request.getfixturevalue(f"bottle_{algorithm}_run")  # skips without ../shared/data/mvtec_ad
            folder = tmp_path_factory.mktemp(f"bottle_{algorithm}")
            fp32 = export_run(run, folder / "fp32")
            out = folder / "int8"
            assert main([str(fp32), "--out", str(out), "--latency-runs", "100"]) == 0
            read_bundle(out)
            cache[algorithm] = json.loads((out / "bundle.json").read_text())
        return cache[algorithm]

    return get


@pytest.mark.mvtec
@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["stfpm", "dfm"])
def test_int8_keeps_fp32_accuracy_on_bottle(bottle_int8, algorithm):
    bundle = bottle_int8(algorithm)
    fp32, int8 = bundle["metrics"]["fp32_ir"], bundle["metrics"]["int8_ir"]
    print(
        f"\n{algorithm} bottle: image AUROC fp32 {fp32['image_auroc']:.4f} int8 {int8['image_auroc']:.4f}, "
        f"pixel AUROC fp32 {fp32['pixel_auroc']:.4f} int8 {int8['pixel_auroc']:.4f}, Spearman {int8['spearman_vs_fp32_ir']:.4f}, "
        f"latency {bundle['calibration']['latency_ms']['fp32']['median_ms']:.1f} -> {bundle['calibration']['latency_ms']['int8']['median_ms']:.1f} ms"
    )
    assert fp32["image_auroc"] >= 0.98 and fp32["pixel_auroc"] >= 0.95, fp32  # a model worth quantizing
    assert fp32["image_auroc"] - int8["image_auroc"] <= 0.01, (fp32, int8)
    assert fp32["pixel_auroc"] - int8["pixel_auroc"] <= 0.01, (fp32, int8)
    assert int8["spearman_vs_fp32_ir"] >= 0.95, int8
    assert bundle["calibration"]["targets"]["met"] is True


# Latency is not asserted here (speed targets are checked by benchmark scripts, not timed tests):
# calibration.quantize records FP32 vs INT8 latency and `pays_off` in every bundle, and warns.


def test_without_the_run_folder_the_split_is_redrawn_from_the_split_seed(tiny_fp32_bundle, synthetic_root):
    """A run trained with --split-seed calibrates on the validation images it held out, not --seed's."""
    from edge_ad.model.bundle import read_bundle
    from training.data import load_category, split_validation
    from calibration.quantize import validation_samples

    bundle = read_bundle(tiny_fp32_bundle)
    train = load_category(synthetic_root, "synthetic").train
    fraction = bundle.training.validation_fraction
    _, from_seed = split_validation(train, fraction=fraction, seed=bundle.training.seed)
    _, from_split_seed = split_validation(train, fraction=fraction, seed=bundle.training.seed + 7)
    assert [s.path for s in from_seed] != [s.path for s in from_split_seed]
    assert [s.path for s in validation_samples(bundle, synthetic_root, "synthetic", None)[1]] == [s.path for s in from_seed]
    bundle.training.config = {**bundle.training.config, "split_seed": bundle.training.seed + 7}
    _, samples, source = validation_samples(bundle, synthetic_root, "synthetic", None)
    assert [s.path for s in samples] == [s.path for s in from_split_seed]
    assert f"seed={bundle.training.seed + 7}" in source
