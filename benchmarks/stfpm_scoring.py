"""Scoring levers of one trained STFPM run, chosen on synthetic validation defects, measured on test.

    python -m benchmarks.stfpm_scoring RUN_DIR [--data-root ROOT] [--defect-strength 0.3] [--defect-kinds warp]
        [--memory-weights 0,1,2,4] [--memory-fusions map,score] [--run-scoring-only] [--synthetic-copies 4]
        [--memory-fractions 0.003,0.01 --memory-seeds 0,1,2]

Which taps make the map, product or sum, max or top-k mean, smoothing: none of them changes the
trained weights, so the per-tap discrepancy maps are computed once per image and every variant is
scored from them. A run with a subspace term (`--subspace-weight`) keeps it in every variant, each
term's scale recomputed on validation normals for the variant's map as training does. The variants are ranked by the synthetic validation AUROC (validation images
against defective copies of themselves, `training.data.synthetic_defects`); the test columns are
measured beside it and never rank anything. `--defect-strength` (fainter) and `--defect-kinds`
(e.g. `warp`, shape only) change the synthetic defects, to see whether the ranking holds for defects
more like real ones. `--memory-weights` scores a memory-term run (`--memory-weight`) at other weights too (same student,
memory and scales); `--memory-fusions` scores a memory-term run with the other way the memory joins the image
score too (`StfpmModel.memory_fusion`). `--run-scoring-only` keeps the run's own taps, combine, score and sigma, so
the weight and fusion variants take minutes. `--synthetic-copies N` draws N defective copies of each validation
image (each its own seed and kind; default: as many as the run's own signal, 1 for runs before the setting), so the
synthetic recall moves in steps of 1/(validation images x N). Every variant's threshold is fitted on the validation
scores alone: a run trained with `--threshold-folds` also fitted its own on out-of-fold training scores, which
would need its fold models again, so its deployed columns here differ from its metrics.json.
`--memory-fractions` / `--memory-seeds` refit a memory-term run's memory (`training.stfpm.fit_memory`: the coreset's
size and seed; same student) for each combination and score every variant with each, to see how much of a memory
run's result is its coreset draw (the student's and subspace's maps and each image's memory patches are taken once;
a refit recomputes only the distances: three refits of round 11's screw run at weight 4, `--run-scoring-only`, took
167 s instead of 214 s on a 2-core AMD EPYC, with the same rows). Writes `benchmarks/results/stfpm_scoring-<run>[-s<strength>][-<kinds>][-c<copies>]
[-memory<weights>][-fusion<fusions>][-fraction<fractions>][-seed<seeds>][-own].json`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from edge_ad.decide.thresholds import estimate_thresholds
from edge_ad.ops.tool_cli import run_tool
from training.config import StfpmConfig
from training.data.synthetic_defects import ALL_KINDS, KINDS
from training.metrics import compute_metrics, image_auroc, rates_at
from training.models.image_score import ImageScore
from training.models.patch_memory.torch_model import locally_aware_patches
from training.models.stfpm.anomaly_map import tap_distance
from training.models.stfpm.torch_model import FUSIONS, fuse_terms, term_scales
from training.pipeline import loader, prepare_data, resolve_device, synthetic_validation
from training.run_dir import load_model
from training.stfpm import fit_memory, memory_patches

log = logging.getLogger("benchmarks.stfpm_scoring")
RESULTS = Path(__file__).parent / "results"
TAP_SETS = [(0, 1, 2), (0, 1), (1, 2), (0, 2), (0,), (1,), (2,)]
COMBINES = ("product", "sum")
SCORES = [("max", 0.01), ("topk", 0.01), ("topk", 0.001)]
SIGMAS = (0.0, 4.0)


@torch.no_grad()
def tap_maps(model, batches, device, keep_memory_patches: bool = False) -> dict:
    """(N, taps, H, W) per-tap discrepancy maps at input size, the unscaled maps of the run's other terms
    (subspace, memory), labels and the masks of `batches`; with keep_memory_patches also each batch's memory
    patches (`memory_map` then scores them against a refitted memory without the student or the subspace)."""
    maps, extra_terms, labels, masks, patches = [], [], [], [], []
    for batch in tqdm(batches, desc="tap maps", unit="batch", leave=False):
        images = batch["image"].to(device)
        teacher, student = model.features(images)
        per_tap = [F.interpolate(tap_distance(t, s), size=images.shape[-2:], mode="bilinear", align_corners=False)
                   for t, s in zip(teacher, student)]
        maps.append(torch.cat(per_tap, dim=1).cpu())
        extra_terms.append([term.cpu() for term in model.term_maps_from_features(teacher, student, images)[1:]])
        labels.append(batch["label"].numpy())
        masks.append(batch["mask"][:, 0].numpy().astype(np.uint8))
        if keep_memory_patches:
            patches.append(locally_aware_patches(model.teacher(images)).cpu())  # the full input, as the term sees it
    return {"maps": torch.cat(maps), "terms": [torch.cat(parts) for parts in zip(*extra_terms)],
            "labels": np.concatenate(labels), "masks": np.concatenate(masks), "memory_patches": patches,
            "size": tuple(maps[0].shape[-2:])}


@torch.no_grad()
def memory_map(model, maps: dict, device) -> torch.Tensor:
    """The memory term's map of the images behind `maps` (their kept patches) against the model's memory now."""
    return torch.cat([model.memory.error_map_of_patches(patches.to(device), maps["size"]).cpu()
                      for patches in maps["memory_patches"]])


def combine(per_tap: torch.Tensor, taps, how: str) -> torch.Tensor:
    chosen = per_tap[:, list(taps)]
    return (chosen.prod(dim=1) if how == "product" else chosen.sum(dim=1)).unsqueeze(1)


def score(maps: dict, taps, how: str, scorer: ImageScore, scales: list[float] | None = None,
          weights: list[float] | None = None, fusion: str = "map") -> tuple[np.ndarray, np.ndarray]:
    """The variant's map and image scores; with other terms, fused with it as the model does."""
    amap = combine(maps["maps"], taps, how)
    if maps["terms"]:
        amap, image_score = fuse_terms([amap, *maps["terms"]], scales, weights, scorer, fusion == "score")
    else:
        amap, image_score = scorer(amap)
    return amap[:, 0].numpy(), image_score.numpy()


def variant_scales(maps: dict, taps, how: str, scorer: ImageScore) -> list[float] | None:
    """Each term's scale, as training sets them, recomputed for the variant's own map."""
    if not maps["terms"]:
        return None
    return term_scales(scorer, combine(maps["maps"], taps, how), *maps["terms"]).tolist()


def term_weights(model, memory_weight: float | None) -> list[float]:
    """The run's term weights (`StfpmModel.term_weights`), the memory's (the last) replaced by `memory_weight`."""
    weights = model.term_weights
    return weights if memory_weight is None else weights[:-1] + [memory_weight]


def run_scoring(model) -> tuple[list, tuple[str], list[tuple[str, float]], tuple[float]]:
    """The run's own taps, combine, score and sigma, as one-entry variant lists."""
    scorer = model.image_score
    return [model.map_taps], (model.map_combine,), [(scorer.reduction, scorer.topk_fraction)], \
        (scorer.smooth_sigma,)


def evaluate(run_dir: Path, data_root: str | None, defect_strength: float = 1.0,
             defect_kinds: tuple[str, ...] = KINDS, memory_weights: tuple[float, ...] = (),
             fusions: tuple[str, ...] = (), run_scoring_only: bool = False, synthetic_copies: int | None = None,
             memory_fractions: tuple[float, ...] = (), memory_seeds: tuple[int, ...] = ()) -> dict:
    model, saved = load_model(run_dir)
    if memory_weights and model.memory is None:
        raise ValueError("--memory-weights needs a run with a memory term (--memory-weight > 0)")
    if fusions and model.memory is None:
        raise ValueError("--memory-fusions needs a run with a memory term (--memory-weight > 0)")
    if (memory_fractions or memory_seeds) and model.memory is None:
        raise ValueError("--memory-fractions and --memory-seeds need a run with a memory term (--memory-weight > 0)")
    if any(not 0.0 < fraction <= 1.0 for fraction in memory_fractions):
        raise ValueError(f"--memory-fractions must be in (0, 1], got {','.join(f'{f:g}' for f in memory_fractions)}")
    if any(weight < 0 for weight in memory_weights):
        raise ValueError(f"--memory-weights must be >= 0, got {','.join(f'{w:g}' for w in memory_weights)}")
    known = {f.name for f in fields(StfpmConfig)}
    config = StfpmConfig(**{k: v for k, v in saved.items() if k in known} | ({"data_root": data_root} if data_root else {}))
    # By default the run's own signal; runs written before the setting existed drew one copy.
    if synthetic_copies is None:
        synthetic_copies = saved.get("synthetic_copies", 1)
    device = resolve_device("cpu")
    data = prepare_data(config)
    model = model.to(device)
    batches = {"validation": loader(data.validation, data, config),
               "synthetic": synthetic_validation(data, config, defect_strength, defect_kinds, synthetic_copies),
               "test": loader(data.test, data, config)}
    refits = list(itertools.product(memory_fractions or (config.memory_fraction,), memory_seeds or (config.seed,))) \
        if memory_fractions or memory_seeds else [None]
    refitting = refits != [None]
    patches = memory_patches(model, data, config, device) if refitting else None  # the same for every refit
    # The student's and subspace's maps do not depend on the memory: taken once, with each image's memory patches.
    sets = {name: tap_maps(model, batch, device, keep_memory_patches=refitting) for name, batch in batches.items()}
    rows = []
    for refit in refits:
        if refit is not None:
            fit_memory(model, data, replace(config, memory_fraction=refit[0], seed=refit[1]), device, patches)
            for maps in sets.values():
                maps["terms"][-1] = memory_map(model, maps, device)  # the memory is the last term
        rows += score_variants(model, sets, config, data.has_masks, memory_weights, fusions, run_scoring_only, refit)
    rows.sort(key=lambda row: -row["synthetic_validation_auroc"])
    return {"run": str(run_dir), "category": config.category, "backbone": config.backbone,
            "defect_strength": defect_strength, "defect_kinds": list(defect_kinds), "synthetic_copies": synthetic_copies,
            "subspace_weight": model.subspace_weight, "memory_weight": model.memory_weight, "rows": rows}


def score_variants(model, sets: dict, config: StfpmConfig, has_masks: bool, memory_weights: tuple[float, ...],
                   fusions: tuple[str, ...], run_scoring_only: bool, refit: tuple[float, int] | None) -> list[dict]:
    """One row per scoring variant of the cached maps (`tap_maps`), with the memory they were computed with."""
    memory = {} if model.memory is None else {
        "memory_fraction": config.memory_fraction if refit is None else refit[0],
        "memory_seed": config.seed if refit is None else refit[1], "memory_size": model.memory.size}
    rows = []
    tap_sets, combines, scores, sigmas = run_scoring(model) if run_scoring_only else (TAP_SETS, COMBINES, SCORES, SIGMAS)
    for taps, how, (reduction, fraction), sigma, memory_weight, fusion in itertools.product(
            tap_sets, combines, scores, sigmas, memory_weights or (None,), fusions or (model.memory_fusion,)):
        if len(taps) == 1 and how == "sum":
            continue  # one tap: product and sum are the same map
        scorer = ImageScore(sigma, reduction, fraction)
        term = (variant_scales(sets["validation"], taps, how, scorer), term_weights(model, memory_weight))
        _, synthetic_scores = score(sets["synthetic"], taps, how, scorer, *term, fusion)
        val_maps, val_scores = score(sets["validation"], taps, how, scorer, *term, fusion)
        test_maps, test_scores = score(sets["test"], taps, how, scorer, *term, fusion)
        thresholds = estimate_thresholds(val_scores, val_maps, config.target_fpr, config.pixel_fpr,
                                         confidence=config.threshold_confidence)
        with_masks = has_masks and bool(sets["test"]["masks"].any())
        metrics = compute_metrics(sets["test"]["labels"], test_scores, thresholds.image,
                                  masks=sets["test"]["masks"] if with_masks else None,
                                  maps=test_maps if with_masks else None).to_dict()
        rows.append({
            "map_taps": ",".join(map(str, taps)), "map_combine": how, "score_reduction": reduction,
            "topk_fraction": fraction, "smooth_sigma": sigma, "memory_weight": term[1][-1] if model.memory else 0.0,
            "memory_fusion": fusion, **memory,
            "synthetic_validation_auroc": image_auroc(sets["synthetic"]["labels"], synthetic_scores),
            # the share of synthetic defects over the validation threshold: what a deployed F1 sees of them
            "synthetic_recall_deployed": rates_at(sets["synthetic"]["labels"], synthetic_scores, thresholds.image)[1],
            **{k: metrics[k] for k in ("image_auroc", "pixel_auroc", "image_f1_deployed", "fpr_deployed",
                                       "recall_deployed", "image_f1_optimal")},
        })
    return rows


def _cell(value, spec: str) -> str:
    """A table cell; blank for a column that results written before it lack."""
    return "" if value is None else format(value, spec)


def table(result: dict) -> str:
    lines = [f"STFPM {result['backbone']} {result['category']} ({result['run']}), ranked by synthetic validation AUROC"
             f" (defects {','.join(result['defect_kinds'])}, strength {result['defect_strength']:g},"
             f" {result.get('synthetic_copies', 1)} per validation image)",
             "| map taps | combine | score | sigma | memory weight | memory fusion | memory (share, seed) | synthetic val AUROC | synthetic recall deployed | test image AUROC | pixel AUROC | F1 / FPR / recall deployed |",
             "|---|---|---|---|---:|---|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        score_name = "max" if r["score_reduction"] == "max" else f"top {r['topk_fraction']:.1%}"
        pixel = "" if r["pixel_auroc"] is None else f"{r['pixel_auroc']:.3f}"
        memory = "" if r.get("memory_fraction") is None else f"{r['memory_fraction']:.1%}, {r['memory_seed']}"
        lines.append(f"| {r['map_taps']} | {r['map_combine']} | {score_name} | {r['smooth_sigma']:g} | {r.get('memory_weight', 0):g} | {r.get('memory_fusion', 'map')} | {memory} | "
                     f"{r['synthetic_validation_auroc']:.3f} | {_cell(r.get('synthetic_recall_deployed'), '.2f')} | {r['image_auroc']:.3f} | {pixel} | "
                     f"{r['image_f1_deployed']:.2f} / {r['fpr_deployed']:.2f} / {r['recall_deployed']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="an STFPM run folder (runs/stfpm-...)")
    parser.add_argument("--data-root", help="where the run's data lives now (default: the run's own)")
    parser.add_argument("--defect-strength", type=float, default=1.0,
                        help="contrast of the synthetic defects, (0, 1]; 1: the training default")
    parser.add_argument("--defect-kinds", default=",".join(KINDS),
                        help=f"comma list of {', '.join(ALL_KINDS)} (default: the training cycle)")
    parser.add_argument("--memory-weights", default="",
                        help="comma list of memory-term weights to score as variants too (default: the run's own)")
    parser.add_argument("--memory-fusions", default="",
                        help=f"comma list of {', '.join(FUSIONS)}: how the memory joins the image score (default: the run's own)")
    parser.add_argument("--synthetic-copies", type=int,
                        help="defective copies of each validation image (each its own seed and kind); default: as the run drew them")
    parser.add_argument("--memory-fractions", default="",
                        help="comma list of memory shares to refit a memory-term run's memory with (default: the run's own memory)")
    parser.add_argument("--memory-seeds", default="",
                        help="comma list of coreset seeds to refit the memory with (default: the run's seed)")
    parser.add_argument("--run-scoring-only", action="store_true",
                        help="score only the run's own taps, combine, score and sigma (the weight and fusion variants)")
    args = parser.parse_args(argv)

    def go() -> None:
        try:
            memory_weights = tuple(dict.fromkeys(float(w) for w in args.memory_weights.split(",") if w.strip()))
        except ValueError:
            raise ValueError(f"--memory-weights must be a comma list of numbers, got {args.memory_weights!r}") from None
        try:
            memory_fractions = tuple(dict.fromkeys(float(f) for f in args.memory_fractions.split(",") if f.strip()))
            memory_seeds = tuple(dict.fromkeys(int(s) for s in args.memory_seeds.split(",") if s.strip()))
        except ValueError:
            raise ValueError("--memory-fractions must be a comma list of numbers and --memory-seeds of integers, got "
                             f"{args.memory_fractions!r} and {args.memory_seeds!r}") from None
        kinds = tuple(k.strip() for k in args.defect_kinds.split(",") if k.strip())
        if not kinds or set(kinds) - set(ALL_KINDS):
            raise ValueError(f"--defect-kinds must list some of {', '.join(ALL_KINDS)}, got {args.defect_kinds!r}")
        if args.synthetic_copies is not None and args.synthetic_copies < 1:
            raise ValueError(f"--synthetic-copies must be >= 1, got {args.synthetic_copies}")
        fusions = tuple(dict.fromkeys(f.strip() for f in args.memory_fusions.split(",") if f.strip()))
        if set(fusions) - set(FUSIONS):
            raise ValueError(f"--memory-fusions must list some of {', '.join(FUSIONS)}, got {args.memory_fusions!r}")
        result = evaluate(args.run, args.data_root, args.defect_strength, kinds, memory_weights, fusions,
                          args.run_scoring_only, args.synthetic_copies, memory_fractions, memory_seeds)
        RESULTS.mkdir(exist_ok=True)
        suffix = ("" if args.defect_strength == 1.0 else f"-s{args.defect_strength:g}") + \
            ("" if kinds == KINDS else "-" + "+".join(kinds)) + \
            ("" if args.synthetic_copies is None else f"-c{args.synthetic_copies}") + \
            ("" if not memory_weights else "-memory" + "+".join(f"{w:g}" for w in memory_weights)) + \
            ("" if not fusions else "-fusion" + "+".join(fusions)) + \
            ("" if not memory_fractions else "-fraction" + "+".join(f"{f:g}" for f in memory_fractions)) + \
            ("" if not memory_seeds else "-seed" + "+".join(map(str, memory_seeds))) + ("-own" if args.run_scoring_only else "")
        (RESULTS / f"stfpm_scoring-{args.run.name}{suffix}.json").write_text(json.dumps(result, indent=1))
        print(table(result))

    return run_tool(go, (ValueError, FileNotFoundError))


if __name__ == "__main__":
    raise SystemExit(main())
