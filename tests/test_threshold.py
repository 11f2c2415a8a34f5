"""Site threshold recalibration: new thresholds from the bundle's own IR, model files untouched, no torch."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.threshold import main
from edge_ad.model.bundle import read_bundle
from training.data.synthetic import make_texture, to_uint8

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site_images(tmp_path_factory) -> Path:
    """12 normal frames 'from the line': larger, brighter than training, plus one corrupt file."""
    folder = tmp_path_factory.mktemp("site")
    for i in range(12):
        frame = to_uint8(np.clip(make_texture(np.random.default_rng([7, i]), 80) * 1.15, 0, 1))
        cv2.imwrite(str(folder / f"frame_{i:02d}.png"), frame)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


TORCH_FREE_CLI = """
import sys
sys.modules["torch"] = None  # recalibration must run on an edge PC without torch
from calibration.threshold import main
sys.exit(main(sys.argv[1:]))
"""


def test_recalibration_cli_without_torch_writes_new_bundle(tiny_fp32_bundle, site_images, tmp_path):
    original = read_bundle(tiny_fp32_bundle)
    out = tmp_path / "site_bundle"
    result = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_CLI, str(tiny_fp32_bundle), "--images", str(site_images),
         "--target-fpr", "0.1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped 1 of 13 files" in result.stderr

    bundle = read_bundle(out)  # verifies checksums
    assert bundle.files == original.files
    assert bundle.thresholds.image != original.thresholds.image
    assert bundle.thresholds.pixel != original.thresholds.pixel
    assert bundle.thresholds.source == f"site:{site_images}, 12 images"
    assert bundle.thresholds.target_fpr == 0.1
    assert bundle.thresholds.image_min <= bundle.thresholds.image <= bundle.thresholds.image_max
    record = bundle.calibration["thresholds"]
    assert record["n_images"] == 12 and record["n_skipped"] == 1
    assert record["previous"]["image"] == original.thresholds.image
    assert bundle.metrics == original.metrics and bundle.training == original.training
    assert read_bundle(tiny_fp32_bundle).thresholds == original.thresholds  # source bundle untouched


def test_recalibration_in_place(tiny_fp32_bundle, site_images, tmp_path, capsys):
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_fp32_bundle, folder)
    before = read_bundle(folder)
    assert main([str(folder), "--images", str(site_images)]) == 0
    after = read_bundle(folder)
    assert after.files == before.files
    assert after.thresholds.source.startswith("site:")
    assert after.thresholds.target_fpr == 0.01
    assert sorted(p.name for p in folder.iterdir()) == ["bundle.json", "bundle.json.v1", "model.bin", "model.xml"]
    assert read_bundle(folder).calibration["thresholds"]["previous_version"] == "bundle.json.v1"
    assert json.loads((folder / "bundle.json.v1").read_text())["thresholds"] == asdict(before.thresholds)


def one_line_error(argv, capsys) -> str:
    """The failure is the last stderr line, `error: ...`; progress logs may precede it, tracebacks never."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "Logging error" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    return last


def test_empty_folder_is_a_clear_error(tiny_fp32_bundle, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = one_line_error([str(tiny_fp32_bundle), "--images", str(tmp_path / "empty")], capsys)
    assert "0 images" in err and "at least 10" in err


def test_too_few_readable_images(tiny_fp32_bundle, site_images, tmp_path, capsys):
    err = one_line_error([str(tiny_fp32_bundle), "--images", str(site_images), "--min-images", "13"], capsys)
    assert "only 12 readable images" in err and "1 unreadable" in err


def test_missing_folder_and_bad_rates(tiny_fp32_bundle, tmp_path, capsys):
    assert "image folder not found" in one_line_error([str(tiny_fp32_bundle), "--images", str(tmp_path / "nope")], capsys)
    assert "[0, 1)" in one_line_error([str(tiny_fp32_bundle), "--images", str(tmp_path), "--target-fpr", "1.5"], capsys)
    assert "bundle folder not found" in one_line_error([str(tmp_path / "nobundle"), "--images", str(tmp_path)], capsys)


def test_tampered_bundle_is_not_recalibrated(tiny_fp32_bundle, site_images, tmp_path, capsys):
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_fp32_bundle, folder)
    with open(folder / "model.xml", "a") as handle:
        handle.write("\n")
    before = (folder / "bundle.json").read_text()
    assert "checksum mismatch" in one_line_error([str(folder), "--images", str(site_images)], capsys)
    assert (folder / "bundle.json").read_text() == before


def test_out_folder_not_empty_needs_force(tiny_fp32_bundle, site_images, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "other.txt").write_text("x")
    assert "not empty" in one_line_error([str(tiny_fp32_bundle), "--images", str(site_images), "--out", str(out)], capsys)
    assert main([str(tiny_fp32_bundle), "--images", str(site_images), "--out", str(out), "--force"]) == 0
    assert json.loads((out / "bundle.json").read_text())["thresholds"]["source"].startswith("site:")


def test_a_defective_part_among_the_site_images_is_named(tiny_fp32_bundle, tmp_path, caplog):
    """A defect slipped into the 'normal' images sets the threshold alone: the log and the record name it."""
    folder = tmp_path / "site"
    folder.mkdir()
    for i in range(16):
        frame = to_uint8(make_texture(np.random.default_rng([9, i]), 80))
        if i == 11:
            cv2.circle(frame, (40, 40), 12, (0, 0, 0), -1)
        cv2.imwrite(str(folder / f"part_{i:02d}.png"), frame)
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny_fp32_bundle, bundle_dir)
    with caplog.at_level("WARNING", logger="calibration"):
        assert main([str(bundle_dir), "--images", str(folder)]) == 0
    record = read_bundle(bundle_dir).calibration["thresholds"]
    assert record["outliers"] and "1 of 16 normal images scores beyond" in record["outliers"]
    assert "(part_11.png)" in record["outliers"] and record["outliers"] in caplog.text
    fit = read_bundle(bundle_dir).thresholds.fit
    assert fit["outliers"] == [11] and fit["threshold_without_outliers"] < read_bundle(bundle_dir).thresholds.image
