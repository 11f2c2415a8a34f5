"""benchmarks.precision: every variant measured as compiled, kernels classified by their arithmetic."""

from __future__ import annotations

import json

from benchmarks.precision import _arithmetic, main
from benchmarks.tiny_bundle import build_bundle


def test_kernel_names_decide_the_arithmetic():
    assert _arithmetic("brgconv_avx512_1x1_I8", "U8") == "i8"
    assert _arithmetic("brgemm_avx512_f32", "u8") == "f32"  # INT8-weight matmul, f32 arithmetic
    assert _arithmetic("brgconv_avx512_dw_bf16", "bf16") == "bf16"
    assert _arithmetic("unknown", "U8") == "i8" and _arithmetic("ref", "f32") == "f32"


def test_table_on_tiny_bundles(tmp_path, capsys):
    build_bundle(tmp_path / "x-fp32")
    build_bundle(tmp_path / "x-int8")  # stands in for an INT8 bundle: same files, another folder
    assert main(["--bundles", str(tmp_path), "--models", "x,missing", "--seconds", "0.05", "--rounds", "2",
                 "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "precision.json").read_text())
    rows = report["models"]["x"]["variants"]
    has_bf16 = "BF16" in report["machine"]["openvino_capabilities"]
    # bf16 rows only where the CPU has bf16 (elsewhere OpenVINO would run them as f32); no int8-w8 folder here
    assert list(rows) == (["FP32 (f32)", "FP32 as bf16", "INT8 (7-bit w)", "INT8 as bf16"] if has_bf16
                          else ["FP32 (f32)", "INT8 (7-bit w)"])
    assert all(len(r["latency_rounds_ms"]) == 2 and r["throughput_fps"] > 0 for r in rows.values())
    assert rows["FP32 (f32)"]["compiled_precision"] == "f32"
    if has_bf16:
        assert rows["FP32 as bf16"]["compiled_precision"] == "bf16"
    assert rows["FP32 (f32)"]["throughput_vs_fp32"] == 1.0
    assert "ops_int8" in report["models"]["x"] and "missing" not in report["models"]
    out = capsys.readouterr().out
    assert "1.7x target" in out and report["machine"]["openvino_capabilities"]
    assert ("| x | FP32 as bf16 |" in out) == has_bf16
    assert ("No bf16 rows" in out) != has_bf16
