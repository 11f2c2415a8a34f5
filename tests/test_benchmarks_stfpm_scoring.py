"""benchmarks.stfpm_scoring re-scores a trained run from cached per-tap maps: the variant equal to the
run's own settings must reproduce the run's metrics (it is the same graph, assembled differently)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import stfpm_scoring
from run_helpers import copy_run
from training.config import StfpmConfig


def cli_error(capsys, *argv: str) -> str:
    """The one line a bad command line prints, after checking it exits 2 (a user error, not a traceback)."""
    assert stfpm_scoring.main(list(argv)) == 2
    return capsys.readouterr().err


def test_the_runs_own_variant_reproduces_its_metrics(tiny_stfpm_run):
    result = stfpm_scoring.evaluate(tiny_stfpm_run, None)
    metrics = json.loads((tiny_stfpm_run / "metrics.json").read_text())
    own = [r for r in result["rows"] if (r["map_taps"], r["map_combine"], r["score_reduction"], r["smooth_sigma"])
           == ("0,1,2", "product", "max", 0.0)]
    assert len(own) == 1
    assert own[0]["image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-6)
    assert own[0]["synthetic_validation_auroc"] == pytest.approx(metrics["synthetic_validation_auroc"], abs=1e-6)
    assert own[0]["image_f1_deployed"] == pytest.approx(metrics["image_f1_deployed"], abs=1e-6)
    ranked = [r["synthetic_validation_auroc"] for r in result["rows"]]
    assert ranked == sorted(ranked, reverse=True)  # ranked by the validation signal, never by test
    single = {r["map_taps"] for r in result["rows"] if r["map_combine"] == "sum"}
    assert not single & {"0", "1", "2"}  # one tap: sum and product are the same map, listed once
    assert "| map taps |" in stfpm_scoring.table(result)


def test_other_synthetic_defects_change_only_the_signal(tiny_stfpm_run, capsys):
    base = stfpm_scoring.evaluate(tiny_stfpm_run, None)
    warped = stfpm_scoring.evaluate(tiny_stfpm_run, None, defect_strength=0.5, defect_kinds=("warp",))
    assert warped["defect_kinds"] == ["warp"] and warped["defect_strength"] == 0.5
    key = lambda r: (r["map_taps"], r["map_combine"], r["score_reduction"], r["topk_fraction"], r["smooth_sigma"])
    test_base = {key(r): r["image_auroc"] for r in base["rows"]}
    assert all(test_base[key(r)] == pytest.approx(r["image_auroc"]) for r in warped["rows"])  # test untouched
    assert [r["synthetic_validation_auroc"] for r in warped["rows"]] != [
        r["synthetic_validation_auroc"] for r in base["rows"]]
    assert "--defect-kinds must list some of" in cli_error(capsys, str(tiny_stfpm_run), "--defect-kinds", "rust")


@pytest.fixture(scope="module")
def tiny_memory_run(synthetic_root, tmp_path_factory):
    from training import stfpm

    return stfpm.train(StfpmConfig(category="synthetic", data_root=str(synthetic_root), epochs=1, image_size=64,
                                   batch_size=8, out=str(tmp_path_factory.mktemp("runs")), student_pool=2,
                                   memory_weight=4.0))


def test_memory_weights_are_variants_and_the_runs_own_reproduces_its_metrics(tiny_memory_run, tiny_stfpm_run, capsys):
    result = stfpm_scoring.evaluate(tiny_memory_run, None, memory_weights=(0.0, 4.0))
    metrics = json.loads((tiny_memory_run / "metrics.json").read_text())
    own = {r["memory_weight"]: r for r in result["rows"]
           if (r["map_taps"], r["map_combine"], r["score_reduction"], r["smooth_sigma"]) == ("0,1,2", "product", "max", 0.0)}
    assert set(own) == {0.0, 4.0}
    assert own[4.0]["image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-6)
    assert own[4.0]["synthetic_validation_auroc"] == pytest.approx(metrics["synthetic_validation_auroc"], abs=1e-6)
    # the memory term counts: the same maps scored at weights 0 and 4 give other image scores
    from training.models.image_score import ImageScore
    from training.pipeline import loader, prepare_data
    from training.run_dir import load_model
    model, saved = load_model(tiny_memory_run)
    config = StfpmConfig(**{k: saved[k] for k in ("category", "data_root", "image_size", "batch_size", "student_pool")})
    data = prepare_data(config)
    maps = stfpm_scoring.tap_maps(model, loader(data.validation, data, config), torch.device("cpu"))
    assert len(maps["terms"]) == 2  # subspace, memory
    scales = stfpm_scoring.variant_scales(maps, (0, 1, 2), "product", ImageScore())
    scores = [stfpm_scoring.score(maps, (0, 1, 2), "product", ImageScore(), scales,
                                  stfpm_scoring.term_weights(model, weight))[1] for weight in (0.0, 4.0)]
    assert np.abs(scores[1] - scores[0]).min() > 0
    assert "| memory weight |" in stfpm_scoring.table(result)
    assert "needs a run with a memory term" in cli_error(capsys, str(tiny_stfpm_run), "--memory-weights", "1")
    assert "--memory-weights must be a comma list" in cli_error(
        capsys, str(tiny_memory_run), "--memory-weights", "two")
    assert "--memory-weights must be >= 0" in cli_error(capsys, str(tiny_memory_run), "--memory-weights", "-1")


def test_memory_fusions_are_variants_of_the_runs_own_scoring(tiny_memory_run, tiny_stfpm_run, capsys):
    """--run-scoring-only keeps the run's taps, combine, score and sigma; its own fusion reproduces its metrics,
    and the other fusion is the model's own forward with memory_fusion="score"."""
    result = stfpm_scoring.evaluate(tiny_memory_run, None, fusions=("map", "score"), run_scoring_only=True)
    metrics = json.loads((tiny_memory_run / "metrics.json").read_text())
    assert [(r["map_taps"], r["map_combine"], r["score_reduction"], r["smooth_sigma"]) for r in result["rows"]] == \
        [("0,1,2", "product", "max", 0.0)] * 2
    rows = {r["memory_fusion"]: r for r in result["rows"]}
    assert rows["map"]["image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-6)
    from training.pipeline import loader, prepare_data, synthetic_validation
    from training.run_dir import load_model
    model, saved = load_model(tiny_memory_run)
    config = StfpmConfig(**{k: saved[k] for k in ("category", "data_root", "image_size", "batch_size", "student_pool")})
    data = prepare_data(config)
    maps = stfpm_scoring.tap_maps(model, loader(data.test, data, config), torch.device("cpu"))
    model.memory_fusion = "score"
    with torch.no_grad():
        forward = torch.cat([model(batch["image"])[1] for batch in loader(data.test, data, config)]).numpy()
    scales = model.map_scales.tolist()
    _, fused = stfpm_scoring.score(maps, (0, 1, 2), "product", model.image_score, scales, model.term_weights, "score")
    np.testing.assert_allclose(fused, forward, rtol=1e-4)
    # the synthetic defects over the run's own deployed threshold, from the model's own (map-fused) forward
    model.memory_fusion = "map"
    with torch.no_grad():
        synthetic = [(model(batch["image"])[1], batch["label"]) for batch in synthetic_validation(data, config)]
    synthetic_scores, labels = torch.cat([s for s, _ in synthetic]), torch.cat([label for _, label in synthetic])
    recall = float((synthetic_scores[labels == 1] >= metrics["thresholds"]["image"]).float().mean())
    assert 0 < recall < 1  # a case where the count matters
    assert rows["map"]["synthetic_recall_deployed"] == pytest.approx(recall, abs=1e-6)
    text = stfpm_scoring.table(result)
    assert "| memory fusion |" in text and "| synthetic recall deployed |" in text
    assert "--memory-fusions needs a run with a memory term" in cli_error(
        capsys, str(tiny_stfpm_run), "--memory-fusions", "score")
    assert "--memory-fusions must list some of map, score" in cli_error(
        capsys, str(tiny_memory_run), "--memory-fusions", "mean")


def test_synthetic_copies_draw_more_defects_and_leave_test_untouched(tiny_stfpm_run, capsys):
    """Copy 0 is the defect set training draws; each further copy has its own seed and the next kind, so the
    synthetic recall moves in steps of 1 / (validation images x copies)."""
    from edge_ad.model.preprocess import as_bgr_uint8
    from edge_ad.sources.images import read_image
    from training.data.dataset import FrameDataset
    from training.data.synthetic_defects import KINDS, synthetic_anomalies
    from training.pipeline import prepare_data, synthetic_validation
    from training.run_dir import load_model

    _, saved = load_model(tiny_stfpm_run)
    config = StfpmConfig(**{k: saved[k] for k in ("category", "data_root", "image_size", "batch_size")})
    data = prepare_data(config)
    one = synthetic_validation(data, config, copies=1).dataset
    three = synthetic_validation(data, config, copies=3).dataset
    n = len(data.validation)
    assert len(one) == 2 * n and len(three) == 4 * n
    assert config.synthetic_copies == 4 and len(synthetic_validation(data, config).dataset) == 5 * n  # training's
    assert [three[i]["label"] for i in range(len(three))] == [0] * n + [1] * 3 * n
    for i in range(2 * n):  # the first n normals and the first copy are what training's signal sees
        assert torch.equal(three[i]["image"], one[i]["image"])
    # copy 1: its own seed and the kinds turned by one (the first image gets the second kind)
    frames = [as_bgr_uint8(read_image(sample.path)) for sample in data.validation]
    expected, _ = synthetic_anomalies(frames, seed=config.seed + 1, kinds=KINDS[1:] + KINDS[:1])
    same_seed_old_kinds, _ = synthetic_anomalies(frames, seed=config.seed + 1, kinds=KINDS)
    copy_one = FrameDataset(expected, [None] * n, [1] * n, data.spec, ["x"] * n)
    assert torch.equal(three[2 * n]["image"], copy_one[0]["image"])
    assert not np.array_equal(expected[0], same_seed_old_kinds[0])  # the kind turn is what the check above sees
    with pytest.raises(ValueError, match="synthetic copies must be >= 1"):
        synthetic_validation(data, config, copies=0)

    base = stfpm_scoring.evaluate(tiny_stfpm_run, None, run_scoring_only=True)
    more = stfpm_scoring.evaluate(tiny_stfpm_run, None, run_scoring_only=True, synthetic_copies=3)
    assert base["synthetic_copies"] == saved["synthetic_copies"] == 4 and more["synthetic_copies"] == 3
    assert more["rows"][0]["image_auroc"] == pytest.approx(base["rows"][0]["image_auroc"])
    # the synthetic recall over all 3 n defects, from the model's own forward at the run's deployed threshold
    model, _ = load_model(tiny_stfpm_run)
    threshold = json.loads((tiny_stfpm_run / "metrics.json").read_text())["thresholds"]["image"]
    with torch.no_grad():
        scored = [(model(batch["image"])[1], batch["label"]) for batch in synthetic_validation(data, config, copies=3)]
    scores, labels = torch.cat([s for s, _ in scored]), torch.cat([label for _, label in scored])
    assert int((labels == 1).sum()) == 3 * n
    recall = float((scores[labels == 1] >= threshold).float().mean())
    assert more["rows"][0]["synthetic_recall_deployed"] == pytest.approx(recall, abs=1e-6)
    assert "3 per validation image" in stfpm_scoring.table(more)
    assert "--synthetic-copies must be >= 1, got 0" in cli_error(
        capsys, str(tiny_stfpm_run), "--synthetic-copies", "0")


def test_a_run_written_before_synthetic_copies_is_scored_with_its_one_copy(tiny_stfpm_run, tmp_path):
    """Its recorded signal came from one defective copy per validation image; the benchmark's own row must say so
    and reproduce that figure, not silently draw today's default."""
    saved = json.loads((tiny_stfpm_run / "config.json").read_text())
    old = copy_run(tiny_stfpm_run, tmp_path / "old-run", {k: v for k, v in saved.items() if k != "synthetic_copies"})
    result = stfpm_scoring.evaluate(old, None, run_scoring_only=True)
    assert result["synthetic_copies"] == 1
    one_copy = stfpm_scoring.evaluate(tiny_stfpm_run, None, run_scoring_only=True, synthetic_copies=1)
    own = json.loads((tiny_stfpm_run / "metrics.json").read_text())["synthetic_validation_auroc"]  # four copies
    assert result["rows"][0]["synthetic_validation_auroc"] == one_copy["rows"][0]["synthetic_validation_auroc"] != own


@pytest.fixture(scope="module")
def tiny_unpooled_memory_run(synthetic_root, tmp_path_factory):
    from training import stfpm

    return stfpm.train(StfpmConfig(category="synthetic", data_root=str(synthetic_root), epochs=1, image_size=64,
                                   batch_size=8, out=str(tmp_path_factory.mktemp("runs")), memory_weight=4.0))


@pytest.mark.parametrize("run", ["tiny_memory_run", "tiny_unpooled_memory_run"])
def test_a_refits_memory_map_from_kept_patches_is_the_models_own(run, request):
    """Refits score the memory term from patches kept once; it must be the very map the model computes, whether
    the memory's teacher pass is its own at the full input (student pool 2) or the student's (pool 1)."""
    from training.pipeline import loader, prepare_data
    from training.run_dir import load_model

    model, saved = load_model(request.getfixturevalue(run))
    model.eval()
    assert model.student_pool == (2 if run == "tiny_memory_run" else 1)
    config = StfpmConfig(**{k: saved[k] for k in ("category", "data_root", "image_size", "batch_size")})
    data = prepare_data(config)
    batches = loader(data.test, data, config)
    maps = stfpm_scoring.tap_maps(model, batches, torch.device("cpu"), keep_memory_patches=True)
    with torch.no_grad():
        expected = torch.cat([model.term_maps(batch["image"])[-1] for batch in batches])
    assert torch.equal(stfpm_scoring.memory_map(model, maps, torch.device("cpu")), expected)
    assert torch.equal(maps["terms"][-1], expected)
    model.memory.memory = model.memory.memory[: model.memory.size // 2]  # a refit: the same patches, another memory
    with torch.no_grad():
        refitted = torch.cat([model.term_maps(batch["image"])[-1] for batch in batches])
    assert not torch.equal(refitted, expected)
    assert torch.equal(stfpm_scoring.memory_map(model, maps, torch.device("cpu")), refitted)


def test_memory_refits_reproduce_the_runs_own_memory_and_score_others(tiny_memory_run, tiny_stfpm_run, capsys):
    """Refitting with the run's own share and seed is the run's memory (same metrics); another share or seed is
    another coreset of the same training patches, scored with the same student."""
    metrics = json.loads((tiny_memory_run / "metrics.json").read_text())
    saved = json.loads((tiny_memory_run / "config.json").read_text())
    own_share = saved["memory_fraction"]
    # the run's own share and seed come last: a refit that left state behind would show in its reproduction
    result = stfpm_scoring.evaluate(tiny_memory_run, None, run_scoring_only=True,
                                    memory_fractions=(0.5, own_share), memory_seeds=(7, saved["seed"]))
    rows = {(r["memory_fraction"], r["memory_seed"]): r for r in result["rows"]}
    assert set(rows) == {(own_share, saved["seed"]), (own_share, 7), (0.5, saved["seed"]), (0.5, 7)}
    own = rows[(own_share, saved["seed"])]
    assert own["memory_size"] == saved["memory"]["size"]
    assert own["image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-6)
    assert own["synthetic_validation_auroc"] == pytest.approx(metrics["synthetic_validation_auroc"], abs=1e-6)
    assert rows[(0.5, 7)]["memory_size"] > own["memory_size"]
    scores = {key: (r["synthetic_validation_auroc"], r["image_auroc"]) for key, r in rows.items()}
    assert len(set(scores.values())) > 1  # the refits are other memories, not the run's own four times
    assert "| memory (share, seed) |" in stfpm_scoring.table(result)
    assert "--memory-fractions and --memory-seeds need a run with a memory term" in cli_error(
        capsys, str(tiny_stfpm_run), "--memory-seeds", "1")
    assert "--memory-fractions must be in (0, 1]" in cli_error(
        capsys, str(tiny_memory_run), "--memory-fractions", "1.5")
    assert "--memory-seeds of integers" in cli_error(capsys, str(tiny_memory_run), "--memory-seeds", "a")
