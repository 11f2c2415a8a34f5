"""`--inference-precision auto`: bf16 only where the CPU has it and the bundle verified it; f32 otherwise."""

from __future__ import annotations

import json
from dataclasses import asdict

import openvino as ov
import openvino.properties.hint as hints
import pytest

from edge_ad.model.bundle import BundleError, PrecisionCheck, read_bundle, write_bundle
from edge_ad.model.inference import Detector
from edge_ad.model.precision import choose_precision, cpu_has_bf16
from edge_ad.ops.bench import benchmark, format_report

VERIFIED = PrecisionCheck(precision="bf16", measured=True, verified=True, reason="bf16 verified on test CPU",
                          cpu="test CPU", image_auroc_delta=0.0, spearman=0.999, max_score_deviation=0.004,
                          validation_decisions_agree=True, validation_images=30, test_images=80)


class FakeCore:
    def __init__(self, capabilities):
        self.capabilities = capabilities

    def get_property(self, device, name):
        assert (device, name) == ("CPU", "OPTIMIZATION_CAPABILITIES")
        return self.capabilities


def with_checks(bundle_dir, checks):
    bundle = read_bundle(bundle_dir)
    bundle.precision_checks = checks
    write_bundle(bundle_dir, bundle)
    return read_bundle(bundle_dir)


@pytest.fixture
def own_bundle(tmp_path):
    from benchmarks.tiny_bundle import build_bundle

    return build_bundle(tmp_path / "bundle")


def test_auto_picks_bf16_only_when_the_cpu_has_it_and_the_bundle_verified_it(own_bundle):
    bf16_cpu, plain_cpu = FakeCore(["FP32", "INT8", "BF16"]), FakeCore(["FP32", "INT8"])
    bare = read_bundle(own_bundle)  # exported before bf16 checks: no entry at all
    assert choose_precision(None, "CPU", bare, bf16_cpu)[0] == "f32"
    verified = with_checks(own_bundle, {"bf16": VERIFIED})
    assert choose_precision("auto", "CPU", verified, bf16_cpu) == ("bf16", "this CPU has bf16 and the bundle "
                                                                   "verified it (bf16 verified on test CPU)")
    precision, reason = choose_precision(None, "CPU", verified, plain_cpu)
    assert precision == "f32" and "no bf16" in reason
    failed = with_checks(own_bundle, {"bf16": PrecisionCheck("bf16", True, False, "bf16 failed on X: Spearman 0.9")})
    precision, reason = choose_precision(None, "CPU", failed, bf16_cpu)
    assert precision == "f32" and "Spearman 0.9" in reason
    unmeasured = with_checks(own_bundle, {"bf16": PrecisionCheck("bf16", False, False, "not verified: no bf16")})
    assert choose_precision(None, "CPU", unmeasured, bf16_cpu)[0] == "f32"
    assert choose_precision("bf16", "CPU", failed, plain_cpu) == ("bf16", "pinned by --inference-precision")
    assert choose_precision("f32", "CPU", verified, bf16_cpu)[0] == "f32"
    assert choose_precision(None, "GPU", verified, bf16_cpu)[0] == "auto"  # other devices: their own default


def test_detector_runs_a_verified_bundle_in_bf16_on_a_bf16_cpu(own_bundle, caplog):
    """On this machine's real CPU: bf16 iff OpenVINO reports BF16; the compiled model says the same."""
    expected = "bf16" if cpu_has_bf16(ov.Core()) else "f32"
    assert Detector(own_bundle).precision == "f32"  # no check: f32
    with_checks(own_bundle, {"bf16": VERIFIED})
    caplog.set_level("INFO", logger="edge_ad.inference")
    detector = Detector(own_bundle)
    assert detector.precision == expected
    assert detector.compiled.get_property(hints.inference_precision).get_type_name() == expected
    assert f"inference precision {expected}: " in caplog.text
    pinned = Detector(own_bundle, precision="f32")
    assert pinned.precision == "f32" and pinned.precision_reason == "pinned by --inference-precision"
    result = benchmark(own_bundle, seconds=0.2, warmup=1)
    assert result["inference_precision"] == expected
    assert result["inference_precision_reason"] == detector.precision_reason
    assert detector.precision_reason in format_report(result)


def test_precision_checks_round_trip_and_old_bundles_load(own_bundle):
    bundle = with_checks(own_bundle, {"bf16": VERIFIED})
    assert bundle.precision_checks == {"bf16": VERIFIED}
    data = json.loads((own_bundle / "bundle.json").read_text())
    assert data["precision_checks"]["bf16"] == asdict(VERIFIED)
    del data["precision_checks"]  # a bundle written before the field existed
    (own_bundle / "bundle.json").write_text(json.dumps(data))
    assert read_bundle(own_bundle).precision_checks == {}
    data["precision_checks"] = {"bf16": {"precision": "bf16", "fast": True}}
    (own_bundle / "bundle.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="malformed"):
        read_bundle(own_bundle)
