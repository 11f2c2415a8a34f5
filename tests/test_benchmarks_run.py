"""`python -m benchmarks.run`: models built once and reused, the accuracy table from the bundles, the README
block replaced, and the heatmap figure drawn through the runtime's path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.accuracy import AccuracyError, collect, markdown
from benchmarks.run import BEGIN, END, RunError, splice_readme
from benchmarks.variants import Variant, load_variants

ROOT = Path(__file__).resolve().parents[1]


def run_benchmarks(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def dfm_benchmark(synthetic_root, tmp_path_factory):
    """models + accuracy steps for DFM on the generated category, README block spliced."""
    work = tmp_path_factory.mktemp("bench")
    readme = work / "README.md"
    readme.write_text(f"# title\nbefore\n{BEGIN}\nold numbers\n{END}\nafter\n")
    args = ["--data-root", str(synthetic_root), "--categories", "synthetic", "--algorithms", "dfm",
            "--backbones", "mobilenet_v2", "--image-size", "64", "--steps", "models", "accuracy",
            "--work", str(work / "work"), "--out", str(work / "results"), "--readme", str(readme)]
    result = run_benchmarks(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, args, readme


def test_accuracy_table_matches_the_bundles(dfm_benchmark):
    work, _, _ = dfm_benchmark
    (variant,) = load_variants(work / "results" / "variants.json")
    assert (variant.algorithm, variant.backbone, variant.category) == ("dfm", "mobilenet_v2", "synthetic")
    measured = json.loads((variant.int8 / "bundle.json").read_text())["metrics"]
    rows = {row["stage"]: row for row in json.loads((work / "results" / "accuracy.json").read_text())}
    assert set(rows) == {"torch", "fp32_ir", "int8_ir"}
    for stage, row in rows.items():
        assert row["image_auroc"] == measured[stage]["image_auroc"]
        assert row["pixel_auroc"] == measured[stage]["pixel_auroc"]
    # the INT8 IR is smaller on disk than the FP32 IR it came from
    assert 0 < rows["int8_ir"]["size_mb"] < rows["fp32_ir"]["size_mb"]


def test_readme_block_replaced_and_rest_kept(dfm_benchmark):
    _, _, readme = dfm_benchmark
    text = readme.read_text()
    assert text.startswith("# title\nbefore\n" + BEGIN) and text.endswith(END + "\nafter\n")
    assert "old numbers" not in text and "Image AUROC" in text and "Measured on" in text


def test_rerun_reuses_runs_and_bundles(dfm_benchmark):
    work, args, _ = dfm_benchmark
    before = sorted(p.name for p in (work / "work" / "runs").iterdir())
    result = run_benchmarks(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (work / "work" / "runs").iterdir()) == before
    assert "reusing" in result.stderr


def test_bad_data_root_is_one_line(tmp_path):
    result = run_benchmarks("--data-root", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: data root not found") and "\n" not in result.stderr.strip()


def _fake_variant(root: Path, category: str, image_auroc: float, pixel_auroc: float | None) -> Variant:
    run_dir, fp32, int8 = root / f"run-{category}", root / f"fp32-{category}", root / f"int8-{category}"
    for folder in (run_dir, fp32, int8):
        folder.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"train_time_s": 12.0, "process_cpu_s": 20.0}))
    (fp32 / "model.bin").write_bytes(b"x" * 4000)
    (int8 / "model.bin").write_bytes(b"x" * 1000)
    stage = {"image_auroc": image_auroc, "pixel_auroc": pixel_auroc, "image_f1": 0.9, "image_f1_validation_threshold": 0.8}
    (int8 / "bundle.json").write_text(json.dumps({"metrics": {"torch": stage, "fp32_ir": stage, "int8_ir": stage}}))
    return Variant("stfpm", "mobilenet_v2", category, run_dir, fp32, int8)


def test_markdown_mean_first_over_available_categories(tmp_path):
    variants = [_fake_variant(tmp_path, "bottle", 1.0, 0.98), _fake_variant(tmp_path, "screw", 0.5, None)]
    table = markdown(collect(variants))
    assert "| STFPM mobilenet_v2 | INT8 IR | 0.750 | 1.000 | 0.500 |" in table  # image AUROC: mean of both
    assert "| STFPM mobilenet_v2 | INT8 IR | 0.980 | 0.980 | - |" in table  # pixel AUROC: screw has no masks


def test_missing_stage_is_named(tmp_path):
    variant = _fake_variant(tmp_path, "bottle", 1.0, 0.98)
    (variant.int8 / "bundle.json").write_text(json.dumps({"metrics": {"torch": {"image_auroc": 1.0}}}))
    with pytest.raises(AccuracyError, match="no 'fp32_ir' metrics"):
        collect([variant])


def test_splice_without_markers_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(RunError, match="markers"):
        splice_readme(readme, f"{BEGIN}\nx\n{END}\n")
    assert readme.read_text() == "no markers\n"


def test_heatmap_grid_through_the_runtime(tiny_fp32_bundle, synthetic_root, tmp_path):
    import cv2

    from benchmarks.figures import heatmap_grid

    out = heatmap_grid(tiny_fp32_bundle, synthetic_root, "synthetic", tmp_path / "grid.png", n_defective=3, n_good=1)
    image = cv2.imread(str(out))
    assert image is not None and image.shape[1] > image.shape[0] > 100
