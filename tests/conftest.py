"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data root holding a tiny synthetic MVTec-layout category named "synthetic" (64 px, 24/6/6 images)."""
    from training.data.synthetic import generate_synthetic_dataset

    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic_data"), image_size=64, n_train=24, n_test_good=6, n_test_defect=6
    )


@pytest.fixture(scope="session")
def tiny_stfpm_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch STFPM run folder (mobilenet_v2, 64 px, CPU) on the synthetic category: input of export tests."""
    from training.config import StfpmConfig
    from training.stfpm import train

    config = StfpmConfig(
        category="synthetic", data_root=str(synthetic_root), epochs=1, image_size=64, batch_size=8,
        device="cpu", out=str(tmp_path_factory.mktemp("export_runs")),
    )
    return train(config)


@pytest.fixture(scope="session")
def tiny_fp32_bundle(tiny_stfpm_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An FP32 bundle written by the export CLI (`python -m deploy.export`) from tiny_stfpm_run. Do not modify: copy it."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("fp32_bundle") / "bundle"
    result = subprocess.run(
        [sys.executable, "-m", "deploy.export", str(tiny_stfpm_run), "--out", str(out)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out
