"""One trained model and its two bundles: the unit every benchmark measures.

`benchmarks.run` builds these (training, exporting and quantizing what is missing) and hands the same
list to the accuracy, speed, footprint, roofline and peer benchmarks, so every table speaks of the same
models.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Variant:
    algorithm: str  # "stfpm" | "dfm"
    backbone: str  # a name from training.backbones
    category: str  # MVTec category, e.g. "bottle"
    run_dir: Path  # training run folder (config.json, model.pt, metrics.json)
    fp32: Path  # FP32 bundle folder
    int8: Path  # INT8 bundle folder (its bundle.json holds torch / FP32 IR / INT8 IR test metrics)

    @property
    def name(self) -> str:
        return f"{self.algorithm}-{self.backbone}-{self.category}"

    def to_json(self) -> dict:
        return {key: str(value) for key, value in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> "Variant":
        return cls(
            algorithm=data["algorithm"], backbone=data["backbone"], category=data["category"],
            run_dir=Path(data["run_dir"]), fp32=Path(data["fp32"]), int8=Path(data["int8"]),
        )


def save_variants(variants: list[Variant], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([v.to_json() for v in variants], indent=2) + "\n")


def load_variants(path: Path) -> list[Variant]:
    return [Variant.from_json(item) for item in json.loads(Path(path).read_text())]
