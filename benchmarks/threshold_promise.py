"""Does a threshold fitted on a few normal scores keep its false-positive promise on other normal images?

    python -m benchmarks.threshold_promise RUN [RUN ...] [--fit-size 30] [--draws 3000] [--confidences 0.5,0.75,0.9]

Validation data only: a run trained with a large validation split (e.g. `--validation-fraction 0.5`, 100 held-out
normal images of screw) has its validation scores split `--draws` times into `--fit-size` that set the threshold,
as training sets it (`edge_ad.decide.thresholds.image_threshold`), and the rest, which measure the share of normal
images above it. Reported per confidence: the mean of that share, the share of draws above 3x the target (the
issue's limit) and at or below the target, and the median threshold; also for the raw maximum of the fitted scores,
what a quantile of 30 scores amounts to. The test split is never read. Writes
`benchmarks/results/threshold_promise-<run>[-fit<N>].json` (docs/TRAINING.md, round 15).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge_ad.decide.thresholds import DEFAULT_IMAGE_FPR, image_threshold
from edge_ad.ops.tool_cli import run_tool

log = logging.getLogger("benchmarks.threshold_promise")
RESULTS = Path(__file__).parent / "results"
DEFAULT_FIT_SIZE = 30  # training's validation split on MVTec screw
LIMIT_FACTOR = 3  # the limit: false positives on unseen normal images <= 3x the target rate


class PromiseError(RuntimeError):
    """A run that cannot be measured; the message says why."""


def validation_scores(run_dir: Path) -> np.ndarray:
    try:
        return np.load(Path(run_dir) / "report_data.npz")["validation_scores"].astype(np.float64)
    except (OSError, KeyError, ValueError) as exc:
        raise PromiseError(f"{run_dir} has no validation scores (report_data.npz): {exc}") from None


def out_of_fold_scores(run_dir: Path) -> np.ndarray | None:
    """The training images' out-of-fold scores the run's threshold was also fitted on (training.crossfit); None without."""
    with np.load(Path(run_dir) / "report_data.npz") as data:
        return data["out_of_fold_scores"].astype(np.float64) if "out_of_fold_scores" in data.files else None


def promise(scores: np.ndarray, fit_size: int, draws: int, confidences: list[float],
            target_fpr: float = DEFAULT_IMAGE_FPR, seed: int = 0, out_of_fold: np.ndarray | None = None) -> dict:
    """Per confidence (and "max", the raw maximum), the false-positive share on the held-out rest over the draws.
    `out_of_fold`: training images' scores that join every draw's fitted scores, as training fits them (they are
    never measured: they are not validation images)."""
    if not 5 <= fit_size <= scores.size - 10:
        raise PromiseError(f"{scores.size} validation scores: --fit-size must leave at least 10 to measure on "
                           f"(and be at least 5), got {fit_size}")
    rng = np.random.default_rng(seed)
    rates = {str(c): [] for c in confidences} | {"max": []}
    thresholds = {key: [] for key in rates}
    for _ in tqdm(range(draws), desc="draws", unit="draw", leave=False):
        order = rng.permutation(scores.size)
        fitted, rest = scores[order[:fit_size]], scores[order[fit_size:]]
        if out_of_fold is not None:
            fitted = np.concatenate([fitted, out_of_fold])
        for confidence in confidences:
            threshold, _ = image_threshold(fitted, target_fpr, confidence)
            rates[str(confidence)].append(float(np.mean(rest > threshold)))
            thresholds[str(confidence)].append(threshold)
        rates["max"].append(float(np.mean(rest > fitted.max())))
        thresholds["max"].append(float(fitted.max()))
    return {key: {"mean_fpr": float(np.mean(values)),
                  "share_above_limit": float(np.mean(np.asarray(values) > LIMIT_FACTOR * target_fpr)),
                  "share_within_target": float(np.mean(np.asarray(values) <= target_fpr)),
                  "median_threshold": float(np.median(thresholds[key]))}
            for key, values in rates.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.threshold_promise", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training run folders (report_data.npz)")
    parser.add_argument("--fit-size", type=int, default=DEFAULT_FIT_SIZE, help="scores that set each threshold (training's split: 30)")
    parser.add_argument("--draws", type=int, default=3000)
    parser.add_argument("--confidences", default="0.5,0.75,0.9")
    parser.add_argument("--target-fpr", type=float, default=DEFAULT_IMAGE_FPR)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    def run() -> None:
        confidences = [float(c) for c in args.confidences.split(",") if c.strip()]
        for run_dir in args.runs:
            scores = validation_scores(run_dir)
            extra = out_of_fold_scores(run_dir)
            result = {"run": run_dir.name, "validation_scores": int(scores.size), "fit_size": args.fit_size,
                      "draws": args.draws, "target_fpr": args.target_fpr, "limit": LIMIT_FACTOR * args.target_fpr,
                      "out_of_fold_scores": 0 if extra is None else int(extra.size),
                      "by_confidence": promise(scores, args.fit_size, args.draws, confidences, args.target_fpr,
                                               out_of_fold=extra)}
            if extra is not None:  # and as before the out-of-fold threshold, for comparison
                result["validation_only"] = promise(scores, args.fit_size, args.draws, confidences, args.target_fpr)
            args.out.mkdir(parents=True, exist_ok=True)
            suffix = "" if args.fit_size == DEFAULT_FIT_SIZE else f"-fit{args.fit_size}"
            path = args.out / f"threshold_promise-{run_dir.name}{suffix}.json"
            path.write_text(json.dumps(result, indent=2) + "\n")
            print(f"{run_dir.name}: {scores.size} validation scores, {args.fit_size} set each threshold"
                  + ("" if extra is None else f" with the {extra.size} training images' out-of-fold scores"))
            for part in ("by_confidence", "validation_only"):
                if part not in result:
                    continue
                if part == "validation_only":
                    print(f"  without the out-of-fold scores ({args.fit_size} validation scores alone):")
                for key, row in result[part].items():
                    label = "raw maximum" if key == "max" else f"confidence {key}"
                    print(f"  {label:16s} mean false-positive rate {row['mean_fpr']:.2%}, above {LIMIT_FACTOR}x the "
                          f"target in {row['share_above_limit']:.1%} of draws, median threshold {row['median_threshold']:.4g}")
            print(f"wrote {path}")

    return run_tool(run, (PromiseError, ValueError))


if __name__ == "__main__":
    raise SystemExit(main())
