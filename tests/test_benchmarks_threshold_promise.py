"""benchmarks.threshold_promise: the false-positive share of thresholds fitted on a few of a run's validation scores."""

import json

import numpy as np
import pytest

from benchmarks import threshold_promise


def fake_run(folder, scores):
    folder.mkdir()
    np.savez(folder / "report_data.npz", validation_scores=np.asarray(scores), test_scores=np.zeros(2),
             test_labels=np.array([0, 1]))
    return folder


def test_a_heavier_tail_than_the_fit_breaks_the_promise_where_a_lognormal_one_keeps_it(tmp_path, capsys):
    rng = np.random.default_rng(0)
    lognormal = fake_run(tmp_path / "lognormal", rng.lognormal(0.0, 0.3, 100))
    mode = rng.lognormal(0.0, 0.3, 100)
    mode[:3] = [4.0, 4.5, 5.0]  # a rare high mode: 3 in 100 normal parts, as on screw
    rare_mode = fake_run(tmp_path / "rare_mode", mode)
    assert threshold_promise.main([str(lognormal), str(rare_mode), "--draws", "300", "--confidences", "0.5,0.9",
                                   "--out", str(tmp_path / "results")]) == 0
    kept = json.loads((tmp_path / "results" / "threshold_promise-lognormal.json").read_text())["by_confidence"]
    broken = json.loads((tmp_path / "results" / "threshold_promise-rare_mode.json").read_text())["by_confidence"]
    assert kept["0.9"]["mean_fpr"] < 0.01 < kept["max"]["mean_fpr"]
    assert kept["0.9"]["mean_fpr"] < kept["0.5"]["mean_fpr"]
    assert kept["0.9"]["median_threshold"] > kept["0.5"]["median_threshold"]
    assert broken["0.9"]["mean_fpr"] > 0.01 and broken["0.9"]["share_above_limit"] > kept["0.9"]["share_above_limit"]
    assert "rare_mode: 100 validation scores, 30 set each threshold" in capsys.readouterr().out
    assert threshold_promise.main([str(lognormal), "--draws", "20", "--fit-size", "60", "--out", str(tmp_path / "results")]) == 0
    assert json.loads((tmp_path / "results" / "threshold_promise-lognormal-fit60.json").read_text())["fit_size"] == 60


def test_direct_draws_measure_the_rest_only():
    scores = np.r_[np.ones(36), np.full(4, 100.0)]
    result = threshold_promise.promise(scores, fit_size=10, draws=200, confidences=[0.9])
    # a fit without a 100 (about a third of the draws) lets all four of the rest through; one with a 100 none
    assert 0.0 < result["max"]["share_above_limit"] < 1.0
    assert result["max"]["mean_fpr"] == pytest.approx(4 / 30 * result["max"]["share_above_limit"])
    with pytest.raises(threshold_promise.PromiseError, match="leave at least 10"):
        threshold_promise.promise(scores, fit_size=35, draws=1, confidences=[0.9])


def test_a_folder_without_scores_is_one_line(tmp_path, capsys):
    assert threshold_promise.main([str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "report_data.npz" in err and "Traceback" not in err


def test_out_of_fold_scores_join_every_draw_and_the_run_is_measured_without_them_too(tmp_path, capsys):
    """A run whose threshold also saw its training images' out-of-fold scores: with a rare high mode among the
    training images, every draw's threshold rises above it, which 30 validation scores alone miss."""
    rng = np.random.default_rng(1)
    folder = fake_run(tmp_path / "with_oof", rng.lognormal(0.0, 0.3, 100))
    with np.load(folder / "report_data.npz") as data:
        arrays = dict(data)
    out_of_fold = rng.lognormal(0.0, 0.3, 170)
    out_of_fold[:2] = [6.0, 7.0]
    np.savez(folder / "report_data.npz", **arrays, out_of_fold_scores=out_of_fold)
    assert threshold_promise.main([str(folder), "--draws", "200", "--confidences", "0.9",
                                   "--out", str(tmp_path / "results")]) == 0
    result = json.loads((tmp_path / "results" / "threshold_promise-with_oof.json").read_text())
    assert result["out_of_fold_scores"] == 170
    assert result["by_confidence"]["max"]["median_threshold"] == 7.0  # the maximum of every draw is the training 7.0
    assert result["by_confidence"]["0.9"]["median_threshold"] > result["validation_only"]["0.9"]["median_threshold"]
    assert result["by_confidence"]["0.9"]["mean_fpr"] <= result["validation_only"]["0.9"]["mean_fpr"]
    out = capsys.readouterr().out
    assert "with the 170 training images' out-of-fold scores" in out and "without the out-of-fold scores" in out
