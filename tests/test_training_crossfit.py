"""The out-of-fold threshold (training.crossfit): every training image scored by a fit that did not see it."""

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from training import crossfit, dfm, pipeline, stfpm
from training.config import DfmConfig, StfpmConfig
from training.run_dir import load_model



class Memorizer(nn.Module):
    """A fitted term at its most biased: scores 1 on the images it was fitted on and 2 on any other; the image's
    index is its first pixel."""

    def __init__(self, fitted: set[int]):
        super().__init__()
        self.fitted = set(fitted)

    def forward(self, images):
        index = images[:, 0, 0, 0].round().long().tolist()
        scores = torch.tensor([1.0 if i in self.fitted else 2.0 for i in index])
        return torch.zeros(len(index), 1, 4, 4), scores


def toy_data(n_train: int, n_validation: int):
    train = [SimpleNamespace(path=f"train/good/{i:03d}.png", index=i) for i in range(n_train)]
    validation = [SimpleNamespace(path=f"val/{i}.png", index=1000 + i) for i in range(n_validation)]
    return SimpleNamespace(train=train, validation=validation)


def batches_of(samples):
    """Batches as training's loaders give them (training.predict reads every key)."""
    images = torch.stack([torch.full((3, 4, 4), float(sample.index)) for sample in samples])
    return [{"image": images[i:i + 3], "label": torch.zeros(len(images[i:i + 3]), dtype=torch.long),
             "mask": torch.zeros(len(images[i:i + 3]), 1, 4, 4), "has_mask": [False] * len(images[i:i + 3]),
             "path": [str(sample.path) for sample in samples[i:i + 3]]} for i in range(0, len(images), 3)]


def final_scores(model, data):
    """The final model's validation scores, as training passes them in."""
    return crossfit._scores(model, batches_of(data.validation), torch.device("cpu"), "validation")


def test_each_training_image_is_scored_by_a_fit_without_it_and_the_final_fit_comes_back():
    data = toy_data(n_train=17, n_validation=5)
    everything = set(range(17))
    model = Memorizer(everything)
    held_out_sets = []

    def refit(held_out):
        held_out_sets.append(set(held_out.tolist()))
        model.fitted = everything - set(held_out.tolist())
        return model

    def restore():
        model.fitted = set(everything)

    term = crossfit.RefittableTerm("memorizer", refit, restore)
    config = SimpleNamespace(threshold_folds=4, validation_seed=0)
    result = crossfit.out_of_fold_scores(term, data, config, torch.device("cpu"), batches_of, final_scores(model, data))
    # the in-sample score would be 1; every image's score is 2: no fold scored an image it was fitted on
    assert result.scores.tolist() == [2.0] * 17
    assert result.paths == [sample.path for sample in data.train] and result.folds == 4
    assert sorted(len(s) for s in held_out_sets) == [4, 4, 4, 5] and set().union(*held_out_sets) == everything
    assert result.adjustments == [{"ratio": 1.0, "shift": 0.0}] * 4  # the validation images score alike under every fit
    assert model.fitted == everything  # the final fit is back
    assert crossfit.out_of_fold_scores(term, data, SimpleNamespace(threshold_folds=0, validation_seed=0),
                                       torch.device("cpu"), batches_of, final_scores(model, data)) is None
    with pytest.raises(ValueError, match="between 2 and the 17 training images"):
        crossfit.out_of_fold_scores(term, data, SimpleNamespace(threshold_folds=18, validation_seed=0),
                                    torch.device("cpu"), batches_of, final_scores(model, data))


def test_a_failing_refit_still_puts_the_final_fit_back():
    data = toy_data(n_train=9, n_validation=3)
    model = Memorizer(set(range(9)))
    calls = []

    def refit(held_out):
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("the PCA did not converge")
        model.fitted = set(range(9)) - set(held_out.tolist())
        return model

    term = crossfit.RefittableTerm("memorizer", refit, lambda: setattr(model, "fitted", set(range(9))))
    with pytest.raises(RuntimeError, match="did not converge"):
        crossfit.out_of_fold_scores(term, data, SimpleNamespace(threshold_folds=3, validation_seed=0),
                                    torch.device("cpu"), batches_of, final_scores(model, data))
    assert model.fitted == set(range(9))


def test_interrupted_folds_keep_the_final_model_with_a_validation_threshold(synthetic_root, tmp_path, monkeypatch,
                                                                           caplog):
    """Ctrl-C during the fold fits (STFPM: K more trainings) must not throw away the final model trained before."""
    calls = []

    def interrupted_on_second_fold(model, *args):
        term = crossfit.subspace_term(model, *args)
        refit = term.refit

        def refit_or_interrupt(held_out):
            calls.append(len(held_out))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return refit(held_out)

        return crossfit.RefittableTerm(term.name, refit_or_interrupt, term.restore)

    monkeypatch.setattr(dfm, "subspace_term", interrupted_on_second_fold)
    config = DfmConfig(category="synthetic", data_root=str(synthetic_root), image_size=64, batch_size=8,
                       out=str(tmp_path / "runs"), posed_copies=1, threshold_folds=5)
    with caplog.at_level("WARNING", logger="training"):
        run = dfm.train(config)
    assert len(calls) == 2
    assert "interrupted during fold 2 of 5" in caplog.text
    thresholds = json.loads((run / "metrics.json").read_text())["thresholds"]
    assert thresholds["source"] == "validation" and "out_of_fold" not in thresholds["fit"]
    assert json.loads((run / "config.json").read_text())["threshold_folds"] == 0  # what the run holds, not what was asked
    plain = dfm.train(DfmConfig(**{**config.to_dict(), "threshold_folds": 0}))
    plain_thresholds = json.loads((plain / "metrics.json").read_text())["thresholds"]
    assert thresholds["image"] == pytest.approx(plain_thresholds["image"])
    # the final PCA was put back after the interrupted fold fit: the saved model is the one fitted on every image
    saved, plain_saved = load_model(run)[0], load_model(plain)[0]
    for name in ("mean", "components", "variances"):
        torch.testing.assert_close(getattr(saved, name), getattr(plain_saved, name))


def test_a_fold_fit_that_scores_everything_higher_is_scaled_back_by_the_validation_images():
    """A term fitted on fewer images explains new ones worse: the fold's scores are multiplied by the final over
    the fold fit's mean score on the validation images, which neither saw."""
    data = toy_data(n_train=10, n_validation=4)

    class Scaled(nn.Module):
        gain = 1.0

        def forward(self, images):
            index = images[:, 0, 0, 0]
            return torch.zeros(len(index), 1, 4, 4), self.gain * (1.0 + (index % 3))

    model = Scaled()
    fold_model = Scaled()
    fold_model.gain = 1.25
    term = crossfit.RefittableTerm("scaled", lambda held_out: fold_model, lambda: None)
    result = crossfit.out_of_fold_scores(term, data, SimpleNamespace(threshold_folds=2, validation_seed=0),
                                         torch.device("cpu"), batches_of, final_scores(model, data))
    assert [a["ratio"] for a in result.adjustments] == pytest.approx([0.8, 0.8])
    assert result.scores == pytest.approx([1.0 + (i % 3) for i in range(10)])  # as the final fit scores new images
    # scores whose change is an offset (DFM's nll: log-variances) or that have no zero to scale from get a shift
    assert crossfit._to_final_scale(np.array([1.0, 3.0]), np.array([2.0, 4.0]), additive=True) == {"ratio": 1.0, "shift": -1.0}
    assert crossfit._to_final_scale(np.array([-1.0, 2.0]), np.array([-3.0, 1.0]), additive=False) == {"ratio": 1.0, "shift": 1.5}


def test_dfm_fits_its_threshold_on_validation_and_out_of_fold_training_scores(synthetic_root, tmp_path):
    """The recorded out-of-fold scores are what a PCA fitted without each fold gives (scaled); the in-sample
    scores of the final PCA are lower; the threshold's fit covers both sets; --threshold-folds 0 keeps the old way."""
    config = DfmConfig(category="synthetic", data_root=str(synthetic_root), image_size=64, batch_size=8,
                       out=str(tmp_path / "runs"), posed_copies=1, threshold_folds=5)
    run = dfm.train(config)
    metrics = json.loads((run / "metrics.json").read_text())
    split = json.loads((run / "split.json").read_text())
    fit = metrics["thresholds"]["fit"]
    record = fit["out_of_fold"]
    assert (record["folds"], record["images"]) == (5, len(split["train"]))
    assert fit["n"] == len(split["validation"]) + len(split["train"])
    assert "out-of-fold" in metrics["thresholds"]["source"]
    assert len(record["adjustments"]) == 5 and all(0.5 < a["ratio"] < 1.0 and a["shift"] == 0 for a in record["adjustments"])
    assert record["paths"] == split["train"] and metrics["out_of_fold_s"] > 0

    from training.pipeline import loader, prepare_data
    from training.predict import predict

    model, _ = load_model(run)
    data = prepare_data(config)
    in_sample = predict(model, loader(data.train, data, config), torch.device("cpu")).scores
    out_of_fold = np.asarray(record["scores"])
    assert np.median(out_of_fold) > np.median(in_sample)  # a PCA explains its own training images best
    assert min(metrics["thresholds"]["image_min"], np.min(out_of_fold)) == pytest.approx(metrics["thresholds"]["image_min"])

    plain = dfm.train(DfmConfig(**{**config.to_dict(), "threshold_folds": 0}))
    plain_fit = json.loads((plain / "metrics.json").read_text())["thresholds"]
    assert plain_fit["fit"]["n"] == len(split["validation"]) and "out_of_fold" not in plain_fit["fit"]
    assert plain_fit["source"] == "validation"


@pytest.mark.parametrize("algorithm,value,message", [
    ("dfm", "1", "--threshold-folds must be 0 (off) or between 2 and the 34 training images, got 1"),
    ("dfm", "99", "between 2 and the 34 training images, got 99"), ("dfm", "-1", "must be 0 (off) or between 2 and"),
    ("stfpm", "1", "--threshold-folds must be 0 (off) or between 2 and the 34 training images, got 1")])
def test_bad_fold_counts_are_one_line_errors(synthetic_root, tmp_path, algorithm, value, message):
    result = subprocess.run([sys.executable, "-m", f"training.{algorithm}", "--category", "synthetic", "--data-root",
                             str(synthetic_root), "--out", str(tmp_path), "--image-size", "64",
                             *(["--posed-copies", "0"] if algorithm == "dfm" else ["--epochs", "1"]),
                             "--threshold-folds", value], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # refused before any fitting: no run folder


def test_stfpm_retrains_everything_without_each_fold_and_keeps_the_final_model(synthetic_root, tmp_path, monkeypatch):
    """The student has seen its training images' rare parts as the subspace term has (round 16): each fold's model
    is trained from scratch on the other folds' images, and the run's own model is the one trained on all of them."""
    config = StfpmConfig(category="synthetic", data_root=str(synthetic_root), epochs=1, image_size=64, batch_size=8,
                         out=str(tmp_path / "runs"), threshold_folds=3, memory_weight=1, device="cpu")
    fitted_on, rng_states = [], []
    real_fit = stfpm.fit

    def recording_fit(config, data, device):
        fitted_on.append({str(sample.path) for sample in data.train})
        rng_states.append(torch.random.get_rng_state())
        return real_fit(config, data, device)

    monkeypatch.setattr(stfpm, "fit", recording_fit)
    validation_passes = []
    real_predict = pipeline.predict

    def counting_predict(model, batches, device, desc="predict"):
        validation_passes.append(desc == "validation")
        return real_predict(model, batches, device, desc=desc)

    monkeypatch.setattr(pipeline, "predict", counting_predict)
    monkeypatch.setattr(crossfit, "predict", counting_predict)
    run = stfpm.train(config)
    metrics = json.loads((run / "metrics.json").read_text())
    split = json.loads((run / "split.json").read_text())
    record = metrics["thresholds"]["fit"]["out_of_fold"]
    train = set(split["train"])
    assert fitted_on[0] == train and len(fitted_on) == 4  # the final model first, then one per fold
    held_out = [train - kept for kept in fitted_on[1:]]
    assert all(kept < train for kept in fitted_on[1:]) and set().union(*held_out) == train
    assert sum(len(h) for h in held_out) == len(train)  # each training image held out exactly once
    assert record["paths"] == split["train"] and metrics["thresholds"]["fit"]["n"] == len(split["validation"]) + len(train)
    assert len(record["adjustments"]) == 3 and all(a["ratio"] > 0 and a["shift"] == 0 for a in record["adjustments"])
    assert metrics["out_of_fold_s"] > 0
    assert sum(validation_passes) == 1 + 3  # the final model's validation scores once (folds and threshold), each fold's once
    assert json.loads((run / "config.json").read_text())["threshold_folds"] == 3
    # every fold's student starts from the run's seed, as the final model's did
    assert all(torch.equal(state, rng_states[0]) for state in rng_states[1:])

    monkeypatch.setattr(stfpm, "fit", real_fit)
    plain = stfpm.train(StfpmConfig(**{**config.to_dict(), "threshold_folds": 0}))
    plain_metrics = json.loads((plain / "metrics.json").read_text())
    assert plain_metrics["image_auroc"] == metrics["image_auroc"]  # the fold fits leave the run's model as it was
    assert plain_metrics["thresholds"]["source"] == "validation" and "out_of_fold" not in plain_metrics["thresholds"]["fit"]
    from training.pipeline import loader, prepare_data
    from training.predict import predict

    data = prepare_data(config)
    scores = [predict(load_model(r)[0], loader(data.test, data, config), torch.device("cpu")).scores for r in (run, plain)]
    np.testing.assert_array_equal(*scores)


def test_int8_calibration_carries_the_out_of_fold_scores_by_the_validation_line():
    from calibration.quantize import carried_out_of_fold

    fp32_validation = np.array([1.0, 2.0, 3.0, 4.0])
    int8_validation = 1.1 * fp32_validation - 0.05
    record = {"folds": 5, "images": 3, "scores": [2.0, 5.0, 7.0], "paths": ["a.png", "b.png", "c.png"]}
    carried = carried_out_of_fold(record, fp32_validation, int8_validation)
    assert carried["scores"] == pytest.approx([2.15, 5.45, 7.65])
    assert carried["mapped_from_fp32"] == pytest.approx({"slope": 1.1, "intercept": -0.05})
    assert (carried["folds"], carried["images"]) == (5, 3) and record["scores"] == [2.0, 5.0, 7.0]
    assert carried_out_of_fold(None, fp32_validation, int8_validation) is None
    flat = carried_out_of_fold(record, np.ones(4), np.full(4, 1.5))  # no spread to fit a line through: a shift
    assert flat["scores"] == pytest.approx([2.5, 5.5, 7.5])
