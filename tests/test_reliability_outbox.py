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
from edge_ad.deliver.outbox import Outbox, OutboxError, default_path


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
    assert box.dropped == 4 and len(box) == 3
    warnings = [r.getMessage() for r in caplog.records if "is full" in r.getMessage()]
    assert len(warnings) == 4 and "id-0" in warnings[0] and "(4 dropped so far)" in warnings[-1]
    box.close()
    again = Outbox(tmp_path / "o.sqlite", max_rows=3)
    assert again.dropped == 0 and [r.event_id for r in again.head(10)] == ["id-4", "id-5", "id-6"]
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


def test_state_names_do_not_collide_and_keep_old_outboxes(monkeypatch, tmp_path):
    from edge_ad.deliver.outbox import state_name

    ids = [("a-b", "c"), ("a", "b-c"), ("a%2Db", "c"), ("a-", "-b"), ("a", "--b"), ("line3", "cam0")]
    assert len({state_name(*pair) for pair in ids}) == len(ids)  # before: a-b-c twice
    assert state_name("line3", "cam0") == "line3-cam0"  # unchanged names for ids without '-' or '%'
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    assert default_path("a-b", "c") != default_path("a", "b-c")
    (tmp_path / "outbox-line-3-cam0.sqlite").write_bytes(b"")  # an outbox from before: still found
    assert default_path("line-3", "cam0") == tmp_path / "outbox-line-3-cam0.sqlite"


# -- a healthy outbox that cannot be used right now is kept, never moved aside -----------------------------

def filled(path, rows: int = 3) -> list[str]:
    box = Outbox(path)
    for i in range(rows):
        box.add("t", payload(i), f"id-{i}")
    box.close()
    return [f"id-{i}" for i in range(rows)]


def kept(path, ids: list[str]) -> None:
    """Still the same file with the same rows, and nothing quarantined."""
    assert not list(path.parent.glob("*.corrupt-*"))
    box = Outbox(path)
    assert [r.event_id for r in box.head(100)] == ids
    box.close()


def test_a_locked_outbox_is_an_error_that_keeps_it(tmp_path):
    """Another program (an operator's sqlite3 shell, a backup) holds a write lock: exit 1, retried later."""
    path = tmp_path / "o.sqlite"
    ids = filled(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(OutboxError, match="another program holds a lock on it") as info:
            Outbox(path, busy_timeout=0.2)
        assert info.value.exit_code == 1 and "the alerts in it are kept" in str(info.value)
    finally:
        other.execute("ROLLBACK")
        other.close()
    kept(path, ids)


def _without_root_file_access() -> None:
    """In the child: root loses the right to ignore file permissions (as the edge-ad service user has none)."""
    import ctypes
    import os

    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_a_read_only_folder_is_a_configuration_error_that_keeps_the_outbox(tmp_path):
    path = tmp_path / "state" / "o.sqlite"
    ids = filled(path)
    path.parent.chmod(0o555)  # e.g. ProtectSystem=strict without the StateDirectory=
    code = textwrap.dedent(f"""
        from edge_ad.deliver.outbox import Outbox, OutboxError
        try:
            Outbox({str(path)!r})
        except OutboxError as exc:
            print(exc.exit_code, exc)
    """)
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              preexec_fn=_without_root_file_access)
    finally:
        path.parent.chmod(0o700)
    assert "Traceback" not in proc.stderr, proc.stderr
    exit_code, message = proc.stdout.strip().split(" ", 1)
    assert exit_code == "2" and "cannot write it or its folder" in message and "--outbox" in message
    kept(path, ids)


def test_a_full_filesystem_at_start_keeps_the_outbox(tmp_path):
    """Writes fail at start-up (here: a file-size limit, RLIMIT_FSIZE): not damage, so nothing is moved."""
    path = tmp_path / "o.sqlite"
    ids = filled(path)
    code = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        from edge_ad.deliver.outbox import Outbox, OutboxError
        try:
            Outbox({str(path)!r})
        except OutboxError as exc:
            print(exc.exit_code, exc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    exit_code, message = proc.stdout.strip().split(" ", 1)
    assert exit_code == "1" and "the alerts in it are kept" in message
    kept(path, ids)


def test_a_full_disk_while_running_refuses_the_new_event_and_keeps_the_others(tmp_path):
    """SQLITE_FULL (the database may not grow: PRAGMA max_page_count) on add(): an OutboxError, nothing lost."""
    path = tmp_path / "o.sqlite"
    box = Outbox(path)
    box.add("t", payload(0), "id-0")
    pages = box._db.execute("PRAGMA page_count").fetchone()[0]
    box._db.execute(f"PRAGMA max_page_count={pages}")
    big = json.dumps({"event": "alert", "event_id": "big", "blob": "x" * 100_000})
    with pytest.raises(OutboxError, match="disk is full") as info:
        box.add("t", big, "big")
    assert info.value.exit_code == 1 and len(box) == 1
    box._db.execute("PRAGMA max_page_count=1073741823")  # space freed
    box.add("t", payload(1), "id-1")
    box.close()
    kept(path, ["id-0", "id-1"])


def test_only_real_corruption_is_quarantined(tmp_path):
    """A real SQLite database whose pages were overwritten: SQLITE_CORRUPT, moved aside, an empty one started."""
    path = tmp_path / "o.sqlite"
    filled(path, rows=200)
    data = bytearray(path.read_bytes())
    page = 4096
    data[page:page * 3] = b"\xff" * (page * 2)  # the table's pages, not the header
    path.write_bytes(bytes(data))
    box = Outbox(path)
    assert len(box) == 0
    box.close()
    assert len(list(tmp_path.glob("o.sqlite.corrupt-*"))) == 1
