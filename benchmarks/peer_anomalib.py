"""edge-ad side by side with anomalib on this machine: same data, same backbone weights, same IR workflow.

Why: "use anomalib" is the obvious alternative to this project, so its figures are measured here, on the
same CPU and data, rather than quoted. Targets (from the issue): our INT8 pipeline >= 1.3x the frames per
second of anomalib's OpenVINO inferencer end to end, at an image AUROC no lower than theirs; our runtime
environment under 10 % of the installed size of anomalib's.

    python -m benchmarks.peer_anomalib --data-root /work/shared/data/mvtec_ad --category bottle \\
        --variants VARIANTS_JSON --out OUT_DIR [--venv PATH] [--epochs 10] [--backbone mobilenet_v2]

Runs in OUR venv and never imports anomalib. It
1. creates (or reuses) anomalib's own venv (default ~/.cache/edge-ad/anomalib-venv): torch 2.14.1 /
   torchvision 0.29.1, then `anomalib[openvino]==2.7.0` with torch pinned, plus efficientnet-lite-pytorch
   (architecture only, no weights) so the worker can check features against our EfficientNet-Lite0;
2. runs benchmarks/peer/anomalib_worker.py there: anomalib's Stfpm and Dfm built with OUR ImageNet weights
   renamed onto timm (checked tensor by tensor and feature by feature), Engine.fit / Engine.test on anomalib's
   MVTecAD datamodule over our data folder, Engine.export to OpenVINO, OpenVINOInferencer.predict timed on
   every test image (see that file);
3. measures our side of the same variants (from --variants, see benchmarks.variants): image / pixel AUROC
   of the INT8 bundle from its bundle.json (torch and FP32 IR beside it), training time from the run's
   metrics.json, and `edge-ad` end to end as a subprocess (benchmarks.pipeline_fps: a video made from the
   same test images at their size on disk, a real mosquitto, every frame; also the same PNG files through
   --images), and the installed size of the runtime-only venv (`pip install` of this checkout, no extras;
   built and cached by benchmarks.footprint);
4. writes OUT_DIR/peer.md and OUT_DIR/peer.json (ours, theirs, ratio, target) and prints the table.
Bad input (missing data, variants, bundles, pip failure) ends with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import pipeline_fps as pf
from benchmarks.footprint import DEFAULT_VENV_CACHE, _clean_env, ensure_runtime_venv, site_packages
from benchmarks.variants import Variant, load_variants

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "benchmarks" / "peer" / "anomalib_worker.py"
ANOMALIB_VERSION = "2.7.0"
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
DEFAULT_VENV = Path("~/.cache/edge-ad/anomalib-venv").expanduser()
FPS_TARGET = 1.3  # ours / theirs, end to end
SIZE_TARGET = 0.10  # ours / theirs, installed size
ALGORITHMS = ("stfpm", "dfm")


class PeerError(pf.BenchmarkError):
    """A failure worth one line (exit 1)."""


class PeerInputError(pf.InputError):
    """Bad input or an environment that cannot be built (exit 2)."""


def say(message: str) -> None:
    print(f"peer_anomalib: {message}", file=sys.stderr, flush=True)


# -- pure helpers (tested without anomalib) -------------------------------------------------------------------

def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours / theirs, or None when either is missing or theirs is 0."""
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "not measured"
    met = value >= target if higher_is_better else value < target
    return "met" if met else "NOT met"


def _f(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _mib(size: int | None) -> str:
    return "-" if size is None else f"{size / 2**20:,.0f} MiB"


def comparison_rows(ours: dict, theirs: dict) -> list[dict]:
    """One algorithm's rows: measure, our figure, theirs, ratio ours/theirs, target and verdict."""
    rows = []
    auroc_ok = None
    if ours.get("image_auroc_int8") is not None and theirs.get("image_auroc") is not None:
        auroc_ok = ours["image_auroc_int8"] >= theirs["image_auroc"]
    rows.append({"measure": "image AUROC (ours INT8 IR; theirs Engine.test)", "ours": ours.get("image_auroc_int8"),
                 "theirs": theirs.get("image_auroc"), "ratio": None, "fmt": ".3f",
                 "target": "ours >= theirs", "verdict": "not measured" if auroc_ok is None else
                 ("met" if auroc_ok else "NOT met")})
    rows.append({"measure": "image AUROC, FP32 IR (theirs: own OpenVINO IR via its inferencer)",
                 "ours": ours.get("image_auroc_fp32"), "theirs": theirs.get("ir_image_auroc"), "ratio": None,
                 "fmt": ".3f", "target": "", "verdict": ""})
    rows.append({"measure": "pixel AUROC (ours INT8 IR; theirs Engine.test)", "ours": ours.get("pixel_auroc_int8"),
                 "theirs": theirs.get("pixel_auroc"), "ratio": None, "fmt": ".3f", "target": "", "verdict": ""})
    rows.append({"measure": "training wall time, s", "ours": ours.get("train_wall_s"), "theirs": theirs.get("train_wall_s"),
                 "ratio": ratio(ours.get("train_wall_s"), theirs.get("train_wall_s")), "fmt": ".0f", "target": "",
                 "verdict": ""})
    rows.append({"measure": "training CPU time, s (ours: whole run process, when recorded; theirs: Engine.fit)",
                 "ours": ours.get("run_process_cpu_s"), "theirs": theirs.get("train_cpu_s"),
                 "ratio": ratio(ours.get("run_process_cpu_s"), theirs.get("train_cpu_s")), "fmt": ".0f", "target": "",
                 "verdict": ""})
    fps = ratio(ours.get("fps_video"), theirs.get("fps_from_file"))
    rows.append({"measure": "end-to-end fps: ours INT8 `edge-ad --video` + MQTT; theirs predict(path)",
                 "ours": ours.get("fps_video"), "theirs": theirs.get("fps_from_file"), "ratio": fps, "fmt": ".1f",
                 "target": f">= {FPS_TARGET}x", "verdict": verdict(fps, FPS_TARGET)})
    same_files = ratio(ours.get("fps_images"), theirs.get("fps_from_file"))
    rows.append({"measure": "end-to-end fps, same PNG files: ours INT8 `edge-ad --images` + MQTT; theirs predict(path)",
                 "ours": ours.get("fps_images"), "theirs": theirs.get("fps_from_file"), "ratio": same_files,
                 "fmt": ".1f", "target": f">= {FPS_TARGET}x", "verdict": verdict(same_files, FPS_TARGET)})
    rows.append({"measure": "fps without file reading: ours INT8 `edge-ad bench` (model only); theirs predict(array)",
                 "ours": ours.get("fps_bench"), "theirs": theirs.get("fps_from_array"),
                 "ratio": ratio(ours.get("fps_bench"), theirs.get("fps_from_array")), "fmt": ".1f", "target": "",
                 "verdict": ""})
    return rows


def size_row(ours_bytes: int | None, theirs_bytes: int | None, cpu_only_estimate: bool = False) -> dict:
    share = ratio(ours_bytes, theirs_bytes)
    measure = ("installed size (site-packages): ours `pip install edge-ad`; theirs anomalib[openvino] venv as "
               "installed (PyPI's torch: CUDA build)")
    if cpu_only_estimate:
        measure = ("installed size, theirs ESTIMATED with a CPU-only torch (the venv minus its CUDA-only files: "
                   "nvidia-*, triton, cuda-*, torch/lib CUDA libraries)")
    return {"measure": measure, "ours": ours_bytes, "theirs": theirs_bytes, "ratio": share, "fmt": "size",
            "target": f"< {SIZE_TARGET:.0%}", "verdict": verdict(share, SIZE_TARGET, higher_is_better=False)}


CUDA_ONLY_PREFIXES = ("nvidia", "triton", "cuda")  # top-level entries of site-packages (and their dist-info)
CUDA_ONLY_TORCH_LIBS = ("cuda", "nvrtc", "nvshmem", "cudnn", "nccl", "cublas", "cusparse", "cufft")


def cuda_only_bytes(site: Path) -> int:
    """Bytes a CPU-only torch would not install: the CUDA runtime packages and torch's CUDA libraries.

    An estimate (a CPU-only torch wheel also differs in small ways), reported as such beside the real size.
    """
    total = sum(tree_size(child) for child in site.iterdir() if child.name.lower().startswith(CUDA_ONLY_PREFIXES))
    torch_lib = site / "torch" / "lib"
    if torch_lib.is_dir():
        total += sum(f.stat().st_size for f in torch_lib.iterdir()
                     if f.is_file() and any(word in f.name.lower() for word in CUDA_ONLY_TORCH_LIBS))
    return total


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"- Machine: {m['cpu']}, {m['cores']} usable core(s), load average (1/5/15 min) at start "
        f"{m['load_average_start']}, at end {report.get('load_average_end')}; {m['date']}",
        f"- Versions: ours edge-ad (this checkout), OpenVINO {m['openvino']}; theirs "
        + ", ".join(f"{k} {v}" for k, v in report.get("anomalib_versions", {}).items()),
    ]
    for variant in (report.get("theirs") or {}).get("variants", []):
        loads = variant.get("train_load_average") or []
        inference = variant.get("inference", {})
        lines.append(f"- anomalib {variant['name']}: trained on {variant.get('n_train_images')} images, 1-min load "
                     f"{' -> '.join(f'{load[0]:.1f}' for load in loads) or '-'} during Engine.fit; inferencer on "
                     f"{inference.get('images')} images of {inference.get('image_size')}, IR input "
                     f"{', '.join(inference.get('ir_inputs', []))}"
                     + (f"; note: {variant['export_note']}" if variant.get("export_note") else ""))
    for name, ours in (report.get("ours") or {}).items():
        lines.append(f"- edge-ad {ours.get('name', name)}: OpenVINO hint {ours.get('mode')}; fps runs: video "
                     f"{', '.join(_f(v, '.1f') for v in ours.get('fps_video_runs', []))}; images "
                     f"{', '.join(_f(v, '.1f') for v in ours.get('fps_images_runs', []))}")
    lines += [
        "",
        "| algorithm | measure | edge-ad | anomalib | ratio ours/theirs | target | verdict |",
        "|---|---|---:|---:|---:|---|---|",
    ]

    def cell(value, fmt):
        return _mib(value) if fmt == "size" else _f(value, fmt)

    for section in report["comparisons"]:
        for row in section["rows"]:
            ratio_text = "-" if row["ratio"] is None else (f"{row['ratio']:.1%}" if row["fmt"] == "size"
                                                           else f"{row['ratio']:.2f}x")
            lines.append(f"| {section['name']} | {row['measure']} | {cell(row['ours'], row['fmt'])} | "
                         f"{cell(row['theirs'], row['fmt'])} | {ratio_text} | {row['target']} | {row['verdict']} |")
    return "\n".join(lines)


# -- arguments ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peer_anomalib",
        description="edge-ad vs anomalib on this machine: AUROC, training time, end-to-end fps, installed size.")
    parser.add_argument("--data-root", type=Path, default=Path(os.environ.get("EDGE_AD_DATA_ROOT", "data/mvtec_ad")),
                        help="MVTec-layout root (default: $EDGE_AD_DATA_ROOT or data/mvtec_ad)")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--variants", type=Path, required=True, metavar="JSON",
                        help="variants file (benchmarks.variants): trained runs and their FP32/INT8 bundles")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="peer.md, peer.json and logs go here")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                        help=f"anomalib's venv, created when missing (default: {DEFAULT_VENV})")
    parser.add_argument("--epochs", type=int, default=10, help="anomalib STFPM epochs (default: 10, as ours)")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS),
                        help="comma-separated, from stfpm,dfm (default: both)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes / runs per figure; medians (default: 3)")
    parser.add_argument("--warmup", type=int, default=5, help="anomalib inferencer warm-up predictions (default: 5)")
    parser.add_argument("--frames", type=int, default=400,
                        help="frames of our video / image sequence, the test images cycled (default: 400)")
    parser.add_argument("--mode", choices=("throughput", "latency"), default="throughput",
                        help="edge-ad's OpenVINO performance hint (default: throughput, as benchmarks.pipeline_fps)")
    parser.add_argument("--runtime-venv", type=Path, metavar="DIR",
                        help="measure this existing runtime venv instead of creating a fresh one")
    parser.add_argument("--reuse-anomalib-result", action="store_true",
                        help="skip anomalib's training when OUT_DIR/anomalib.json has every variant (re-measure ours)")
    args = parser.parse_args(argv)
    args.algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    if not args.algorithms or set(args.algorithms) - set(ALGORITHMS):
        parser.error(f"--algorithms: choose from {','.join(ALGORITHMS)}")
    if args.epochs < 1 or args.repeats < 1 or args.warmup < 0 or args.frames < 10:
        parser.error("--epochs and --repeats must be >= 1, --warmup >= 0, --frames >= 10")
    return args


def select_variants(args) -> list[Variant]:
    """Our variant for each algorithm, checked before minutes of pip and training are spent."""
    category_dir = args.data_root / args.category
    if not (category_dir / "train").is_dir() or not (category_dir / "test").is_dir():
        raise PeerInputError(f"--data-root {args.data_root}: no {args.category}/train and {args.category}/test folders")
    if not args.variants.is_file():
        raise PeerInputError(f"--variants {args.variants}: no such file")
    try:
        variants = load_variants(args.variants)
    except (ValueError, KeyError, TypeError) as exc:
        raise PeerInputError(f"--variants {args.variants}: not a variants file ({exc})") from None
    chosen = []
    for algorithm in args.algorithms:
        match = [v for v in variants if (v.algorithm, v.backbone, v.category) == (algorithm, args.backbone, args.category)]
        if not match:
            raise PeerInputError(f"--variants {args.variants}: no {algorithm} {args.backbone} {args.category} variant")
        variant = match[0]
        for what, folder in (("INT8 bundle", variant.int8), ("FP32 bundle", variant.fp32)):
            if not (folder / "bundle.json").is_file():
                raise PeerInputError(f"{variant.name}: {what} {folder} has no bundle.json")
        if not (variant.run_dir / "config.json").is_file():
            raise PeerInputError(f"{variant.name}: run folder {variant.run_dir} has no config.json")
        chosen.append(variant)
    return chosen


# -- anomalib's venv ------------------------------------------------------------------------------------------

def _pip(venv: Path, args: list[str], log_path: Path, what: str) -> None:
    say(f"{what} (pip, can take several minutes; log: {log_path}) ...")
    with open(log_path, "a") as log:
        log.write(f"\n$ pip {' '.join(args)}\n")
        log.flush()
        proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                               *args], stdout=log, stderr=subprocess.STDOUT, env=_clean_env(venv))
    if proc.returncode != 0:
        tail = [line for line in log_path.read_text().splitlines() if line.strip()][-1:]
        raise PeerInputError(f"{what}: pip exited {proc.returncode} ({tail[0][:200] if tail else 'no output'}); "
                             f"see {log_path}")


def installed_anomalib(venv: Path) -> str | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    proc = subprocess.run([str(python), "-c", "import anomalib, timm, openvino, efficientnet_lite_pytorch, torch; "
                           "print(anomalib.__version__, torch.__version__)"],
                          capture_output=True, text=True, env=_clean_env(venv))
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_anomalib_venv(venv: Path, out: Path) -> str:
    """anomalib's own venv; reused when it already has anomalib ANOMALIB_VERSION and the pinned torch."""
    found = installed_anomalib(venv)
    torch_version = TORCH_PINS[0].split("==")[1]
    if found and found.split()[0] == ANOMALIB_VERSION and found.split()[1].startswith(torch_version):
        say(f"reusing anomalib's venv {venv} (anomalib {found.split()[0]}, torch {found.split()[1]})")
        return found
    log_path = out / "anomalib-pip.log"
    if not (venv / "bin" / "python").exists():
        say(f"creating anomalib's venv {venv} ...")
        venv.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise PeerInputError(f"python -m venv {venv} failed: {proc.stderr.strip()[-200:]}")
    constraints = out / "anomalib-constraints.txt"
    constraints.write_text("\n".join(TORCH_PINS) + "\n")  # anomalib's requirements must not swap torch
    _pip(venv, list(TORCH_PINS), log_path, f"installing {' '.join(TORCH_PINS)} into {venv}")
    _pip(venv, ["-c", str(constraints), f"anomalib[openvino]=={ANOMALIB_VERSION}"], log_path,
         f"installing anomalib[openvino]=={ANOMALIB_VERSION} and its dependencies")
    _pip(venv, ["--no-deps", "efficientnet-lite-pytorch"], log_path,
         "installing efficientnet-lite-pytorch (architecture for the EfficientNet-Lite0 feature check)")
    found = installed_anomalib(venv)
    if not found:
        raise PeerInputError(f"anomalib's venv {venv} still cannot import anomalib after installing; see {log_path}")
    return found


# -- anomalib's side ------------------------------------------------------------------------------------------

def weights_file(variant: Variant, config: dict) -> Path:
    """The exact ImageNet weight file our run trained with (--weights, else the backbone's offline package)."""
    if config.get("weights"):
        return Path(config["weights"])
    from training import backbones

    loader = {"mobilenet_v2": backbones._deep_sort_mobilenet_v2_file,
              "efficientnet_lite0": backbones._efficientnet_lite_file}.get(variant.backbone)
    if loader is None:
        raise PeerInputError(f"{variant.name}: backbone {variant.backbone} has no offline weights to give anomalib")
    try:
        return Path(loader(variant.backbone)[0])
    except backbones.BackboneWeightsError as exc:
        raise PeerInputError(str(exc)) from None


def worker_variant(variant: Variant, epochs: int) -> dict:
    from training.backbones import BACKBONES

    config = json.loads((variant.run_dir / "config.json").read_text())
    taps = list(BACKBONES[variant.backbone].taps)
    spec = {"algorithm": variant.algorithm, "backbone": variant.backbone, "batch_size": int(config["batch_size"]),
            "weights_file": str(weights_file(variant, config))}
    if config.get("image_size", 256) != 256:
        raise PeerInputError(f"{variant.name}: trained at {config['image_size']} px; anomalib's default is 256")
    if variant.algorithm == "stfpm":
        spec.update(taps=taps, epochs=epochs)
        if config.get("epochs") not in (None, epochs):
            say(f"warning: {variant.name} was trained for {config['epochs']} epochs, anomalib gets {epochs}")
    else:
        run_taps = str(config["taps"] if "taps" in config else config.get("tap", 2)).split(",")
        if len(run_taps) != 1 or config.get("score_type", "fre") not in ("fre", "nll") \
                or config.get("augment", "none") != "none":
            raise PeerInputError(f"{variant.name}: anomalib's DFM has one tap, fre/nll scores and no augmentation; "
                                 "compare a run trained with --taps 2 --score-type fre --augment none")
        spec.update(taps=[taps[int(run_taps[0])]], pool=int(config.get("pool", 1)),
                    variance_ratio=float(config.get("variance_ratio", 0.97)),
                    score_type=config.get("score_type", "fre"))
    return spec


def run_anomalib(args, variants: list[Variant], venv: Path, out: Path) -> dict:
    result_path = out / "anomalib.json"
    wanted = [worker_variant(v, args.epochs) for v in variants]
    if args.reuse_anomalib_result and result_path.is_file():
        previous = json.loads(result_path.read_text())
        have = {(r["algorithm"], r["backbone"]) for r in previous.get("variants", [])}
        if all((w["algorithm"], w["backbone"]) in have for w in wanted):
            say(f"reusing anomalib's results from {result_path}")
            return previous
    job = {"repo": str(REPO), "data_root": str(args.data_root.resolve()), "category": args.category, "seed": 0,
           "warmup": args.warmup, "repeats": args.repeats, "work_dir": str((out / "anomalib_work").resolve()),
           "variants": wanted}
    job_path = out / "anomalib-job.json"
    job_path.write_text(json.dumps(job, indent=2) + "\n")
    log_path = out / "anomalib-worker.log"
    say(f"anomalib worker: train, test, export, time ({', '.join(w['algorithm'] for w in wanted)}; STFPM "
        f"{args.epochs} epoch(s) takes tens of minutes on 2 cores; full log: {log_path}) ...")
    env = _clean_env(venv)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(venv / "bin" / "python"), str(WORKER), str(job_path.resolve()),
                                 str(result_path.resolve())], stdout=log, stderr=subprocess.PIPE, text=True,
                                cwd=out, env=env)
        last = ""
        for line in proc.stderr:
            log.write(line)
            log.flush()
            if line.startswith("[anomalib worker]") or line.startswith("anomalib worker: error"):
                print(line.rstrip(), file=sys.stderr, flush=True)
            if line.strip():
                last = line.strip()
        proc.wait()
    if proc.returncode != 0:
        message = last if last.startswith("anomalib worker: error") else f"last line: {last[:300]}"
        cls = PeerInputError if proc.returncode == 2 else PeerError
        raise cls(f"anomalib worker exited {proc.returncode}: {message} (log: {log_path})")
    return json.loads(result_path.read_text())


# -- our side -------------------------------------------------------------------------------------------------

def test_image_files(data_root: Path, category: str) -> list[Path]:
    files = sorted(p for p in (data_root / category / "test").rglob("*") if p.suffix.lower() in pf.IMAGE_SUFFIXES)
    if not files:
        raise PeerInputError(f"no test images under {data_root / category / 'test'}")
    return files


def image_sequence(folder: Path, files: list[Path], count: int) -> Path:
    """`count` symlinks to the test images, cycled, named in order: the same PNG files anomalib reads."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{i:05d}{files[i % len(files)].suffix.lower()}").symlink_to(files[i % len(files)].resolve())
    return folder


def run_images(bundle: Path, folder: Path, *, mode: str, broker: pf.Mosquitto, run_id: str, timeout: float) -> dict:
    """`edge-ad --images DIR` with MQTT, fps from its final heartbeat (as pipeline_fps.run_pipeline for --video)."""
    device_id = f"peer-{run_id}"
    subscriber = pf.Subscriber(broker.port, device_id)
    try:
        proc = subprocess.run(pf._edge_ad("--images", folder, "--model", bundle, "--mode", mode, "--heartbeat", "0.5",
                                          "--device-id", device_id, "--camera-id", pf.CAMERA_ID, "--mqtt-host",
                                          "127.0.0.1", "--mqtt-port", broker.port, "--log-level", "info"),
                              capture_output=True, text=True, timeout=timeout, cwd=pf.REPO, env=pf._env())
        if proc.returncode != 0:
            raise PeerError(f"edge-ad --images on {bundle} exited {proc.returncode}: {pf._tail(proc.stderr, 2)}")
        subscriber.wait_for_offline()
    except subprocess.TimeoutExpired:
        raise PeerError(f"edge-ad --images on {bundle} did not finish within {timeout:.0f} s") from None
    finally:
        subscriber.close()
    result = pf.fps_from_events(subscriber.events)
    result.pop("final")
    return result


def our_side(args, variant: Variant, video: Path, sequence: Path, broker: pf.Mosquitto, workdir: Path) -> dict:
    bundle = json.loads((variant.int8 / "bundle.json").read_text())
    metrics = bundle.get("metrics", {})
    run_metrics_path = variant.run_dir / "metrics.json"
    run_metrics = json.loads(run_metrics_path.read_text()) if run_metrics_path.is_file() else {}
    frames = pf.video_frames(video)
    video_runs, image_runs, benches = [], [], []
    for rep in range(args.repeats):
        say(f"[{variant.name}] INT8 edge-ad --video ({frames} frames, {args.mode}, MQTT) {rep + 1}/{args.repeats} ...")
        run = pf.run_pipeline(variant.int8, video, mode=args.mode, device="CPU", max_frames=None, broker=broker,
                              workdir=workdir, run_id=f"{variant.algorithm}-v{rep}", timeout=600)
        video_runs.append(run)
        say(f"[{variant.name}]   {run['pipeline_fps']:.1f} fps; edge-ad --images (same PNG files) ...")
        image_runs.append(run_images(variant.int8, sequence, mode=args.mode, broker=broker,
                                     run_id=f"{variant.algorithm}-i{rep}", timeout=600))
        say(f"[{variant.name}]   {image_runs[-1]['pipeline_fps']:.1f} fps; edge-ad bench (model only) ...")
        benches.append(pf.run_bench(variant.int8, args.mode, "CPU", 6.0, 300))
    for runs, what in ((video_runs, "--video"), (image_runs, "--images")):
        for run in runs:
            if run["processed"] != frames or run.get("errors") or run.get("dropped"):
                say(f"warning: [{variant.name}] {what}: processed {run['processed']} of {frames} frames, "
                    f"errors {run.get('errors')}, dropped {run.get('dropped')}")

    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    return {
        "name": variant.name, "int8_bundle": str(variant.int8), "run_dir": str(variant.run_dir),
        "image_auroc_int8": metrics.get("int8_ir", {}).get("image_auroc"),
        "pixel_auroc_int8": metrics.get("int8_ir", {}).get("pixel_auroc"),
        "image_auroc_fp32": metrics.get("fp32_ir", {}).get("image_auroc"),
        "pixel_auroc_fp32": metrics.get("fp32_ir", {}).get("pixel_auroc"),
        "image_auroc_torch": metrics.get("torch", {}).get("image_auroc"),
        "pixel_auroc_torch": metrics.get("torch", {}).get("pixel_auroc"),
        "train_wall_s": run_metrics.get("train_time_s"), "run_process_cpu_s": run_metrics.get("process_cpu_s"),
        "epochs": (bundle.get("training") or {}).get("epochs"), "mode": args.mode,
        "fps_video": med(r["pipeline_fps"] for r in video_runs), "fps_video_runs": [r["pipeline_fps"] for r in video_runs],
        "fps_images": med(r["pipeline_fps"] for r in image_runs),
        "fps_images_runs": [r["pipeline_fps"] for r in image_runs],
        "fps_bench": med(b["throughput_fps"] for b in benches), "fps_bench_runs": [b["throughput_fps"] for b in benches],
        "video_runs": video_runs, "image_runs": image_runs,
    }


def tree_size(path: Path) -> int:
    """Bytes on disk under path (du -sb: apparent sizes, links not followed)."""
    proc = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PeerError(f"du {path} failed: {proc.stderr.strip()[-200:]}")
    return int(proc.stdout.split()[0])


def largest(path: Path, count: int = 8) -> list[tuple[str, int]]:
    sizes = [(child.name, tree_size(child)) for child in path.iterdir() if not child.name.endswith(".dist-info")]
    return sorted(sizes, key=lambda item: -item[1])[:count]


def runtime_venv(args) -> Path:
    """The runtime-only venv (`pip install` of this checkout, base package only): `--runtime-venv`, or the one
    `benchmarks.footprint` builds and caches, so both benchmarks measure the same install."""
    if args.runtime_venv is not None:
        if not (args.runtime_venv / "bin" / "python").exists():
            raise PeerInputError(f"--runtime-venv {args.runtime_venv}: not a venv")
        return args.runtime_venv
    return Path(ensure_runtime_venv(DEFAULT_VENV_CACHE)["venv"])


# -- main -----------------------------------------------------------------------------------------------------

def theirs_figures(result: dict) -> dict:
    inference = result["inference"]
    return {"image_auroc": result.get("image_auroc"), "pixel_auroc": result.get("pixel_auroc"),
            "ir_image_auroc": inference.get("ir_image_auroc"), "train_wall_s": result.get("train_wall_s"),
            "train_cpu_s": result.get("train_cpu_s"),
            "fps_from_file": inference.get("fps_from_file"), "fps_from_array": inference.get("fps_from_array")}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        variants = select_variants(args)
        mosquitto = pf.find_mosquitto()
        if not mosquitto:
            raise PeerInputError("needs the mosquitto binary for the end-to-end run (apt-get install mosquitto)")
        args.out.mkdir(parents=True, exist_ok=True)
        machine = pf.machine_info()
        found = ensure_anomalib_venv(args.venv.expanduser(), args.out)
        anomalib = run_anomalib(args, variants, args.venv.expanduser(), args.out)
        theirs = {r["algorithm"]: r for r in anomalib["variants"]}
        with tempfile.TemporaryDirectory(prefix="peer_anomalib-") as tmp:
            workdir = Path(tmp)
            files = test_image_files(args.data_root, args.category)
            import cv2

            height, width = cv2.imread(str(files[0]), cv2.IMREAD_COLOR).shape[:2]
            say(f"our side: {width}x{height} MJPG video and image sequence of {args.frames} frames from "
                f"{len(files)} test images ...")
            video = pf.video_from_images(workdir / "test.avi", args.data_root / args.category / "test",
                                         args.frames, width, height)
            sequence = image_sequence(workdir / "sequence", files, args.frames)
            ours = {}
            with pf.Mosquitto(workdir, binary=mosquitto) as broker:
                for variant in variants:
                    ours[variant.algorithm] = our_side(args, variant, video, sequence, broker, workdir)
            runtime = runtime_venv(args)
            runtime_sp = site_packages(runtime)
            theirs_sp = site_packages(args.venv.expanduser())
            sizes = {"ours_site_packages": tree_size(runtime_sp), "ours_largest": largest(runtime_sp),
                     "theirs_site_packages": tree_size(theirs_sp), "theirs_largest": largest(theirs_sp),
                     "theirs_cuda_only": cuda_only_bytes(theirs_sp)}
            sizes["theirs_cpu_only_estimate"] = sizes["theirs_site_packages"] - sizes["theirs_cuda_only"]
            video_meta = pf.video_info(video)
    except pf.BenchmarkError as exc:
        print(f"peer_anomalib: error: {exc}", file=sys.stderr)
        return exc.exit_code
    comparisons = [{"name": alg.upper(), "rows": comparison_rows(ours[alg], theirs_figures(theirs[alg]))}
                   for alg in args.algorithms if alg in theirs]
    comparisons.append({"name": "runtime", "rows": [
        size_row(sizes["ours_site_packages"], sizes["theirs_site_packages"]),
        size_row(sizes["ours_site_packages"], sizes["theirs_cpu_only_estimate"], cpu_only_estimate=True)]})
    report = {"machine": machine, "load_average_end": pf.load_average(), "category": args.category,
              "backbone": args.backbone, "anomalib_versions": anomalib.get("versions", {}), "anomalib_venv": str(args.venv),
              "anomalib_found": found, "video": {**video_meta, "path": None}, "frames": args.frames, "ours": ours,
              "theirs": anomalib, "sizes": sizes, "comparisons": comparisons}
    text = markdown(report)
    (args.out / "peer.md").write_text(text + "\n")
    (args.out / "peer.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(text)
    print(f"\nfull results: {args.out / 'peer.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
