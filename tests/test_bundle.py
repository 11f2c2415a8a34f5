"""Export CLI on a tiny trained run -> bundle: contents, checksums, schema, torch-free loading."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deploy.export import export_run, main
from edge_ad.model.bundle import BundleError, read_bundle, write_bundle

REPO = Path(__file__).resolve().parents[1]
# Parity is ~1e-6 relative, far below the gaps between the 12 test scores: the AUROC
# (a function of the score ranking only) must come out identical.
AUROC_TOLERANCE = 1e-9


def copy_bundle(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(source, target)
    return target


def test_bundle_json_has_everything_design_lists(tiny_fp32_bundle, tiny_stfpm_run):
    data = json.loads((tiny_fp32_bundle / "bundle.json").read_text())
    run_config = json.loads((tiny_stfpm_run / "config.json").read_text())
    run_metrics = json.loads((tiny_stfpm_run / "metrics.json").read_text())

    assert data["schema_version"] == 1
    assert data["model"] == {
        "algorithm": "stfpm", "backbone": "mobilenet_v2", "precision": "fp32", "xml": "model.xml",
        "bin": "model.bin", "input_name": "image", "outputs": ["anomaly_map", "score"],
    }
    assert data["preprocess"]["height"] == data["preprocess"]["width"] == 64
    assert data["preprocess"]["color"] == "RGB"
    assert data["thresholds"] == run_metrics["thresholds"]
    training = data["training"]
    assert training["category"] == "synthetic"
    assert training["data_fingerprint"] == run_metrics["data_fingerprint"]
    assert training["epochs"] == 1 and training["seed"] == 0 and training["image_size"] == 64
    assert training["validation_fraction"] == run_config["validation_fraction"]
    assert training["config"] == run_config
    assert set(data["files"]) == {"model.xml", "model.bin"}
    assert all(len(digest) == 64 for digest in data["files"].values())
    assert {"torch", "openvino", "nncf", "edge-ad"} <= set(data["versions"])
    assert data["created_utc"]

    torch_metrics, ir_metrics = data["metrics"]["torch"], data["metrics"]["fp32_ir"]
    for key in ("image_auroc", "pixel_auroc", "image_f1_optimal", "image_f1_deployed", "fpr_deployed", "recall_deployed", "n_test", "n_test_anomalous"):
        assert key in torch_metrics and key in ir_metrics
        assert torch_metrics[key] == run_metrics[key]
    assert ir_metrics["n_test"] == 12
    assert ir_metrics["image_auroc"] == pytest.approx(torch_metrics["image_auroc"], abs=AUROC_TOLERANCE)
    assert ir_metrics["image_f1_deployed"] == pytest.approx(torch_metrics["image_f1_deployed"], abs=AUROC_TOLERANCE)
    assert ir_metrics["pixel_auroc"] == pytest.approx(torch_metrics["pixel_auroc"], abs=1e-4)
    assert ir_metrics["data_fingerprint"] == run_metrics["data_fingerprint"]
    assert ir_metrics["parity_max_rel_map_error"] < 1e-4


def test_read_bundle_verifies_checksums(tiny_fp32_bundle):
    bundle = read_bundle(tiny_fp32_bundle)
    assert bundle.model.precision == "fp32"
    assert bundle.thresholds.source == "validation"


def test_tampered_model_bin_is_refused(tiny_fp32_bundle, tmp_path):
    folder = copy_bundle(tiny_fp32_bundle, tmp_path)
    data = bytearray((folder / "model.bin").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    (folder / "model.bin").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum"):
        read_bundle(folder)


def test_unknown_schema_version_is_refused(tiny_fp32_bundle, tmp_path):
    folder = copy_bundle(tiny_fp32_bundle, tmp_path)
    data = json.loads((folder / "bundle.json").read_text())
    data["schema_version"] = 99
    (folder / "bundle.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="schema version 99"):
        read_bundle(folder)


TORCH_FREE_INFER = """
import sys
sys.modules["torch"] = None  # any `import torch` now fails
import numpy as np, openvino as ov
from edge_ad.model.bundle import read_bundle
from edge_ad.sources.images import list_images, read_image
from edge_ad.model.preprocess import preprocess
folder = sys.argv[1]
bundle = read_bundle(folder)
compiled = ov.Core().compile_model(f"{folder}/{bundle.model.xml}", "CPU")
frame = read_image(sys.argv[2])
result = compiled({bundle.model.input_name: preprocess(frame, bundle.preprocess)[None]})
amap, score = result[compiled.output("anomaly_map")], result[compiled.output("score")]
assert amap.shape == (1, 1, bundle.preprocess.height, bundle.preprocess.width) and score.shape == (1,)
assert np.isfinite(amap).all() and abs(float(score[0]) - float(amap.max())) < 1e-6 * float(amap.max())
print(float(score[0]))
"""


def test_bundle_loads_and_infers_without_torch(tiny_fp32_bundle, synthetic_root):
    image = next((synthetic_root / "synthetic" / "test" / "blob").iterdir())
    result = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_INFER, str(tiny_fp32_bundle), str(image)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip()) > 0


def test_write_bundle_after_reading_keeps_checksums(tiny_fp32_bundle, tmp_path):
    folder = copy_bundle(tiny_fp32_bundle, tmp_path)
    before = read_bundle(folder)
    write_bundle(folder, read_bundle(folder))
    assert read_bundle(folder).files == before.files


@pytest.fixture(scope="module")
def tiny_dfm_run(synthetic_root, tmp_path_factory):
    from training.config import DfmConfig
    from training.dfm import train

    return train(DfmConfig(category="synthetic", data_root=str(synthetic_root), image_size=64, batch_size=8,
                           device="cpu", out=str(tmp_path_factory.mktemp("dfm_runs"))))


FP16_TOLERANCE = 1e-2  # weights rounded to 11 significant bits; FP32 parity is ~1e-6


def fp16_parity(run_dir: Path, bundle_dir: Path):
    """Parity of a bundle's IR with the run's torch module, on the test images of the synthetic set."""
    from deploy.export import parity
    from deploy.ir_eval import IrRunner
    from edge_ad.sources.images import read_image
    from edge_ad.model.preprocess import preprocess
    from training.run_dir import load_model

    model, config = load_model(run_dir)
    bundle = read_bundle(bundle_dir)
    test = sorted((Path(config["data_root"]) / "synthetic" / "test").rglob("*.png"))
    images = np.stack([preprocess(read_image(p), bundle.preprocess) for p in test])
    return parity(model, IrRunner.open(bundle_dir / "model.xml"), images)


def test_export_run_dfm_fp16(tiny_dfm_run, tiny_fp32_bundle, tmp_path):
    out = export_run(tiny_dfm_run, tmp_path / "fp16", precision="fp16")
    bundle = read_bundle(out)
    assert bundle.model.algorithm == "dfm" and bundle.model.precision == "fp16"
    assert bundle.training.epochs is None
    assert set(bundle.metrics) == {"torch", "fp16_ir"}
    assert bundle.metrics["fp16_ir"]["image_auroc"] == pytest.approx(bundle.metrics["torch"]["image_auroc"], abs=0.05)
    result = fp16_parity(tiny_dfm_run, out)
    print(f"fp16 dfm: max rel map err {result.max_rel_map_error:.2e}, score err {result.max_rel_score_error:.2e}")
    assert result.max_rel_map_error <= FP16_TOLERANCE and result.max_rel_score_error <= FP16_TOLERANCE


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_cli_non_empty_output_needs_force_then_fp16_without_data(tiny_stfpm_run, tiny_fp32_bundle, tmp_path, capsys, caplog):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("operator notes")
    code, err = run_cli([str(tiny_stfpm_run), "--out", str(out), "--no-measure"], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "not empty" in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    code, err = run_cli([str(tiny_stfpm_run), "--out", str(out), "--force", "--data-root", str(tmp_path / "moved")], capsys)
    assert code == 2 and "has no category folder 'synthetic'" in err and err.strip().count("\n") == 0

    # --force, FP16, and a run copied to a PC without its data: export-time parity on random
    # images, no IR metrics
    run = tmp_path / "run"
    shutil.copytree(tiny_stfpm_run, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"data_root": str(tmp_path / "elsewhere")}))
    code, err = run_cli([str(run), "--out", str(out), "--force", "--precision", "fp16"], capsys)
    assert code == 0, err
    assert (out / "notes.txt").exists()  # --force replaces bundle files only
    bundle = read_bundle(out)
    assert set(bundle.metrics) == {"torch"} and bundle.model.precision == "fp16"
    assert "not found: parity checked on random images" in caplog.text
    assert (out / "model.bin").stat().st_size < 0.6 * (tiny_fp32_bundle / "model.bin").stat().st_size
    result = fp16_parity(tiny_stfpm_run, out)  # the original run knows where the data is
    print(f"fp16 stfpm: max rel map err {result.max_rel_map_error:.2e}, score err {result.max_rel_score_error:.2e}")
    assert result.max_rel_map_error <= FP16_TOLERANCE and result.max_rel_score_error <= FP16_TOLERANCE


@pytest.mark.parametrize(
    "argv_tail,message",
    [
        (["--precision", "int8"], "precision must be one of fp32, fp16"),
        (["--precision", "FP64"], "precision must be one of fp32, fp16"),
    ],
)
def test_cli_bad_precision_is_one_line(tiny_stfpm_run, tmp_path, capsys, argv_tail, message):
    code, err = run_cli([str(tiny_stfpm_run), "--out", str(tmp_path / "b"), *argv_tail], capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.strip().count("\n") == 0
    assert not (tmp_path / "b").exists()


def test_cli_missing_run_dir_is_one_line(tmp_path, capsys):
    code, err = run_cli([str(tmp_path / "no-such-run"), "--out", str(tmp_path / "b")], capsys)
    assert code == 2
    assert err.strip() == f"error: run folder not found: {tmp_path / 'no-such-run'}"
    assert not (tmp_path / "b").exists()


def test_cli_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_cli([str(tmp_path / "empty"), "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "not a training run folder" in err and err.strip().count("\n") == 0


def test_training_info_names_the_seed_that_drew_the_validation_split():
    """INT8 calibration without --run-dir redraws the split from this seed: --split-seed where the run set one."""
    from edge_ad.model.bundle import TrainingInfo

    def info(config):
        return TrainingInfo(category="c", data_root="d", data_fingerprint="f", epochs=1, seed=3, image_size=64,
                            validation_fraction=0.15, config=config)

    assert info({}).validation_seed == 3
    assert info({"seed": 3, "split_seed": None}).validation_seed == 3
    assert info({"seed": 3, "split_seed": 7}).validation_seed == 7
