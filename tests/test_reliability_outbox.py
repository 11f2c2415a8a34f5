"""The outbox on its own: durable, ordered, bounded (oldest dropped, counted), one owner, survives damage."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from edge_ad.errors import UsageError
from edge_ad.deliver.outbox import Outbox, default_path


def payload(i: int) -> str:
    return json.dumps({"event": "alert", "event_id": f"id-{i}", "frame_index": i})


def test_rows_come_back_in_order_and_leave_only_when_removed(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    seqs = [box.add("edge-ad/d/c/alert", payload(i), f"id-{i}") for i in range(5)]
    assert seqs == sorted(seqs) and len(box) == 5
    assert [r.event_id for r in box.head(3)] == ["id-0", "id-1", "id-2"]
    assert [r.event_id for r in box.head(10, after=seqs[2])] == ["id-3", "id-4"]
    assert box.remove(seqs[0]) and not box.remove(seqs[0])
    assert len(box) == 4 and box.head(1)[0].payload == payload(1)
    box.close()
    again = Outbox(tmp_path / "o.sqlite")
    assert [r.event_id for r in again.head(10)] == ["id-1", "id-2", "id-3", "id-4"] and len(again) == 4
    again.close()


def test_a_killed_writer_loses_nothing_it_committed(tmp_path):
    """add() returns only after the commit: a process killed right after it still left the row on disk."""
    path = tmp_path / "o.sqlite"
    code = textwrap.dedent(f"""
        import os, signal
        from edge_ad.deliver.outbox import Outbox
        box = Outbox({str(path)!r})
        for i in range(20):
            box.add("t", '{{"event_id": "x%d"}}' % i, "x%d" % i)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    box = Outbox(path)  # the lock of the dead process is gone with it
    assert [r.event_id for r in box.head(100)] == [f"x{i}" for i in range(20)]
    box.close()


def test_bounded_drops_the_oldest_and_counts_it(tmp_path, caplog):
    box = Outbox(tmp_path / "o.sqlite", max_rows=3)
    with caplog.at_level(logging.WARNING, logger="edge_ad.deliver.outbox"):
        for i in range(7):
            box.add("t", payload(i), f"id-{i}")
    assert [r.event_id for r in box.head(10)] == ["id-4", "id-5", "id-6"]
    assert box.dropped == 4 and box.dropped_total == 4 and len(box) == 3
    warnings = [r.getMessage() for r in caplog.records if "is full" in r.getMessage()]
    assert len(warnings) == 4 and "id-0" in warnings[0] and "(4 dropped so far)" in warnings[-1]
    box.close()
    again = Outbox(tmp_path / "o.sqlite", max_rows=3)
    assert again.dropped == 0 and again.dropped_total == 4  # history survives a restart
    again.close()


def test_one_process_per_outbox(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    code = f"from edge_ad.deliver.outbox import Outbox; Outbox({str(tmp_path / 'o.sqlite')!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "is in use by another edge-ad process" in proc.stderr
    box.close()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)


def test_a_corrupt_file_is_moved_aside_loudly(tmp_path, caplog):
    path = tmp_path / "o.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.ERROR, logger="edge_ad.deliver.outbox"):
        box = Outbox(path)
    assert len(box) == 0 and box.add("t", payload(1), "id-1")
    moved = list(tmp_path.glob("o.sqlite.corrupt-*"))
    assert len(moved) == 1 and moved[0].read_bytes().startswith(b"this is not")
    assert any("not a usable SQLite database" in r.getMessage() and "cannot be delivered" in r.getMessage()
               for r in caplog.records)
    box.close()


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "o.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=7")
    db.close()
    with pytest.raises(UsageError, match="newer edge-ad"):
        Outbox(path)


def test_wal_mode_and_private_file(tmp_path):
    box = Outbox(tmp_path / "sub" / "o.sqlite")
    box.add("t", payload(1), "id-1")
    db = sqlite3.connect(tmp_path / "sub" / "o.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert (tmp_path / "sub" / "o.sqlite").stat().st_mode & 0o077 == 0
    box.close()


def test_default_location(monkeypatch, tmp_path):
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_path("line3", "cam0") == tmp_path / "edge-ad" / "outbox-line3-cam0.sqlite"
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/edge-ad")  # systemd StateDirectory=edge-ad
    assert str(default_path("line3", "cam0")) == "/var/lib/edge-ad/outbox-line3-cam0.sqlite"
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_path("a", "b") == tmp_path / ".local" / "state" / "edge-ad" / "outbox-a-b.sqlite"
