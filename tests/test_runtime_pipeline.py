"""The pipeline's preprocessing stage (frame order, bounds, live dropping), regions only for alerts,
and the run summary in the final heartbeat."""

from __future__ import annotations

import json
import logging
import random
import threading
import time

import numpy as np
import pytest
from runtime_helpers import bundle_dir, make_frame  # noqa: F401  (fixture)

from edge_ad.deliver.events import Topics
from edge_ad.model.inference import Detector
from edge_ad.pipeline import Pipeline, PrepareStage
from edge_ad.decide.policy import AlertPolicy, Cooldown
from edge_ad.model.preprocess import FrameError
from edge_ad.decide.scoring import Scorer
from edge_ad.deliver.sinks import Sinks
from edge_ad.deliver.jsonl_sink import JsonlSink
from edge_ad.sources.capture import Frame, FrameSource
from edge_ad.ops.stats import RuntimeStats


class FakeDetector:
    """What PrepareStage needs from a Detector: slow, jittery preparation; starts recorded in order."""

    def __init__(self, requests: int = 2, delay: float = 0.004, hold: bool = False):
        self.requests = requests
        self.delay = delay
        self.started: list[int] = []
        self.dropped = 0
        self.failed = 0
        self.in_flight = 0
        self.hold = hold  # started frames stay in flight (a model that never finishes)
        self.preparing = 0
        self.most_preparing = 0
        self.lock = threading.Lock()

    def try_prepare(self, frame):
        with self.lock:
            self.preparing += 1
            self.most_preparing = max(self.most_preparing, self.preparing)
        time.sleep(random.uniform(0, self.delay))  # workers finish out of order
        with self.lock:
            self.preparing -= 1
        if frame.image is None:
            self.failed += 1
            return None
        return frame.index

    def start(self, frame, tensor):
        with self.lock:
            self.started.append(frame.index)
            if self.hold:
                self.in_flight += 1
        return True

    def drop(self):
        self.dropped += 1


def frame(index: int, image=True) -> Frame:
    return Frame(index=index, image=np.zeros((2, 2, 3), np.uint8) if image else None, timestamp=index / 25)


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_frames_start_in_order_whatever_worker_finishes_first(workers):
    detector = FakeDetector()
    stage = PrepareStage(detector, workers=workers)
    for i in range(200):
        assert stage.put(frame(i, image=i % 17 != 5))  # some unusable frames: skipped, order kept
    stage.close()
    assert detector.started == [i for i in range(200) if i % 17 != 5]
    assert detector.failed == len([i for i in range(200) if i % 17 == 5])
    assert detector.most_preparing <= workers


def test_file_sources_wait_instead_of_queueing_without_bound():
    detector = FakeDetector(delay=0.002)
    stage = PrepareStage(detector, workers=2)
    most = 0
    for i in range(100):
        stage.put(frame(i))
        most = max(most, stage._pending)
    stage.close()
    assert most <= stage.depth == 4 and len(detector.started) == 100 and detector.dropped == 0


def test_live_sources_drop_when_requests_and_preparation_are_spoken_for():
    """A model that never finishes: exactly `requests` frames get in, every later one is dropped at once."""
    detector = FakeDetector(requests=3, delay=0.0, hold=True)
    stage = PrepareStage(detector, workers=2, live=True)
    accepted = sum(stage.put(frame(i)) for i in range(50))
    stage.close()
    assert accepted == 3 and detector.started == [0, 1, 2] and detector.dropped == 47


def test_a_worker_error_is_reported_and_the_stream_goes_on():
    class Failing(FakeDetector):
        def try_prepare(self, frame):
            if frame.index == 3:
                raise RuntimeError("boom")
            return super().try_prepare(frame)

    errors = []
    detector = Failing()
    stage = PrepareStage(detector, workers=2, on_error=lambda f, exc: errors.append((f.index, str(exc))))
    for i in range(10):
        stage.put(frame(i))
    stage.close()
    assert errors == [(3, "boom")] and detector.started == [0, 1, 2, 4, 5, 6, 7, 8, 9]


# -- the real pipeline on the tiny model ------------------------------------------------------------------------

class ListSource(FrameSource):
    live = False
    default_id = "mem"
    description = "memory"

    def __init__(self, images):
        self.images = images

    def __iter__(self):
        for index, image in enumerate(self.images):
            yield Frame(index=index, image=image, timestamp=index / 25)


class CountingScorer(Scorer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.region_calls = 0

    def regions(self, anomaly_map, frame_size):
        self.region_calls += 1
        return super().regions(anomaly_map, frame_size)


def run_pipeline(detector, images, tmp_path, scorer=None, policy=None, **kwargs):
    out = tmp_path / "events.jsonl"
    sink = JsonlSink(str(out))
    stats = RuntimeStats()
    pipeline = Pipeline(detector=detector, source=ListSource(images),
                        scorer=scorer or Scorer(detector.bundle.thresholds),
                        policy=policy or AlertPolicy(3, 5, Cooldown(frames=10), 5), sinks=Sinks([sink]),
                        topics=Topics("edge-ad", "dev", "mem"), model={}, stop=threading.Event(), stats=stats,
                        heartbeat=60, **kwargs)
    pipeline.run()
    sink.close()
    return stats, [json.loads(line) for line in out.read_text().splitlines()]


def test_regions_only_for_alerts_and_the_alert_counts_them(bundle_dir, tmp_path):
    """20 anomalous frames, one alert (then cool-down): regions are computed once, not 20 times."""
    detector = Detector(bundle_dir, mode="throughput", requests=3)
    boxes = [(8 + 24 * i, 8, 12, 12) for i in range(9)] + [(8 + 24 * i, 100, 12, 12) for i in range(9)]
    images = [make_frame() for _ in range(5)] + [make_frame(boxes) for _ in range(20)]
    scorer = CountingScorer(detector.bundle.thresholds, max_regions=4)
    stats, events = run_pipeline(detector, images, tmp_path, scorer=scorer,
                                 policy=AlertPolicy(3, 5, Cooldown(frames=1000), 1000), prepare_threads=2)
    (alert,) = [e for e in events if e["event"] == "alert"]
    assert stats.anomalous == 20 and scorer.region_calls == 1
    assert alert["frame_index"] == 7 and alert["regions_total"] == 18 and len(alert["regions"]) == 4


def test_final_heartbeat_is_the_run_summary(bundle_dir, tmp_path, caplog):
    detector = Detector(bundle_dir)
    with caplog.at_level(logging.INFO, logger="edge_ad.pipeline"):
        stats, events = run_pipeline(detector, [make_frame() for _ in range(30)], tmp_path)
    final = events[-1]
    assert final["event"] == "heartbeat" and final["final"] is True and final["processed"] == 30
    # elapsed_s is rounded to 0.1 ms, fps_avg to 0.01 fps: compare within that rounding
    assert final["elapsed_s"] > 0
    assert final["fps_avg"] == pytest.approx(29 / final["elapsed_s"], rel=0.001 + 0.00006 / final["elapsed_s"], abs=0.01)
    assert final["cpu_ms_per_frame"] > 0  # process CPU time per frame: capture to decision, every thread
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run summary:")]
    assert summary and "processed=30" in summary[0] and f"fps_avg={final['fps_avg']:.2f}" in summary[0]


def test_a_detector_serves_several_runs_in_order(bundle_dir, tmp_path):
    """Sequence numbers continue across runs; each run's consumer starts at the detector's next number, so
    results are decided as they arrive (not parked until the run ends) in the second and third run too."""
    detector = Detector(bundle_dir, mode="throughput", requests=2)
    for run in range(3):
        folder = tmp_path / str(run)
        folder.mkdir()
        images = [make_frame([(8, 8, 40, 40)] if 10 <= i < 14 else []) for i in range(20)]
        stats = RuntimeStats()
        decided_midway = []

        class Watching(ListSource):
            def __iter__(self):
                for frame in super().__iter__():
                    if frame.index == 15:  # wait (bounded) until the first frames were decided
                        deadline = time.monotonic() + 10
                        while stats.processed < 5 and time.monotonic() < deadline:
                            time.sleep(0.01)
                        decided_midway.append(stats.processed)
                    yield frame

        out = folder / "events.jsonl"
        sink = JsonlSink(str(out))
        Pipeline(detector=detector, source=Watching(images), scorer=Scorer(detector.bundle.thresholds),
                 policy=AlertPolicy(2, 3, Cooldown(frames=100), 2), sinks=Sinks([sink]),
                 topics=Topics("edge-ad", "dev", "mem"), model={}, stop=threading.Event(), stats=stats,
                 heartbeat=60).run()
        sink.close()
        events = [json.loads(line) for line in out.read_text().splitlines()]
        assert stats.processed == 20 and decided_midway[0] >= 5
        assert [(e["event"], e["frame_index"]) for e in events if e["event"] in ("alert", "clear")] == \
            [("alert", 11), ("clear", 15)]


def test_unusable_frames_are_skipped_by_the_stage(bundle_dir, tmp_path):
    detector = Detector(bundle_dir, requests=2)
    images = [make_frame(), np.zeros((0, 0, 3), np.uint8), make_frame(), np.array([["x"]]), make_frame()]
    stats, events = run_pipeline(detector, images, tmp_path, prepare_threads=2)
    assert stats.processed == 3 and detector.failed == 2 and stats.errors == 0
    assert events[-1]["skipped"] == 2


def test_prepare_errors_are_frame_errors():
    """What try_prepare turns into a count: the preprocess module's FrameError."""
    from edge_ad.model.preprocess import PreprocessSpec, resize_for_model

    with pytest.raises(FrameError):
        resize_for_model(np.zeros((0, 3), np.uint8), PreprocessSpec.square(8))
