"""Disks fill up, outputs fail, threads race: no alert leaves uncounted, no folder grows without bound.

Real components: a real mosquitto, a real SQLite outbox whose database may not grow (PRAGMA
max_page_count: what SQLite reports on a full disk), real files.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid

import numpy as np
import pytest
from runtime_helpers import MOSQUITTO, Subscriber, broker, jsonl, make_frame, mosquitto  # noqa: F401  (fixtures)

from edge_ad.deliver.events import Topics
from edge_ad.deliver.jsonl_sink import JsonlSink
from edge_ad.deliver.outbox import Outbox
from edge_ad.deliver.sinks import Sinks
from edge_ad.deliver.snapshots import LowDiskSpace, SnapshotWriter


def alert(size: int = 0) -> dict:
    return {"event": "alert", "event_id": str(uuid.uuid4()), "padding": "x" * size}


# -- item: an alert the outbox cannot store is counted, never silently "published" -------------------------

@pytest.mark.mosquitto
def test_an_alert_the_full_outbox_cannot_store_is_counted_and_still_sent(mosquitto, tmp_path, caplog):
    from edge_ad.app import _StatusReporter
    from edge_ad.deliver.mqtt import MqttSettings
    from edge_ad.deliver.mqtt_sink import MqttSink

    host, port = mosquitto
    topics = Topics("edge-ad", "full", "cam")
    outbox = Outbox(tmp_path / "outbox.sqlite")
    sub = Subscriber(host, port, "edge-ad/full/#")
    mqtt_sink = MqttSink(MqttSettings(host=host, port=port, client_id="full-disk"), topics, outbox)
    sinks = Sinks([mqtt_sink, JsonlSink(tmp_path / "mirror.jsonl")])
    status = _StatusReporter(sinks, model={})
    try:
        stored = alert()
        sinks.publish("alert", stored)
        pages = outbox._db.execute("PRAGMA page_count").fetchone()[0]
        outbox._db.execute(f"PRAGMA max_page_count={pages}")  # the disk is now full for the outbox
        unstored = alert(size=50_000)
        sinks.publish("alert", unstored)
        sub.wait_for(lambda m: {p["event_id"] for _, p in m} >= {stored["event_id"], unstored["event_id"]},
                     what="both alerts (the second one from memory)")
        assert status.health()["alerts_unstored"] == 1 and sinks.unstored == 1
    finally:
        sinks.close()
        sub.close()
    mirror = [e["event_id"] for e in jsonl(tmp_path / "mirror.jsonl", "alert")]
    assert mirror == [stored["event_id"], unstored["event_id"]]  # raised: both; stored: one, and that is said
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(unstored["event_id"] in e and "NOT stored" in e and "disk is full" in e for e in errors), errors
    print(f"\nFIGURES outbox full while running: raised 2, stored 1, alerts_unstored 1, delivered "
          f"{len({p['event_id'] for p in sub.events('alert')})}")


def test_a_failing_output_is_counted_for_alerts_not_for_heartbeats(tmp_path):
    """Without MQTT the JSON-lines file is the only store: a write that fails is an uncounted loss otherwise."""
    target = tmp_path / "alerts.jsonl"
    sink = JsonlSink(target)
    sinks = Sinks([sink])
    sinks.publish("alert", alert())
    sink._stream.close()  # what a yanked USB stick or an I/O error leaves behind: writes raise
    sinks.publish("heartbeat", {"event": "heartbeat"})
    sinks.publish("alert", alert())
    assert sinks.unstored == 1 and len(jsonl(target, "alert")) == 1


# -- item: snapshots and JSON lines are bounded, and the outbox's disk space comes first ---------------------

def snapshot(writer: SnapshotWriter, index: int):
    amap = np.zeros((64, 64), np.float32)
    return writer.write(f"cam_{index:08d}_{uuid.uuid4().hex[:8]}", make_frame(), amap, [])


def test_snapshots_are_bounded_by_count_oldest_first_and_across_restarts(tmp_path):
    (tmp_path / "operator-notes.jpg").write_bytes(b"not ours")  # never touched: not named like a snapshot
    writer = SnapshotWriter(tmp_path, max_files=3)
    paths = [snapshot(writer, i) for i in range(5)]
    assert sorted(p.name for p in tmp_path.glob("cam_*.jpg")) == sorted(p.name for p in paths[2:])
    assert writer.deleted == 2
    again = SnapshotWriter(tmp_path, max_files=2)  # a restart with a tighter bound trims the old ones
    assert sorted(tmp_path.glob("cam_*.jpg")) == sorted(paths[3:]) and again.deleted == 1
    assert (tmp_path / "operator-notes.jpg").exists()


def test_snapshots_are_bounded_by_size(tmp_path):
    writer = SnapshotWriter(tmp_path)
    one = snapshot(writer, 0).stat().st_size
    bounded = SnapshotWriter(tmp_path / "bounded", max_bytes=int(one * 2.5))
    for i in range(6):
        snapshot(bounded, i)
    total = sum(p.stat().st_size for p in (tmp_path / "bounded").glob("*.jpg"))
    assert len(list((tmp_path / "bounded").glob("*.jpg"))) == 2 and total <= one * 2.5


def test_no_snapshot_eats_into_the_reserve_kept_for_the_outbox(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    writer = SnapshotWriter(tmp_path, reserve_bytes=free + 1)  # a disk with less free than the reserve
    with pytest.raises(LowDiskSpace, match="reserve kept for the outbox"):
        snapshot(writer, 0)
    assert not list(tmp_path.glob("*.jpg")) and writer.refused == 1
    assert snapshot(SnapshotWriter(tmp_path, reserve_bytes=1), 1).exists()


def test_jsonl_files_are_rotated_and_bounded(tmp_path):
    target = tmp_path / "alerts.jsonl"
    sink = JsonlSink(target, max_bytes=2000, backups=2)
    raised = [alert(size=200) for _ in range(40)]
    for event in raised:
        sink.publish("alert", event)
    sink.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["alerts.jsonl", "alerts.jsonl.1", "alerts.jsonl.2"]
    assert all(f.stat().st_size <= 2000 for f in files)
    kept = [e["event_id"] for name in ("alerts.jsonl.2", "alerts.jsonl.1", "alerts.jsonl")
            for e in jsonl(tmp_path / name)]
    assert kept == [e["event_id"] for e in raised[-len(kept):]]  # the newest, complete lines, in order


def test_disk_bounds_are_options(tmp_path):
    from edge_ad.errors import ConfigError
    from edge_ad.ops.config import build_config

    config = build_config({"images": str(tmp_path), "model": "b", "snapshot_max_files": 10, "snapshot_max_mb": 5.0,
                           "disk_reserve_mb": 100.0, "jsonl_max_mb": 1.0, "jsonl_backups": 2})
    assert (config.snapshot_max_files, config.disk_reserve_mb, config.jsonl_backups) == (10, 100.0, 2)
    with pytest.raises(ConfigError, match="--jsonl-backups"):
        build_config({"images": str(tmp_path), "model": "b", "jsonl_backups": 0})
    with pytest.raises(ConfigError, match="--disk-reserve-mb"):
        build_config({"images": str(tmp_path), "model": "b", "disk_reserve_mb": -1.0})


# -- item: counters and status shared between threads -----------------------------------------------------

def test_frame_errors_counted_from_many_threads_are_exact():
    from edge_ad.ops.stats import RuntimeStats

    stats = RuntimeStats()
    threads = [threading.Thread(target=lambda: [stats.error() for _ in range(20000)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stats.errors == 80000 and stats.snapshot()["errors"] == 80000


def test_status_health_is_safe_while_other_threads_change_the_problems():
    """health() runs on the ticker thread while the capture and MQTT threads set and clear problems."""
    from edge_ad.app import _StatusReporter

    status = _StatusReporter(Sinks([]), model={})
    stop = threading.Event()
    failures: list[BaseException] = []

    def churn(component: str) -> None:
        i = 0
        while not stop.is_set():
            status.set(f"{component}{(i // 2) % 50}", "away" if i % 2 == 0 else None)  # set, then clear
            i += 1

    def read() -> None:
        try:
            for _ in range(20000):
                status.health()
        except BaseException as exc:  # noqa: BLE001  (dictionary changed size during iteration)
            failures.append(exc)

    writers = [threading.Thread(target=churn, args=(name,)) for name in ("camera", "broker")]
    reader = threading.Thread(target=read)
    old = os.sys.getswitchinterval()
    os.sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up at once
    try:
        for thread in writers + [reader]:
            thread.start()
        reader.join()
    finally:
        stop.set()
        for thread in writers:
            thread.join()
        os.sys.setswitchinterval(old)
    assert not failures, failures[0]
    assert json.dumps(status.health())
