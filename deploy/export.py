"""Export a training run to an OpenVINO bundle: python -m deploy.export RUN_DIR --out BUNDLE_DIR

The bundle is what an edge PC runs: model.xml/model.bin plus bundle.json with the
preprocessing, raw thresholds and normalization statistics, training details, the
metrics of the PyTorch model and of the exported IR on the same test images, the
library versions and a sha256 of each model file (see edge_ad/model/bundle.py).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import platform
import sys
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from torch import nn

import edge_ad
from deploy.ir_eval import INPUT_NAME, MAP_OUTPUT, SCORE_OUTPUT, IrError, IrRunner, predict_ir
from deploy.precision_check import check_bf16, not_verified, validation_images
from edge_ad.model.bundle import BUNDLE_FILE, Bundle, ModelInfo, Thresholds, TrainingInfo, validation_seed, write_bundle
from edge_ad.model.signing import add_sign_key_option, signing
from edge_ad.model.preprocess import PreprocessSpec

log = logging.getLogger("deploy")

PRECISIONS = ("fp32", "fp16")
MODEL_XML = "model.xml"
MODEL_BIN = "model.bin"
# Export refuses an IR whose maps differ from PyTorch by more than this (max |ov - torch| / max |torch|).
# FP32 measures ~1e-6; FP16 weights are rounded to 11 significant bits.
PARITY_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}
PARITY_IMAGES = 4


class ExportError(RuntimeError):
    """A run that cannot be exported as asked; the message says why."""


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ExportError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r} "
            "(INT8 bundles come from python -m calibration.quantize on an FP32 bundle)"
        )
    return precision


def convert(model: nn.Module, spec: PreprocessSpec, dynamic_batch: bool = False) -> ov.Model:
    """The model module -> ov.Model with input `image` and outputs `anomaly_map`, `score`.

    openvino.convert_model takes the torch module directly (its PyTorch frontend reads the
    TorchScript trace): no ONNX intermediate means one exporter less whose op translation
    could differ, no onnx dependency, and parity is measured end to end between the very
    module that was trained and the IR. We trace ourselves only to skip torch's trace
    check (it re-runs the model twice: ~40 % of the export time on a 2-core PC); the
    parity check after export compares the IR with the module, which is the stronger test.
    """
    model = model.eval()
    batch = -1 if dynamic_batch else 1
    example = torch.rand(1, 3, spec.height, spec.width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.trace is deprecated": still what OpenVINO reads
        # e.g. DFM's n_components read as a Python int: a constant of the fitted model, and the
        # parity check after export would catch any trace that does not generalize to real images.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        ov_model = ov.convert_model(traced, example_input=example, input=[(batch, 3, spec.height, spec.width)])
    if len(ov_model.inputs) != 1 or len(ov_model.outputs) != 2:
        raise ExportError(
            f"expected forward(images) -> (anomaly_map, score); the converted graph has "
            f"{len(ov_model.inputs)} inputs and {len(ov_model.outputs)} outputs"
        )
    ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})
    ov_model.get_parameters()[0].set_friendly_name(INPUT_NAME)
    for output, name in zip(ov_model.outputs, (MAP_OUTPUT, SCORE_OUTPUT)):
        output.get_tensor().set_names({name})
        output.get_node().set_friendly_name(name)
    map_rank = ov_model.outputs[0].get_partial_shape().rank.get_length()
    score_rank = ov_model.outputs[1].get_partial_shape().rank.get_length()
    if map_rank != 4 or score_rank != 1:
        raise ExportError(f"expected anomaly_map (N,1,H,W) and score (N,); got ranks {map_rank} and {score_rank}")
    return ov_model


def export_ir(
    model: nn.Module,
    spec: PreprocessSpec,
    xml_path: str | Path,
    precision: str = "fp32",
    dynamic_batch: bool = False,
) -> Path:
    """Write model.xml/.bin; static 1x3xHxW input unless dynamic_batch (then ?x3xHxW).

    fp16 stores weights as float16 (half the file); OpenVINO decompresses or runs them
    natively depending on the device. Inputs and outputs stay float32 either way.
    """
    check_precision(precision)
    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov_model = convert(model, spec, dynamic_batch=dynamic_batch)
    ov.save_model(ov_model, str(xml_path), compress_to_fp16=(precision == "fp16"))
    return xml_path


@dataclass
class Parity:
    """How far an IR is from its PyTorch module on the same inputs."""

    max_rel_map_error: float  # max |ov - torch| / max |torch| over all map pixels
    max_rel_score_error: float
    same_ranking: bool  # image scores sort the images the same way
    n_images: int


@torch.no_grad()
def parity(model: nn.Module, runner: IrRunner, images: np.ndarray) -> Parity:
    """Run torch and the IR on the same NCHW batch and compare."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    torch_map, torch_score = model.eval()(torch.from_numpy(images))
    torch_map = torch_map[:, 0].double().numpy()
    torch_score = torch_score.double().numpy()
    ov_map, ov_score = runner.infer(images)
    map_error = float(np.max(np.abs(ov_map - torch_map)) / max(np.max(np.abs(torch_map)), 1e-30))
    score_error = float(np.max(np.abs(ov_score - torch_score)) / max(np.max(np.abs(torch_score)), 1e-30))
    same = bool(np.array_equal(np.argsort(torch_score, kind="stable"), np.argsort(ov_score, kind="stable")))
    return Parity(map_error, score_error, same, len(images))


def library_versions() -> dict[str, str]:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "edge-ad": edge_ad.__version__,
        "torch": torch.__version__,
        "openvino": ov.get_version(),
        "nncf": version("nncf"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def torch_metrics(run_metrics: dict) -> dict:
    """The test metrics of a run's metrics.json (same keys the IR measurement produces)."""
    from training.metrics import Metrics

    keys = [f.name for f in fields(Metrics)]
    missing = [k for k in keys if k not in run_metrics]
    if missing:
        raise ExportError(f"metrics.json lacks {', '.join(missing)}; was the run written by this version of training?")
    result = {k: run_metrics[k] for k in keys}
    if "data_fingerprint" in run_metrics:
        result["data_fingerprint"] = run_metrics["data_fingerprint"]
    return result


def build_bundle_metadata(
    config: dict,
    run_metrics: dict,
    precision: str,
    measured: dict[str, dict] | None = None,
) -> Bundle:
    """Bundle description from a run's config.json and metrics.json (+ re-measured IR metrics)."""
    check_precision(precision)
    if "thresholds" not in run_metrics:
        raise ExportError("metrics.json has no thresholds; re-run training with this version")
    try:
        thresholds = Thresholds(**run_metrics["thresholds"])
        training = TrainingInfo(
            category=config["category"],
            data_root=str(config["data_root"]),
            data_fingerprint=str(run_metrics.get("data_fingerprint", "")),
            epochs=config.get("epochs"),
            seed=int(config["seed"]),
            image_size=int(config["image_size"]),
            validation_fraction=float(config["validation_fraction"]),
            config=dict(config),
        )
        model = ModelInfo(algorithm=config["algorithm"], backbone=config["backbone"], precision=precision, xml=MODEL_XML, bin=MODEL_BIN)
    except (KeyError, TypeError) as exc:
        raise ExportError(f"run config/metrics incomplete: {exc}") from exc
    return Bundle(
        model=model,
        preprocess=PreprocessSpec.square(int(config["image_size"]), config.get("fit", "stretch")),
        thresholds=thresholds,
        training=training,
        metrics={"torch": torch_metrics(run_metrics), **(measured or {})},
        calibration=None,
        versions=library_versions(),
    )


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Fail before the slow part: a bundle folder is never overwritten by accident."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output path exists and is not a folder: {out_dir}")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"output folder is not empty: {out_dir} (use --force to overwrite its bundle files)")


def prepare_out_dir(out_dir: Path, force: bool) -> None:
    check_out_dir(out_dir, force)
    for name in (BUNDLE_FILE, MODEL_XML, MODEL_BIN):  # only our files: never wipe a whole folder
        (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _resolve_data_root(config: dict, data_root: str | Path | None) -> Path | None:
    """The data root to measure on: an explicit one must exist; the run's own may be gone (other PC)."""
    category = str(config.get("category", ""))
    if data_root is not None:
        root = Path(data_root).expanduser()
        if not (root / category).is_dir():
            raise ExportError(f"--data-root {root} has no category folder {category!r}")
        return root
    root = Path(str(config.get("data_root", ""))).expanduser()
    return root if str(root) and (root / category).is_dir() else None


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    precision: str = "fp32",
    measure: bool = True,
    force: bool = False,
    data_root: str | Path | None = None,
) -> Path:
    """Run folder -> bundle folder; returns the bundle folder.

    Checks parity on a few images (test images when the data is reachable, random
    ones otherwise) and refuses an IR that disagrees with PyTorch. With `measure`
    and the data root reachable, the IR's metrics are re-measured on the run's test split.
    """
    from training.data import load_category, data_fingerprint
    from training.run_dir import METRICS_FILE, load_model, read_json

    check_precision(precision)
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_out_dir(out_dir, force)
    model, config = load_model(run_dir)
    run_metrics = read_json(run_dir, METRICS_FILE)
    spec = PreprocessSpec.square(int(config["image_size"]), config.get("fit", "stretch"))
    root = _resolve_data_root(config, data_root)
    prepare_out_dir(out_dir, force)

    started = time.perf_counter()
    log.info("exporting %s/%s (%s) at %dx%d to %s IR", config["algorithm"], config["backbone"], config["category"], spec.width, spec.height, precision)
    xml = export_ir(model, spec, out_dir / MODEL_XML, precision=precision)
    log.info("wrote %s and %s (%.1f MB) in %.1f s", xml.name, MODEL_BIN, (out_dir / MODEL_BIN).stat().st_size / 1e6, time.perf_counter() - started)
    runner = IrRunner.open(xml)

    category = None
    if root is not None:
        category = load_category(root, config["category"])
    else:
        log.warning("data root %s/%s not found: parity checked on random images, IR metrics not measured (pass --data-root)", config.get("data_root"), config.get("category"))

    if category is not None:
        from training.data import AnomalyDataset

        picks = category.test[:: max(1, len(category.test) // PARITY_IMAGES)][:PARITY_IMAGES]
        dataset = AnomalyDataset(picks, spec, cache=False)
        images = np.stack([dataset[i]["image"].numpy() for i in range(len(dataset))])
    else:
        images = np.random.default_rng(0).random((PARITY_IMAGES, 3, spec.height, spec.width), dtype=np.float32)
    check = parity(model, runner, images)
    log.info("parity on %d images: max rel map error %.2e, max rel score error %.2e", check.n_images, check.max_rel_map_error, check.max_rel_score_error)
    if check.max_rel_map_error > PARITY_TOLERANCE[precision] or check.max_rel_score_error > PARITY_TOLERANCE[precision]:
        raise ExportError(
            f"the {precision} IR disagrees with PyTorch: max relative error {max(check.max_rel_map_error, check.max_rel_score_error):.2e} "
            f"> {PARITY_TOLERANCE[precision]:.0e}; not writing bundle.json"
        )

    measured: dict[str, dict] = {}
    checks = {"bf16": not_verified("not verified: the IR was not measured (--no-measure or no data)")}
    if measure and category is not None:
        from training.pipeline import test_metrics

        thresholds = run_metrics.get("thresholds") or {}
        image_threshold = float(thresholds.get("image", np.inf))
        predictions = predict_ir(runner, category.test, spec, desc=f"{precision} IR test")
        metrics = test_metrics(predictions, image_threshold, category.has_masks)
        fingerprint = data_fingerprint(category.train + category.test)
        metrics["data_fingerprint"] = fingerprint
        if fingerprint != run_metrics.get("data_fingerprint"):
            log.warning("the data under %s changed since training (fingerprint %s, run had %s): IR and torch metrics are not comparable", root, fingerprint, run_metrics.get("data_fingerprint"))
        metrics["parity_max_rel_map_error"] = check.max_rel_map_error
        measured[f"{precision}_ir"] = metrics
        pixel = metrics["pixel_auroc"]
        log.info(
            "%s IR: image AUROC %.4f (torch %.4f), pixel AUROC %s",
            precision, metrics["image_auroc"], run_metrics.get("image_auroc", float("nan")), "n/a" if pixel is None else f"{pixel:.4f}",
        )
        val_images = validation_images(category.train, float(config["validation_fraction"]), validation_seed(config), spec)
        _, val_scores = runner.infer(val_images)
        checks["bf16"] = check_bf16(xml, category.test, val_images, spec, image_threshold, category.has_masks,
                                    predictions, val_scores)
    elif not measure:
        log.info("--no-measure: IR metrics not measured")

    bundle = build_bundle_metadata(config, run_metrics, precision, measured)
    bundle.precision_checks = checks
    path = write_bundle(out_dir, bundle)
    log.info("wrote %s in %.1f s", path, time.perf_counter() - started)
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.export",
        description="Export a training run folder to an OpenVINO bundle (model.xml, model.bin, bundle.json).",
    )
    parser.add_argument("run_dir", type=Path, help="training run folder (model.pt, config.json, metrics.json)")
    parser.add_argument("--out", required=True, type=Path, help="bundle folder to write (must be empty or new)")
    parser.add_argument("--precision", default="fp32", help="fp32 (default) or fp16 weights")
    parser.add_argument("--no-measure", action="store_true", help="skip re-measuring the IR on the test split")
    parser.add_argument("--data-root", type=Path, default=None, help="data root if it moved since training (default: the run's)")
    parser.add_argument("--force", action="store_true", help="overwrite the bundle files in a non-empty --out folder")
    add_sign_key_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from edge_ad.sources.images import ImageReadError
    from training.data import DatasetError
    from training.run_dir import RunDirError

    from edge_ad.ops.tool_cli import run_tool

    args = build_parser().parse_args(argv)

    def export() -> Path:
        check_precision(args.precision)
        return export_run(args.run_dir, args.out, args.precision, measure=not args.no_measure, force=args.force,
                          data_root=args.data_root)

    return run_tool(signing(export, args.sign_key),
                    (ExportError, IrError, RunDirError, DatasetError, ImageReadError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
