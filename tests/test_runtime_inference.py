"""OpenVINO inference on a real (tiny) bundle: outputs, async queue, dropping vs blocking, bench."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
from runtime_helpers import bundle_dir, make_frame  # noqa: F401  (fixture)

from edge_ad.bench import benchmark, format_report
from edge_ad.bundle import BundleError
from edge_ad.errors import UsageError
from edge_ad.inference import Detector
from edge_ad.sources import Frame


def frame(index: int, boxes=()) -> Frame:
    return Frame(index=index, image=make_frame(boxes), timestamp=index / 25)


def collect(detector: Detector, count: int, timeout: float = 10.0):
    results = []
    deadline = time.monotonic() + timeout
    while len(results) < count and time.monotonic() < deadline:
        results.append(detector.results.get(timeout=timeout))
    return results


def test_outputs_for_normal_and_defect_frames(bundle_dir):
    detector = Detector(bundle_dir)
    assert detector.submit(frame(0), block=True)
    assert detector.submit(frame(1, [(64, 48, 64, 48)]), block=True)
    detector.drain()
    normal, defect = sorted(collect(detector, 2), key=lambda r: r.seq)
    assert normal.anomaly_map.shape == (64, 64) and normal.error is None
    assert normal.score < 0.01 and defect.score == pytest.approx(0.5, abs=0.01)
    assert defect.anomaly_map[20, 24] == pytest.approx(0.5, abs=0.01)  # inside the box (model pixels)
    assert normal.latency > 0


def test_throughput_mode_with_many_requests_processes_every_frame_in_seq(bundle_dir):
    detector = Detector(bundle_dir, mode="throughput", requests=4)
    assert detector.requests == 4
    done = []
    consumer = threading.Thread(target=lambda: done.extend(collect(detector, 40)))
    consumer.start()
    for i in range(40):
        assert detector.submit(frame(i, [(8, 8, 30, 30)] if i % 2 else []), block=True)
    detector.drain()
    consumer.join()
    assert sorted(r.seq for r in done) == list(range(40)) and detector.dropped == 0
    for result in done:
        assert (result.score > 0.4) == bool(result.frame.index % 2)


def test_live_source_drops_new_frames_when_all_requests_are_busy(bundle_dir):
    """With nobody consuming results, the callback blocks on the full results queue, so the
    only request stays busy and further frames are dropped and counted, never queued."""
    detector = Detector(bundle_dir, requests=1, result_queue_size=2)
    accepted = 0
    for i in range(30):
        accepted += detector.submit(frame(i), block=False)
        time.sleep(0.01)
    assert accepted == 3 and detector.dropped == 27 and detector.submitted == 3
    assert len(collect(detector, 3)) == 3
    detector.drain()


def test_unusable_frame_is_counted_not_fatal(bundle_dir):
    detector = Detector(bundle_dir)
    bad = Frame(index=0, image=np.zeros((0, 0, 3), np.uint8), timestamp=0.0)
    assert not detector.submit(bad, block=True)
    assert detector.failed == 1 and detector.submitted == 0


def test_unknown_device_is_a_usage_error(bundle_dir):
    with pytest.raises(UsageError, match="not available on this machine"):
        Detector(bundle_dir, device="NPU")


def test_ir_that_does_not_match_the_contract(bundle_dir, tmp_path):
    import openvino as ov
    import openvino.opset13 as ops

    from edge_ad.bundle import read_bundle, write_bundle

    folder = tmp_path / "wrong"
    shutil.copytree(bundle_dir, folder)
    x = ops.parameter([1, 3, 64, 64], np.float32, name="input")
    x.output(0).get_tensor().set_names({"input"})
    ov.save_model(ov.Model([ops.relu(x)], [x]), str(folder / "model.xml"))
    write_bundle(folder, read_bundle(folder, verify=False))
    with pytest.raises(BundleError, match="no input 'image'"):
        Detector(folder)


def test_bench_measures_latency_and_throughput(bundle_dir):
    result = benchmark(bundle_dir, seconds=0.4, warmup=2)
    lat = result["latency_ms"]
    assert 0 < lat["min"] <= lat["median"] <= lat["p99"] <= lat["max"]
    assert result["latency_requests"] >= 10 and result["throughput_fps"] > 0
    assert result["model"]["algorithm"] == "absdiff" and result["input"] == "1x3x64x64"
    json.dumps(result)
    text = format_report(result)
    assert "latency" in text and "throughput" in text and "fps" in text
