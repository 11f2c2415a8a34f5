"""benchmarks.levers: the greedy keep rule, reuse of finished runs, and the README splice."""

import json

from benchmarks import levers


def test_a_lever_key_leaves_out_later_options_at_their_old_behaviour():
    """Runs keyed before an option existed are still found: at the value that trains what they trained the
    option is not in the key, at another it is."""
    from training.config import StfpmConfig

    today = json.loads(levers._key(StfpmConfig(category="screw")))
    assert not {"memory_weight", "memory_fraction", "memory_fusion", "student_pool", "subspace_posed_copies"} & set(today)
    assert json.loads(levers._key(StfpmConfig(category="screw", memory_fusion="score")))["memory_fusion"] == "score"
    # the sweep's signal stays the one-copy signal its runs were keyed with; today's default of four is in the key
    assert "synthetic_copies" not in json.loads(levers._key(StfpmConfig(category="screw", synthetic_copies=1)))
    assert today["synthetic_copies"] == 4
    assert all(baseline["synthetic_copies"] == 1 for baseline in levers.BASELINES.values())
    # --split-seed: unset it draws what --seed drew, so it stays out of the key
    assert "split_seed" not in today
    assert json.loads(levers._key(StfpmConfig(category="screw", split_seed=3)))["split_seed"] == 3
    # DFM's out-of-fold threshold: the sweep keeps the validation-only threshold its runs were keyed with
    from training.config import DfmConfig

    assert levers.BASELINES["dfm"]["threshold_folds"] == 0
    assert "threshold_folds" not in json.loads(levers._key(DfmConfig(category="screw", **levers.BASELINES["dfm"])))
    assert json.loads(levers._key(DfmConfig(category="screw", threshold_folds=5)))["threshold_folds"] == 5


def test_greedy_sweep_keeps_only_gains_above_the_margin_and_reuses_runs(synthetic_root, tmp_path, monkeypatch):
    steps = [("baseline", {}), ("map score", {"score_type": "map", "score_reduction": "topk"}),
             ("same again", {"variance_ratio": 0.97})]
    out = tmp_path / "runs"
    rows = levers.sweep("dfm", "synthetic", str(synthetic_root), out, steps, check=[])
    measured = [r for r in rows if "recipe" not in r]
    assert [r["lever"] for r in measured] == ["baseline", "map score", "same again"]
    signals = [r["synthetic_validation_auroc"] for r in measured]
    assert measured[1]["kept"] == (signals[1] >= signals[0] + levers.KEEP_MARGIN)
    assert measured[2]["kept"] is False  # an unchanged recipe is never a gain
    runs_before = sorted(out.iterdir())
    again = levers.sweep("dfm", "synthetic", str(synthetic_root), out, steps, check=[])
    assert sorted(out.iterdir()) == runs_before  # every step reused, nothing retrained
    assert [r.get("run") for r in again] == [r.get("run") for r in rows]

    skipped = levers.sweep("dfm", "synthetic", str(synthetic_root), out, steps + [("new", {"pool": 2})], check=[],
                           train=False)
    assert skipped[-2]["not_measured"] is True

    rows = [{"model": "DFM", **r} for r in rows]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{levers.README_MARKERS[0]}\nOLD-CONTENT\n{levers.README_MARKERS[1]}\noutro\n")
    levers.splice_readme(readme, levers.readme_block(rows, "header\n"), markers=levers.README_MARKERS)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "OLD-CONTENT" not in text
    assert "| DFM | map score |" in text
    assert json.loads(json.dumps(rows))  # the JSON the command writes
