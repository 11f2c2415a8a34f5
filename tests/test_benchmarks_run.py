"""`python -m benchmarks.run`: models built once and reused, the accuracy table from the bundles, the README
block replaced, and the heatmap figure drawn through the runtime's path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.accuracy import AccuracyError, collect, markdown
from benchmarks.run import BEGIN, END, RunError, full_block, short_block, splice_readme
from benchmarks.variants import Variant, load_variants

ROOT = Path(__file__).resolve().parents[1]


def run_benchmarks(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def dfm_benchmark(tmp_path_factory):
    """models + accuracy steps for DFM on the generated category, README block spliced."""
    from training.data.synthetic import generate_synthetic_dataset

    work = tmp_path_factory.mktemp("bench")
    # enough normal images that the 15 % validation split can set a threshold
    synthetic_root = generate_synthetic_dataset(work / "data", image_size=64, n_train=60, n_test_good=6, n_test_defect=6)
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


def test_run_report_gets_the_bundles_side_by_side(dfm_benchmark):
    import html
    import re

    work, _, _ = dfm_benchmark
    (variant,) = load_variants(work / "results" / "variants.json")
    page = (variant.run_dir / "report.html").read_text()
    stages = json.loads(html.unescape(re.search(r'id="precisions" data-stages="([^"]*)"', page).group(1)))
    measured = json.loads((variant.int8 / "bundle.json").read_text())["metrics"]
    assert set(stages) == {"torch", "fp32_ir", "int8_ir"}
    assert stages["int8_ir"]["image_auroc"] == measured["int8_ir"]["image_auroc"]


def test_readme_block_replaced_and_rest_kept(dfm_benchmark):
    _, _, readme = dfm_benchmark
    text = readme.read_text()
    assert text.startswith("# title\nbefore\n" + BEGIN) and text.endswith(END + "\nafter\n")
    assert "old numbers" not in text and "[docs/RESULTS.md](docs/RESULTS.md)" in text


def test_readme_gets_the_int8_summary_and_results_doc_every_table(dfm_benchmark):
    work, _, readme = dfm_benchmark
    int8 = next(row for row in json.loads((work / "results" / "accuracy.json").read_text())
                if row["stage"] == "int8_ir")
    short = readme.read_text()
    # the README's row is the INT8 bundle's measured figures, and only those (no torch / FP32 rows)
    assert (f"| DFM mobilenet_v2 | {int8['image_auroc']:.3f} | {int8['pixel_auroc']:.3f} | - | - | "
            f"{int8['size_mb']:.1f} |") in short
    assert "FP32 IR" not in short and "**Image AUROC**" not in short
    full = (work / "docs" / "RESULTS.md").read_text()  # created beside the README on the first run
    assert full.startswith("# Benchmark results") and full.count(BEGIN) == full.count(END) == 1
    assert "**Image AUROC**" in full and "| DFM mobilenet_v2 | FP32 IR |" in full and "Measured on" in full
    assert full.split(BEGIN)[1] == (work / "results" / "summary.md").read_text().split(BEGIN)[1].replace(
        "](./)", "](../results/)")


def test_summary_step_rebuilds_blocks_without_measuring(dfm_benchmark, tmp_path):
    work, _, _ = dfm_benchmark
    results_doc = work / "docs" / "RESULTS.md"
    results_doc.write_text(results_doc.read_text().replace("# Benchmark results", "# Benchmark results\nhand text"))
    before = results_doc.read_text()
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{BEGIN}\nstale\n{END}\n")
    accuracy_mtime = (work / "results" / "accuracy.json").stat().st_mtime_ns
    result = run_benchmarks("--steps", "summary", "--categories", "synthetic", "--out", str(work / "results"),
                            "--work", str(work / "nothing"), "--readme", str(readme), "--results-doc", str(results_doc))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (work / "nothing").exists() and (work / "results" / "accuracy.json").stat().st_mtime_ns == accuracy_mtime
    assert "stale" not in readme.read_text() and "| DFM mobilenet_v2 |" in readme.read_text()
    assert results_doc.read_text() == before  # same tables, hand-written text above the markers kept


def test_summary_step_needs_measured_tables(tmp_path):
    result = run_benchmarks("--steps", "summary", "--out", str(tmp_path / "empty"), "--readme", str(tmp_path / "R.md"))
    assert result.returncode == 2 and "machine.json missing" in result.stderr
    result = run_benchmarks("--steps", "models", "summary")
    assert result.returncode == 2 and "runs alone" in result.stderr


def test_summary_names_the_cpu_flags_and_an_anomalib_comparison_kept_from_another_day(tmp_path):
    """A rerun without the peer step keeps the earlier comparison: the README must not pass it off as today's."""
    out = tmp_path / "results"
    out.mkdir()
    row = {"measure": "image AUROC", "ours": 1.0, "theirs": 0.9, "ratio": None, "target": "ours >= theirs",
           "verdict": "met", "fmt": ".3f"}
    peer = {"machine": {"cpu": "Intel Xeon", "date": "2026-11-22T19:16:48+00:00"}, "category": "bottle",
            "backbone": "mobilenet_v2", "anomalib_versions": {"anomalib": "2.7.0"},
            "comparisons": [{"name": "STFPM", "rows": [row]}]}
    (out / "peer.json").write_text(json.dumps(peer))
    today = {"cpu": "AMD EPYC", "isa": ["avx2", "fma"], "cores": 2, "openvino": "2026.4.1",
             "date": "2026-12-08T02:00:00+00:00"}
    block = short_block(out, today, ["bottle"], tmp_path / "docs" / "RESULTS.md", tmp_path)
    assert "on AMD EPYC (2 cores; avx2, fma)" in block
    assert "same machine; measured 2026-11-22 on Intel Xeon with edge-ad's recipes of that day, not re-run since" in block
    assert "| STFPM | image AUROC | 1.000 | 0.900 |" in block
    same_day = short_block(out, {**today, "date": "2026-11-22T19:00:00+00:00"}, ["bottle"],
                           tmp_path / "docs" / "RESULTS.md", tmp_path)
    # measured by this run (after it started): named as today's, with the DFM recipe it compares
    assert "same machine; DFM: a run with anomalib's recipe, `--taps 2 --score-type fre --augment none`):" in same_day
    assert "not re-run" not in same_day
    (out / "peer.md").write_text("peer tables")
    full = full_block(out, today, ["bottle"], [], tmp_path)
    assert "Measured on AMD EPYC, 2 cores (avx2, fma)," in full
    assert "2 cores (ISA unknown)" in full_block(out, {**today, "isa": None}, ["bottle"], [], tmp_path)
    assert "(measured 2026-11-22 on Intel Xeon with edge-ad's recipes of that day, not re-run since.)\n\npeer tables" in full


def test_figure_links_are_relative_to_the_document(tmp_path):
    out, doc_dir = tmp_path / "bench" / "results", tmp_path / "docs"
    out.mkdir(parents=True)
    (out / "heatmap_grid.png").write_bytes(b"png")
    block = full_block(out, {}, ["synthetic"], [], doc_dir)
    link = block.split("![heatmaps and regions on generated test images](")[1].split(")")[0]
    assert link == "../bench/results/heatmap_grid.png" and (doc_dir / link).resolve() == (out / "heatmap_grid.png")


def test_rerun_reuses_runs_and_bundles(dfm_benchmark):
    work, args, _ = dfm_benchmark
    before = sorted(p.name for p in (work / "work" / "runs").iterdir())
    result = run_benchmarks(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (work / "work" / "runs").iterdir()) == before
    assert "reusing" in result.stderr


def test_the_anomalib_comparison_gets_a_dfm_anomalib_can_train(dfm_benchmark):
    """Today's DFM (pooled stride-8 tap, top-1 % score, posed copies) is no model anomalib trains: the peer step
    trains one with anomalib's recipe beside it, in runs of its own, and reuses it on a rerun."""
    from benchmarks.run import PEER_RECIPES, find_run, parse_args, peer_variants

    work, args, _ = dfm_benchmark
    run_args = parse_args(args)
    (default,) = load_variants(work / "results" / "variants.json")
    path = peer_variants(run_args, [default], "synthetic")
    (peer,) = load_variants(path)
    assert peer.run_dir.parent == work / "work" / "peer-runs" and peer.int8.parent == work / "work" / "peer-bundles"
    config = json.loads((peer.run_dir / "config.json").read_text())
    assert {key: config[key] for key in PEER_RECIPES["dfm"]} == PEER_RECIPES["dfm"]
    assert (peer.int8 / "bundle.json").is_file()
    # the like-for-like run is never taken for today's default, nor the default for it
    data_root = run_args.data_root
    assert find_run(work / "work" / "peer-runs", "dfm", "mobilenet_v2", "synthetic", data_root, 64, None) is None
    assert find_run(work / "work" / "runs", "dfm", "mobilenet_v2", "synthetic", data_root, 64, None,
                    PEER_RECIPES["dfm"]) is None
    assert load_variants(peer_variants(run_args, [default], "synthetic")) == [peer]  # reused, not retrained
    assert len(list((work / "work" / "peer-runs").iterdir())) == 1
    # its training log sits beside the default model's, not over it
    assert (work / "work" / "logs" / "train-peer-dfm-mobilenet_v2-synthetic.log").is_file()
    assert (work / "work" / "logs" / "train-dfm-mobilenet_v2-synthetic.log").is_file()


def test_anomalib_takes_the_peer_recipe_and_refuses_todays_default_dfm(tmp_path):
    from benchmarks import peer_anomalib
    from benchmarks.run import PEER_RECIPES
    from training.config import DfmConfig

    def variant(config: dict) -> Variant:
        run_dir = tmp_path / str(len(list(tmp_path.iterdir())))
        run_dir.mkdir()
        (run_dir / "config.json").write_text(json.dumps(config))
        return Variant("dfm", "mobilenet_v2", "bottle", run_dir, run_dir, run_dir)

    default = DfmConfig(category="bottle").to_dict()
    with pytest.raises(peer_anomalib.PeerInputError, match="one tap, fre/nll scores and no augmentation"):
        peer_anomalib.worker_variant(variant(default), epochs=1)
    spec = peer_anomalib.worker_variant(variant({**default, **PEER_RECIPES["dfm"]}), epochs=1)
    assert spec["score_type"] == "fre" and len(spec["taps"]) == 1 and spec["pool"] == default["pool"]


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
    stage = {"image_auroc": image_auroc, "pixel_auroc": pixel_auroc, "image_f1_optimal": 0.9, "image_f1_deployed": 0.8, "fpr_deployed": 0.0, "recall_deployed": 0.7}
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


@pytest.mark.parametrize("algorithm, saved, reused", [
    ("dfm", {"posed_copies": 7, "taps": "1", "score_type": "map", "augment": "rotate,hflip,vflip", "pool": 2}, True),
    ("dfm", {"posed_copies": 7}, False),  # saved before --taps/--score-type existed: the stride-16 tap, total error
    ("dfm", {}, False),  # saved before --posed-copies existed: a PCA on 3 copies, not today's default
    ("dfm", {"posed_copies": 11, "taps": "1", "score_type": "map", "augment": "rotate,hflip,vflip", "pool": 2}, False),
    # the anomalib comparison's like-for-like DFM is not today's default
    ("dfm", {"posed_copies": 7, "taps": "2", "score_type": "fre", "augment": "none", "pool": 2}, False),
    ("stfpm", {"subspace_weight": 2.0, "subspace_posed_copies": 3}, True),
    ("stfpm", {"subspace_weight": 2.0}, True),  # from before the option: 3 copies, today's default
    ("stfpm", {}, False),  # student only
    ("stfpm", {"subspace_weight": 2.0, "subspace_posed_copies": 7}, False),
    ("stfpm", {"subspace_weight": 2.0, "memory_weight": 0.0, "student_pool": 1, "memory_fraction": 0.003}, True),
    ("stfpm", {"subspace_weight": 2.0, "memory_weight": 4.0, "student_pool": 2}, False),  # the memory option
    ("stfpm", {"subspace_weight": 2.0, "memory_fusion": "map"}, True),
    ("stfpm", {"subspace_weight": 2.0, "memory_fusion": "score"}, False),
])
def test_only_runs_of_todays_default_recipe_are_reused(tmp_path, algorithm, saved, reused):
    from benchmarks.run import _matches

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"")
    (run / "metrics.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"algorithm": algorithm, "backbone": "mobilenet_v2", "category": "screw",
                                                 "image_size": 256, "data_root": str(tmp_path), **saved}))
    assert _matches(run, algorithm, "mobilenet_v2", "screw", tmp_path, 256, None) is reused
