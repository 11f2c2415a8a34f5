"""The model bundle: a folder an operator copies to the industrial PC.

`bundle.json` describes the IR next to it: how to preprocess, the raw thresholds
and normalization statistics (data, never baked into the graph), the metrics
measured for each precision, and a sha256 of every file. Loading verifies the
checksums and the schema version before anything is handed to OpenVINO, and
refuses file names that would leave the bundle folder ("../../etc/passwd", an
absolute path, a symlink pointing outside). A bundle is data only: JSON and an
OpenVINO IR; nothing in it is imported or executed.
Only json/hashlib here: the runtime reads bundles without torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from edge_ad.atomic import write_atomic
from edge_ad.model.preprocess import PreprocessSpec

SCHEMA_VERSION = 1
# 2: the same fields, with a preprocess.fit other than stretch. Only such bundles are written as 2, so a
# runtime from before `fit` existed refuses them ("upgrade edge-ad") instead of silently stretching frames.
SUPPORTED_SCHEMAS = (1, 2)


def required_schema(preprocess: PreprocessSpec) -> int:
    return 1 if preprocess.fit == "stretch" else 2
BUNDLE_FILE = "bundle.json"


class BundleError(RuntimeError):
    """A bundle that is missing, tampered with, or of a schema this runtime does not know."""


@dataclass
class Thresholds:
    """Raw (unnormalized) decision thresholds plus the statistics that map raw -> 0..1.

    normalized = clip(0.5 + (raw - threshold) / (max - min), 0, 1), so the
    threshold always sits at 0.5. min/max are taken over held-out normal images.
    """

    image: float
    pixel: float
    image_min: float
    image_max: float
    pixel_min: float
    pixel_max: float
    target_fpr: float | None = None
    source: str = "validation"  # where they were computed: validation split, site images...
    fit: dict | None = None  # how the image threshold was estimated (edge_ad.decide.thresholds)


@dataclass
class ModelInfo:
    algorithm: str  # "stfpm" | "dfm"
    backbone: str
    precision: str  # "fp32" | "fp16" | "int8"
    xml: str = "model.xml"
    bin: str = "model.bin"
    input_name: str = "image"
    outputs: tuple[str, str] = ("anomaly_map", "score")


def validation_seed(run_config: dict) -> int:
    """The seed that drew a run's validation split: its --split-seed where it set one, else its --seed."""
    split_seed = run_config.get("split_seed")
    return int(run_config["seed"] if split_seed is None else split_seed)


@dataclass
class TrainingInfo:
    category: str
    data_root: str
    data_fingerprint: str
    epochs: int | None
    seed: int
    image_size: int
    validation_fraction: float
    config: dict = field(default_factory=dict)

    @property
    def validation_seed(self) -> int:
        return validation_seed(self.config | {"seed": self.seed})


@dataclass
class PrecisionCheck:
    """The bundle's IR compiled with another CPU inference precision (INFERENCE_PRECISION_HINT) against f32.

    Measured at export / INT8 calibration on the images the INT8 check uses, with the INT8
    tolerances; the runtime's `--inference-precision auto` runs that precision only if `verified`
    (bf16 changes raw scores, and the thresholds were set on f32 ones).
    """

    precision: str  # "bf16"
    measured: bool  # False: the exporting CPU could not run it (`reason` says why)
    verified: bool  # measured and within every tolerance below
    reason: str  # one line, for the runtime's log
    cpu: str = ""  # the CPU it was measured on
    image_auroc_delta: float | None = None  # this precision - f32, test split
    pixel_auroc_delta: float | None = None
    spearman: float | None = None  # of test image scores vs f32
    max_score_deviation: float | None = None  # max |score - f32 score| / |image threshold|, validation + test
    max_validation_deviation: float | None = None  # the same over the validation (normal) images only
    validation_decisions_agree: bool | None = None  # every validation image on the same side of the threshold
    test_decision_agreement: float | None = None  # share of test images on the same side (reported, not a gate)
    validation_images: int = 0
    test_images: int = 0
    tolerances: dict = field(default_factory=dict)


@dataclass
class Bundle:
    model: ModelInfo
    preprocess: PreprocessSpec
    thresholds: Thresholds
    training: TrainingInfo
    # {"torch": {...}, "fp32_ir": {...}, "int8_ir": {...}}: same test images for each
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    calibration: dict | None = None
    precision_checks: dict[str, PrecisionCheck] = field(default_factory=dict)  # "bf16" -> check; absent: not measured
    files: dict[str, str] = field(default_factory=dict)  # relative name -> sha256
    versions: dict[str, str] = field(default_factory=dict)
    created_utc: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        data = asdict(self)
        data["model"]["outputs"] = list(self.model.outputs)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Bundle":
        try:
            model = dict(data["model"])
            model["outputs"] = tuple(model.get("outputs", ModelInfo.outputs))
            return cls(
                model=ModelInfo(**model),
                preprocess=PreprocessSpec.from_dict(data["preprocess"]),
                thresholds=Thresholds(**data["thresholds"]),
                training=TrainingInfo(**data["training"]),
                metrics=data.get("metrics", {}),
                calibration=data.get("calibration"),
                precision_checks={name: PrecisionCheck(**check)
                                  for name, check in (data.get("precision_checks") or {}).items()},
                files=data.get("files", {}),
                versions=data.get("versions", {}),
                created_utc=data.get("created_utc", ""),
                schema_version=data["schema_version"],
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise BundleError(f"bundle.json is malformed: {exc}") from exc


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_hash(bundle: Bundle) -> str:
    """Short identity of a bundle's model files, carried in every alert."""
    joined = "".join(f"{name}:{digest}" for name, digest in sorted(bundle.files.items()))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def write_bundle(folder: str | Path, bundle: Bundle) -> Path:
    """Checksum the model files already in `folder` and write bundle.json beside them."""
    folder = Path(folder)
    names = [bundle.model.xml, bundle.model.bin]
    bundle.files = {name: sha256_file(folder / name) for name in names}
    bundle.schema_version = required_schema(bundle.preprocess)
    if not bundle.created_utc:
        bundle.created_utc = datetime.now(timezone.utc).isoformat(timespec="seconds")
    path = folder / BUNDLE_FILE
    write_atomic(path, json.dumps(bundle.to_dict(), indent=2, sort_keys=False) + "\n")
    return path


def read_bundle(folder: str | Path, verify: bool = True) -> Bundle:
    """Load bundle.json; refuse unknown schemas and files that fail their checksum."""
    folder = Path(folder)
    path = folder / BUNDLE_FILE
    if not folder.is_dir():
        raise BundleError(f"bundle folder not found: {folder}")
    if not path.is_file():
        raise BundleError(f"not a bundle (no {BUNDLE_FILE}): {folder}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path} is not a JSON object")
    version = data.get("schema_version")
    if type(version) is not int or version not in SUPPORTED_SCHEMAS:
        raise BundleError(
            f"bundle schema version {version!r} is not supported by this runtime "
            f"(supports {', '.join(map(str, SUPPORTED_SCHEMAS))}); re-export the bundle or upgrade edge-ad"
        )
    bundle = Bundle.from_dict(data)
    if verify:
        verify_files(folder, bundle)
    return bundle


def safe_member(folder: Path, name) -> Path:
    """`folder / name` if that stays inside the bundle folder (after resolving symlinks); BundleError otherwise."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise BundleError(f"bundle file name must be a non-empty string, got {name!r}")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"bundle file name escapes the bundle folder: {name}")
    path = folder / relative
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # symlink loops
        inside = False
    if not inside:
        raise BundleError(f"bundle file {name} points outside the bundle folder; refusing to load")
    return path


def verify_files(folder: Path, bundle: Bundle) -> None:
    if not isinstance(bundle.files, dict) or not all(isinstance(v, str) for v in bundle.files.values()):
        raise BundleError("bundle.json 'files' must map file names to sha256 checksums")
    for name in (bundle.model.xml, bundle.model.bin):
        safe_member(folder, name)
        if name not in bundle.files:
            raise BundleError(f"bundle.json lists no checksum for {name}")
    for name, expected in bundle.files.items():
        file = safe_member(folder, name)
        if not file.is_file():
            raise BundleError(f"bundle file missing: {file}")
        actual = sha256_file(file)
        if actual != expected:
            raise BundleError(f"checksum mismatch for {file}: the file was changed after export; refusing to load")
