"""Training data: MVTec-layout reader, validation split, torch Dataset, synthetic generator.

The torch Dataset and the generator are imported on first use: listing a dataset
needs no torch, and ``python -m training.data.synthetic`` must not find its own
module already imported by this package.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import DatasetError
from .mvtec import MVTecCategory, Sample, available_categories, data_fingerprint, load_category
from .split import split_validation

if TYPE_CHECKING:
    from .dataset import AnomalyDataset, make_loader
    from .synthetic import generate_synthetic_dataset

_LAZY = {
    "AnomalyDataset": "dataset",
    "make_loader": "dataset",
    "generate_synthetic_dataset": "synthetic",
}

__all__ = [
    "AnomalyDataset",
    "DatasetError",
    "MVTecCategory",
    "Sample",
    "available_categories",
    "data_fingerprint",
    "generate_synthetic_dataset",
    "load_category",
    "make_loader",
    "split_validation",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
