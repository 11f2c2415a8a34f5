"""benchmarks.patch_memory: the coreset and nearest-patch map it is built on, and one run end to end on
generated data (the figures are the probe's own, so only their consistency is checked)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import patch_memory
from training.models.image_score import ImageScore
from training.models.patch_memory import patch_rows


def test_coreset_picks_distinct_patches_that_cover_every_cluster():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0] * 8, [10.0] * 8, [-10.0] * 8, [10.0] * 4 + [-10.0] * 4])
    points = torch.cat([c + 0.1 * torch.randn(500, 8, generator=generator) for c in centres])
    memory = patch_memory.greedy_coreset(points, 4, seed=0)
    assert memory.shape == (4, 8)
    nearest_centre = torch.cdist(memory, centres).argmin(1)
    assert sorted(nearest_centre.tolist()) == [0, 1, 2, 3]  # random picks would repeat a cluster most times


def test_coreset_picks_the_same_patches_as_the_plain_farthest_point_rule():
    """The selection's distances are expanded into one matrix-vector product for speed. On float16 patches with
    near-duplicates (the background of a real part) it picks what the plain difference picks until the remaining
    candidates tie to rounding; after that it may pick another of the tied ones, and covers the patches as well."""
    from training.models.patch_memory import greedy_coreset
    from training.models.patch_memory.coreset import PROJECTION

    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(20, 64, generator=generator)
    patches = (centres[torch.randint(20, (4000,), generator=generator)]
               + 0.05 * torch.randn(4000, 64, generator=generator)).half()

    def plain(patches: torch.Tensor, size: int, seed: int, pool: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        chosen = patches[torch.randperm(len(patches), generator=generator)[:pool]].float()
        projected = chosen @ (torch.randn(chosen.shape[1], PROJECTION, generator=generator) / PROJECTION**0.5)
        picked = [int(torch.randint(len(chosen), (1,), generator=generator))]
        distance = (projected - projected[picked[0]]).pow(2).sum(1)
        for _ in range(size - 1):
            picked.append(int(distance.argmax()))
            distance = torch.minimum(distance, (projected - projected[picked[-1]]).pow(2).sum(1))
        return chosen[picked]

    fast, reference = greedy_coreset(patches, 300, seed=1, pool=3000), plain(patches, 300, seed=1, pool=3000)
    assert torch.equal(fast[:100], reference[:100])  # every cluster and then its spread: far from any tie

    def covering_radius(memory: torch.Tensor) -> float:
        return float(torch.cdist(patches.float(), memory).amin(1).max())

    assert covering_radius(fast) == pytest.approx(covering_radius(reference), rel=0.01)


def test_probe_nearest_distance_map_is_the_distance_to_the_closest_memory_patch():
    generator = torch.Generator().manual_seed(1)
    patches = torch.randn(2, 5, 3, 4, generator=generator)
    memory = torch.randn(7, 5, generator=generator)
    distance = patch_memory.nearest_distance_map(patches, memory)
    expected = torch.cdist(patches.permute(0, 2, 3, 1).reshape(-1, 5), memory).amin(1).reshape(2, 1, 3, 4)
    assert distance.shape == (2, 1, 3, 4)
    assert torch.allclose(distance, expected, atol=1e-4)
    # a patch held in the memory is at distance 0
    assert patch_memory.nearest_distance_map(memory[:1].view(1, 5, 1, 1), memory).item() == pytest.approx(0, abs=1e-3)


def test_recall_at_one_false_alarm_reads_the_second_highest_normal_score():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([1.0, 5.0, 2.0, 1.5, 2.5, 3.0, 6.0])
    assert patch_memory.recall_at_one_false_alarm(labels, scores) == pytest.approx(0.75)  # above 2.0: 2.5, 3, 6


def test_figures_at_the_threshold_fitted_on_normal_scores():
    labels = np.array([0] * 10 + [1] * 4)
    normal = np.linspace(1.0, 2.0, 30)
    from edge_ad.decide.thresholds import image_threshold
    threshold = image_threshold(normal, 0.01, 0.9)[0]
    assert threshold > 2.0  # above every normal score: a tolerance bound, not a quantile
    scores = np.r_[np.linspace(1.0, 2.0, 9), threshold + 1, 0.5, threshold + 2, threshold + 3, threshold + 4]
    figures = patch_memory.at_threshold(labels, scores, normal, 0.01, 0.9)
    assert figures["threshold"] == pytest.approx(threshold)
    assert figures["fpr"] == pytest.approx(0.1) and figures["recall"] == pytest.approx(0.75)  # 1 of 10, 3 of 4
    assert figures["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))


def test_out_of_fold_scores_never_see_their_own_image():
    """With every patch kept, an image inside its memory scores exactly 0: each must score above it."""
    generator = torch.Generator().manual_seed(2)
    patches = torch.randn(12, 4, 3, 3, generator=generator)
    memories = []

    def memory_of(indices):
        memories.append(set(indices.tolist()))
        return patch_rows(patches[indices]).float()

    scores = patch_memory.out_of_fold_scores(patches, memory_of, folds=3, seed=0, image_score=ImageScore())
    assert len(memories) == 3 and all(len(m) == 8 for m in memories)  # three folds of 4 held out
    assert set.union(*[set(range(12)) - m for m in memories]) == set(range(12))  # every image held out once
    assert np.all(scores > 0.1)
    own = patch_memory.scores_of(patches, patch_rows(patches).float(), ImageScore())
    assert np.all(own < 0.01)  # the same images inside the memory (float rounding): what a leak would give


def test_probe_runs_end_to_end_on_generated_data(synthetic_root, tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert patch_memory.main(["--data-root", str(synthetic_root), "--category", "synthetic", "--image-size", "64",
                              "--bank-fraction", "0.1", "--seeds", "0,1", "--folds", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["seed"] for row in result["rows"]] == [0, 1]
    for row in result["rows"]:
        assert set(row["out_of_fold"]) >= {"image_auroc", "threshold", "f1", "fpr", "recall"}
    # 64 px: an 8x8 stride-8 grid, 34 training images (85 % of 40): 10 % of 34 x 64 patches
    assert result["rows"][0]["memory_patches"] == int(0.1 * result["n_train"] * 64)
    # the generated defects are strong and the parts simple: the probe must see them, and its thresholds
    # (fitted on normal images only) must pass the normal test images and catch most defects
    for row in result["rows"]:
        assert row["image_auroc"] > 0.8 and row["synthetic_validation_auroc"] > 0.8
        assert row["deployed"]["fpr"] <= 0.2 and row["deployed"]["recall"] >= 0.5
    assert "| seed | memory patches |" in capsys.readouterr().out


def test_bad_options_are_one_line_errors(synthetic_root, tmp_path, monkeypatch, capsys):
    assert patch_memory.main(["--data-root", str(synthetic_root), "--category", "synthetic", "--folds", "1"]) == 2
    assert "--folds must be 0 (off) or at least 2" in capsys.readouterr().err
    assert patch_memory.main(["--data-root", str(synthetic_root), "--category", "synthetic", "--gain-range", "x"]) == 2
    assert "--gain-range must be LOW,HIGH" in capsys.readouterr().err
    monkeypatch.setattr(patch_memory, "POOL", 500)  # 34 training images x 64 patches are more than the pool
    assert patch_memory.main(["--data-root", str(synthetic_root), "--category", "synthetic", "--image-size", "64",
                              "--bank-fraction", "1", "--out", str(tmp_path / "never.json")]) == 2
    assert "lower --bank-fraction" in capsys.readouterr().err
    assert not (tmp_path / "never.json").exists()
