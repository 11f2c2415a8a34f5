"""`edge-ad bench`: how fast is this bundle on this machine, before it goes on the line.

Latency: single synchronous requests after warm-up (what one frame waits).
Throughput: the AsyncInferQueue with OpenVINO's optimal number of requests
(what the device sustains). The model is compiled exactly as `edge-ad run`
compiles it (`compile_bundle`: uint8 input with the pixel conversion in the
graph, performance hint, inference precision, request count), so pipeline fps
divided by this throughput compares like with like. The CPU time per frame
of the throughput phase (all threads) is reported too: on a machine where
inference and frame decoding share the cores, it is what the host work per
frame is to be compared with. The host's share of preprocessing (the resize)
of a 1280x720 frame is timed as well.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import openvino as ov

from edge_ad.deliver.events import model_identity
from edge_ad.model.inference import compile_bundle


def _summary_ms(samples: list[float]) -> dict:
    ms = np.asarray(samples, dtype=np.float64) * 1000.0
    return {
        "median": round(float(np.median(ms)), 3),
        "mean": round(float(ms.mean()), 3),
        "p90": round(float(np.percentile(ms, 90)), 3),
        "p99": round(float(np.percentile(ms, 99)), 3),
        "min": round(float(ms.min()), 3),
        "max": round(float(ms.max()), 3),
    }


def benchmark(bundle_dir: str | Path, device: str = "CPU", mode: str = "latency", seconds: float = 6.0,
              warmup: int = 5, requests: int = 0, precision: str | None = None) -> dict:
    """Measure; `seconds` is split evenly between the latency and the throughput phase."""
    built = compile_bundle(bundle_dir, device, mode, precision)
    bundle, compiled = built.bundle, built.compiled
    spec = bundle.preprocess
    name = bundle.model.input_name
    tensor = built.example_input()
    phase = max(seconds / 2.0, 0.05)

    request = compiled.create_infer_request()
    for _ in range(warmup):
        request.infer({name: tensor}, share_inputs=True)
    latencies: list[float] = []
    end = time.perf_counter() + phase
    while time.perf_counter() < end or len(latencies) < 10:
        start = time.perf_counter()
        request.infer({name: tensor}, share_inputs=True)
        latencies.append(time.perf_counter() - start)

    nireq = requests or built.optimal_requests  # what Detector uses for the same options
    infer_queue = ov.AsyncInferQueue(compiled, nireq)
    for _ in range(nireq):
        infer_queue.start_async({name: tensor}, share_inputs=True)
    infer_queue.wait_all()
    frames = 0
    cpu_start = time.process_time()  # all threads of this process: what a frame costs the machine
    start = time.perf_counter()
    end = start + phase
    while time.perf_counter() < end or frames < nireq:
        infer_queue.start_async({name: tensor}, share_inputs=True)  # blocks while all requests are busy
        frames += 1
    infer_queue.wait_all()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start

    frame = np.random.default_rng(1).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    prep = []
    for _ in range(20):
        start = time.perf_counter()
        built.prepare(frame, spec)
        prep.append(time.perf_counter() - start)

    return {
        "bundle": str(Path(bundle_dir).resolve()),
        "model": model_identity(bundle),
        "device": device,
        "mode": mode,
        "input": f"1x3x{spec.height}x{spec.width}",
        "host_input": built.host_input,
        "inference_precision": built.precision,
        "inference_precision_reason": built.precision_reason,
        "streams": built.streams,
        "latency_ms": _summary_ms(latencies),
        "latency_requests": len(latencies),
        "throughput_fps": round(frames / elapsed, 2),
        "throughput_frames": frames,
        "throughput_cpu_ms_per_frame": round(cpu / frames * 1000.0, 3),
        "requests_in_flight": nireq,
        "requests_optimal": built.optimal_requests,
        "preprocess_ms_1280x720": round(float(np.median(prep)) * 1000.0, 3),
        "openvino": ov.__version__.split("-")[0],
    }


def format_report(result: dict) -> str:
    m = result["model"]
    lat = result["latency_ms"]
    return "\n".join([
        f"edge-ad bench: {m['algorithm']}/{m['backbone']} {m['precision']} (bundle {m['bundle_hash']}) "
        f"on {result['device']}, {result['mode']} mode, input {result['input']}, OpenVINO {result['openvino']}",
        f"  compiled    inference precision {result['inference_precision']}, {result['streams']} stream(s), "
        f"host input {result['host_input']}",
        f"  precision   {result['inference_precision_reason']}",
        f"  latency     median {lat['median']:.2f} ms   p99 {lat['p99']:.2f} ms   "
        f"(min {lat['min']:.2f}, max {lat['max']:.2f}; {result['latency_requests']} sync requests)",
        f"  throughput  {result['throughput_fps']:.1f} fps   ({result['requests_in_flight']} requests in flight, "
        f"OpenVINO optimum {result['requests_optimal']}; {result['throughput_frames']} frames, "
        f"{result['throughput_cpu_ms_per_frame']:.1f} ms CPU per frame)",
        f"  preprocess  {result['preprocess_ms_1280x720']:.2f} ms per 1280x720 frame on the host",
    ])


def to_json(result: dict) -> str:
    return json.dumps(result, indent=2)
