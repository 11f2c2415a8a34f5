"""The one threshold estimator: raw decision thresholds from scores of normal images only.

Training (validation split), INT8 calibration and teach-in on site (`edge-ad teach`) all call
`estimate_thresholds`, so a threshold means the same thing wherever it was set.

Why not the empirical quantile: the 99 % quantile of 20-50 normal scores is just their maximum,
and the next few hundred normal parts exceed it far more often than 1 % (measured: 20 % on a
demo run). Instead the scores are mapped to a near-Gaussian scale (positive scores: a Box-Cox
power of score / median; others: a Yeo-Johnson power of robustly standardized scores; the exponent
fitted by maximum likelihood, at least 0, i.e. at most a logarithm), and the
threshold is the one-sided normal *tolerance* bound there: with probability `confidence`, at
least (1 - target_fpr) of unseen normal scores fall below it. The bound grows as the sample
shrinks, which is the honest answer to "how sure are 30 images?".

From GPD_MIN_SCORES scores on (teach-in on hundreds of frames, `--threshold-folds`), the top
GPD_TAIL_SHARE of them are enough to fit the tail itself: a generalized Pareto distribution on the
exceedances (peaks over threshold), its (1 - target_fpr) quantile, and the same confidence by a
parametric bootstrap. Why: a normal tail on any power of the scores is too light for scores with a
rare high mode or a power-law tail, and at n = 130 it lets 1.4-3.2 % through where 1 % is promised
(docs/TRAINING.md, round 18). numpy and the standard library only: this runs on the edge PC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from statistics import NormalDist

import numpy as np

from edge_ad.model.bundle import Thresholds

DEFAULT_IMAGE_FPR = 0.01
DEFAULT_PIXEL_FPR = 0.001
DEFAULT_CONFIDENCE = 0.9
MIN_NORMAL_SCORES = 5  # below this no tail can be fitted, only guessed; the bound widens as n shrinks
# The outlier check (`outlying_scores`): the chance that a sample of normal scores from one tail shows one, and how
# many of the highest scores it looks at. It names images; it never changes the threshold.
OUTLIER_ALPHA = 0.05
MAX_OUTLIERS = 3
ROSNER_MIN_SCORES = 25
# Powers below 0 give a transform with a ceiling (-1/power); a tolerance bound near it maps back to an
# absurd threshold (1e5 for scores below 3), so the fit stays at or above the logarithm.
_LAMBDAS = np.linspace(0.0, 3.0, 121)
# The fitted tail (`_gpd_bound`): from this many scores, on the top share of them, for rates well inside that share.
GPD_MIN_SCORES = 100
GPD_TAIL_SHARE = 0.2
GPD_MAX_FPR = GPD_TAIL_SHARE / 4
GPD_BOOTSTRAP = 200  # resamples for the confidence; seeded, so a threshold is reproducible
_GPD_SHAPES = (-0.5, 1.0)  # the shapes the fit may take: a few dozen exceedances cannot tell others apart


class ThresholdEstimateError(ValueError):
    """Normal scores that cannot give a threshold (too few, not finite, bad rates)."""


def _yeo_johnson(x: np.ndarray, lam: float) -> np.ndarray:
    out = np.empty_like(x)
    pos = x >= 0
    if abs(lam) > 1e-8:
        out[pos] = ((x[pos] + 1.0) ** lam - 1.0) / lam
    else:
        out[pos] = np.log1p(x[pos])
    if abs(lam - 2.0) > 1e-8:
        out[~pos] = -((1.0 - x[~pos]) ** (2.0 - lam) - 1.0) / (2.0 - lam)
    else:
        out[~pos] = -np.log1p(-x[~pos])
    return out


def _yeo_johnson_inverse(y: float, lam: float) -> float | None:
    """None where y lies beyond the transform's range (a bounded fit cannot reach that far)."""
    try:
        if y >= 0:
            if abs(lam) <= 1e-8:
                return math.expm1(y)
            if 1.0 + lam * y <= 0:
                return None
            return math.expm1(math.log1p(lam * y) / lam)
        if abs(lam - 2.0) > 1e-8:
            if 1.0 - (2.0 - lam) * y <= 0:
                return None
            return 1.0 - (1.0 - (2.0 - lam) * y) ** (1.0 / (2.0 - lam))
        return -math.expm1(-y)
    except OverflowError:
        return None


def _box_cox(x: np.ndarray, lam: float) -> np.ndarray:
    return np.log(x) if lam < 1e-8 else (x**lam - 1.0) / lam


def _fit_box_cox(x: np.ndarray) -> float:
    """Maximum-likelihood Box-Cox exponent for positive scores."""
    best, best_ll = 1.0, -math.inf
    log_sum = float(np.log(x).sum())
    for lam in _LAMBDAS:
        variance = float(np.var(_box_cox(x, float(lam))))
        if not math.isfinite(variance) or variance <= 0:
            continue
        ll = -0.5 * len(x) * math.log(variance) + (lam - 1.0) * log_sum
        if ll > best_ll:
            best, best_ll = float(lam), ll
    return best


def _fit_lambda(x: np.ndarray) -> float:
    """Maximum-likelihood Yeo-Johnson exponent (grid search: no scipy on the edge PC)."""
    best, best_ll = 1.0, -math.inf
    log_terms = np.sign(x) * np.log1p(np.abs(x))
    for lam in _LAMBDAS:
        y = _yeo_johnson(x, float(lam))
        variance = float(np.var(y))
        if not math.isfinite(variance) or variance <= 0:
            continue
        ll = -0.5 * len(x) * math.log(variance) + (lam - 1.0) * float(log_terms.sum())
        if ll > best_ll:
            best, best_ll = float(lam), ll
    return best


def tolerance_factor(n: int, coverage: float, confidence: float) -> float:
    """One-sided normal tolerance factor k: mean + k*sd covers `coverage` with `confidence`.

    The standard closed-form approximation (Natrella, NIST handbook 7.2.6.3).
    """
    z_p = NormalDist().inv_cdf(coverage)
    z_g = NormalDist().inv_cdf(confidence)
    a = 1.0 - z_g**2 / (2.0 * (n - 1))
    b = z_p**2 - z_g**2 / n
    if a <= 0:
        raise ThresholdEstimateError(f"{n} normal scores are too few for {confidence:.0%} confidence")
    return (z_p + math.sqrt(max(z_p**2 - a * b, 0.0))) / a


@dataclass(frozen=True)
class TailFit:
    """How the image threshold was set, kept in bundle.json so a reader can check it."""

    method: str
    n: int
    confidence: float
    power: float | None  # Box-Cox / Yeo-Johnson exponent of the normal bound; None for the fitted tail
    empirical_quantile: float  # what the raw quantile would have given, for comparison
    p50: float | None = None  # median and 95th percentile of the normal scores: the reference the runtime's
    p95: float | None = None  # drift watch and teach-in compare site scores with (edge_ad.decide.drift)
    outliers: tuple[int, ...] = ()  # positions (in the scores given) of those beyond the others' tail, highest first
    threshold_without_outliers: float | None = None  # what the others alone would have set
    tail: dict | None = None  # the fitted tail: exceedances, where they start, GPD shape and scale

    def to_dict(self) -> dict:
        return {"method": self.method, "n": self.n, "confidence": self.confidence,
                "power": None if self.power is None else round(self.power, 4),
                "empirical_quantile": self.empirical_quantile,
                "p50": self.p50, "p95": self.p95, "outliers": list(self.outliers),
                "threshold_without_outliers": self.threshold_without_outliers,
                **({"tail": self.tail} if self.tail is not None else {})}


def image_threshold(scores, target_fpr: float = DEFAULT_IMAGE_FPR,
                    confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, TailFit]:
    """Raw image threshold for `target_fpr` on unseen normal images, and how it was fitted (with the
    positions of any scores beyond the others' tail: `outlying_scores`)."""
    threshold, fit = _tail_bound(scores, target_fpr, confidence)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    outliers = outlying_scores(scores)
    if not outliers:
        return threshold, fit
    try:  # by the same method, though a few scores fewer might have chosen the other
        without, _ = _tail_bound(np.delete(scores, outliers), target_fpr, confidence, fitted_tail=fit.tail is not None)
    except ThresholdEstimateError:  # fewer scores than a bound at this confidence needs: name them all the same
        without = None
    return threshold, replace(fit, outliers=tuple(outliers), threshold_without_outliers=without)


def outlying_scores(scores, alpha: float = OUTLIER_ALPHA) -> list[int]:
    """Positions of the highest normal scores that the tail of the others does not explain, highest first.

    Why: the threshold follows the highest scores, and one defective part among the "normal" images (or one
    normal kind the sample holds once) can set it alone. Rosner's generalized ESD test (Technometrics 1983),
    one-sided, on the near-Gaussian scale the threshold is fitted on: at step i the highest remaining score
    is tested against the others' mean and spread, and the k highest are named for the last step k whose
    statistic beats its critical value; at most MAX_OUTLIERS steps, never leaving fewer than
    MIN_NORMAL_SCORES, and one step below ROSNER_MIN_SCORES, where the test's approximation is meant to
    hold (with three steps, 9 scores from one tail showed some in 8 % of samples). Scores from one tail show
    any with probability about alpha.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-scores, kind="stable")
    found = 0
    positive = scores.min() > 0
    steps = MAX_OUTLIERS if scores.size >= ROSNER_MIN_SCORES else 1
    for step in range(1, min(steps, scores.size - MIN_NORMAL_SCORES) + 1):
        sample = scores[order[step - 1:]]  # highest first
        # Positive scores: Box-Cox fitted on the step's sample, as the threshold is (its power stops at the
        # logarithm). Scores of both signs are tested as they are: a Yeo-Johnson power fitted with an outlier
        # absorbs it (one 9 spreads above the rest still read as normal).
        transformed = _box_cox_scale(sample)[0] if positive else sample
        spread = float(transformed.std(ddof=1))
        if not spread > 1e-9 * max(1.0, float(np.abs(transformed).max())):  # equal up to rounding: nothing stands out
            break
        m = sample.size
        t = _t_quantile(1.0 - alpha / m, m - 2)
        critical = (m - 1) * t / math.sqrt((m - 2 + t * t) * m)
        if (transformed[0] - transformed.mean()) / spread > critical:
            found = step
    return [int(position) for position in order[:found]]


def _t_quantile(p: float, dof: int) -> float:
    """Student's t quantile by the Cornish-Fisher expansion (Abramowitz & Stegun 26.7.5), within 0.6 % of
    the exact value for dof >= 4 where outlying_scores uses it: no scipy on the edge PC."""
    z = NormalDist().inv_cdf(p)
    terms = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
             (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)
    return z + sum(term / dof ** (power + 1) for power, term in enumerate(terms))


def _box_cox_scale(scores: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Positive scores on the near-Gaussian scale the tail is fitted on: (Box-Cox of score / median with the
    fitted power, median, power)."""
    median = float(np.median(scores))
    lam = _fit_box_cox(scores / median)
    return _box_cox(scores / median, lam), median, lam


def describe_outliers(fit: dict | None, names) -> str | None:
    """One line for the log naming the images `outlying_scores` found (names: in the order the scores were
    given), or None when there are none."""
    positions = (fit or {}).get("outliers") or []
    if not positions:
        return None
    named = ", ".join(str(names[position]) for position in positions)
    without = fit.get("threshold_without_outliers")
    one = len(positions) == 1
    them = "it" if one else "them"
    return (f"{len(positions)} of {fit.get('n')} normal images score{'s' if one else ''} beyond the tail of the "
            f"others ({named}); the threshold follows {them}" +
            (f" ({without:.4g} without {them})" if without is not None else "") +
            f". Look at {them}: a defect among the normal images raises the threshold for every part; if "
            f"{'it is' if one else 'they are'} normal, the line has more parts like {them} than these images show")


def _tail_bound(scores, target_fpr: float, confidence: float,
                fitted_tail: bool | None = None) -> tuple[float, TailFit]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not 0.0 < target_fpr < 1.0:
        raise ThresholdEstimateError(f"target false-positive rate must be in (0, 1), got {target_fpr}")
    if not 0.5 <= confidence < 1.0:
        raise ThresholdEstimateError(f"confidence must be in [0.5, 1), got {confidence}")
    if scores.size < MIN_NORMAL_SCORES:
        raise ThresholdEstimateError(
            f"{scores.size} normal scores are too few to set a threshold (need at least {MIN_NORMAL_SCORES})")
    if not np.all(np.isfinite(scores)):
        raise ThresholdEstimateError("normal scores contain NaN or infinite values")
    empirical = float(np.quantile(scores, 1.0 - target_fpr))
    p95 = float(np.quantile(scores, 0.95))
    if fitted_tail is None:
        fitted_tail = scores.size >= GPD_MIN_SCORES and target_fpr <= GPD_MAX_FPR
    tail_bound = _gpd_bound(scores, target_fpr, confidence) if fitted_tail and np.ptp(scores) > 0 else None
    if tail_bound is not None:
        threshold, tail = tail_bound
        fit = TailFit(method="generalized Pareto tail bound", n=int(scores.size), confidence=confidence, power=None,
                      empirical_quantile=empirical, p50=float(np.median(scores)), p95=p95, tail=tail)
        return threshold, fit
    k = tolerance_factor(scores.size, 1.0 - target_fpr, confidence)
    if scores.min() > 0 and np.ptp(scores) > 0:
        # Positive scores (maps, distances, errors): Box-Cox on scores / median, exact for log-normal ones.
        transformed, median, lam = _box_cox_scale(scores)
        bound = float(transformed.mean() + k * transformed.std(ddof=1))
        value = math.exp(bound) if lam < 1e-8 else (lam * bound + 1.0) ** (1.0 / lam)
        fit = TailFit(method="box-cox normal tolerance bound", n=int(scores.size), confidence=confidence,
                      power=lam, empirical_quantile=empirical, p50=median, p95=p95)
        return float(median * value), fit
    center = float(np.median(scores))
    q25, q75 = np.quantile(scores, [0.25, 0.75])
    scale = float(q75 - q25) or float(np.std(scores)) or 1.0
    standardized = (scores - center) / scale
    lam = _fit_lambda(standardized)
    value = None
    for power in (lam, 1.0):  # 1.0 is the identity: a plain normal fit where the fitted power cannot reach the bound
        transformed = _yeo_johnson(standardized, power)
        value = _yeo_johnson_inverse(float(transformed.mean() + k * transformed.std(ddof=1)), power)
        if value is not None and math.isfinite(value):
            lam = power
            break
    threshold = center + scale * value
    fit = TailFit(method="yeo-johnson normal tolerance bound", n=int(scores.size), confidence=confidence,
                  power=lam, empirical_quantile=empirical, p50=center, p95=p95)
    return float(threshold), fit


def _fit_gpd(exceedances: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood (shape, scale) of a generalized Pareto distribution on exceedances > 0.

    Grimshaw's profile likelihood: for theta = shape / scale the best shape is mean(log(1 + theta * y)), so the
    likelihood is one function of theta, searched on a grid (theta -> 0 is the exponential). No scipy on the edge PC.
    """
    y = np.asarray(exceedances, dtype=np.float64)
    k, mean = y.size, float(y.mean())
    best_shape, best_scale, best_ll = 0.0, mean, -k * (math.log(mean) + 1.0)
    lowest = -(1.0 - 1e-6) / float(y.max())  # 1 + theta * y must stay positive
    thetas = np.concatenate([np.linspace(lowest, 0.0, 200, endpoint=False), np.geomspace(1e-4, 1e3, 200) / mean])
    shapes = np.log1p(np.outer(thetas, y)).mean(axis=1)
    scales = shapes / thetas
    # Below a shape of -1 the likelihood has no maximum; a few dozen exceedances cannot tell shapes outside this
    # range apart, and the scale must be the one fitted with the shape kept.
    valid = np.isfinite(shapes) & (scales > 0) & (shapes >= _GPD_SHAPES[0]) & (shapes <= _GPD_SHAPES[1])
    log_likelihood = np.full(thetas.size, -np.inf)
    log_likelihood[valid] = -k * np.log(scales[valid]) - k * (shapes[valid] + 1.0)
    i = int(np.argmax(log_likelihood))
    if log_likelihood[i] > best_ll:
        best_shape, best_scale = float(shapes[i]), float(scales[i])
    return best_shape, best_scale


def _gpd_quantile(start: float, shape: float, scale: float, tail_probability):
    """The score exceeded with `tail_probability` (a float, or an array: the bootstrap draws by the same formula)."""
    if abs(shape) < 1e-9:
        return start - scale * np.log(tail_probability)
    return start + scale / shape * (tail_probability ** -shape - 1.0)


def _gpd_bound(scores: np.ndarray, target_fpr: float, confidence: float) -> tuple[float, dict] | None:
    """Peaks over threshold: the top GPD_TAIL_SHARE of the scores fitted by a GPD; its (1 - target_fpr) quantile,
    raised to a `confidence` upper bound by a parametric bootstrap (the basic bootstrap, 2 q - the resampled
    (1 - confidence) quantile; the percentile bound covered less on every tail tried). On 26 exceedances it is
    approximate: 57-79 % of samples of 130 keep the target at confidence 0.9, and the mean rate stays at it
    (docs/TRAINING.md, round 18). None where ties leave too few scores strictly above the tail's start
    (rounded scores): no tail to fit."""
    ordered = np.sort(scores)
    k = max(int(round(GPD_TAIL_SHARE * ordered.size)), 10)
    start = float(ordered[-k - 1])
    exceedances = ordered[ordered > start] - start
    if exceedances.size < k // 2 or np.unique(exceedances).size < 5:
        return None
    k = exceedances.size
    tail_probability = target_fpr * ordered.size / k
    shape, scale = _fit_gpd(exceedances)
    estimate = float(_gpd_quantile(start, shape, scale, tail_probability))
    rng = np.random.default_rng(0)
    resampled = []
    for _ in range(GPD_BOOTSTRAP):
        draw = _gpd_quantile(0.0, shape, scale, 1.0 - rng.random(k))  # inverse CDF of uniforms in (0, 1]
        draw = draw[draw > 0]
        resampled.append(_gpd_quantile(start, *_fit_gpd(draw), tail_probability) if draw.size >= 2 else start)
    bound = 2.0 * estimate - float(np.quantile(resampled, 1.0 - confidence))
    tail = {"exceedances": k, "start": round(start, 6), "shape": round(shape, 4), "scale": round(scale, 6),
            "estimate": round(estimate, 6)}
    return max(bound, estimate), tail


def estimate_thresholds(
    scores,
    maps,
    target_fpr: float = DEFAULT_IMAGE_FPR,
    pixel_fpr: float = DEFAULT_PIXEL_FPR,
    source: str = "validation",
    confidence: float = DEFAULT_CONFIDENCE,
) -> Thresholds:
    """Image threshold from the fitted tail; pixel threshold and normalization from normal maps.

    Pixels are plentiful (thousands per image), so their (1 - pixel_fpr) quantile is kept as is.
    """
    if not 0.0 < pixel_fpr < 1.0:
        raise ThresholdEstimateError(f"pixel false-positive rate must be in (0, 1), got {pixel_fpr}")
    scores = np.asarray(scores, dtype=np.float64).ravel()
    pixels = np.asarray(maps, dtype=np.float32).ravel()
    image, fit = image_threshold(scores, target_fpr, confidence)
    if pixels.size == 0 or not np.all(np.isfinite(pixels)):
        raise ThresholdEstimateError("normal anomaly maps are empty or not finite")
    return Thresholds(
        image=image,
        pixel=float(np.quantile(pixels, 1.0 - pixel_fpr)),
        image_min=float(scores.min()),
        image_max=float(max(scores.max(), image)),
        pixel_min=float(pixels.min()),
        pixel_max=float(pixels.max()),
        target_fpr=float(target_fpr),
        source=source,
        fit=fit.to_dict(),
    )
