"""The run folder: what training leaves behind and deploy/ starts from."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import torch

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"
METRICS_FILE = "metrics.json"


class RunDirError(RuntimeError):
    """A run folder that is missing files or cannot be loaded."""


def new_run_dir(out: str | Path, algorithm: str, backbone: str, category: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(out) / f"{algorithm}-{backbone}-{category}-{stamp}"
    suffix = 1
    while path.exists():
        path = Path(out) / f"{algorithm}-{backbone}-{category}-{stamp}-{suffix}"
        suffix += 1
    path.mkdir(parents=True)
    return path


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def read_json(run_dir: Path, name: str) -> dict:
    path = Path(run_dir) / name
    if not path.is_file():
        raise RunDirError(f"not a training run folder (no {name}): {run_dir}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path} is not valid JSON: {exc}") from exc


def save_run(run_dir: Path, model: torch.nn.Module, config: dict, split: dict, metrics: dict) -> None:
    torch.save(model.state_dict(), run_dir / MODEL_FILE)
    write_json(run_dir / CONFIG_FILE, config)
    write_json(run_dir / SPLIT_FILE, split)
    write_json(run_dir / METRICS_FILE, metrics)


def load_model(run_dir: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the trained module from a run folder, offline: weights come from model.pt."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run folder not found: {run_dir}")
    config = read_json(run_dir, CONFIG_FILE)
    checkpoint = run_dir / MODEL_FILE
    if not checkpoint.is_file():
        raise RunDirError(f"run folder has no {MODEL_FILE}: {run_dir}")
    algorithm = config.get("algorithm")
    if algorithm == "stfpm":
        from training.stfpm import build_model
    elif algorithm == "dfm":
        from training.dfm import build_model
    else:
        raise RunDirError(f"unknown algorithm {algorithm!r} in {run_dir / CONFIG_FILE}")
    try:
        model = build_model(config, pretrained=False)
    except ValueError as exc:  # a config this code cannot rebuild a model from
        raise RunDirError(f"cannot rebuild the model of {run_dir}: {exc}") from exc
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # corrupt file, wrong architecture
        raise RunDirError(f"cannot load {checkpoint}: {exc}") from exc
    return model.eval(), config
