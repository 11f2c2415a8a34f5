"""End-to-end frames per second of `edge-ad` on a video, against the raw model throughput of `edge-ad bench`.

Why: `edge-ad bench` times the model alone. On the line the same CPU cores also
decode video, resize every frame, decide (thresholds, defect regions, alert
policy) and publish over MQTT. This runs the real command as an operator would
and reports pipeline / model (target >= 90 %).

    python -m benchmarks.pipeline_fps --model bundles/stfpm-fp32 --model bundles/stfpm-int8 --json out.json

How it measures (start-up excluded, nothing estimated):
- raw model fps: `edge-ad bench --model B --mode M --json` -> `throughput_fps`: the model compiled exactly
  as `edge-ad run` compiles it (uint8 input with the pixel conversion in the graph, same performance hint,
  inference precision and number of requests), one constant input: no decode, no resize.
- pipeline fps: `edge-ad --video V --model B --mode M --mqtt-host 127.0.0.1 --mqtt-port P` in a
  subprocess, every frame processed (no --realtime: file sources block instead of dropping). edge-ad's
  final heartbeat is its run summary: `fps_avg` = frames after the first / `elapsed_s`, the time from the
  first to the last decided frame (so model compilation and broker connection are excluded; the
  pipeline filling up is included). The heartbeats' own rate (`--heartbeat 0.5`: frames processed between
  the first heartbeat with frames done and the final heartbeat, over the time between them, which also
  skips the first second) is reported beside it as a cross-check, and is what older edge-ad builds
  without `fps_avg` are measured by (--repo measures another checkout, e.g. the code before a change).
  Heartbeats come from the broker (a subscriber here also counts the alerts that arrived, proof that
  publishing was real) or, with --no-mqtt, from a --jsonl file.
- ratio: each pipeline run is bracketed by two `edge-ad bench` runs (bench, pipeline, bench, pipeline,
  ..., bench) and divided by their mean; the median over --repeat rounds is reported. On a shared
  machine the load drifts within minutes, and a ratio against a bench taken at another moment can be
  off by 20 % either way.
- CPU-time ratio (CPU inference only): the model's CPU time per frame in bench's throughput phase over
  the pipeline's (`cpu_ms_per_frame` of the run summary: every thread of edge-ad, first to last decided
  frame). It is what the fps ratio would be on a machine whose cores edge-ad has to itself with
  inference keeping them busy, and other jobs do not move it. It counts the work a frame adds, not
  stalls: a pipeline that leaves cores idle shows that only in the fps ratio.
- per-frame stage costs: decode, the host's part of preprocessing (the resize; colour order, float and
  layout run inside the compiled model), sync inference and decision, single-threaded in this process at
  the video's frame size, to show where the time goes. Decoding (capture thread) and resizing
  (preprocessing threads) overlap, so 1000 / max(decode, resize / threads) ms is the host's ceiling.
  Also CPU time per frame (process CPU time, which other jobs do not inflate): the model's in throughput
  mode (from bench) and the host's decode + resize. Where inference and host work share the same cores,
  the pipeline cannot exceed infer / (infer + host) of the raw fps: the CPU-share ceiling.

Without --video a synthetic MJPG .avi is written: a mid-gray texture drifting one pixel per frame (so
every frame decodes differently) at --size (default 640x480), with a white "defect" rectangle in 5 of
every 50 frames. --from-images DIR makes the video from real images instead (e.g. MVTec test images,
so a real model sees in-distribution frames; a model looking at the synthetic texture may flag every
frame, which makes the decision stage do region extraction on every frame).

The machine's load is part of any number taken on a shared box: the CPU model and the load average
before and after each measurement are reported with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]  # the edge-ad checkout whose `python -m edge_ad` is measured (--repo)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/pipeline_fps.py`

from benchmarks.broker import BrokerStartError, Mosquitto, find_mosquitto  # noqa: E402
TOPIC_ROOT = "edge-ad"
CAMERA_ID = "bench"
TARGET_RATIO = 0.90
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class BenchmarkError(Exception):
    """A failure worth one line; exit code 1 (2 for bad input)."""

    exit_code = 1


class InputError(BenchmarkError):
    exit_code = 2


# -- machine ----------------------------------------------------------------------------------------

# The flags that decide what OpenVINO can do on the CPU (and so what a timing means): named with every timing.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpuinfo_field(name: str) -> list[str]:
    """Every value of one /proc/cpuinfo field, a line per core ([] where there is no /proc/cpuinfo)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    return [line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == name and ":" in line]


def cpu_model() -> str:
    names = cpuinfo_field("model name")
    return names[0] if names else platform.processor() or platform.machine()


def cpu_flags() -> set[str] | None:
    """None where no x86 flags line could be read (no /proc/cpuinfo, or an ARM CPU): unknown, not absent."""
    flags = cpuinfo_field("flags")
    return set(flags[0].split()) if flags else None


def isa_flags() -> list[str] | None:
    flags = cpu_flags()
    return None if flags is None else [flag for flag in ISA_FLAGS if flag in flags]


def describe_isa(isa: list[str] | None) -> str:
    """machine_info's "isa" for a line of text."""
    if isa is None:
        return "ISA unknown"
    return ", ".join(isa) or f"none of {', '.join(ISA_FLAGS)}"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []


def machine_info() -> dict:
    import openvino as ov

    return {
        "cpu": cpu_model(), "isa": isa_flags(), "cores": usable_cores(), "host": socket.gethostname(),
        "python": platform.python_version(),
        "openvino": ov.__version__.split("-")[0], "opencv": cv2.__version__, "load_average_start": load_average(),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


# -- video ------------------------------------------------------------------------------------------

def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or min(int(match.group(1)), int(match.group(2))) < 16:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x480, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def _write_video(path: Path, frames, count: int, width: int, height: int, fps: float) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise BenchmarkError(f"OpenCV cannot write an MJPG .avi at {path}")
    for frame in frames:
        writer.write(frame)
    writer.release()
    written = video_frames(path)
    if written != count:
        raise BenchmarkError(f"wrote {count} frames to {path} but OpenCV reads back {written}")
    return path


def synthetic_video(path: Path, count: int, width: int, height: int, fps: float = 25.0) -> Path:
    """Drifting mid-gray texture; a white 'defect' rectangle in frames 20-24 of every 50 (10 %)."""
    rng = np.random.default_rng(0)
    margin = 64
    noise = rng.integers(0, 256, (height + margin, width + margin, 3), dtype=np.uint8)
    texture = cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 3), None, 110, 150, cv2.NORM_MINMAX)
    box_w, box_h = max(8, width // 10), max(8, height // 10)

    def frames():
        for i in range(count):
            dx, dy = i % margin, (i // 2) % margin
            frame = np.ascontiguousarray(texture[dy : dy + height, dx : dx + width])
            if 20 <= i % 50 < 25:
                x = (width // 5 + 37 * (i // 50)) % (width - box_w)
                y = (height // 4 + 23 * (i // 50)) % (height - box_h)
                frame[y : y + box_h, x : x + box_w] = 255
            yield frame

    return _write_video(path, frames(), count, width, height, fps)


def video_from_images(path: Path, source: Path, count: int, width: int, height: int, fps: float = 25.0) -> Path:
    """Real images (sorted, cycled) resized to width x height, as an MJPG video of `count` frames."""
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if source.is_dir() else []
    if not files:
        raise InputError(f"--from-images: no images ({', '.join(IMAGE_SUFFIXES)}) under {source}")
    images = []
    for file in files[:count]:
        image = cv2.imread(str(file), cv2.IMREAD_COLOR)
        if image is not None:
            images.append(cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA))
    if not images:
        raise InputError(f"--from-images: none of the images under {source} could be read")
    return _write_video(path, (images[i % len(images)] for i in range(count)), count, width, height, fps)


def video_frames(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise InputError(f"OpenCV cannot open the video {path}")
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if count <= 0:  # containers without a frame count: read through
            count = 0
            while cap.grab():
                count += 1
        return count
    finally:
        cap.release()


def video_info(path: Path) -> dict:
    cap = cv2.VideoCapture(str(path))
    width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode("ascii", "replace").strip("\x00")
    cap.release()
    return {"path": str(path), "size": f"{width}x{height}", "frames": video_frames(path), "codec": fourcc}


# -- broker -----------------------------------------------------------------------------------------

class Subscriber:
    """Everything edge-ad publishes for one device id (heartbeats for fps, alerts as proof of delivery)."""

    def __init__(self, port: int, device: str):
        import paho.mqtt.client as mqtt

        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pipeline-fps-{os.getpid()}-{device}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{TOPIC_ROOT}/{device}/#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise BenchmarkError(f"could not subscribe to the benchmark broker on port {port}")

    def _on_message(self, client, userdata, message) -> None:
        try:
            payload = json.loads(message.payload)
        except ValueError:
            return
        with self._lock:
            self.events.append(payload)

    def wait_for_offline(self, timeout: float = 5.0) -> None:
        """The `offline` status is edge-ad's last message (after the final heartbeat)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if any(e.get("event") == "status" and e.get("state") == "offline" for e in self.events):
                    return
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- measurements -------------------------------------------------------------------------------------

def _edge_ad(*args) -> list[str]:
    """`python -m edge_ad` of this checkout: the same entry point as the `edge-ad` script."""
    return [sys.executable, "-m", "edge_ad", *map(str, args)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_bench(bundle: Path, mode: str, device: str, seconds: float, timeout: float, precision: str | None = None) -> dict:
    """`edge-ad bench --json`; its throughput phase gets seconds / 2."""
    load_before = load_average()
    extra = ["--inference-precision", precision] if precision else []
    proc = subprocess.run(_edge_ad("bench", "--model", bundle, "--mode", mode, "--device", device,
                                   "--seconds", seconds, "--json", *extra),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=_env())
    if proc.returncode != 0:
        raise BenchmarkError(f"edge-ad bench on {bundle} exited {proc.returncode}:\n{_tail(proc.stderr)}")
    result = json.loads(proc.stdout)
    result["load_average"] = [load_before, load_average()]
    return result


def _utc(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def fps_from_events(events: list[dict]) -> dict:
    """The run's fps from its final heartbeat (fps_avg), and the heartbeats' own rate; see the module docstring."""
    beats = [e for e in events if e.get("event") == "heartbeat"]
    online = next((e for e in events if e.get("event") == "status" and e.get("state") == "online"), None)
    if not beats:
        raise BenchmarkError("edge-ad published no heartbeat; cannot measure its frame rate")
    final = beats[-1]
    working = [b for b in beats if b["processed"] > 0]
    result = {"processed": final["processed"], "heartbeats": len(beats), "final": final,
              "fps_avg": final.get("fps_avg"), "elapsed_s": final.get("elapsed_s"), "steady_fps": None,
              "steady_frames": 0, "steady_seconds": 0.0, "online_to_done_fps": None}
    if working:
        first = working[0]
        span = _utc(final["timestamp"]) - _utc(first["timestamp"])
        frames = final["processed"] - first["processed"]
        if span >= 0.5 and frames > 0:
            result.update(steady_fps=frames / span, steady_frames=frames, steady_seconds=span)
    if online is not None:
        span = _utc(final["timestamp"]) - _utc(online["timestamp"])
        if span > 0:
            result["online_to_done_fps"] = final["processed"] / span
    if result["fps_avg"] is not None:
        result["pipeline_fps"], result["pipeline_fps_from"] = result["fps_avg"], "fps_avg"
    elif result["steady_fps"] is not None:
        result["pipeline_fps"], result["pipeline_fps_from"] = result["steady_fps"], "heartbeats"
    else:
        result["pipeline_fps"], result["pipeline_fps_from"] = result["online_to_done_fps"], "online->done"
    return result


def run_pipeline(bundle: Path, video: Path, *, mode: str, device: str, max_frames: int | None, broker: Mosquitto | None,
                 workdir: Path, run_id: str, timeout: float, precision: str | None = None) -> dict:
    """One `edge-ad --video` run as fast as possible; fps from its heartbeats, CPU time from rusage."""
    device_id = f"pipeline-fps-{run_id}"
    args = ["--video", video, "--model", bundle, "--mode", mode, "--device", device, "--heartbeat", "0.5",
            "--device-id", device_id, "--camera-id", CAMERA_ID, "--log-level", "info"]
    if max_frames:
        args += ["--max-frames", max_frames]
    if precision:
        args += ["--inference-precision", precision]
    jsonl = workdir / f"events-{run_id}.jsonl"
    subscriber = None
    if broker is not None:
        args += ["--mqtt-host", "127.0.0.1", "--mqtt-port", broker.port]
        subscriber = Subscriber(broker.port, device_id)
    else:
        args += ["--jsonl", jsonl]
    load_before = load_average()
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    try:
        proc = subprocess.run(_edge_ad(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO, env=_env())
    except BaseException as exc:
        if subscriber is not None:
            subscriber.close()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise BenchmarkError(f"edge-ad on {bundle} did not finish within {timeout:.0f} s") from None
        raise
    wall = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
    if proc.returncode != 0:
        if subscriber is not None:
            subscriber.close()
        raise BenchmarkError(f"edge-ad --video on {bundle} exited {proc.returncode}:\n{_tail(proc.stderr)}")
    if subscriber is not None:
        subscriber.wait_for_offline()
        subscriber.close()
        events = list(subscriber.events)
    else:
        events = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    result = fps_from_events(events)
    final = result.pop("final")
    summary = re.search(r"run summary: .*", proc.stderr)
    result.update(
        wall_s=round(wall, 2), cpu_s=round(cpu, 2), cpu_cores_used=round(cpu / wall, 2) if wall else None,
        cpu_ms_per_frame=final.get("cpu_ms_per_frame"),
        anomalous=final.get("anomalous"), alerts=final.get("alerts"), dropped=final.get("dropped"),
        errors=final.get("errors"), skipped=final.get("skipped"), latency_ms=final.get("latency_ms"),
        e2e_latency_ms=final.get("e2e_latency_ms"),
        alerts_received=sum(e.get("event") == "alert" for e in events) if broker is not None else None,
        summary_line=summary.group(0) if summary else None, compiled=_compiled(proc.stderr),
        requests_in_flight=_requests(proc.stderr), load_average=[load_before, load_average()],
    )
    return result


def _requests(stderr: str) -> int | None:
    match = re.search(r"(\d+) request\(s\) in flight", stderr)
    return int(match.group(1)) if match else None


def _compiled(stderr: str) -> str | None:
    """edge-ad's start-up line on how it compiled the model (requests, streams, precision, input)."""
    match = re.search(r"request\(s\) in flight[^)]*\)", stderr)
    return match.group(0) if match else None


def stage_costs(bundle: Path, video: Path, device: str = "CPU", frames: int = 60, precision: str | None = None) -> dict:
    """Single-threaded median ms per frame of each stage at the video's frame size: where the time goes."""
    from edge_ad.model.inference import compile_bundle
    from edge_ad.pipeline import default_prepare_threads
    from edge_ad.model.preprocess import preprocess
    from edge_ad.decide.scoring import Scorer

    def median_ms(samples):
        return round(statistics.median(samples) * 1000.0, 3) if samples else None

    def min_ms(samples):  # on a shared box noise only adds: the minimum is the uncontended cost
        return round(min(samples) * 1000.0, 3) if samples else None

    cap = cv2.VideoCapture(str(video))
    images, decode = [], []
    cpu_start = time.process_time()
    for _ in range(frames):
        start = time.perf_counter()
        ok, image = cap.read()
        if not ok:
            break
        decode.append(time.perf_counter() - start)
        images.append(image)
    decode_cpu = (time.process_time() - cpu_start) / max(1, len(images))
    cap.release()
    if not images:
        raise BenchmarkError(f"cannot decode {video}")
    built = compile_bundle(bundle, device, "latency", precision)
    spec = built.bundle.preprocess
    request = built.compiled.create_infer_request()
    name = built.bundle.model.input_name
    scorer = Scorer(built.bundle.thresholds)
    cpu_start = time.process_time()
    for image in images:
        built.prepare(image, spec)
    prepare_cpu = (time.process_time() - cpu_start) / len(images)
    prepare, full, infer, decide, decide_anomalous, regions = [], [], [], [], [], []
    for image in images:
        start = time.perf_counter()
        tensor = built.prepare(image, spec)[None]
        prepare.append(time.perf_counter() - start)
        start = time.perf_counter()
        preprocess(image, spec)
        full.append(time.perf_counter() - start)
        start = time.perf_counter()
        request.infer({name: tensor})
        infer.append(time.perf_counter() - start)
        amap = np.array(request.get_tensor(built.bundle.model.outputs[0]).data, dtype=np.float32)
        amap = amap.reshape(amap.shape[-2:])
        score = float(np.asarray(request.get_tensor(built.bundle.model.outputs[1]).data).reshape(-1)[0])
        start = time.perf_counter()
        decision = scorer.decide(amap, score, image.shape[:2], with_regions=False)  # as the pipeline does
        (decide_anomalous if decision.anomalous else decide).append(time.perf_counter() - start)
        if decision.anomalous:
            start = time.perf_counter()
            scorer.regions(amap, image.shape[:2])  # what an alert adds
            regions.append(time.perf_counter() - start)
    threads = default_prepare_threads()

    def ceiling(d, p):
        slowest = max(d, p / threads)
        return round(1.0 / slowest, 1) if slowest > 0 else None

    result = {"frames": len(images), "frame_size": f"{images[0].shape[1]}x{images[0].shape[0]}",
              "host_input": built.host_input, "prepare_threads": threads,
              "anomalous_frames": len(decide_anomalous), "opencv_threads": cv2.getNumThreads(),
              "decode_cpu_ms": round(decode_cpu * 1000.0, 3), "prepare_cpu_ms": round(prepare_cpu * 1000.0, 3),
              "host_ceiling_fps": ceiling(statistics.median(decode), statistics.median(prepare)),
              "host_ceiling_fps_uncontended": ceiling(min(decode), min(prepare))}
    for key, samples in (("decode", decode), ("prepare", prepare), ("preprocess_full", full), ("infer_sync", infer),
                         ("decide_normal", decide), ("decide_anomalous", decide_anomalous), ("regions", regions)):
        result[f"{key}_ms"] = median_ms(samples)
        result[f"{key}_min_ms"] = min_ms(samples)
    return result


# -- report ---------------------------------------------------------------------------------------------

def _fmt(value, spec: str = ".1f", empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def _load(pair) -> str:
    return " -> ".join(f"{v[0]:.1f}" for v in pair if v) if pair else "-"


def markdown(report: dict) -> str:
    m = report["machine"]
    v = report["video"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} usable core(s), load average at start {m['load_average_start']} "
        f"(1/5/15 min), OpenVINO {m['openvino']}, OpenCV {m['opencv']}, Python {m['python']}, {m['date']}",
        f"Video: {v['size']} {v['codec']}, {v['frames']} frames ({v['origin']}); mode {report['mode']}, device "
        f"{report['device']}; publishing: {report['publishing']}",
        "",
        f"edge-ad measured: {report.get('repo', REPO)}",
        "",
        "| bundle | precision | input | raw model fps (bench) | pipeline fps | ratio (target >= 90 %) | "
        "CPU-time ratio | heartbeat fps | frames | anomalous | alerts sent/recv | requests bench/run | edge-ad CPU cores | "
        "1-min load (bench; pipeline) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["results"]:
        ratio = row["ratio"]
        verdict = "" if ratio is None else (" ok" if ratio >= TARGET_RATIO else " **below**")
        p = row["pipeline"]
        recv = "-" if p["alerts_received"] is None else p["alerts_received"]
        spread = ""
        if len(row["pipeline_fps_runs"]) > 1:
            spread = f" ({min(row['pipeline_fps_runs']):.1f}-{max(row['pipeline_fps_runs']):.1f})"
        anomalous = f"{100.0 * p['anomalous'] / p['processed']:.0f} %" if p["processed"] else "-"
        if row["pipeline_fps_from"] != "fps_avg":
            spread += f" (from {row['pipeline_fps_from']})"
        steady = [r["steady_fps"] for r in row["pipeline_runs"] if r["steady_fps"] is not None]
        if len(row.get("ratio_runs", [])) > 1:
            verdict += f" ({100 * min(row['ratio_runs']):.0f}-{100 * max(row['ratio_runs']):.0f} %)"
        lines.append(
            f"| {row['name']} | {row['precision']} | {row['input']} | {_fmt(row['raw_fps'])} | "
            f"{_fmt(row['pipeline_fps'])}{spread} | {_fmt(None if ratio is None else 100 * ratio, '.0f')} %{verdict} | "
            f"{_fmt(None if row.get('cpu_ratio') is None else 100 * row['cpu_ratio'], '.0f')} % | "
            f"{_fmt(statistics.median(steady) if steady else None)} | {p['processed']} | {anomalous} | "
            f"{p['alerts']}/{recv} | {row['bench'].get('requests_in_flight', '-')}/{_fmt(p['requests_in_flight'], 'd')} | "
            f"{_fmt(p['cpu_cores_used'], '.2f')} | {_load(row['bench']['load_average'])}; {_load(p['load_average'])} |")
    if not any(row.get("stages") for row in report["results"]):
        return "\n".join(lines + ["", f"Load average at end: {report['load_average_end']}"])
    threads = next(row["stages"]["prepare_threads"] for row in report["results"] if row.get("stages"))
    lines += [
        "",
        f"Per-frame stage costs at {v['size']}, ms, single thread, median (min = uncontended) over the first "
        f"frames of the video. The host only resizes (colour, float, layout run in the compiled model); decoding "
        f"(capture thread) overlaps resizing ({threads} preprocessing thread(s)), so 1000 / max(decode, resize / "
        "threads) caps the pipeline; regions are computed only for alerts (and for --roi-mask/--min-area). "
        "CPU ms per frame (process CPU time, robust to other jobs): inference in throughput mode (bench) and the "
        "host's decode + resize; where both share the same cores the pipeline reaches at most "
        "infer / (infer + host) of the raw fps (CPU-share ceiling):",
        "",
        "| bundle | decode | resize (host part) | full preprocess (old host path) | infer (sync, 1 request) | "
        "decide normal | decide anomalous | regions (per alert) | host ceiling fps | CPU/frame infer; host | "
        "CPU-share ceiling |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(s, name):
        return f"{_fmt(s[name + '_ms'], '.2f')} ({_fmt(s[name + '_min_ms'], '.2f')})"

    for row in report["results"]:
        s = row.get("stages")
        if not s:
            continue
        lines.append(
            f"| {row['name']} | {cell(s, 'decode')} | {cell(s, 'prepare')} | {cell(s, 'preprocess_full')} | "
            f"{cell(s, 'infer_sync')} | {cell(s, 'decide_normal')} | {cell(s, 'decide_anomalous')} | "
            f"{cell(s, 'regions')} | {_fmt(s['host_ceiling_fps'])} ({_fmt(s['host_ceiling_fps_uncontended'])}) | "
            f"{_fmt(s.get('infer_cpu_ms'))}; {_fmt(s['decode_cpu_ms'] + s['prepare_cpu_ms'])} | "
            f"{_fmt(None if s.get('cpu_share_ceiling') is None else 100 * s['cpu_share_ceiling'], '.0f')} % |")
    lines += ["", f"Load average at end: {report['load_average_end']}"]
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pipeline_fps",
        description="End-to-end fps of `edge-ad --video` (decode + preprocess + infer + decide + publish) "
                    "vs raw model fps of `edge-ad bench`, per bundle, as a Markdown table.")
    parser.add_argument("--model", "-m", action="append", required=True, type=Path, metavar="BUNDLE",
                        help="bundle folder; repeat for several (e.g. FP32 and INT8)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--video", type=Path, metavar="PATH", help="video file to run (default: a synthetic one)")
    src.add_argument("--from-images", type=Path, metavar="DIR", help="make the video from the images under DIR")
    parser.add_argument("--frames", type=int, default=900, metavar="N",
                        help="frames of the generated video (default: 900 = 36 s at 25 fps)")
    parser.add_argument("--size", type=parse_size, default=(640, 480), metavar="WxH",
                        help="frame size of the generated video (default: 640x480)")
    parser.add_argument("--seconds", type=float, default=10.0, metavar="S",
                        help="aim for about S seconds of pipeline per bundle: --max-frames = raw fps x S "
                             "(at least 150, at most the video; default: 10)")
    parser.add_argument("--max-frames", type=int, metavar="N", help="frames per pipeline run (overrides --seconds)")
    parser.add_argument("--bench-seconds", type=float, default=6.0, metavar="S",
                        help="`edge-ad bench --seconds` (half of it measures throughput; default: 6)")
    parser.add_argument("--mode", choices=("throughput", "latency"), default="throughput",
                        help="OpenVINO performance hint for both bench and pipeline (default: throughput)")
    parser.add_argument("--device", default="CPU", help="OpenVINO device (default: CPU)")
    parser.add_argument("--inference-precision", choices=("auto", "f32", "bf16", "f16"), default=None,
                        help="passed to both edge-ad bench and edge-ad (default: edge-ad's, f32 on CPU)")
    parser.add_argument("--mqtt", action=argparse.BooleanOptionalAction, default=None,
                        help="publish to a throw-away mosquitto on a loopback port (default: on when mosquitto "
                             "is installed; --no-mqtt writes JSON lines to a file instead)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="alternate bench and pipeline N times per bundle; the table shows medians")
    parser.add_argument("--no-stages", dest="stages", action="store_false",
                        help="skip the in-process per-stage cost breakdown")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the full results as JSON")
    parser.add_argument("--repo", type=Path, metavar="DIR",
                        help="measure the `python -m edge_ad` of another checkout (e.g. before a change); the "
                             "stage costs always use this one's edge_ad, so combine with --no-stages")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="S", help="per edge-ad run (default: 600)")
    args = parser.parse_args(argv)
    for bundle in args.model:
        if not (bundle / "bundle.json").is_file():
            parser.error(f"--model {bundle}: not a bundle folder (no bundle.json)")
    if args.video is not None and not args.video.is_file():
        parser.error(f"--video {args.video}: no such file")
    if args.frames < 10 or args.repeat < 1 or (args.max_frames is not None and args.max_frames < 10):
        parser.error("--frames and --max-frames must be >= 10, --repeat >= 1")
    return args


def main(argv=None) -> int:
    global REPO
    args = parse_args(argv)
    if args.repo is not None:
        if not (args.repo / "edge_ad" / "__main__.py").is_file():
            print(f"pipeline_fps: error: --repo {args.repo}: no edge_ad package there", file=sys.stderr)
            return 2
        REPO = args.repo.resolve()
    mosquitto = find_mosquitto()
    use_mqtt = bool(mosquitto) if args.mqtt is None else args.mqtt
    if use_mqtt and not mosquitto:
        print("pipeline_fps: error: --mqtt needs the mosquitto binary (apt-get install mosquitto)", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="pipeline_fps-") as tmp:
            workdir = Path(tmp)
            report = measure(args, workdir, mosquitto if use_mqtt else None)
    except BenchmarkError as exc:
        print(f"pipeline_fps: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nfull results: {args.json}")
    return 0


def measure(args: argparse.Namespace, workdir: Path, mosquitto: str | None) -> dict:
    machine = machine_info()
    width, height = args.size
    if args.video is not None:
        video, origin = args.video.resolve(), "given"
    elif args.from_images is not None:
        print(f"writing a {width}x{height} video of {args.frames} frames from {args.from_images} ...", file=sys.stderr)
        video = video_from_images(workdir / "from_images.avi", args.from_images, args.frames, width, height)
        origin = f"made from images under {args.from_images}"
    else:
        print(f"writing a synthetic {width}x{height} video of {args.frames} frames ...", file=sys.stderr)
        video, origin = synthetic_video(workdir / "synthetic.avi", args.frames, width, height), "synthetic"
    info = {**video_info(video), "origin": origin}
    results = []
    broker_cm = Mosquitto(workdir, binary=mosquitto) if mosquitto else None
    if broker_cm is not None:
        try:
            broker_cm.start()
        except BrokerStartError as exc:
            raise BenchmarkError(str(exc)) from None
    try:
        publishing = f"MQTT to mosquitto {broker_cm.version()} on 127.0.0.1:{broker_cm.port}" if broker_cm \
            else "JSON lines to a file (no broker)"
        for index, bundle in enumerate(args.model):
            results.append(measure_bundle(args, bundle, video, info["frames"], broker_cm, workdir, index))
    finally:
        if broker_cm is not None:
            broker_cm.stop()
    return {"machine": machine, "repo": str(REPO), "video": info, "mode": args.mode, "device": args.device,
            "publishing": publishing,
            "target_ratio": TARGET_RATIO, "results": results, "load_average_end": load_average()}


def measure_bundle(args, bundle: Path, video: Path, video_count: int, broker, workdir: Path, index: int) -> dict:
    """--repeat rounds of bench, pipeline, ... and a closing bench: each pipeline run is bracketed by two model
    measurements, and its ratio is taken against their mean (on a shared machine the load drifts, so a bench
    minutes away would skew the ratio). Reported: medians over rounds."""
    benches, pipelines, ratios, cpu_ratios = [], [], [], []

    def bench_once() -> dict:
        print(f"[{bundle}] edge-ad bench ({args.mode}, {args.bench_seconds:g} s) ...", file=sys.stderr)
        benches.append(run_bench(bundle, args.mode, args.device, args.bench_seconds, args.timeout,
                                 args.inference_precision))
        return benches[-1]

    before = bench_once()
    for rep in range(args.repeat):
        raw = before["throughput_fps"]
        frames = args.max_frames or int(min(video_count, max(150, raw * args.seconds)))
        frames = min(frames, video_count)
        print(f"[{bundle}] edge-ad --video ({frames} frames, raw {raw:.1f} fps) ...", file=sys.stderr)
        run = run_pipeline(bundle, video, mode=args.mode, device=args.device, max_frames=frames, broker=broker,
                           workdir=workdir, run_id=f"{index}-{rep}", timeout=args.timeout,
                           precision=args.inference_precision)
        if run["processed"] != frames or run["errors"] or run["dropped"]:
            print(f"[{bundle}] warning: processed {run['processed']} of {frames} frames, errors {run['errors']}, "
                  f"dropped {run['dropped']}", file=sys.stderr)
        if run["pipeline_fps_from"] != "fps_avg":
            print(f"[{bundle}] warning: no fps_avg in the final heartbeat (older edge-ad?); using "
                  f"{run['pipeline_fps_from']}", file=sys.stderr)
        after = bench_once()
        bracket = (before["throughput_fps"] + after["throughput_fps"]) / 2.0
        run["raw_fps_bracket"] = bracket
        if run["pipeline_fps"] and bracket:
            ratios.append(run["pipeline_fps"] / bracket)
        bench_cpu = [b.get("throughput_cpu_ms_per_frame") for b in (benches[-2], benches[-1])]
        if all(bench_cpu) and run.get("cpu_ms_per_frame"):
            cpu_ratios.append(sum(bench_cpu) / 2.0 / run["cpu_ms_per_frame"])
        pipelines.append(run)
        before = after
    raw_runs = [b["throughput_fps"] for b in benches]
    pipe_runs = [p["pipeline_fps"] for p in pipelines if p["pipeline_fps"] is not None]
    sources = sorted({p["pipeline_fps_from"] for p in pipelines})
    raw_fps = statistics.median(raw_runs)
    pipeline_fps = statistics.median(pipe_runs) if pipe_runs else None
    bench = min(benches, key=lambda b: abs(b["throughput_fps"] - raw_fps))  # the median run's details
    typical = min(pipelines, key=lambda p: abs((p["pipeline_fps"] or 0) - (pipeline_fps or 0)))
    stages = None
    if args.stages:
        print(f"[{bundle}] per-stage costs ...", file=sys.stderr)
        stages = stage_costs(bundle, video, args.device, precision=args.inference_precision)
        cpu_infer = statistics.median(b["throughput_cpu_ms_per_frame"] for b in benches
                                      if b.get("throughput_cpu_ms_per_frame"))
        host = stages["decode_cpu_ms"] + stages["prepare_cpu_ms"]
        stages["infer_cpu_ms"] = cpu_infer
        stages["cpu_share_ceiling"] = cpu_infer / (cpu_infer + host) if cpu_infer else None
    return {
        "name": bundle.name, "bundle": str(bundle.resolve()), "precision": bench["model"]["precision"],
        "algorithm": bench["model"]["algorithm"], "backbone": bench["model"]["backbone"], "input": bench["input"],
        "raw_fps": raw_fps, "raw_fps_runs": raw_runs, "pipeline_fps": pipeline_fps, "pipeline_fps_runs": pipe_runs,
        "pipeline_fps_from": "+".join(sources),
        "ratio": statistics.median(ratios) if ratios else None, "ratio_runs": ratios,
        "cpu_ratio": statistics.median(cpu_ratios) if cpu_ratios else None, "cpu_ratio_runs": cpu_ratios,
        "bench": bench, "pipeline": typical, "pipeline_runs": pipelines, "stages": stages,
    }


if __name__ == "__main__":
    sys.exit(main())
