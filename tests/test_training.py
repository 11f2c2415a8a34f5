"""Training CLIs end to end on generated data, and the run folder they leave."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training import dfm, stfpm
from training.config import DfmConfig, StfpmConfig
from run_helpers import copy_run
from training.run_dir import RunDirError, load_model


@pytest.fixture(scope="module")
def stfpm_run(synthetic_root, tmp_path_factory):
    config = StfpmConfig(
        category="synthetic", data_root=str(synthetic_root), epochs=2, image_size=64, batch_size=8,
        out=str(tmp_path_factory.mktemp("runs")),
    )
    return stfpm.train(config)


@pytest.fixture(scope="module")
def dfm_run(synthetic_root, tmp_path_factory):
    config = DfmConfig(
        category="synthetic", data_root=str(synthetic_root), image_size=64, batch_size=8,
        out=str(tmp_path_factory.mktemp("runs")),
    )
    return dfm.train(config)


@pytest.mark.parametrize("run_fixture", ["stfpm_run", "dfm_run"])
def test_run_folder_contents(run_fixture, request):
    run_dir = request.getfixturevalue(run_fixture)
    for name in ("model.pt", "config.json", "split.json", "metrics.json"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "image_f1_deployed", "fpr_deployed", "recall_deployed", "thresholds", "train_time_s", "data_fingerprint"):
        assert key in metrics
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    assert metrics["pixel_auroc"] is not None  # synthetic data has masks
    split = json.loads((run_dir / "split.json").read_text())
    assert split["validation"] and not set(split["validation"]) & set(split["train"])
    assert all("/train/good/" in path for path in split["validation"])  # never test images


@pytest.mark.parametrize("run_fixture", ["stfpm_run", "dfm_run"])
def test_reloaded_model_reproduces_its_test_metrics(run_fixture, request):
    """load_model rebuilds the exact module offline; its scores give the recorded AUROC."""
    from edge_ad.model.preprocess import PreprocessSpec
    from training.data import load_category, make_loader
    from training.metrics import image_auroc
    from training.predict import predict

    run_dir = request.getfixturevalue(run_fixture)
    model, config = load_model(run_dir)
    category = load_category(config["data_root"], config["category"])
    loader = make_loader(category.test, PreprocessSpec.square(config["image_size"]), batch_size=8, shuffle=False)
    predictions = predict(model, loader, torch.device("cpu"))
    recorded = json.loads((run_dir / "metrics.json").read_text())["image_auroc"]
    assert image_auroc(predictions.labels, predictions.scores) == pytest.approx(recorded, abs=1e-9)


def test_dfm_separates_synthetic_defects(dfm_run):
    metrics = json.loads((dfm_run / "metrics.json").read_text())
    assert metrics["image_auroc"] >= 0.9
    assert metrics["pixel_auroc"] >= 0.9


def test_stfpm_records_validation_model_selection(stfpm_run):
    metrics = json.loads((stfpm_run / "metrics.json").read_text())
    losses = [entry["validation_loss"] for entry in metrics["history"]]
    assert metrics["best_epoch"] == int(np.argmin(losses)) + 1
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]


def test_stfpm_subspace_term_is_the_dfm_recipe_fitted_on_the_teacher(stfpm_run, synthetic_root, tmp_path):
    """The default STFPM adds DFM's reconstruction error on its teacher's features; the run records the
    recipe and its shapes, and the scales make each term's mean image score on validation normals 1."""
    from training.pipeline import loader, prepare_data

    saved = json.loads((stfpm_run / "config.json").read_text())
    assert saved["subspace_weight"] > 0
    recipe = saved["subspace"]
    assert (recipe["taps"], recipe["pool"], recipe["augment"]) == (DfmConfig.taps, DfmConfig.pool, DfmConfig.augment)
    assert recipe["posed_copies"] == saved["subspace_posed_copies"] == StfpmConfig.subspace_posed_copies
    model, _ = load_model(stfpm_run)
    assert model.subspace.n_components == recipe["n_components"] > 0
    config = StfpmConfig(**{k: saved[k] for k in ("category", "data_root", "image_size", "batch_size")})
    data = prepare_data(config)
    with torch.no_grad():
        terms = [torch.cat(parts) for parts in zip(*(model.term_maps(batch["image"])
                                                     for batch in loader(data.validation, data, config)))]
    means = [float((term.amax(dim=(1, 2, 3)) / scale).mean()) for term, scale in zip(terms, model.map_scales)]
    assert means == pytest.approx([1.0, 1.0], rel=1e-4)
    # the per-epoch validation pass computes the loss and, from the same features, the scales
    fitted_scales = model.map_scales.clone()
    batches = list(loader(data.validation, data, config))
    loss = stfpm.validation_pass(model, batches, torch.device("cpu"))
    model.map_scales.fill_(7.0)
    assert stfpm.validation_pass(model, batches, torch.device("cpu"), calibrate_scales=True) == pytest.approx(loss)
    assert torch.allclose(model.map_scales, fitted_scales, rtol=1e-5)

    broken = copy_run(stfpm_run, tmp_path / "no-record", {k: v for k, v in saved.items() if k != "subspace"})
    with pytest.raises(RunDirError, match="no \"subspace\" record"):
        load_model(broken)

    plain = stfpm.train(StfpmConfig(category="synthetic", data_root=str(synthetic_root), epochs=1, image_size=64,
                                    batch_size=8, out=str(tmp_path), subspace_weight=0.0, memory_weight=0.0))
    assert not {"subspace", "memory"} & set(json.loads((plain / "config.json").read_text()))
    assert load_model(plain)[0].subspace is None and load_model(plain)[0].memory is None


def test_stfpm_memory_term_is_a_coreset_of_the_full_inputs_training_patches(synthetic_root, tmp_path):
    """The memory term keeps a coreset of the training patches of the full input (the student's terms see it
    pooled), its scale makes its mean image score on validation normals 1 like the others', the run records
    its shape, and a run without the record is refused."""
    from training.models.patch_memory import locally_aware_patches
    from training.pipeline import loader, prepare_data

    run = stfpm.train(StfpmConfig(category="synthetic", data_root=str(synthetic_root), epochs=1, image_size=64,
                                  batch_size=8, out=str(tmp_path / "runs"), student_pool=2, memory_weight=4.0))
    saved = json.loads((run / "config.json").read_text())
    model, _ = load_model(run)
    assert saved["memory_weight"] == model.memory_weight == 4.0 and saved["student_pool"] == model.student_pool == 2
    assert (saved["memory"]["size"], saved["memory"]["channels"]) == tuple(model.memory.memory.shape)
    config = StfpmConfig(**{k: saved[k] for k in ("category", "data_root", "image_size", "batch_size", "student_pool",
                                                  "memory_weight")})
    data = prepare_data(config)
    with torch.no_grad():
        terms = [torch.cat(parts) for parts in zip(*(model.term_maps(batch["image"])
                                                     for batch in loader(data.validation, data, config)))]
    assert [float((term.amax(dim=(1, 2, 3)) / scale).mean()) for term, scale in zip(terms, model.map_scales)] == \
        pytest.approx([1.0, 1.0, 1.0], rel=1e-4)
    with torch.no_grad():
        train_patches = torch.cat([locally_aware_patches(model.teacher(batch["image"])).permute(0, 2, 3, 1)
                                   .reshape(-1, model.memory.memory.shape[1]) for batch in loader(data.train, data, config)])
        student_taps = model.features(torch.rand(1, 3, 64, 64))[0]
    # every memory patch is one of the training patches (float16 rounding aside), and fewer are kept
    assert torch.cdist(model.memory.memory, train_patches).amin(1).max() < 1e-2 * train_patches.norm(dim=1).mean()
    assert stfpm.MIN_MEMORY <= model.memory.size < len(train_patches)
    assert student_taps[0].shape[-1] == 64 // 2 // 4  # the student's stride-4 tap of the pooled 32 px input

    broken = copy_run(run, tmp_path / "no-memory-record", {k: v for k, v in saved.items() if k != "memory"})
    with pytest.raises(RunDirError, match="no \"memory\" record"):
        load_model(broken)
    assert saved["memory_fusion"] == model.memory_fusion == "map"
    by_score = copy_run(run, tmp_path / "memory-by-score", saved | {"memory_fusion": "score"})
    assert load_model(by_score)[0].memory_fusion == "score"  # the run's fusion is rebuilt with it


@pytest.mark.parametrize("option,value,message", [
    ("--memory-weight", "-1", "--memory-weight must be >= 0"),
    ("--memory-fraction", "0", "--memory-fraction must be in (0, 1]"),
    ("--student-pool", "3", "--student-pool must be >= 1 and divide --image-size"),
    ("--memory-fusion", "mean", "--memory-fusion must be one of map, score"),
    ("--memory-fusion", "score", "--memory-fusion score needs --memory-weight > 0"),
    ("--synthetic-copies", "0", "--synthetic-copies must be >= 1"),
])
def test_cli_bad_options_are_one_line_errors(synthetic_root, tmp_path, option, value, message):
    result = run_cli("-m", "training.stfpm", "--category", "synthetic", "--data-root", str(synthetic_root),
                     "--out", str(tmp_path), "--image-size", "64", option, value)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_load_model_errors(tmp_path):
    with pytest.raises(RunDirError, match="not found"):
        load_model(tmp_path / "missing")
    with pytest.raises(RunDirError, match="config.json"):
        load_model(tmp_path)


def run_cli(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_cli_missing_data_root_is_one_clean_line(tmp_path):
    result = run_cli("-m", "training.stfpm", "--category", "screw", "--data-root", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "nope" in result.stderr and result.stderr.strip().startswith("error:")


def test_cli_unknown_category_lists_the_found_ones(synthetic_root):
    result = run_cli("-m", "training.dfm", "--category", "carpet", "--data-root", str(synthetic_root))
    assert result.returncode == 2
    assert "synthetic" in result.stderr and "Traceback" not in result.stderr


def test_cli_unavailable_pretrained_weights_name_the_remedy(synthetic_root, tmp_path):
    result = run_cli(
        "-m", "training.stfpm", "--category", "synthetic", "--data-root", str(synthetic_root),
        "--backbone", "resnet18", "--weights", str(tmp_path / "resnet18.pth"), "--epochs", "1",
    )
    assert result.returncode == 2
    assert "resnet18.pth" in result.stderr and "Traceback" not in result.stderr


def test_cli_help_lists_the_options():
    result = run_cli("-m", "training.stfpm", "--help")
    assert result.returncode == 0
    for flag in ("--category", "--data-root", "--backbone", "--weights", "--epochs", "--batch-size",
                 "--image-size", "--device", "--seed", "--out"):
        assert flag in result.stdout


def test_a_memory_larger_than_the_cap_is_refused_before_training(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setattr(stfpm, "MAX_MEMORY", 300)  # the synthetic set has a few thousand patches, far below 20k
    with pytest.raises(ValueError, match="--memory-fraction 1 keeps .* more than 300 .*: lower it"):
        stfpm.train(StfpmConfig(category="synthetic", data_root=str(synthetic_root), epochs=1, image_size=64,
                                batch_size=8, out=str(tmp_path), memory_weight=1.0, memory_fraction=1.0))
    assert not list(tmp_path.iterdir())  # no run folder left behind


def test_split_seed_draws_the_split_and_its_defects_apart_from_the_model_seed(synthetic_root):
    """--split-seed lets a student be retrained on another run's validation split (and synthetic defects)."""
    from dataclasses import replace

    from edge_ad.model.bundle import validation_seed
    from training.pipeline import prepare_data, synthetic_validation

    base = StfpmConfig(category="synthetic", data_root=str(synthetic_root), image_size=64)
    other_student = replace(base, seed=5, split_seed=0)
    other_split = replace(base, split_seed=5)
    assert (base.validation_seed, other_student.validation_seed, other_split.validation_seed) == (0, 0, 5)
    assert [validation_seed(c.to_dict()) for c in (base, other_student, other_split)] == [0, 0, 5]  # export's reading

    def validation(config):
        return [s.path for s in prepare_data(config).validation]

    assert validation(other_student) == validation(base)
    assert validation(other_split) == validation(replace(base, seed=5)) != validation(base)
    same = [synthetic_validation(prepare_data(c), c, copies=1).dataset for c in (base, other_student)]
    assert len(same[0]) == len(same[1]) and all(torch.equal(same[0][i]["image"], same[1][i]["image"])
                                                for i in range(len(same[0])))
    moved = synthetic_validation(prepare_data(replace(base, seed=5)), replace(base, seed=5), copies=1).dataset
    assert not all(torch.equal(moved[i]["image"], same[0][i]["image"]) for i in range(len(moved)))
