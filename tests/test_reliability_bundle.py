"""A bundle is untrusted input: checksums before anything is loaded, unknown schemas refused, file names that
leave the bundle folder refused, nothing in it executed. Each refusal is one line, exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from runtime_helpers import bundle_dir, make_frame, run_cli, write_video  # noqa: F401  (fixture)

from edge_ad.model.bundle import BundleError, read_bundle, sha256_file
from edge_ad.model.inference import Detector


@pytest.fixture
def bundle(bundle_dir, tmp_path) -> Path:
    """A private, writable copy of the test bundle inside a folder that also holds a 'secret' beside it."""
    folder = tmp_path / "bundles" / "b"
    shutil.copytree(bundle_dir, folder)
    (tmp_path / "secret.txt").write_text("not part of any bundle\n")
    return folder


def edit(folder: Path, change) -> None:
    meta = json.loads((folder / "bundle.json").read_text())
    change(meta)
    (folder / "bundle.json").write_text(json.dumps(meta))



@pytest.mark.parametrize("name", ["../../secret.txt", "../secret.txt", "/etc/passwd", "sub/../../../secret.txt",
                                  "..\\..\\secret.txt", "C:\\Windows\\win.ini", "", "model.xml\x00.txt"])
def test_file_names_that_leave_the_bundle_are_refused(bundle, name):
    def change(meta):
        meta["files"][name] = "0" * 64

    edit(bundle, change)
    with pytest.raises(BundleError, match="escapes the bundle folder|non-empty string|outside the bundle"):
        read_bundle(bundle)


@pytest.mark.parametrize("field", ["xml", "bin"])
def test_model_file_names_that_leave_the_bundle_are_refused_even_with_a_matching_checksum(bundle, field):
    """The attacker controls bundle.json, so a 'correct' checksum of /etc/passwd proves nothing."""
    target = bundle.parent.parent / "secret.txt"

    def change(meta):
        meta["model"][field] = "../../secret.txt"
        meta["files"]["../../secret.txt"] = sha256_file(target)

    edit(bundle, change)
    with pytest.raises(BundleError, match="escapes the bundle folder"):
        read_bundle(bundle)


def test_a_symlink_pointing_outside_is_refused(bundle):
    (bundle / "model.bin").unlink()
    (bundle / "model.bin").symlink_to(bundle.parent.parent / "secret.txt")

    def change(meta):
        meta["files"]["model.bin"] = sha256_file(bundle / "model.bin")

    edit(bundle, change)
    with pytest.raises(BundleError, match="points outside the bundle folder"):
        read_bundle(bundle)


@pytest.mark.parametrize("version", [3, 0, "1", True, None, 1.0, [1], 2.0])
def test_unknown_schema_versions_are_refused(bundle, version):
    edit(bundle, lambda meta: meta.update(schema_version=version))
    with pytest.raises(BundleError, match="schema version .* is not supported"):
        read_bundle(bundle)


@pytest.mark.parametrize("change,match", [
    (lambda m: m.update(files=["model.xml", "model.bin"]), "'files' must map"),
    (lambda m: m["files"].update({"model.xml": 42}), "'files' must map"),
    (lambda m: m["model"].update(xml=7), "non-empty string"),
    (lambda m: m.pop("model"), "malformed"),
    (lambda m: m["model"].update(shellcode="rm -rf /"), "malformed"),
    (lambda m: m["files"].pop("model.bin"), "no checksum for model.bin"),
])
def test_malformed_bundle_json_is_a_clear_error(bundle, change, match):
    edit(bundle, change)
    with pytest.raises(BundleError, match=match):
        read_bundle(bundle)


@pytest.mark.parametrize("change,match", [
    (lambda m: m["preprocess"].update(height=10**9), "preprocess.height"),
    (lambda m: m["preprocess"].update(width="64"), "preprocess.width"),
    (lambda m: m["preprocess"].update(color="CMYK"), "preprocess.color"),
    (lambda m: m["thresholds"].update(image=float("nan")), "thresholds.image"),
    (lambda m: m["thresholds"].update(pixel_max="1"), "thresholds.pixel_max"),
])
def test_runtime_fields_are_checked_before_any_frame_depends_on_them(bundle, change, match):
    edit(bundle, change)
    with pytest.raises(BundleError, match=match):
        Detector(bundle)


def test_refusals_are_one_line_with_exit_code_2(bundle, tmp_path):
    def change(meta):
        meta["model"]["xml"] = "../../etc/passwd"
        meta["files"]["../../etc/passwd"] = "0" * 64

    edit(bundle, change)
    video = write_video(tmp_path / "v.avi", [make_frame() for _ in range(3)])
    proc = run_cli("--video", video, "--model", bundle)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edge-ad: error:")]
    assert errors == ["edge-ad: error: bundle file name escapes the bundle folder: ../../etc/passwd"]


def test_a_tampered_model_is_refused_before_openvino_reads_it(bundle):
    xml = (bundle / "model.xml").read_text()
    (bundle / "model.xml").write_text(xml.replace("test-absdiff", "test-absdiff-evil"))
    with pytest.raises(BundleError, match="checksum mismatch for .*model.xml"):
        Detector(bundle)


def test_the_runtime_never_imports_pickle_based_loaders():
    """Bundles are JSON + OpenVINO IR: no pickle, no torch.load, no yaml.load/eval anywhere in edge_ad."""
    import edge_ad

    root = Path(edge_ad.__file__).parent
    for source in root.rglob("*.py"):
        text = source.read_text()
        for forbidden in ("import pickle", "torch.load", "yaml.load(", "eval(", "exec(", "__import__(",
                          "import_module(", "marshal"):
            assert forbidden not in text, f"{forbidden} in {source}"
