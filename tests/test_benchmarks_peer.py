"""The anomalib peer benchmark's parts that need no anomalib: weight-name mapping, table logic, bad input.

The full run (anomalib's venv, training, export) takes tens of minutes and is not a test; what can go
wrong without it is checked here: our MobileNetV2 / EfficientNet-Lite0 keys onto timm's names (against
names written down from timm's modules), the worker's strict loader, ratio and verdict arithmetic, and
that bad input ends with one line and exit code 2 before any pip or training starts.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from benchmarks import peer_anomalib as peer
from benchmarks.peer import anomalib_worker as worker
from benchmarks.peer.timm_names import NameMappingError, rename_state_dict_keys, timm_tap


# -- names onto timm ------------------------------------------------------------------------------------------

def test_mobilenet_v2_keys_map_one_to_one_onto_timm_names():
    keys = list(torchvision.models.mobilenet_v2(weights=None).state_dict())
    mapping = rename_state_dict_keys("mobilenet_v2", keys)
    assert len(set(mapping.values())) == len(keys)
    # timm mobilenetv2_100: conv_stem/bn1, blocks.<stage>.<block> (stage 0 depthwise-separable), conv_head/bn2
    expected = {
        "features.0.0.weight": "conv_stem.weight",
        "features.0.1.running_var": "bn1.running_var",
        "features.1.conv.0.0.weight": "blocks.0.0.conv_dw.weight",
        "features.1.conv.1.weight": "blocks.0.0.conv_pw.weight",
        "features.1.conv.2.bias": "blocks.0.0.bn2.bias",
        "features.2.conv.0.0.weight": "blocks.1.0.conv_pw.weight",
        "features.3.conv.1.0.weight": "blocks.1.1.conv_dw.weight",
        "features.6.conv.2.weight": "blocks.2.2.conv_pwl.weight",
        "features.7.conv.3.running_mean": "blocks.3.0.bn3.running_mean",
        "features.13.conv.1.1.weight": "blocks.4.2.bn2.weight",
        "features.17.conv.0.1.bias": "blocks.6.0.bn1.bias",
        "features.18.0.weight": "conv_head.weight",
        "features.18.1.num_batches_tracked": "bn2.num_batches_tracked",
        "classifier.1.weight": "classifier.weight",
    }
    assert {k: mapping[k] for k in expected} == expected
    assert {m.split(".")[1] for m in mapping.values() if m.startswith("blocks.")} == {str(i) for i in range(7)}


def test_efficientnet_lite0_keys_map_onto_timm_names():
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    keys = list(efficientnet.EfficientNet.from_name("efficientnet-lite0").state_dict())
    mapping = rename_state_dict_keys("efficientnet_lite0", keys)
    assert len(set(mapping.values())) == len(keys)
    assert mapping["_blocks.0._depthwise_conv.weight"] == "blocks.0.0.conv_dw.weight"
    assert mapping["_blocks.1._expand_conv.weight"] == "blocks.1.0.conv_pw.weight"
    assert mapping["_blocks.10._bn2.running_var"] == "blocks.4.2.bn3.running_var"
    assert mapping["_blocks.15._project_conv.weight"] == "blocks.6.0.conv_pwl.weight"
    assert mapping["_bn1.weight"] == "bn2.weight" and mapping["_fc.bias"] == "classifier.bias"


def test_taps_map_to_timm_stage_ends_and_mid_stage_taps_are_refused():
    assert [timm_tap("mobilenet_v2", t) for t in ("features.3", "features.6", "features.13")] == \
        ["blocks.1", "blocks.2", "blocks.4"]
    assert [timm_tap("efficientnet_lite0", t) for t in ("_blocks.2", "_blocks.4", "_blocks.10")] == \
        ["blocks.1", "blocks.2", "blocks.4"]
    with pytest.raises(NameMappingError, match="inside stage"):
        timm_tap("mobilenet_v2", "features.12")
    with pytest.raises(NameMappingError):
        rename_state_dict_keys("mobilenet_v2", ["features.19.conv.0.0.weight"])
    with pytest.raises(NameMappingError):
        rename_state_dict_keys("resnet18", ["conv1.weight"])


def test_worker_loader_refuses_incomplete_or_misshaped_weights():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in model.state_dict().items()}
    state["extra.weight"] = torch.zeros(1)  # a dropped head: allowed
    assert worker.load_checked(model, state, "toy") == len(model.state_dict())
    assert model[0].weight.equal(state["0.weight"])
    with pytest.raises(worker.WorkerError, match="no counterpart"):
        worker.load_checked(model, {k: v for k, v in state.items() if k != "1.running_var"}, "toy")
    with pytest.raises(worker.WorkerError, match="shape mismatch"):
        worker.load_checked(model, {**state, "0.weight": torch.zeros(4, 3, 5, 5)}, "toy")


# -- table logic ----------------------------------------------------------------------------------------------

def test_ratios_and_verdicts():
    assert peer.ratio(130.0, 100.0) == pytest.approx(1.3)
    assert peer.ratio(None, 1.0) is None and peer.ratio(1.0, 0) is None
    assert peer.verdict(1.3, 1.3) == "met" and peer.verdict(1.29, 1.3) == "NOT met"
    assert peer.verdict(0.05, 0.10, higher_is_better=False) == "met"
    assert peer.verdict(0.10, 0.10, higher_is_better=False) == "NOT met"
    assert peer.verdict(None, 1.3) == "not measured"


def test_comparison_rows_and_markdown():
    ours = {"image_auroc_int8": 0.99, "image_auroc_fp32": 1.0, "pixel_auroc_int8": 0.98, "train_wall_s": 100.0,
            "fps_video": 60.0, "fps_images": 30.0, "fps_bench": 120.0}
    theirs = {"image_auroc": 1.0, "ir_image_auroc": 1.0, "pixel_auroc": 0.97, "train_wall_s": 200.0,
              "fps_from_file": 25.0, "fps_from_array": 40.0}
    rows = {row["measure"].split(":")[0].split(" (")[0]: row for row in peer.comparison_rows(ours, theirs)}
    assert rows["image AUROC"]["verdict"] == "NOT met"  # 0.99 < 1.0
    fps = rows["end-to-end fps"]
    assert fps["ratio"] == pytest.approx(2.4) and fps["verdict"] == "met"
    assert rows["end-to-end fps, same PNG files"]["ratio"] == pytest.approx(1.2)
    assert rows["end-to-end fps, same PNG files"]["verdict"] == "NOT met"
    assert rows["training wall time, s"]["ratio"] == pytest.approx(0.5)
    size = peer.size_row(150 * 2**20, 3000 * 2**20)
    assert size["ratio"] == pytest.approx(0.05) and size["verdict"] == "met"
    report = {"machine": {"cpu": "Test CPU", "cores": 2, "load_average_start": [1.0, 1.0, 1.0], "date": "today",
                          "openvino": "2026.0"}, "load_average_end": [2.0, 2.0, 2.0],
              "anomalib_versions": {"anomalib": "2.7.0"},
              "comparisons": [{"name": "STFPM", "rows": peer.comparison_rows(ours, theirs)},
                              {"name": "runtime", "rows": [size]}]}
    text = peer.markdown(report)
    assert "Test CPU" in text and "anomalib 2.7.0" in text
    assert "| STFPM | end-to-end fps: ours INT8" in text and "| 60.0 | 25.0 | 2.40x |" in text
    assert "| 150 MiB | 3,000 MiB | 5.0% | < 10% | met |" in text


def test_cuda_only_bytes_counts_cuda_packages_and_torch_cuda_libraries(tmp_path):
    site = tmp_path / "site-packages"
    files = {"nvidia/cublas/lib/libcublas.so": 1000, "nvidia_cublas-13.dist-info/RECORD": 10, "triton/x.so": 300,
             "cuda/bindings.so": 50, "torch/lib/libtorch_cuda.so": 700, "torch/lib/libc10_cuda.so": 20,
             "torch/lib/libtorch_cpu.so": 4000, "numpy/core.so": 90, "openvino/x.so": 60}
    for name, size in files.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_bytes(b"\0" * size)
    cuda = peer.cuda_only_bytes(site)
    folders = sum(peer.tree_size(site / d) - sum(v for k, v in files.items() if k.startswith(d + "/"))
                  for d in ("nvidia", "nvidia_cublas-13.dist-info", "triton", "cuda"))  # du counts directory entries
    assert cuda == 1000 + 10 + 300 + 50 + 700 + 20 + folders
    assert peer.size_row(100, 1000, cpu_only_estimate=True)["measure"].startswith("installed size, theirs ESTIMATED")


def test_missing_numbers_are_not_measured():
    rows = peer.comparison_rows({}, {})
    assert all(row["verdict"] in ("", "not measured") for row in rows)
    assert "not measured" in peer.markdown({"machine": {"cpu": "c", "cores": 1, "load_average_start": [],
                                                        "date": "d", "openvino": "o"},
                                            "comparisons": [{"name": "DFM", "rows": rows}]})


# -- bad input: one line, exit 2, nothing installed -----------------------------------------------------------

def _data(tmp_path: Path) -> Path:
    for sub in ("bottle/train/good", "bottle/test/good"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    return tmp_path / "data"


def _variants(tmp_path: Path, bundles: bool) -> Path:
    entries = []
    for algorithm in ("stfpm", "dfm"):
        run, fp32, int8 = (tmp_path / f"{algorithm}-{kind}" for kind in ("run", "fp32", "int8"))
        for folder in (run, fp32, int8):
            folder.mkdir()
        (run / "config.json").write_text("{}")
        if bundles:
            (fp32 / "bundle.json").write_text("{}")
            (int8 / "bundle.json").write_text("{}")
        entries.append({"algorithm": algorithm, "backbone": "mobilenet_v2", "category": "bottle", "run_dir": str(run),
                        "fp32": str(fp32), "int8": str(int8)})
    path = tmp_path / "variants.json"
    path.write_text(json.dumps(entries))
    return path


@pytest.mark.parametrize("case, message", [
    ("no data", "no bottle/train and bottle/test folders"),
    ("no variants file", "no such file"),
    ("no such variant", "no stfpm mobilenet_v2 bottle variant"),
    ("no bundle", "has no bundle.json"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, message):
    data = _data(tmp_path) if case != "no data" else tmp_path / "missing"
    variants = _variants(tmp_path, bundles=case != "no bundle")
    if case == "no variants file":
        variants = tmp_path / "absent.json"
    if case == "no such variant":
        variants.write_text(json.dumps([v for v in json.loads(variants.read_text()) if v["algorithm"] != "stfpm"]))
    venv = tmp_path / "never-created-venv"
    code = peer.main(["--data-root", str(data), "--variants", str(variants), "--out", str(tmp_path / "out"),
                      "--venv", str(venv)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("peer_anomalib: error:") and message in err, err
    assert "Traceback" not in err and not venv.exists() and not (tmp_path / "out").exists()


def test_pip_failure_is_an_input_error(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "python"
    fake.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found for anomalib==2.7.0' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(peer.PeerInputError, match="No matching distribution") as caught:
        peer._pip(venv, ["anomalib==2.7.0"], tmp_path / "pip.log", "installing anomalib")
    assert caught.value.exit_code == 2 and "pip exited 1" in str(caught.value)


def test_worker_without_arguments_is_a_usage_error(capsys):
    assert worker.main([]) == 2
    assert "usage" in capsys.readouterr().err
    assert sys.modules.get("anomalib") is None  # nothing here imported anomalib
