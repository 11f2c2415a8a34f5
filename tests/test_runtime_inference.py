"""OpenVINO inference on a real (tiny) bundle: outputs, async queue, dropping vs blocking, bench."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
from runtime_helpers import bundle_dir, make_frame  # noqa: F401  (fixture)

from edge_ad.ops.bench import benchmark, format_report
from edge_ad.model.bundle import BundleError
from edge_ad.errors import UsageError
from edge_ad.model.inference import Detector, compile_model, compile_options, load_model
from edge_ad.model.preprocess import preprocess
from edge_ad.sources.capture import Frame


def frame(index: int, boxes=()) -> Frame:
    return Frame(index=index, image=make_frame(boxes), timestamp=index / 25)


def start(detector: Detector, item: Frame) -> bool:
    """Prepare and start one frame the way the pipeline's PrepareStage does (False: unusable or refused)."""
    tensor = detector.try_prepare(item)
    return tensor is not None and detector.start(item, tensor)


def collect(detector: Detector, count: int, timeout: float = 10.0):
    results = []
    deadline = time.monotonic() + timeout
    while len(results) < count and time.monotonic() < deadline:
        results.append(detector.results.get(timeout=timeout))
    return results


def test_outputs_for_normal_and_defect_frames(bundle_dir):
    detector = Detector(bundle_dir)
    assert start(detector, frame(0))
    assert start(detector, frame(1, [(64, 48, 64, 48)]))
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
        assert start(detector, frame(i, [(8, 8, 30, 30)] if i % 2 else []))
    detector.drain()
    consumer.join()
    assert sorted(r.seq for r in done) == list(range(40)) and detector.dropped == 0
    for result in done:
        assert (result.score > 0.4) == bool(result.frame.index % 2)


def test_live_source_drops_new_frames_when_all_requests_are_busy(bundle_dir):
    """With nobody consuming results, the callback blocks on the full results queue, so the
    only request stays busy and further frames are dropped and counted, never queued."""
    from edge_ad.pipeline import PrepareStage

    detector = Detector(bundle_dir, requests=1, result_queue_size=2)
    stage = PrepareStage(detector, workers=1, live=True)
    accepted = 0
    for i in range(30):
        accepted += stage.put(frame(i))
        time.sleep(0.01)
    assert accepted == 3 and detector.dropped == 27 and detector.submitted == 3
    assert len(collect(detector, 3)) == 3
    stage.close()
    detector.drain()


def test_unusable_frame_is_counted_not_fatal(bundle_dir):
    detector = Detector(bundle_dir)
    bad = Frame(index=0, image=np.zeros((0, 0, 3), np.uint8), timestamp=0.0)
    assert not start(detector, bad)
    assert detector.failed == 1 and detector.submitted == 0


def test_unknown_device_is_a_usage_error(bundle_dir):
    with pytest.raises(UsageError, match="not available on this machine"):
        Detector(bundle_dir, device="NPU")


def test_ir_that_does_not_match_the_contract(bundle_dir, tmp_path):
    import openvino as ov
    import openvino.opset13 as ops

    from edge_ad.model.bundle import read_bundle, write_bundle

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


def build_colour_bundle(folder, color: str = "RGB", size: int = 48):
    """A bundle whose map weighs the three input channels differently (0.2, 0.3, 0.5) through a 3x3
    convolution: unlike the absdiff test model it notices swapped channels, a wrong scale or layout."""
    import openvino as ov
    import openvino.opset13 as ops

    from edge_ad.model.bundle import Bundle, ModelInfo, Thresholds, TrainingInfo, write_bundle
    from edge_ad.model.preprocess import PreprocessSpec

    folder.mkdir(parents=True, exist_ok=True)
    image = ops.parameter([1, 3, size, size], np.float32, name="image")
    image.output(0).get_tensor().set_names({"image"})
    weights = np.zeros((1, 3, 3, 3), np.float32)
    weights[0, :, 1, 1] = (0.2, 0.3, 0.5)
    weights[0, :, 0, 0] = (0.05, -0.02, 0.01)
    amap = ops.convolution(image, ops.constant(weights), [1, 1], [1, 1], [1, 1], [1, 1])
    amap.set_friendly_name("anomaly_map")
    amap.output(0).get_tensor().set_names({"anomaly_map"})
    score = ops.reduce_max(amap, ops.constant(np.array([1, 2, 3], dtype=np.int64)), keep_dims=False)
    score.output(0).get_tensor().set_names({"score"})
    ov.save_model(ov.Model([amap, score], [image], "colour"), str(folder / "model.xml"), compress_to_fp16=False)
    write_bundle(folder, Bundle(
        model=ModelInfo(algorithm="colour", backbone="none", precision="fp32"),
        preprocess=PreprocessSpec(height=size, width=size, color=color),
        thresholds=Thresholds(image=0.5, pixel=0.5, image_min=0.0, image_max=1.0, pixel_min=0.0, pixel_max=1.0),
        training=TrainingInfo(category="synthetic", data_root="-", data_fingerprint="-", epochs=None, seed=0,
                              image_size=size, validation_fraction=0.0)))
    return folder


@pytest.mark.parametrize("color", ["RGB", "BGR"])
def test_pixel_conversion_in_the_model_matches_preprocess(tmp_path, color):
    """The runtime feeds the resized uint8 BGR frame; the compiled model's PrePostProcessor converts it.
    Its maps equal those of the plain IR fed `preprocess()` output (what training and export used)."""
    import cv2
    import openvino as ov

    folder = build_colour_bundle(tmp_path / color, color)
    detector = Detector(folder)
    assert detector.host_input.startswith("uint8 NHWC BGR")
    core = ov.Core()
    bundle, model = load_model(folder, core)
    plain = compile_model(core, model, "CPU", "latency").create_infer_request()
    rng = np.random.default_rng(0)
    frames = [cv2.GaussianBlur(rng.integers(0, 256, shape, dtype=np.uint8), (0, 0), 2)
              for shape in ((480, 640, 3), (720, 1280, 3), (100, 80), (30, 40, 3), (48, 48, 3))]
    frames.append(np.dstack([np.full((60, 60), v, np.uint8) for v in (10, 120, 250)]))  # B, G, R differ
    for i, image in enumerate(frames):
        tensor = detector.prepare(Frame(index=i, image=image, timestamp=0.0))
        assert tensor.dtype == np.uint8 and tensor.shape == (1, 48, 48, 3)
        assert start(detector, Frame(index=i, image=image, timestamp=0.0))
        detector.drain()
        result = detector.results.get(timeout=10)
        expected = plain.infer({"image": preprocess(image, bundle.preprocess)[None]})
        reference = np.asarray(expected[plain.model_outputs[0]]).reshape(48, 48)
        error = np.abs(result.anomaly_map - reference).max() / np.abs(reference).max()
        assert error <= 1e-5, (i, error)
        assert result.score == pytest.approx(np.asarray(expected[plain.model_outputs[1]]).reshape(-1)[0], rel=1e-5)
    swapped = plain.infer({"image": preprocess(frames[-1][:, :, ::-1], bundle.preprocess)[None]})
    assert np.abs(np.asarray(swapped[plain.model_outputs[0]]).reshape(48, 48) - result.anomaly_map).max() > 0.1


def test_inference_precision_is_pinned_to_f32_on_cpu(bundle_dir):
    """OpenVINO runs FP32 IRs in bf16 on CPUs that have it unless told otherwise; the bundle's thresholds and
    metrics were measured in f32, so the runtime (and bench) ask for f32 on CPU by default."""
    import openvino.properties.hint as hints

    assert compile_options("CPU", "throughput")[hints.inference_precision].get_type_name() == "f32"
    assert hints.inference_precision not in compile_options("CPU", "latency", "auto")
    assert hints.inference_precision not in compile_options("GPU", "latency")  # other devices: their default
    assert compile_options("GPU", "latency", "f16")[hints.inference_precision].get_type_name() == "f16"
    with pytest.raises(UsageError, match="inference precision"):
        compile_options("CPU", "latency", "int4")
    detector = Detector(bundle_dir)
    assert detector.precision == "f32"
    assert detector.compiled.get_property(hints.inference_precision).get_type_name() == "f32"


def test_bench_measures_what_the_pipeline_runs(bundle_dir):
    """Same compiled model (uint8 input), same precision, same number of requests as edge-ad run."""
    detector = Detector(bundle_dir, mode="throughput")
    assert detector.requests == detector.optimal_requests >= 1
    result = benchmark(bundle_dir, mode="throughput", seconds=0.4, warmup=2)
    assert result["requests_in_flight"] == detector.requests == result["requests_optimal"]
    assert result["inference_precision"] == detector.precision == "f32"
    assert result["host_input"] == detector.host_input and result["streams"] == detector.streams
    assert "inference precision f32" in format_report(result)


def test_host_preprocessing_when_the_ir_refuses_the_uint8_input(bundle_dir, monkeypatch, caplog):
    """Should PrePostProcessor reject an IR, the runtime preprocesses on the host as before (same outputs)."""
    import edge_ad.model.inference as inference

    def refuse(model, spec, name):
        raise RuntimeError("no layout for this input")

    reference = Detector(bundle_dir)
    monkeypatch.setattr(inference, "with_uint8_input", refuse)
    fallback = Detector(bundle_dir)
    assert fallback.host_input.startswith("float32 NCHW") and "preprocessing on the host" in caplog.text
    image = make_frame([(64, 48, 64, 48)])
    assert fallback.prepare(frame(0, [(64, 48, 64, 48)])).dtype == np.float32
    maps = []
    for detector in (reference, fallback):
        assert start(detector, Frame(index=0, image=image, timestamp=0.0))
        detector.drain()
        maps.append(detector.results.get(timeout=10).anomaly_map)
    assert np.abs(maps[0] - maps[1]).max() <= 1e-5 * np.abs(maps[1]).max()
