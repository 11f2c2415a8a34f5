"""Prometheus /metrics (--metrics-port): scraped over HTTP while edge-ad runs, parsed with prometheus_client's own
parser, and compared with what the same run said in its heartbeats (JSON-lines mirror) and to the broker.

The camera is a generated MJPEG stream over HTTP (what an IP camera serves): after its last frame the stream
ends and the camera is gone, so edge-ad keeps running and reconnecting (camera_up 0) with every counter
settled; that scrape must equal the final heartbeat after SIGTERM, exactly.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
import urllib.request

import cv2
import pytest
from prometheus_client.parser import text_string_to_metric_families
from runtime_helpers import (  # noqa: F401  (fixtures)
    Subscriber, broker, bundle_dir, free_port, jsonl, make_frame, mosquitto, run_cli, start_cli, wait_until,
)

from edge_ad.ops.stats import Histogram

pytestmark = pytest.mark.mosquitto
BOX = (64, 48, 64, 48)
FRAMES = 150
DEFECTS = (30, 80, 120)  # 10 frames each: one alert and one all-clear per block (N=3 of M=5)
COUNTERS = ("captured", "processed", "dropped", "skipped", "anomalous", "errors", "alerts", "clears")


class MjpegCamera:
    """An HTTP MJPEG camera (multipart/x-mixed-replace) that serves `frames` once, then disappears."""

    def __init__(self, frames, fps: float = 40.0):
        self.jpegs = [cv2.imencode(".jpg", f)[1].tobytes() for f in frames]
        self.fps = fps
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(4)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/stream.mjpg"
        self.sent = 0
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.server.accept()
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n")
            start = time.monotonic()
            for i, jpeg in enumerate(self.jpegs):
                time.sleep(max(0.0, start + i / self.fps - time.monotonic()))
                conn.sendall(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg)
                             + jpeg + b"\r\n")
                self.sent += 1
            conn.close()
        finally:
            self.server.close()  # reconnections are refused: the camera is gone
            self.done.set()


def scrape(port: int, camera: str = "camA") -> dict:
    """{sample name (buckets: name[le]): value} of one camera, plus "model_info" -> its labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values: dict = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("camera") != camera:
                continue
            assert sample.labels["device"] == "pc1", sample
            if sample.name == "edge_ad_model_info":
                values["model_info"] = sample.labels
            key = f"{sample.name}[{sample.labels['le']}]" if "le" in sample.labels else sample.name
            values[key] = sample.value
    return values


def buckets(values: dict, name: str) -> list[tuple[float, float]]:
    return sorted((float(k[len(name) + 8:-1]), v) for k, v in values.items() if k.startswith(f"{name}_bucket["))


@pytest.fixture()
def camera():
    frames = [make_frame([BOX] if any(s <= i < s + 10 for s in DEFECTS) else []) for i in range(FRAMES)]
    return MjpegCamera(frames)


def test_metrics_grow_while_running_and_equal_the_final_heartbeat(tmp_path, mosquitto, bundle_dir, camera):
    host, port = mosquitto
    metrics_port = free_port()
    sub = Subscriber(host, port, "edge-ad/pc1/camA/#")
    proc = start_cli("--video", camera.url, "--model", bundle_dir, "--mqtt-host", host, "--mqtt-port", port,
                     "--device-id", "pc1", "--camera-id", "camA", "--alert-n", 3, "--alert-m", 5, "--cooldown", "10f",
                     "--heartbeat", 0.3, "--jsonl", tmp_path / "raised.jsonl", "--outbox", tmp_path / "outbox.sqlite",
                     "--source-retries", 1000, "--retry-delay", 0.2, "--retry-max-delay", 0.5,
                     "--metrics-port", metrics_port)
    running = []
    try:
        wait_until(lambda: _try(metrics_port).get("edge_ad_frames_processed_total", 0) > 0, timeout=30,
                   what="a first scrape with frames")
        while not camera.done.is_set():  # every 0.3 s while the camera streams
            running.append(scrape(metrics_port))
            time.sleep(0.3)
        settled = wait_until(lambda: _settled(scrape(metrics_port)), timeout=20,
                             what="camera gone, every event delivered")
        time.sleep(0.5)
        again = scrape(metrics_port)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
    assert proc.returncode == 0, err
    assert "Prometheus metrics on http://127.0.0.1:" in err and "Traceback" not in err

    # While streaming: counters only grow, frames keep coming, camera and broker are up.
    processed = [s["edge_ad_frames_processed_total"] for s in running]
    assert len(running) >= 4 and processed == sorted(processed) and processed[-1] > processed[0], processed
    for name in (f"edge_ad_{c}_total" for c in ("frames_captured", "frames_anomalous", "alerts", "clears")):
        series = [s[name] for s in running]
        assert series == sorted(series), (name, series)
    assert all(s["edge_ad_camera_up"] == 1 and s["edge_ad_broker_up"] == 1 for s in running)
    assert max(s["edge_ad_fps"] for s in running) > 5

    # Camera gone: reconnecting, status degraded; nothing else moves any more.
    assert settled["edge_ad_camera_up"] == 0 and settled["edge_ad_degraded"] == 1
    assert {k: v for k, v in again.items() if k.endswith("_total")} == \
        {k: v for k, v in settled.items() if k.endswith("_total")}

    # The settled scrape is the run's final heartbeat, counter for counter.
    final = jsonl(tmp_path / "raised.jsonl", "heartbeat")[-1]
    assert final.get("final") is True
    names = {"captured": "frames_captured", "processed": "frames_processed", "dropped": "frames_dropped",
             "skipped": "frames_skipped", "anomalous": "frames_anomalous", "errors": "frame_errors"}
    for field in COUNTERS:
        assert settled[f"edge_ad_{names.get(field, field)}_total"] == final[field], field
    assert final["captured"] == camera.sent == FRAMES and final["alerts"] == final["clears"] == len(DEFECTS)
    assert settled["edge_ad_outbox_pending"] == final["outbox_pending"] == 0
    assert settled["edge_ad_outbox_dropped_total"] == final["outbox_dropped"]
    assert settled["edge_ad_alerts_unstored_total"] == final["alerts_unstored"] == 0
    raised = jsonl(tmp_path / "raised.jsonl", "alert", "clear")
    assert settled["edge_ad_events_delivered_total"] == len(raised) == 2 * len(DEFECTS)
    assert set(sub.event_ids()) == {e["event_id"] for e in raised}

    # Latency histogram: one count per decided frame, and the heartbeat's p50 falls in the right buckets.
    for name, percentiles in (("edge_ad_inference_latency_seconds", final["latency_ms"]),
                              ("edge_ad_e2e_latency_seconds", final["e2e_latency_ms"])):
        cumulative = buckets(settled, name)
        count = settled[f"{name}_count"]
        assert cumulative[-1] == (float("inf"), count) and count == final["processed"]
        assert [n for _, n in cumulative] == sorted(n for _, n in cumulative) and settled[f"{name}_sum"] > 0
        k = int((count - 1) * 0.5)  # p50 interpolates between sorted samples k and k + 1
        upper = next(b for b, n in cumulative if n >= k + 2)
        lower = max([b for b, n in cumulative if n < k + 1], default=0.0)
        assert lower <= percentiles["p50"] / 1000 + 1e-5 and percentiles["p50"] / 1000 <= upper + 1e-5, (
            name, percentiles, cumulative)

    # The model identity: the alert's own `model` object, as labels.
    model = raised[0]["model"]
    info = settled["model_info"]
    assert {k: info[k] for k in ("algorithm", "backbone", "precision", "bundle_hash")} == \
        {k: model[k] for k in ("algorithm", "backbone", "precision", "bundle_hash")}


def _try(port: int) -> dict:
    try:
        return scrape(port)
    except OSError:
        return {}


def _settled(values: dict):
    done = (values["edge_ad_camera_up"] == 0 and values["edge_ad_outbox_pending"] == 0
            and values["edge_ad_events_delivered_total"] == values["edge_ad_alerts_total"]
            + values["edge_ad_clears_total"]
            and values["edge_ad_inference_latency_seconds_count"] == values["edge_ad_frames_processed_total"])
    return values if done else None


def test_metrics_port_in_use_is_one_config_error_line(tmp_path, bundle_dir):
    cv2.imwrite(str(tmp_path / "a.png"), make_frame())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = run_cli("--images", tmp_path, "--model", bundle_dir, "--jsonl", tmp_path / "out.jsonl",
                       "--metrics-port", port)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [f"edge-ad: error: --metrics-port {port}: cannot listen on 127.0.0.1:{port} "
                      "(Address already in use; is another edge-ad or exporter using it?)"], proc.stderr
    assert "Traceback" not in proc.stderr


def test_metrics_options_from_a_config_file_and_bad_values(tmp_path, bundle_dir):
    config = tmp_path / "edge-ad.toml"
    config.write_text(f'model = "{bundle_dir}"\nimages = "{tmp_path}"\n[metrics]\nport = 9100\nhost = "0.0.0.0"\n')
    shown = run_cli("--config", config, "--print-config")
    assert shown.returncode == 0, shown.stderr
    assert '"metrics_port": 9100' in shown.stdout and '"metrics_host": "0.0.0.0"' in shown.stdout
    bad = run_cli("--config", config, "--metrics-port", 70000, "--print-config")
    assert bad.returncode == 2 and "--metrics-port must be 1..65535, got 70000" in bad.stderr


def test_histogram_buckets_are_upper_bounds_inclusive():
    hist = Histogram((0.01, 0.1))
    for seconds in (0.005, 0.01, 0.0100001, 0.1, 7.0):
        hist.add(seconds)
    cumulative, total = hist.cumulative()
    assert cumulative == [(0.01, 2), (0.1, 4), (float("inf"), 5)] and total == pytest.approx(7.1250001)


def test_cameras_of_one_process_share_one_server_and_a_failing_figure_spoils_nothing():
    from edge_ad.ops.config import RunConfig
    from edge_ad.ops.metrics import CameraMetrics, MetricsServer
    from edge_ad.ops.stats import RuntimeStats

    def broken() -> dict:
        raise RuntimeError("outbox closed")

    config = RunConfig(metrics_port=free_port())
    first, second = MetricsServer.for_config(config), MetricsServer.for_config(config)
    assert first is second
    a, b = RuntimeStats(), RuntimeStats()
    for latency in (0.002, 0.02, 0.2):
        a.frame_done(latency, latency * 2, anomalous=latency > 0.1)
    b.frame_done(0.004, 0.005, anomalous=False)
    model = {"algorithm": "stfpm", "backbone": "resnet18", "precision": "int8", "bundle_hash": "abc"}
    first.add(CameraMetrics("pc1", "camA", a, model, health=lambda: {"state": "degraded", "broker_connected": False,
                                                                      "outbox_pending": 3, "alerts_unstored": 1}))
    second.add(CameraMetrics("pc1", "camB", b, model, health=broken, camera_up=lambda: False))
    cam_a, cam_b = scrape(config.metrics_port, "camA"), scrape(config.metrics_port, "camB")
    assert cam_a["edge_ad_frames_processed_total"] == 3 and cam_a["edge_ad_frames_anomalous_total"] == 1
    assert cam_a["edge_ad_inference_latency_seconds_bucket[0.0025]"] == 1
    assert cam_a["edge_ad_inference_latency_seconds_bucket[0.25]"] == 3
    assert cam_a["edge_ad_e2e_latency_seconds_sum"] == pytest.approx(0.444)
    assert (cam_a["edge_ad_broker_up"], cam_a["edge_ad_degraded"], cam_a["edge_ad_outbox_pending"],
            cam_a["edge_ad_alerts_unstored_total"], cam_a["edge_ad_camera_up"]) == (0, 1, 3, 1, 1)
    assert cam_b["edge_ad_frames_processed_total"] == 1 and cam_b["edge_ad_camera_up"] == 0
    assert "edge_ad_broker_up" not in cam_b and "edge_ad_outbox_pending" not in cam_b  # unreadable: left out
    assert cam_b["model_info"]["bundle_hash"] == "abc"
    first.release("pc1", "camA")
    assert "edge_ad_frames_processed_total" not in scrape(config.metrics_port, "camA")
    assert scrape(config.metrics_port, "camB")["edge_ad_frames_processed_total"] == 1
    second.release("pc1", "camB")
    with pytest.raises(OSError):
        scrape(config.metrics_port, "camB")


def test_a_shared_metrics_port_refuses_another_host_and_is_free_once_released():
    """Same port, another --metrics-host: a ConfigError at acquisition (not a bind failure in a camera thread);
    the last release closes the server before another camera can ask for the port."""
    import threading

    from edge_ad.errors import ConfigError
    from edge_ad.ops.config import RunConfig
    from edge_ad.ops.metrics import MetricsServer

    config = RunConfig(metrics_port=free_port())
    server = MetricsServer.for_config(config)
    with pytest.raises(ConfigError, match="one --metrics-host"):
        MetricsServer.for_config(RunConfig(metrics_port=config.metrics_port, metrics_host="0.0.0.0"))
    failures = []

    def restart():
        try:
            MetricsServer.for_config(config).release()
        except ConfigError as exc:  # before: the port still held by the closing server
            failures.append(exc)

    for _ in range(3):  # the last release races a camera starting on the same port
        racer = threading.Thread(target=restart)
        racer.start()
        server.release()
        racer.join()
        server = MetricsServer.for_config(config)
    server.release()
    assert failures == []
