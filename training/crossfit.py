"""Out-of-fold scores of the training images, so the image threshold is fitted on every normal image.

Why: a tolerance bound on the 30 validation scores of a 200-image category leans far to the safe side or, when the
draw holds a rare part, far above it (docs/TRAINING.md, rounds 15-16). DFM's PCA explains its own training images far
better than new ones, so their in-sample scores say nothing about unseen parts. Refitted K times, each time without
one fold of the training images, it scores that fold as it would score new parts, and the threshold sees 200 normal
scores instead of 30 (an option, `--threshold-folds`; why not the default: round 16). A fit on (K-1)/K of the images
explains new ones a little worse than the final fit, so each fold's scores are put on the final model's scale by
their scores on the validation images, which neither fit saw (`_to_final_scale`). The final model is unchanged.
STFPM's student has seen its training images' rare parts too: keeping it and refitting only the subspace term left
the out-of-fold tail short of held-out images' (round 16), so STFPM retrains the whole model per fold (round 17).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from training.predict import predict

log = logging.getLogger("training")


@dataclass
class RefittableTerm:
    """What can be fitted again without some training images, and the final fit put back."""

    name: str
    # fits without these training images (indices into data.train); returns the model that scores them
    refit: Callable[[np.ndarray], torch.nn.Module]
    restore: Callable[[], None]


@dataclass
class OutOfFold:
    scores: np.ndarray  # one per training image, in data.train's order
    paths: list[str]
    folds: int
    adjustments: list[dict] | None = None  # per fold: how its scores were put on the final fit's scale
    seconds: float = 0.0  # the fold fits and their scoring: metrics.json's out_of_fold_s

    def record(self, validation_scores: np.ndarray) -> dict:
        """thresholds.fit["out_of_fold"]: enough to check the fit and for INT8 calibration to carry the scores over."""
        return {"folds": self.folds, "images": int(self.scores.size), "median": float(np.median(self.scores)),
                "validation_median": float(np.median(validation_scores)), "adjustments": self.adjustments or [],
                "scores": [round(float(v), 6) for v in self.scores], "paths": self.paths}


def subspace_term(model, features: np.ndarray, owners: np.ndarray, variance_ratio: float,
                  device: torch.device) -> RefittableTerm:
    """A DFM's PCA refitted on the `features` rows whose image (`owners`) is not held out."""
    final = {name: getattr(model, name).clone() for name in ("mean", "components", "variances")}

    def refit(held_out: np.ndarray) -> torch.nn.Module:
        model.fit(features[~np.isin(owners, held_out)], variance_ratio=variance_ratio)
        return model.to(device)

    def restore() -> None:
        for name, value in final.items():
            setattr(model, name, value)

    return RefittableTerm("PCA", refit, restore)


def check_folds(folds: int, n_train: int) -> None:
    """Before any fitting: a bad count is a one-line error, not a traceback after minutes of work."""
    if folds != 0 and not 2 <= folds <= n_train:
        raise ValueError(f"--threshold-folds must be 0 (off) or between 2 and the {n_train} training images, got {folds}")


def out_of_fold_scores(term: RefittableTerm, data, config, device: torch.device, make_loader,
                       validation: np.ndarray, additive: bool = False) -> OutOfFold | None:
    """The training images' scores, each fold's by the term refitted without it (`config.threshold_folds`, 0: off).
    `validation`: the final model's validation scores (the scale each fold's scores are put on).
    `additive`: scores whose fold-to-fold change is an offset, not a scale (DFM's `nll` holds log-variance terms).
    None when off, or when the folds are interrupted (Ctrl-C): the run is then written with validation scores alone."""
    folds = config.threshold_folds
    if folds == 0:
        return None
    n = len(data.train)
    check_folds(folds, n)
    started = time.perf_counter()
    order = np.random.default_rng(config.validation_seed).permutation(n)
    scores, adjustments = np.empty(n), []
    validation = np.asarray(validation, np.float64)
    try:
        with logging_redirect_tqdm():  # the fold fits log while the fold bar is open
            for fold, held_out in enumerate(tqdm(np.array_split(order, folds), desc=f"out-of-fold {term.name}",
                                                 unit="fold", leave=False), start=1):
                log.info("out-of-fold fit %d of %d: %s without %d of the %d training images", fold, folds, term.name,
                         len(held_out), n)
                fold_model = term.refit(held_out)
                fold_validation = _scores(fold_model, make_loader(data.validation), device, "validation")
                adjust = _to_final_scale(validation, fold_validation, additive)
                adjustments.append(adjust)
                held_out_batches = make_loader([data.train[i] for i in held_out])
                fold_scores = _scores(fold_model, held_out_batches, device, "held-out fold")
                scores[held_out] = fold_scores * adjust["ratio"] + adjust["shift"]
                del fold_model
    except KeyboardInterrupt:
        # The final model took minutes (STFPM) and is already fitted: keep it rather than lose it with the folds.
        log.warning("out-of-fold fits interrupted during fold %d of %d: the image threshold is fitted on the "
                    "validation scores alone; writing the run folder with the final model (Ctrl-C again to abort)",
                    len(adjustments) + 1, folds)
        return None
    finally:
        term.restore()
    log.info("out-of-fold scores of the %d training images (%s fitted %d times without each fold, put on the final "
             "fit's scale by the validation images): median %.4g, validation images %.4g", n, term.name, folds,
             float(np.median(scores)), float(np.median(validation)))
    return OutOfFold(scores, [str(sample.path) for sample in data.train], folds, adjustments,
                     time.perf_counter() - started)


def _scores(model, batches, device: torch.device, desc: str) -> np.ndarray:
    return predict(model, batches, device, desc=desc).scores.astype(np.float64)


def _to_final_scale(final: np.ndarray, fold: np.ndarray, additive: bool) -> dict:
    """score * ratio + shift that gives the fold fit's validation scores the final fit's mean: a ratio for scores
    with a zero (errors, distances; a 4/5 PCA scores screw's new images 10-16 % higher), a shift for the others."""
    final_mean, fold_mean = float(np.mean(final)), float(np.mean(fold))
    if additive or final_mean <= 0 or fold_mean <= 0:
        return {"ratio": 1.0, "shift": round(final_mean - fold_mean, 6)}
    return {"ratio": round(final_mean / fold_mean, 6), "shift": 0.0}
