"""Round 10 probe: a patch memory on frozen backbone taps, measured the way training measures its models.

    python -m benchmarks.patch_memory --data-root ../shared/data/mvtec_ad --category screw \
        [--image-size 512] [--bank-fraction 0.003] [--gain-copies 1] [--seeds 0,1,2] [--folds 5]

Exploratory, like rounds 8-9 (docs/TRAINING.md): not a model the package trains or exports. Each
image's stride-8 and stride-16 taps are averaged over 3x3 neighbours and concatenated on the stride-8
grid (PatchCore's locally aware patches); the memory is a greedy k-centre coreset of a random pool of
the training images' patches (100k: selecting over all of them is hours on 2 cores; the seed draws
the pool, the projection and the first pick); the map is each patch's distance to its nearest memory
patch, the image score its blurred maximum (`training.models.image_score`). A patch matches anywhere,
so the part's pose needs no posed copies. `--gain-copies N` (default 0) adds N copies of each training
image at a random global gain (`--gain-range`) to the memory, so that a lighting change is normal:
tried because screw's `test/good` is darker than its `train/good` (docs/TRAINING.md, round 10), a
reason read off the test split.

Reported per coreset seed, on the run's own split and preprocessing: the synthetic validation AUROC
(the selection signal), test image AUROC, and F1 / false-positive rate / recall at the threshold the
one estimator (`edge_ad.decide.thresholds`) fits on the validation scores. With `--folds K` also at
the threshold fitted on out-of-fold scores of all training + validation images (each scored by a
memory built without its fold; the test is then scored by a memory of all of them). The last column,
the recall reachable with at most one false alarm on `test/good`, reads the test split's own
scores: an analysis of where a model's front lies, never a choice. Image-level figures only.
Writes `benchmarks/results/patch_memory-<category>-<size>px-gain<copies>.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edge_ad.decide.thresholds import image_threshold
from edge_ad.ops.tool_cli import run_tool
from training.backbones import build_backbone
from training.config import DfmConfig
from training.metrics import compute_metrics, image_auroc
from training.models.image_score import ImageScore
from training.models.patch_memory import greedy_coreset as coreset, locally_aware_patches, patch_rows
from training.models.patch_memory.coreset import POOL
from training.models.patch_memory.torch_model import nearest_distance
from training.pipeline import loader, prepare_data, seed_everything, synthetic_validation

log = logging.getLogger("benchmarks.patch_memory")
RESULTS = Path(__file__).parent / "results"


@dataclass
class Features:
    patches: torch.Tensor  # (N, C, h, w) float16
    labels: np.ndarray


@torch.no_grad()
def extract(extractor, batches, gain_range: tuple[float, float] | None = None, seed: int = 0,
            desc: str = "features") -> Features:
    """Patches of every image, kept in float16: at 512 px they are 2 MB an image in float32."""
    generator = torch.Generator().manual_seed(seed)
    patches, labels = [], []
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
        images = batch["image"]
        if gain_range is not None:
            low, high = gain_range
            gain = low + (high - low) * torch.rand(len(images), 1, 1, 1, generator=generator)
            images = (images * gain).clamp(0.0, 1.0)
        patches.append(locally_aware_patches(extractor(images)).half())
        labels.append(batch["label"].numpy())
    return Features(torch.cat(patches), np.concatenate(labels))


def greedy_coreset(patches: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """The package's coreset (the memory term's), with this probe's option named in its error."""
    try:
        return coreset(patches, size, seed, pool=POOL)
    except ValueError as exc:
        raise ValueError(f"{exc} (here: lower --bank-fraction)") from None


def nearest_distance_map(patches: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) patches -> (N, 1, h, w) distance to the nearest memory patch, a few images at a time
    (all of them at once would hold N x h*w x memory distances)."""
    return torch.cat([nearest_distance(chunk.float(), memory) for chunk in patches.split(4)])


def scores_of(patches: torch.Tensor, memory: torch.Tensor, image_score: ImageScore) -> np.ndarray:
    """Image scores as a model's graph would give them: the blurred map's maximum."""
    return image_score(nearest_distance_map(patches, memory))[1].numpy()


def recall_at_one_false_alarm(labels: np.ndarray, scores: np.ndarray) -> float:
    """Share of anomalous images above the second-highest normal score (analysis of the front only)."""
    normal = np.sort(scores[labels == 0])
    cut = normal[-2] if len(normal) > 1 else -np.inf
    return float(np.mean(scores[labels == 1] > cut))


def at_threshold(labels: np.ndarray, scores: np.ndarray, normal_scores: np.ndarray, target_fpr: float,
                 confidence: float) -> dict:
    """The test figures at the threshold the one estimator fits on `normal_scores`."""
    threshold, _ = image_threshold(np.asarray(normal_scores, dtype=np.float64), target_fpr, confidence)
    metrics = compute_metrics(labels, scores, threshold)
    return {"threshold": threshold, "f1": metrics.image_f1_deployed, "fpr": metrics.fpr_deployed,
            "recall": metrics.recall_deployed}


def out_of_fold_scores(patches: torch.Tensor, memory_of, folds: int, seed: int,
                       image_score: ImageScore) -> np.ndarray:
    """Each normal image scored by a memory built without its fold (`memory_of(indices)`): normal scores
    of every image, as unseen as the validation images' are, for a threshold fitted on far more of them."""
    fold_of = np.random.default_rng(seed).permutation(np.arange(len(patches)) % folds)
    scores = np.zeros(len(patches))
    for fold in range(folds):
        held_out = fold_of == fold
        scores[held_out] = scores_of(patches[held_out], memory_of(np.where(~held_out)[0]), image_score)
    return scores


def evaluate(data_root: str, category: str, backbone: str = "mobilenet_v2", image_size: int = 512,
             bank_fraction: float = 0.003, gain_copies: int = 0, gain_range: tuple[float, float] = (0.88, 1.12),
             seeds: tuple[int, ...] = (0,), folds: int = 0, smooth_sigma: float = 1.0) -> dict:
    if not 0.0 < bank_fraction <= 1.0:
        raise ValueError(f"--bank-fraction must be in (0, 1], got {bank_fraction}")
    if gain_copies < 0 or not 0.0 < gain_range[0] <= gain_range[1]:
        raise ValueError(f"--gain-copies must be >= 0 and --gain-range LOW,HIGH with 0 < LOW <= HIGH, got "
                         f"{gain_copies} and {gain_range}")
    if folds == 1 or folds < 0:
        raise ValueError(f"--folds must be 0 (off) or at least 2, got {folds}")
    # One defective copy per validation image: the signal its stored results (round 10) were measured with.
    config = DfmConfig(category=category, data_root=data_root, backbone=backbone, image_size=image_size,
                       synthetic_copies=1)
    seed_everything(config.seed)
    data = prepare_data(config)
    extractor = build_backbone(backbone).eval()
    image_score = ImageScore(smooth_sigma=smooth_sigma)
    normals = data.train + data.validation  # the out-of-fold threshold's images; the first len(train) are training
    identity = extract(extractor, loader(normals, data, config), desc="normal images")
    # Gain copies of the validation images feed only the out-of-fold memories: without folds they are not made.
    gain_images = normals if folds else data.train
    gained = [extract(extractor, loader(gain_images, data, config), gain_range, seed=copy, desc=f"gain copy {copy + 1}")
              for copy in range(gain_copies)]
    synthetic = extract(extractor, synthetic_validation(data, config), desc="synthetic validation")
    test = extract(extractor, loader(data.test, data, config), desc="test")
    patches_per_image = identity.patches.shape[-2] * identity.patches.shape[-1]

    def memory_of(indices: np.ndarray, seed: int) -> torch.Tensor:
        """Coreset of these normal images' patches and of their gain copies."""
        chosen = [identity.patches[indices]] + [copy.patches[indices] for copy in gained]
        size = max(1, int(bank_fraction * len(indices) * patches_per_image))
        return greedy_coreset(patch_rows(torch.cat(chosen)).float(), size, seed)

    n_train = len(data.train)
    rows = []
    for seed in seeds:
        memory = memory_of(np.arange(n_train), seed)
        synthetic_scores = scores_of(synthetic.patches, memory, image_score)
        validation_scores = synthetic_scores[synthetic.labels == 0]
        test_scores = scores_of(test.patches, memory, image_score)
        row = {
            "seed": seed, "memory_patches": int(len(memory)),
            "synthetic_validation_auroc": image_auroc(synthetic.labels, synthetic_scores),
            "image_auroc": image_auroc(test.labels, test_scores),
            "deployed": at_threshold(test.labels, test_scores, validation_scores, config.target_fpr,
                                     config.threshold_confidence),
            "recall_at_one_false_alarm": recall_at_one_false_alarm(test.labels, test_scores),
        }
        if folds:
            out_of_fold = out_of_fold_scores(identity.patches, lambda indices: memory_of(indices, seed), folds, seed,
                                             image_score)
            all_scores = scores_of(test.patches, memory_of(np.arange(len(normals)), seed), image_score)
            row["out_of_fold"] = {
                "image_auroc": image_auroc(test.labels, all_scores),
                **at_threshold(test.labels, all_scores, out_of_fold, config.target_fpr, config.threshold_confidence),
                "recall_at_one_false_alarm": recall_at_one_false_alarm(test.labels, all_scores),
            }
        log.info("seed %d: %s", seed, row)
        rows.append(row)
    return {"category": category, "backbone": backbone, "image_size": image_size, "bank_fraction": bank_fraction,
            "gain_copies": gain_copies, "gain_range": list(gain_range), "folds": folds, "smooth_sigma": smooth_sigma,
            "n_train": n_train, "n_validation": len(data.validation), "rows": rows}


def table(result: dict) -> str:
    lines = ["| seed | memory patches | synthetic val AUROC | test image AUROC | F1 / FPR / recall deployed "
             "| recall at <= 1 false alarm | out-of-fold threshold: AUROC, F1 / FPR / recall |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        d = row["deployed"]
        oof = row.get("out_of_fold")
        oof_text = "" if oof is None else f"{oof['image_auroc']:.3f}, {oof['f1']:.2f} / {oof['fpr']:.2f} / {oof['recall']:.2f}"
        lines.append(f"| {row['seed']} | {row['memory_patches']} | {row['synthetic_validation_auroc']:.3f} "
                     f"| {row['image_auroc']:.3f} | {d['f1']:.2f} / {d['fpr']:.2f} / {d['recall']:.2f} "
                     f"| {row['recall_at_one_false_alarm']:.2f} | {oof_text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--category", default="screw")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--bank-fraction", type=float, default=0.003, help="memory size, share of training patches")
    parser.add_argument("--gain-copies", type=int, default=0, help="brightness-jittered copies per training image")
    parser.add_argument("--gain-range", default="0.88,1.12", help="LOW,HIGH of the random global gain")
    parser.add_argument("--seeds", default="0", help="comma list of coreset seeds")
    parser.add_argument("--folds", type=int, default=0, help="K for the out-of-fold threshold (0: off)")
    parser.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/patch_memory-...)")
    args = parser.parse_args(argv)

    def go() -> None:
        try:
            gain_range = tuple(float(v) for v in args.gain_range.split(","))
            seeds = tuple(int(s) for s in args.seeds.split(","))
        except ValueError:
            raise ValueError(f"--gain-range must be LOW,HIGH and --seeds a comma list of integers, got "
                             f"{args.gain_range!r} and {args.seeds!r}") from None
        if len(gain_range) != 2:
            raise ValueError(f"--gain-range must be LOW,HIGH, got {args.gain_range!r}")
        result = evaluate(args.data_root, args.category, args.backbone, args.image_size, args.bank_fraction,
                          args.gain_copies, gain_range, seeds, args.folds)
        out = args.out or RESULTS / f"patch_memory-{args.category}-{args.image_size}px-gain{args.gain_copies}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(table(result))
        print(f"written: {out}")

    return run_tool(go, (ValueError, FileNotFoundError))


if __name__ == "__main__":
    raise SystemExit(main())
