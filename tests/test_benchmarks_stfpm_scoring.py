"""benchmarks.stfpm_scoring re-scores a trained run from cached per-tap maps: the variant equal to the
run's own settings must reproduce the run's metrics (it is the same graph, assembled differently)."""

from __future__ import annotations

import json

import pytest

from benchmarks import stfpm_scoring


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
