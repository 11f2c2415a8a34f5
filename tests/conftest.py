"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
from prerequisites import missing, required


def pytest_configure(config):
    """Check $EDGE_AD_REQUIRE once, before any test: a typo in it is a usage error, not a silently lost check."""
    required()


@pytest.fixture(autouse=True)
def _no_runtime_log_handler_leaks():
    """An in-process `edge-ad` run installs the runtime's stderr log handler on the root logger, as the
    real command does; remove it afterwards so it never writes into a later test's captured stderr."""
    import logging

    from edge_ad.ops.statusline import StatusAwareHandler

    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, StatusAwareHandler):
            root.removeHandler(handler)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data root holding a tiny synthetic MVTec-layout category named "synthetic" (64 px, 24/6/6 images)."""
    from training.data.synthetic import generate_synthetic_dataset

    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic_data"), image_size=64, n_train=40, n_test_good=6, n_test_defect=6
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


def find_mvtec_root() -> Path | None:
    """The real MVTec AD data, when this machine has it: $EDGE_AD_MVTEC_ROOT or ../shared/data/mvtec_ad."""
    import os

    candidates = [os.environ.get("EDGE_AD_MVTEC_ROOT"), Path(__file__).resolve().parents[2] / "shared/data/mvtec_ad"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "bottle" / "train" / "good").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def mvtec_root() -> Path:
    root = find_mvtec_root()
    if root is None:
        missing("mvtec", "real MVTec AD data not found (set EDGE_AD_MVTEC_ROOT or provide ../shared/data/mvtec_ad)")
    return root


@pytest.fixture(scope="session")
def bottle_stfpm_run(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """STFPM, MobileNetV2 teacher, 256 px, 10 epochs on real bottle: the README's reference settings."""
    from training import stfpm
    from training.config import StfpmConfig

    config = StfpmConfig(
        category="bottle", data_root=str(mvtec_root), backbone="mobilenet_v2", epochs=10,
        out=str(tmp_path_factory.mktemp("bottle_runs")),
    )
    return stfpm.train(config)


@pytest.fixture(scope="session")
def bottle_dfm_run(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DFM with the default recipe (MobileNetV2 stride-8 tap pooled to 16, augmented PCA, top-1 % map score)
    but the EfficientNet-Lite0 backbone, 256 px on real bottle."""
    from training import dfm
    from training.config import DfmConfig

    config = DfmConfig(
        category="bottle", data_root=str(mvtec_root), backbone="efficientnet_lite0",
        out=str(tmp_path_factory.mktemp("bottle_runs")),
    )
    return dfm.train(config)


@pytest.fixture(scope="session")
def screw_stfpm_run(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """STFPM exactly as the README's headline `python -m training.stfpm --category screw` trains it."""
    from training import stfpm
    from training.config import StfpmConfig

    return stfpm.train(StfpmConfig(category="screw", data_root=str(mvtec_root),
                                   out=str(tmp_path_factory.mktemp("screw_runs"))))


@pytest.fixture(scope="session")
def screw_dfm_run(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DFM exactly as `python -m training.dfm --category screw` trains it (the default recipe)."""
    from training import dfm
    from training.config import DfmConfig

    return dfm.train(DfmConfig(category="screw", data_root=str(mvtec_root), out=str(tmp_path_factory.mktemp("screw_runs"))))
