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
