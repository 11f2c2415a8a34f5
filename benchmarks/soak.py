"""Soak test: thousands of frames through the real pipeline into a real broker; memory and lost alerts.

    python benchmarks/soak.py                       # 5000 synthetic frames, tiny test bundle, local mosquitto
    python benchmarks/soak.py --frames 20000 --outage-at 8000 --outage-seconds 5
    python benchmarks/soak.py --model bundles/stfpm-int8 --video line3.mp4 --mqtt-host broker.local --json

Runs edge-ad's own Pipeline in this process (OpenVINO inference, alert policy, outbox, MQTT sink) over a
synthetic source (a defect every --defect-every frames) or a video file, with every frame processed. A
separate subscriber counts the alerts and all-clears that arrive. Prints resident memory after warm-up
and at the end (target: growth < 5 MB), and events raised vs delivered (target: none lost). With
--outage-at, the broker it started is killed (SIGKILL) at that frame and restarted --outage-seconds later.
Not a test: a measurement to run before a release and to quote in docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.broker import BrokerStartError, Mosquitto  # noqa: E402  (needs REPO on sys.path)


def rss_mb() -> float:
    """Resident set size of this process, MiB (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class Counter:
    """Independent subscriber (persistent session): unique alert/clear event ids that arrived."""

    def __init__(self, host: str, port: int, topic: str):
        import paho.mqtt.client as mqtt

        self.ids: set[str] = set()
        self.copies = 0
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"soak-counter-{os.getpid()}",
                                  clean_session=False)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: ready.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not ready.wait(10):
            raise SystemExit("soak: subscription not acknowledged")

    def _on_message(self, client, userdata, message) -> None:
        payload = json.loads(message.payload)
        if payload.get("event") not in ("alert", "clear"):
            return  # per-camera status and heartbeats share the subtree
        with self.lock:
            self.copies += 1
            self.ids.add(payload["event_id"])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=5000, help="frames to process (default: 5000)")
    parser.add_argument("--warmup", type=int, default=500, help="frames before the first memory reading (default: 500)")
    parser.add_argument("--model", help="bundle folder (default: the tiny test bundle, built in a temp folder)")
    parser.add_argument("--video", help="video file to loop instead of synthetic frames")
    parser.add_argument("--defect-every", type=int, default=50, help="synthetic: a 10-frame defect every N frames")
    parser.add_argument("--mqtt-host", help="broker to use (default: start mosquitto on loopback)")
    parser.add_argument("--mqtt-port", type=int, default=1883)
    parser.add_argument("--outage-at", type=int, help="kill the local broker at this frame ...")
    parser.add_argument("--outage-seconds", type=float, default=3.0, help="... and restart it this much later")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)

    import numpy as np

    from edge_ad.deliver.events import Topics, model_identity
    from edge_ad.model.inference import Detector
    from edge_ad.deliver.mqtt import MqttSettings
    from edge_ad.deliver.outbox import Outbox
    from edge_ad.pipeline import Pipeline
    from edge_ad.decide.policy import AlertPolicy, Cooldown
    from edge_ad.decide.scoring import Scorer
    from edge_ad.deliver.sinks import Sink, Sinks
    from edge_ad.deliver.mqtt_sink import MqttSink
    from edge_ad.sources.capture import CaptureSource, Frame, FrameSource
    from edge_ad.ops.stats import RuntimeStats
    from edge_ad.ops.statusline import setup_logging

    setup_logging("error")  # ALERT lines are warnings: thousands of them here
    work = Path(tempfile.mkdtemp(prefix="edge-ad-soak-"))
    broker = None
    readings: dict[str, float] = {}
    try:
        if args.model is None:
            from benchmarks.tiny_bundle import build_bundle

            args.model = str(build_bundle(work / "bundle"))
        if args.mqtt_host is None:
            try:
                broker = Mosquitto(work, persistent=True).start()
            except BrokerStartError as exc:
                raise SystemExit(f"soak: {exc}; install mosquitto or pass --mqtt-host") from None
            host, port = "127.0.0.1", broker.port
        else:
            host, port = args.mqtt_host, args.mqtt_port
        if args.outage_at is not None and broker is None:
            raise SystemExit("soak: --outage-at needs the local broker (no --mqtt-host)")

        device = f"soak-{os.getpid()}"
        topics = Topics("edge-ad", device, "cam")
        counter = Counter(host, port, f"edge-ad/{device}/+/+")

        base = np.full((192, 256, 3), 128, np.uint8)
        defect = base.copy()
        defect[48:96, 64:128] = 255

        class Synthetic(FrameSource):
            live = False
            description = "synthetic"

            def __iter__(self):
                for index in range(args.frames):
                    image = defect if index % args.defect_every < 10 else base
                    yield Frame(index=index, image=image, timestamp=index / 25)

        class Looped(FrameSource):
            live = False
            description = f"video {args.video}"

            def __iter__(self):
                index = 0
                while index < args.frames:
                    source = CaptureSource(args.video, kind="file")
                    source.open()
                    for frame in source:
                        if index >= args.frames:
                            break
                        frame.index, frame.timestamp = index, index / 25
                        yield frame
                        index += 1
                    source.close()

        outage_done = threading.Event()

        class Probe(FrameSource):
            """Wraps the source: memory readings, and the broker outage, at given frames."""

            live = False

            def __init__(self, inner):
                self.inner = inner
                self.description = inner.description
                self.peak = 0.0

            def __iter__(self):
                for frame in self.inner:
                    if frame.index == args.warmup:
                        gc.collect()
                        readings["after_warmup_mb"] = rss_mb()
                    if frame.index % 250 == 0:
                        self.peak = max(self.peak, rss_mb())
                    if args.outage_at is not None and frame.index == args.outage_at:
                        broker.kill()
                        threading.Timer(args.outage_seconds, lambda: (broker.start(), outage_done.set())).start()
                    yield frame

        class Raised(Sink):
            def __init__(self):
                self.ids: list[str] = []

            def publish(self, event, payload):
                if event in ("alert", "clear"):
                    self.ids.append(payload["event_id"])

        detector = Detector(args.model)
        bundle = detector.bundle
        outbox = Outbox(work / "outbox.sqlite")
        settings = MqttSettings(host=host, port=port, client_id=f"edge-ad-{device}", retry_delay=0.2,
                                retry_max_delay=1.0, keepalive=10)
        sink = MqttSink(settings, topics, outbox, model=model_identity(bundle))
        raised = Raised()
        stats = RuntimeStats()
        probe = Probe(Looped() if args.video else Synthetic())
        pipeline = Pipeline(detector=detector, source=probe, scorer=Scorer(bundle.thresholds),
                            policy=AlertPolicy(3, 5, Cooldown(frames=10), 5), sinks=Sinks([sink, raised]),
                            topics=topics, model=model_identity(bundle), stop=threading.Event(), stats=stats,
                            heartbeat=5.0, health=sink.health)
        readings["start_mb"] = rss_mb()
        started = time.monotonic()
        pipeline.run()
        elapsed = time.monotonic() - started
        if args.outage_at is not None:
            outage_done.wait(args.outage_seconds + 15)
        sink.delivery.wait_idle(60)
        gc.collect()
        readings["end_mb"] = rss_mb()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not set(raised.ids) <= counter.ids:
            time.sleep(0.1)
        sink.close()
        counter.close()
        lost = sorted(set(raised.ids) - counter.ids)
        result = {
            "frames": stats.processed, "seconds": round(elapsed, 1), "fps": round(stats.processed / elapsed, 1),
            "rss_start_mb": round(readings["start_mb"], 1),
            "rss_after_warmup_mb": round(readings.get("after_warmup_mb", readings["start_mb"]), 1),
            "rss_peak_mb": round(max(probe.peak, readings["end_mb"]), 1), "rss_end_mb": round(readings["end_mb"], 1),
            "rss_growth_after_warmup_mb": round(readings["end_mb"] - readings.get("after_warmup_mb",
                                                                                  readings["start_mb"]), 2),
            "events_raised": len(raised.ids), "events_delivered": len(set(raised.ids) & counter.ids),
            "copies_received": counter.copies, "events_lost": len(lost), "outbox_dropped": outbox.dropped,
            "outage": (f"broker SIGKILL at frame {args.outage_at} for {args.outage_seconds:g} s"
                       if args.outage_at is not None else None),
            "model": args.model, "source": args.video or "synthetic",
        }
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"frames {result['frames']} in {result['seconds']} s ({result['fps']} fps), source {result['source']}")
        print(f"memory: {result['rss_after_warmup_mb']} MiB after {args.warmup} frames of warm-up, "
              f"{result['rss_end_mb']} MiB at the end (growth {result['rss_growth_after_warmup_mb']:+.2f} MiB, "
              f"peak {result['rss_peak_mb']} MiB)")
        print(f"alerts and all-clears: {result['events_raised']} raised, {result['events_delivered']} delivered "
              f"({result['copies_received']} copies received), {result['events_lost']} lost"
              + (f"; {result['outage']}" if result["outage"] else ""))
    ok = result["events_lost"] == 0 and result["rss_growth_after_warmup_mb"] < 5.0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
