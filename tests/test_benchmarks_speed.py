"""benchmarks.speed / footprint / roofline on a tiny generated variant (no real data, small repeat counts).

Checks the method, not the machine: FLOPs of a hand-countable model (including a depthwise conv),
the structure and sanity of every report (p99 >= p50 > 0, sizes equal to the files, achieved GFLOP/s =
FLOPs / p50), peak RSS against a process of known size, the venv size accounting and its cache, and that
bad input is one `error:` line with exit code 2.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import footprint, roofline, speed
from benchmarks.variants import Variant, save_variants
from calibration.quantize import main as quantize_main


@pytest.fixture(scope="module")
def tiny_variant(tiny_stfpm_run: Path, tiny_fp32_bundle: Path, tmp_path_factory) -> Variant:
    """The 64-px STFPM run, its FP32 bundle and a quick INT8 bundle (plain recipe, 2 calibration images)."""
    int8 = tmp_path_factory.mktemp("speed_int8") / "bundle"
    assert quantize_main([str(tiny_fp32_bundle), "--out", str(int8), "--recipe", "plain", "--subset-size", "2",
                          "--latency-runs", "0"]) == 0
    return Variant("stfpm", "mobilenet_v2", "synthetic", tiny_stfpm_run, tiny_fp32_bundle, int8)


@pytest.fixture(scope="module")
def speed_report(tiny_variant: Variant, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("speed_out")
    other = Variant("stfpm", "mobilenet_v2", "other", tiny_variant.run_dir, tiny_variant.fp32, tiny_variant.int8)
    report = speed.measure_speed([other, tiny_variant], out, category="synthetic", runs=5, warmup=1, rounds=1,
                                 throughput_seconds=0.2, pipeline_frames=20, pipeline_repeat=1, video_size=(96, 96))
    return report, out


class DepthwiseNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)  # 1x3x32x32 -> 1x8x16x16
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise
        self.pw = torch.nn.Conv2d(8, 16, 1)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        y = self.pw(torch.relu(self.dw(self.stem(x))))
        return self.fc(y.mean(dim=(2, 3)))


def test_flop_count_matches_hand_count_including_depthwise():
    model = DepthwiseNet().eval()
    x = torch.rand(1, 3, 32, 32)
    positions = 16 * 16
    macs = {"stem": positions * 8 * 3 * 9, "dw": positions * 8 * 1 * 9, "pw": positions * 16 * 8, "fc": 16 * 4}
    counted = roofline.count_flops(model, x)
    assert counted["total"] == 2 * sum(macs.values())
    assert counted["by_op"]["aten.convolution"] == 2 * (macs["stem"] + macs["dw"] + macs["pw"])
    assert counted["by_op"]["aten.addmm"] == 2 * macs["fc"]

    traffic = roofline.count_traffic(model, x)
    assert traffic["weight_bytes"] == 4 * sum(p.numel() for p in model.parameters())
    act_in = 4 * (3 * 32 * 32 + 8 * positions + 8 * positions + 16)  # stem, dw, pw inputs; fc input
    act_out = 4 * (8 * positions + 8 * positions + 16 * positions + 4)
    assert traffic["activation_in"] == act_in and traffic["activation_out"] == act_out
    assert traffic["uncounted_elements"] >= 8 * positions  # relu at least; mean too


def test_latency_rounds_interleave_and_take_medians():
    keys = [("a", "torch"), ("a", "fp32"), ("b", "torch")]
    visits, rounds_done = [], []

    def runner(key):
        def call():
            visits.append(key)
            time.sleep(0.002 if key[0] == "a" else 0.006)
        return call

    result = speed.measure_latency({k: runner(k) for k in keys}, runs=3, warmup=1, rounds=3,
                                   on_round=rounds_done.append)
    segments = visits[::4]  # 1 warm-up + 3 timed calls per segment, segments never split
    assert all(visits[i:i + 4] == [visits[i]] * 4 for i in range(0, len(visits), 4))
    assert segments == keys + keys[1:] + keys[:1] + keys[2:] + keys[:2]  # every key once per round, rotated
    assert rounds_done == [0, 1, 2]
    for key, lat in result.items():
        assert len(lat["p50_rounds"]) == 3 and lat["p50"] == pytest.approx(statistics.median(lat["p50_rounds"]), abs=1e-3)
        assert lat["p99"] >= lat["p50"] >= lat["min"] >= 2.0
    assert result[("b", "torch")]["p50"] > result[("a", "torch")]["p50"]


def test_speed_report(speed_report, tiny_variant):
    report, out = speed_report
    assert json.loads((out / "speed.json").read_text()) == json.loads(json.dumps(report))
    (row,) = report["results"]  # one per (algorithm, backbone), of the asked category
    assert row["category"] == "synthetic" and row["input"] == "1x3x64x64"
    for kind in speed.BACKENDS:
        lat = row["latency_ms"][kind]
        assert lat["p99"] >= lat["p50"] >= lat["min"] > 0, (kind, lat)
        assert len(lat["p50_rounds"]) == 1 and lat["runs_per_round"] == 5
        assert row["throughput_fps"][kind] > 0
    assert row["throughput_fps"]["torch"] == pytest.approx(1000.0 / row["latency_ms"]["torch"]["p50"])
    assert len(row["throughput_fps_rounds"]["fp32"]) == 1
    sizes = row["size_bytes"]
    assert sizes["fp32"] == sum((tiny_variant.fp32 / f).stat().st_size for f in ("model.xml", "model.bin"))
    assert sizes["torch"] == (tiny_variant.run_dir / "model.pt").stat().st_size
    assert sizes["int8"] < sizes["fp32"]
    # Compiled as the runtime compiles it: f32, or bf16 where this CPU has it and the bundle verified it.
    import openvino as ov

    from edge_ad.model.bundle import read_bundle
    from edge_ad.model.precision import choose_precision

    expected, _ = choose_precision(None, "CPU", read_bundle(tiny_variant.fp32), ov.Core())
    assert row["compiled"]["fp32"]["latency"]["inference_precision"] == expected
    for kind in ("fp32", "int8"):
        pipe = row["pipeline"][kind]
        assert pipe["fps"] > 0 and pipe["processed"] == 20 and pipe["errors"] == 0
    flat = {r["engine"]: r for r in report["rows"]}
    assert set(flat) == set(speed.BACKENDS) and flat["int8"]["p50_ms"] == row["latency_ms"]["int8"]["p50"]
    assert flat["torch"]["pipeline_fps"] is None and flat["fp32"]["pipeline_fps"] == row["pipeline"]["fp32"]["fps"]
    md = (out / "speed.md").read_text()
    assert report["machine"]["cpu"] in md and "| STFPM | mobilenet_v2 | OpenVINO INT8 IR |" in md


def test_roofline_from_speed_json(speed_report, tmp_path):
    report, out = speed_report
    variants = [Variant.from_json({**{k: row[k] for k in ("algorithm", "backbone", "category", "run_dir")},
                                   "fp32": row["fp32_bundle"], "int8": row["int8_bundle"]})
                for row in report["results"]]
    result = roofline.measure_roofline(variants, tmp_path, speed_json=out / "speed.json", ghz=2.0,
                                       bandwidth_mb=4, sgemm_n=128)
    (row,) = result["results"]
    assert row["flops"] > 1e6 and row["flops_by_op"]["aten.convolution"] > 0
    for kind in speed.BACKENDS:
        b = row["backends"][kind]
        p50 = report["results"][0]["latency_ms"][kind]["p50"]
        assert b["achieved_gflops"] == pytest.approx(row["flops"] / (p50 / 1000.0) / 1e9)
        assert 0 < b["percent_of_peak"] < 100 and b["intensity"] == pytest.approx(row["flops"] / b["bytes"])
    assert row["backends"]["int8"]["weight_bytes"] < row["backends"]["fp32"]["weight_bytes"]
    peak = result["peak"]
    assert peak["gflops"] == pytest.approx(peak["cores"] * 2.0 * peak["flops_per_cycle_per_core"])
    assert result["bandwidth"]["gbs"] > 0 and result["sgemm"]["gflops"] > 0
    assert (tmp_path / "roofline.png").stat().st_size > 10_000
    assert (tmp_path / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "roofline.png" in (tmp_path / "roofline.md").read_text()


def test_peak_rss_sees_a_known_allocation():
    small = footprint.peak_rss([sys.executable, "-c", "pass"])
    big = footprint.peak_rss([sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"])
    assert 0 < small["peak_rss_bytes"] < 200 * 2**20
    assert 300 * 2**20 <= big["peak_rss_bytes"] < small["peak_rss_bytes"] + 400 * 2**20


def test_footprint_of_edge_ad(tiny_variant, tmp_path):
    report = footprint.measure_footprint([tiny_variant], tmp_path, category="synthetic", frames=20,
                                         modes=("latency",), venv=False)
    rows = report["edge_ad"]
    assert [(r["precision"], r["mode"]) for r in rows] == [("fp32", "latency"), ("int8", "latency")]
    for r in rows:  # openvino + the model on top of a process that only imports the libraries
        assert r["peak_rss_bytes"] > report["baseline"]["peak_rss_bytes"] > 20 * 2**20
        assert r["peak_rss_bytes"] < 2 * 2**30
    assert report["runtime_env"] is None
    assert "| STFPM | mobilenet_v2 | INT8 IR | latency |" in (tmp_path / "footprint.md").read_text()


def test_venv_size_accounting_and_cache(tmp_path, monkeypatch):
    venv = tmp_path / "cache" / "venv"
    site = venv / "lib" / "python3.11" / "site-packages"
    (site / "big").mkdir(parents=True)
    (site / "big" / "a.bin").write_bytes(b"x" * 300_000)
    (site / "big" / "b.bin").write_bytes(b"x" * 100_000)
    (site / "small.py").write_bytes(b"x" * 1000)
    (site / "pip").mkdir()
    (site / "pip" / "p.py").write_bytes(b"x" * 50_000)
    sizes = footprint.measure_venv(venv)
    assert sizes["site_packages_size"]["apparent_bytes"] == 451_000 and sizes["site_packages_size"]["files"] == 4
    assert [e["name"] for e in sizes["largest"]][:2] == ["big", "pip"]
    assert sizes["pip_setuptools_disk_bytes"] >= 50_000

    (venv / "bin").mkdir()
    (venv / "bin" / "python").write_text("")
    marker = tmp_path / "cache" / "built.json"
    marker.write_text(json.dumps({"key": footprint._cache_key(footprint.REPO), "built": "then", "python": "3"}))
    monkeypatch.setattr(footprint.subprocess, "run", lambda *a, **k: pytest.fail("rebuilt a cached venv"))
    assert footprint.ensure_runtime_venv(tmp_path / "cache")["cached"] is True


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_input_is_one_line_exit_2(tmp_path, capsys, tiny_stfpm_run):
    out = tmp_path / "out"
    assert speed.main(["--variants", str(tmp_path / "nope.json"), "--out", str(out)]) == 2
    assert "not found" in _one_error_line(capsys)

    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    assert footprint.main(["--variants", str(bad), "--out", str(out)]) == 2
    assert "not valid JSON" in _one_error_line(capsys)

    missing = tmp_path / "missing.json"
    save_variants([Variant("stfpm", "mobilenet_v2", "bottle", tiny_stfpm_run, tmp_path / "no-fp32", tmp_path / "x")],
                  missing)
    assert speed.main(["--variants", str(missing), "--out", str(out), "--no-pipeline"]) == 2
    assert "no-fp32" in _one_error_line(capsys)

    assert roofline.main(["--variants", str(missing), "--out", str(out)]) == 2
    assert "speed.json" in _one_error_line(capsys)

    with pytest.raises(SystemExit) as exc:
        speed.main(["--out", str(out)])
    assert exc.value.code == 2
    assert "--variants" in _one_error_line(capsys)
