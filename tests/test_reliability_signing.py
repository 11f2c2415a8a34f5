"""Signed bundles: a manifest of every file (bundle.json, i.e. the thresholds, included) and a detached ed25519
signature. With `bundle_public_key` configured the runtime refuses unsigned, mis-signed and changed bundles
(one line, exit 2); without one it runs as before. Real keys, a real OpenVINO bundle, the real CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
from runtime_helpers import REPO, bundle_dir, make_frame, run_cli  # noqa: F401  (fixture)

from edge_ad.model.signing import (
    MANIFEST, SIGNATURE, SigningError, generate_keypair, load_private_key, load_public_key, sign_bundle,
    verify_bundle,
)


def _tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs made by the CLI: ours, and someone else's."""
    folder = tmp_path_factory.mktemp("keys")
    made = {}
    for name in ("ours", "other"):
        proc = _tool("deploy.keys", "--out", folder / name)
        assert proc.returncode == 0, proc.stderr
        made[name] = (folder / name / "bundle-signing.key", folder / name / "bundle-signing.pub")
    return made


@pytest.fixture
def signed(bundle_dir, keys, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    proc = _tool("deploy.keys", "--sign", copy, "--sign-key", keys["ours"][0])
    assert proc.returncode == 0, proc.stderr
    return copy


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    import cv2

    folder = tmp_path_factory.mktemp("frames")
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), make_frame([(40, 40, 30, 30)] if i == 1 else []))
    return folder


def _run(bundle, frames, key=None):
    extra = ["--bundle-public-key", key] if key is not None else []
    return run_cli("--images", frames, "--model", bundle, "--jsonl", "-", *extra)


def test_keys_cli_makes_a_private_key_only_its_owner_can_read(keys):
    private, public = keys["ours"]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    load_private_key(private), load_public_key(public)
    proc = _tool("deploy.keys", "--out", private.parent)  # never overwrites a key
    assert proc.returncode == 2 and "already exists" in proc.stderr and "Traceback" not in proc.stderr


def test_signed_bundle_runs_and_covers_every_file(signed, keys, frames):
    manifest = (signed / MANIFEST).read_text().splitlines()
    assert sorted(line.split("  ", 1)[1] for line in manifest) == ["bundle.json", "model.bin", "model.xml"]
    assert verify_bundle(signed, load_public_key(keys["ours"][1])) == 3
    proc = _run(signed, frames, keys["ours"][1])
    assert proc.returncode == 0, proc.stderr
    assert "signature verified" in proc.stderr
    final = [e for e in map(json.loads, proc.stdout.splitlines()) if e["event"] == "heartbeat"][-1]
    assert final["processed"] == 3


def test_the_signature_checks_out_with_openssl_too(signed, keys):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    proc = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(keys["ours"][1]), "-rawin",
                           "-in", str(signed / MANIFEST), "-sigfile", str(signed / SIGNATURE)],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "Signature Verified Successfully" in proc.stdout, proc.stdout + proc.stderr


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_threshold(path):
    bundle = json.loads(path.read_text())
    bundle["thresholds"]["image"] = bundle["thresholds"]["image"] * 2  # fewer alerts: the attack that matters
    path.write_text(json.dumps(bundle, indent=2))


TAMPERING = {
    "model.bin byte flipped": (lambda b: _flip_byte(b / "model.bin"), "model.bin was changed after signing"),
    "threshold edited": (lambda b: _edit_threshold(b / "bundle.json"), "bundle.json was changed after signing"),
    "file added": (lambda b: (b / "extra.onnx").write_bytes(b"\x00" * 16),
                   "extra.onnx is not in the signed manifest (added after signing)"),
    "file removed": (lambda b: (b / "model.bin").unlink(), "model.bin is in the signed manifest but missing"),
    "signature missing": (lambda b: (b / SIGNATURE).unlink(), "is not signed (no manifest.sig)"),
    "manifest edited": (lambda b: (b / MANIFEST).write_text((b / MANIFEST).read_text().replace("model.bin", "model.bim")),
                        "signature does not verify with"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_bundles_are_refused_with_their_reason(signed, keys, frames, case):
    tamper, reason = TAMPERING[case]
    tamper(signed)
    with pytest.raises(SigningError, match=re.escape(reason)):
        verify_bundle(signed, load_public_key(keys["ours"][1]))
    proc = _run(signed, frames, keys["ours"][1])
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and reason in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""  # refused before a single frame


def test_a_bundle_signed_with_another_key_is_refused(signed, keys, frames):
    proc = _run(signed, frames, keys["other"][1])
    assert proc.returncode == 2 and "signature does not verify with" in proc.stderr, proc.stderr


def test_an_unsigned_bundle_is_refused_with_a_key_and_runs_without_one(bundle_dir, keys, frames):
    refused = _run(bundle_dir, frames, keys["ours"][1])
    assert refused.returncode == 2 and "is not signed (no manifest.sha256)" in refused.stderr, refused.stderr
    plain = _run(bundle_dir, frames)
    assert plain.returncode == 0 and "signature" not in plain.stderr, plain.stderr


def test_a_bad_public_key_is_one_line_exit_2(bundle_dir, frames, tmp_path):
    bogus = tmp_path / "key.pub"
    bogus.write_text("not a key\n")
    proc = _run(bundle_dir, frames, bogus)
    assert proc.returncode == 2 and "is not a PEM public key" in proc.stderr and "Traceback" not in proc.stderr
    missing = _run(bundle_dir, frames, tmp_path / "absent.pub")
    assert missing.returncode == 2 and "--bundle-public-key file not found" in missing.stderr


def test_public_key_from_a_config_file(signed, keys, frames, tmp_path):
    config = tmp_path / "edge.toml"
    config.write_text(f'bundle_public_key = "{keys["other"][1]}"\n')
    proc = run_cli("--config", config, "--images", frames, "--model", signed, "--jsonl", "-")
    assert proc.returncode == 2 and "signature does not verify" in proc.stderr


def test_threshold_recalibration_re_signs_with_sign_key(signed, keys, tmp_path):
    """An on-site threshold change rewrites bundle.json: with --sign-key the result is signed again."""
    import cv2

    site = tmp_path / "site"
    site.mkdir()
    for i in range(12):
        frame = make_frame()
        frame[i:i + 4, i:i + 4] = 140  # normal variation
        cv2.imwrite(str(site / f"{i:02d}.png"), frame)
    public = load_public_key(keys["ours"][1])
    in_place = _tool("calibration.threshold", signed, "--images", site, "--min-images", 10)
    assert in_place.returncode == 0, in_place.stderr
    with pytest.raises(SigningError, match="bundle.json was changed after signing.*re-sign"):
        verify_bundle(signed, public)  # the old signature does not cover the new thresholds
    resigned = _tool("calibration.threshold", signed, "--images", site, "--min-images", 10, "--out", tmp_path / "s",
                     "--sign-key", keys["ours"][0])
    assert resigned.returncode == 0, resigned.stderr
    assert verify_bundle(tmp_path / "s", public) == 3  # bundle.json, model.xml, model.bin


def test_a_bad_sign_key_fails_before_the_work(bundle_dir, tmp_path):
    bogus = tmp_path / "bogus.key"
    bogus.write_text("nope")
    os.chmod(bogus, 0o600)
    proc = _tool("calibration.threshold", bundle_dir, "--images", tmp_path / "nowhere", "--out", tmp_path / "o",
                 "--sign-key", bogus)
    assert proc.returncode == 2 and "is not an unencrypted PEM private key" in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_sign_then_verify_in_process(bundle_dir, tmp_path):
    private, public = generate_keypair(tmp_path / "k")
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    sign_bundle(copy, load_private_key(private))
    assert verify_bundle(copy, load_public_key(public)) == 3


def test_export_signs_what_it_writes(tiny_stfpm_run, keys, tmp_path):
    """`python -m deploy.export ... --sign-key`: the bundle comes out signed (the hook quantize shares)."""
    out = tmp_path / "exported"
    proc = _tool("deploy.export", tiny_stfpm_run, "--out", out, "--no-measure", "--sign-key", keys["ours"][0])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert verify_bundle(out, load_public_key(keys["ours"][1])) == 3
