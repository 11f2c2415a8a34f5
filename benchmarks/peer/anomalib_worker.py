"""anomalib's side of the peer benchmark; runs inside anomalib's own venv, never in ours.

Why a separate process and venv: anomalib pins its own lightning/timm/torchmetrics stack, and the point of
the comparison is anomalib as its users install it. `benchmarks.peer_anomalib` writes a job JSON, runs

    ANOMALIB_VENV/bin/python benchmarks/peer/anomalib_worker.py JOB.json RESULT.json

and reads RESULT.json. For each variant in the job (algorithm + backbone, e.g. STFPM on MobileNetV2) this:
1. renames OUR ImageNet backbone weights (the same file our training reads) onto timm's module names and
   checks it: every tensor of the timm model assigned, shapes equal, and timm's features at the mapped taps
   equal to our torchvision/package backbone's (training.backbones from this checkout) on random input;
2. builds anomalib's Stfpm / Dfm with that timm backbone; its pretrained load (a model-hub download, which
   is unreachable here) is replaced by loading those weights, and the loaded teacher is compared again;
3. trains with Engine.fit on anomalib's MVTecAD datamodule pointed at our data (never downloads: the
   category folder must exist), CPU, timed (wall and process CPU), and tests (image / pixel AUROC);
4. exports with anomalib's own Engine.export to OpenVINO and times anomalib's OpenVINOInferencer.predict
   on every test image, end to end from the file path (PNG read, its pre-processing, inference, its
   post-processing), median frames per second over repeats after a warm-up; also from pre-read arrays
   (no file read), and the IR's image AUROC from the inferencer's own scores.
Errors end with a one-line message on stderr and exit code 2 (bad input) or 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class WorkerError(Exception):
    exit_code = 1


class WorkerInputError(WorkerError):
    exit_code = 2


def log(message: str) -> None:
    print(f"[anomalib worker] {message}", file=sys.stderr, flush=True)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- our weights onto timm ---------------------------------------------------------------------------------

def our_state_dict(backbone: str, weights_file: Path) -> dict:
    """Our backbone's ImageNet state dict with our own module names (torchvision's for mobilenet_v2)."""
    from training import backbones  # this checkout's loader: same file, same renaming as our training

    state = backbones._read_state_dict_file(weights_file, backbone)
    if backbone == "mobilenet_v2" and backbones._is_deep_sort_mobilenet_v2(state):
        state = backbones._deep_sort_to_torchvision_mobilenet_v2(state)
    return state


def timm_state_dict(backbone: str, weights_file: Path) -> dict:
    from benchmarks.peer.timm_names import rename_state_dict_keys

    state = our_state_dict(backbone, weights_file)
    names = rename_state_dict_keys(backbone, state)
    return {names[key]: value for key, value in state.items()}


def load_checked(model, state: dict, what: str) -> int:
    """Load `state` into a timm model: every tensor the model has must come from `state` with its shape.

    Keys of `state` the model lacks are allowed only for layers a features_only model drops (the head and
    stages after the last tap); returns the number of tensors assigned.
    """
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    if missing:
        raise WorkerError(f"{what}: {len(missing)} timm tensors have no counterpart in our weights, e.g. {missing[:3]}")
    shapes = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if shapes:
        raise WorkerError(f"{what}: shape mismatch for {shapes[:3]}")
    model.load_state_dict({k: state[k] for k in own}, strict=True)
    for key, value in model.state_dict().items():  # what is in the model now is ours, bit for bit
        if not value.equal(state[key].to(value.dtype)):
            raise WorkerError(f"{what}: {key} differs from our weights after loading")
    return len(own)


@contextlib.contextmanager
def offline_pretrained(timm_name: str, state: dict, loads: list):
    """While active, timm.create_model(timm_name, pretrained=True, ...) builds without its hub download and
    loads `state` (checked) instead; every other call is untouched (e.g. anomalib's random-init student)."""
    import timm

    original = timm.create_model

    def create_model(model_name, pretrained=False, *args, **kwargs):
        if not pretrained:
            return original(model_name, False, *args, **kwargs)
        if model_name != timm_name:
            raise WorkerError(f"anomalib asked timm for pretrained {model_name!r}, expected {timm_name!r}")
        kwargs.pop("pretrained_cfg", None)
        model = original(model_name, False, *args, **kwargs)
        loads.append(load_checked(model, state, f"pretrained {model_name}"))
        return model

    timm.create_model = create_model
    try:
        yield
    finally:
        timm.create_model = original


def check_features(backbone: str, weights_file: Path, taps: list[str], timm_taps: list[str], timm_model) -> dict:
    """Our backbone (this checkout's training.backbones) vs the timm model with mapped weights, same input."""
    import torch

    from training.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone

    ours = build_backbone(backbone, weights=weights_file).eval()
    if not set(taps) <= set(ours.spec.taps):
        raise WorkerError(f"{backbone}: taps {taps} are not among our backbone's {list(ours.spec.taps)}")
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 256, 256, generator=generator)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    timm_model = timm_model.eval()
    with torch.no_grad():
        reference = dict(zip(ours.spec.taps, ours(images)))
        reference = [reference[tap] for tap in taps]
        theirs = timm_model((images - mean) / std)
    if isinstance(theirs, dict):
        theirs = list(theirs.values())
    report = []
    for tap, timm_tap, a, b in zip(taps, timm_taps, reference, theirs, strict=True):
        if a.shape != b.shape:
            raise WorkerError(f"{backbone}: our {tap} gives {tuple(a.shape)}, timm {timm_tap} {tuple(b.shape)}")
        rel = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
        report.append({"ours": tap, "timm": timm_tap, "shape": list(a.shape), "max_rel_error": rel})
        if rel > 1e-4:
            raise WorkerError(f"{backbone}: timm {timm_tap} differs from our {tap} (max rel error {rel:.2e})")
    return {"taps": report, "max_rel_error": max(r["max_rel_error"] for r in report)}


def teacher_modules(algorithm: str, model) -> list:
    """The pretrained timm networks inside an anomalib model (STFPM teacher, DFM extractor)."""
    inner = model.model
    if algorithm == "stfpm":
        return [inner.teacher_model.feature_extractor]
    return [inner.feature_extractor.feature_extractor]


# -- data --------------------------------------------------------------------------------------------------

def test_images(root: Path, category: str) -> list[tuple[Path, int]]:
    test = root / category / "test"
    files = sorted(p for p in test.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise WorkerInputError(f"no test images under {test}")
    return [(p, 0 if p.parent.name == "good" else 1) for p in files]


# -- one variant -------------------------------------------------------------------------------------------

def run_variant(job: dict, variant: dict, work: Path) -> dict:
    import lightning
    import torch
    from anomalib.data import MVTecAD
    from anomalib.deploy import OpenVINOInferencer
    from anomalib.engine import Engine
    from anomalib.models import Dfm, Stfpm
    import timm

    from benchmarks.peer.timm_names import TIMM_MODEL, timm_tap

    algorithm, backbone = variant["algorithm"], variant["backbone"]
    name = f"{algorithm}-{backbone}-{job['category']}"
    timm_name = TIMM_MODEL.get(backbone)
    if timm_name is None:
        raise WorkerInputError(f"{name}: no timm counterpart for backbone {backbone!r}")
    taps = variant["taps"]
    timm_taps = [timm_tap(backbone, tap) for tap in taps]
    weights_file = Path(variant["weights_file"])
    log(f"{name}: our {backbone} weights from {weights_file} -> timm {timm_name}, taps {taps} -> {timm_taps}")
    state = timm_state_dict(backbone, weights_file)

    # 1. the mapping, checked on a bare timm feature extractor at the same taps
    probe = timm.create_model(timm_name, pretrained=False, features_only=True, exportable=True,
                              out_indices=_out_indices(timm, timm_name, timm_taps))
    probe_loaded = load_checked(probe, state, f"{timm_name} features")
    # the whole network up to its classifier (our weight files carry none): nothing left over either way
    full = timm.create_model(timm_name, pretrained=False, num_classes=0 if not any(k.startswith("classifier.") for k in state) else 1000)
    full_loaded = load_checked(full, state, timm_name)
    unused = sorted(set(state) - set(full.state_dict()))
    if unused:
        raise WorkerError(f"{name}: our weights have tensors timm's {timm_name} lacks: {unused[:3]}")
    features = check_features(backbone, weights_file, taps, timm_taps, probe)
    log(f"{name}: mapping complete ({full_loaded} tensors of {timm_name}, {probe_loaded} up to the last tap); "
        f"features equal ours, max rel error {features['max_rel_error']:.1e}")

    # 2. anomalib's model, its pretrained weights = ours
    lightning.seed_everything(job["seed"], workers=True)
    loads: list[int] = []
    with offline_pretrained(timm_name, state, loads):
        if algorithm == "stfpm":
            model = Stfpm(backbone=timm_name, layers=timm_taps, visualizer=False)
        elif algorithm == "dfm":
            if len(timm_taps) != 1:
                raise WorkerInputError(f"{name}: DFM takes one tap, got {taps}")
            model = Dfm(backbone=timm_name, layer=timm_taps[0], pre_trained=True,
                        pooling_kernel_size=variant["pool"], pca_level=variant["variance_ratio"],
                        score_type=variant["score_type"], visualizer=False)
        else:
            raise WorkerInputError(f"{name}: unknown algorithm {algorithm!r}")
    if not loads:
        raise WorkerError(f"{name}: anomalib built no pretrained timm model; our weights were not used")
    teacher_check = [check_features(backbone, weights_file, taps, timm_taps, m)["max_rel_error"]
                     for m in teacher_modules(algorithm, model)]
    log(f"{name}: anomalib {type(model).__name__} built with our weights ({loads} tensors loaded), "
        f"teacher features max rel error {max(teacher_check):.1e}")

    # 3. train and test on our data
    root = Path(job["data_root"])
    datamodule = MVTecAD(root=root, category=job["category"], train_batch_size=variant["batch_size"],
                         eval_batch_size=32, num_workers=0, seed=job["seed"])
    engine_kwargs = dict(accelerator="cpu", devices=1, default_root_dir=work / "results", logger=False,
                         enable_progress_bar=False, deterministic=False)
    if algorithm == "stfpm":
        engine_kwargs["max_epochs"] = variant["epochs"]
    engine = Engine(**engine_kwargs)
    log(f"{name}: Engine.fit ({variant.get('epochs') or 1} epoch(s), batch {variant['batch_size']}, CPU, "
        f"{torch.get_num_threads()} torch threads) ...")
    load_before = os.getloadavg()
    wall, cpu = time.monotonic(), cpu_seconds()
    engine.fit(model=model, datamodule=datamodule)
    train_wall, train_cpu = time.monotonic() - wall, cpu_seconds() - cpu
    load_after = os.getloadavg()
    log(f"{name}: trained in {train_wall:.0f} s ({train_cpu:.0f} CPU s); Engine.test ...")
    tested = engine.test(model=model, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in (tested[0] if tested else {}).items()}
    image_size = list(model.pre_processor.transform.transforms[0].size) if _has_resize(model) else None
    n_train = len(datamodule.train_data) if getattr(datamodule, "train_data", None) is not None else None

    # 4. export with anomalib's own export, time its inferencer
    log(f"{name}: image AUROC {metrics.get('image_AUROC', float('nan')):.4f}, pixel AUROC "
        f"{metrics.get('pixel_AUROC', float('nan')):.4f}; Engine.export to OpenVINO ...")
    xml, export_note = export_openvino(engine, model, work)
    inference = time_inferencer(OpenVINOInferencer, xml, test_images(root, job["category"]), job, work)
    log(f"{name}: OpenVINOInferencer {inference['fps_from_file']:.1f} fps from files "
        f"({inference['fps_from_array']:.1f} from pre-read arrays), IR image AUROC {inference['ir_image_auroc']:.4f}")
    return {
        "name": name, "algorithm": algorithm, "backbone": backbone, "timm_model": timm_name,
        "taps": taps, "timm_taps": timm_taps, "weights_file": str(weights_file),
        "mapping": {"tensors_full_model": full_loaded, "tensors_to_last_tap": probe_loaded,
                    "anomalib_pretrained_loads": loads, "features": features,
                    "anomalib_teacher_max_rel_error": max(teacher_check)},
        "image_size": image_size, "n_train_images": n_train, "batch_size": variant["batch_size"],
        "epochs": variant.get("epochs") if algorithm == "stfpm" else 1,
        "train_wall_s": round(train_wall, 1), "train_cpu_s": round(train_cpu, 1),
        "train_load_average": [list(load_before), list(load_after)],
        "test_metrics": metrics, "image_auroc": metrics.get("image_AUROC"), "pixel_auroc": metrics.get("pixel_AUROC"),
        "ir": str(xml), "export_note": export_note, "inference": inference,
    }


def export_openvino(engine, model, work: Path) -> tuple[Path, str | None]:
    """anomalib's Engine.export to OpenVINO with its defaults (dynamic batch, height and width).

    With some models the dynamo ONNX export fixes the batch at its example size (2) although it was asked
    for a dynamic one, and the inferencer then refuses single images. Only then it exports again through
    the same API with the batch fixed at 1 (height and width still dynamic), and says so in the result.
    """
    import openvino as ov
    import torch

    xml = Path(engine.export(model=model, export_type="openvino", export_root=work / "export"))
    batch = ov.Core().read_model(xml).inputs[0].get_partial_shape()[0]
    if batch.is_dynamic or batch.get_length() == 1:
        return xml, None
    note = (f"anomalib's default export gave a static batch of {batch.get_length()}; re-exported via "
            "Engine.export(onnx_kwargs={'dynamic_shapes': batch 1, height and width dynamic})")
    log(f"warning: {note}")
    shapes = ({2: torch.export.Dim("height"), 3: torch.export.Dim("width")},)
    xml = Path(engine.export(model=model, export_type="openvino", export_root=work / "export-batch1",
                             onnx_kwargs={"dynamic_shapes": shapes}))
    shape = ov.Core().read_model(xml).inputs[0].get_partial_shape()
    if shape[0].is_dynamic or shape[0].get_length() != 1:
        raise WorkerError(f"anomalib's OpenVINO export gives input {shape}, which takes no single image")
    return xml, note


def _has_resize(model) -> bool:
    try:
        return hasattr(model.pre_processor.transform.transforms[0], "size")
    except (AttributeError, IndexError, TypeError):
        return False


def _out_indices(timm, timm_name: str, timm_taps: list[str]) -> list[int]:
    info = timm.create_model(timm_name, pretrained=False, features_only=True, exportable=True).feature_info
    modules = [entry["module"] for entry in info.info]
    missing = [tap for tap in timm_taps if tap not in modules]
    if missing:
        raise WorkerError(f"timm {timm_name} has no feature tap {missing}; it has {modules}")
    return [modules.index(tap) for tap in timm_taps]


def time_inferencer(inferencer_cls, xml: Path, images: list[tuple[Path, int]], job: dict, work: Path) -> dict:
    """anomalib's OpenVINOInferencer as documented: predict(path) per image, synchronous, default device."""
    import numpy as np
    from anomalib.data.utils import read_image
    from sklearn.metrics import roc_auc_score

    here = Path.cwd()
    os.chdir(work)  # the inferencer writes ./openvino_cache
    try:
        started = time.monotonic()
        inferencer = inferencer_cls(path=xml)  # device "AUTO", no config: anomalib's defaults
    finally:
        os.chdir(here)
    compile_s = time.monotonic() - started
    paths = [p for p, _ in images]
    for path in paths[: job["warmup"]]:
        inferencer.predict(path)
    from_file, scores = [], []
    for rep in range(job["repeats"]):
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        for path in paths:
            result = inferencer.predict(path)
            if rep == 0:
                scores.append(float(np.asarray(result.pred_score).reshape(-1)[0]))
        from_file.append(len(paths) / (time.perf_counter() - started))
        log(f"  repeat {rep + 1}/{job['repeats']}: {from_file[-1]:.1f} fps from files (1-min load {load_before:.1f})")
    arrays = [read_image(p, as_tensor=False) for p in paths]
    from_array = []
    for _ in range(job["repeats"]):
        started = time.perf_counter()
        for array in arrays:
            inferencer.predict(array)
        from_array.append(len(arrays) / (time.perf_counter() - started))
    labels = [label for _, label in images]
    first = arrays[0]
    return {
        "images": len(paths), "image_size": f"{first.shape[1]}x{first.shape[0]}", "warmup": job["warmup"],
        "repeats": job["repeats"], "fps_from_file": statistics.median(from_file), "fps_from_file_runs": from_file,
        "fps_from_array": statistics.median(from_array), "fps_from_array_runs": from_array,
        "ir_image_auroc": float(roc_auc_score(labels, scores)) if len(set(labels)) == 2 else None,
        "device": inferencer.device, "compile_s": round(compile_s, 2),
        "ir_inputs": [str(i.get_partial_shape()) for i in inferencer.model.inputs],
        "ir_outputs": [next(iter(o.get_names()), "?") for o in inferencer.model.outputs],
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: anomalib_worker.py JOB.json RESULT.json", file=sys.stderr)
        return 2
    job_path, result_path = Path(argv[0]).resolve(), Path(argv[1]).resolve()  # the timing step changes directory
    try:
        job = json.loads(job_path.read_text())
        repo = Path(job["repo"])
        sys.path.insert(0, str(repo))  # training.backbones and benchmarks.peer of this checkout
        root = Path(job["data_root"]) / job["category"]
        if not (root / "train").is_dir() or not (root / "test").is_dir():
            raise WorkerInputError(f"{root}: no MVTec-layout train/ and test/ folders (anomalib would try to download)")
        import anomalib
        import openvino
        import timm
        import torch

        result = {"versions": {"anomalib": anomalib.__version__, "timm": timm.__version__, "torch": torch.__version__,
                               "openvino": openvino.__version__.split("-")[0], "python": platform.python_version()},
                  "variants": []}
        for variant in job["variants"]:
            work = Path(job["work_dir"]) / f"{variant['algorithm']}-{variant['backbone']}"
            work.mkdir(parents=True, exist_ok=True)
            result["variants"].append(run_variant(job, variant, work.resolve()))
            result_path.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a later failure
    except WorkerError as exc:
        print(f"anomalib worker: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - anomalib's own failures: traceback to the log, one line to the caller
        traceback.print_exc()
        print(f"anomalib worker: error: {type(exc).__name__}: {' '.join(str(exc).split())[:400]}", file=sys.stderr)
        return 1
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
