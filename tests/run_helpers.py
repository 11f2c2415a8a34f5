"""Helpers for tests that read training run folders."""

from __future__ import annotations

import json
from pathlib import Path


def copy_run(run: Path, folder: Path, config: dict) -> Path:
    """The run's files under `folder` with another config.json: a run as other code may have saved it."""
    folder.mkdir()
    for name in ("model.pt", "metrics.json", "split.json"):
        (folder / name).write_bytes((run / name).read_bytes())
    (folder / "config.json").write_text(json.dumps(config))
    return folder
