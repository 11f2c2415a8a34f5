"""Alerts waiting for the broker's acknowledgement, kept on disk so that none is lost.

Every alert and all-clear is committed here (SQLite in WAL mode, fsync'ed)
before it is handed to MQTT, and deleted only after the broker's PUBACK. A
broker outage, a network cut, or a kill -9 of edge-ad leaves it here; it is
sent at the next connection or start, in order, with its original event id and
timestamp (at-least-once: consumers drop duplicates by event id). The table is
bounded: when full, the OLDEST rows are dropped, and that is counted, logged and
reported in heartbeats, never silent. One process owns an outbox at a time.

Only a file SQLite itself calls damaged (not a database, malformed) is moved
aside. A locked, full, read-only or failing store is a healthy outbox that
cannot be used right now: it is left exactly as it is, with an OutboxError
saying what to do (exit 1 when time can cure it, 2 when its permissions or
location must be fixed).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edge_ad.errors import EXIT_RUNTIME, EXIT_USAGE, EdgeAdError, UsageError

try:
    import fcntl
except ImportError:  # Windows: no advisory lock; one process per outbox is then up to the operator
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("edge_ad.outbox")

SCHEMA = 1
DEFAULT_MAX = 10000
BUSY_TIMEOUT = 10.0  # seconds SQLite waits for another program's lock before giving up

# Primary SQLite result codes (https://sqlite.org/rescode.html).
_CORRUPT = {11: "SQLITE_CORRUPT", 26: "SQLITE_NOTADB"}
_BUSY, _LOCKED, _READONLY, _IOERR, _FULL, _CANTOPEN, _PERM = 5, 6, 8, 10, 13, 14, 3


class OutboxError(EdgeAdError):
    """The outbox cannot be used now; its file and the alerts in it are kept as they are."""


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF
    text = str(exc).lower()  # Python 3.10: SQLite's own messages
    for needle, primary in (("not a database", 26), ("malformed", 11), ("locked", _BUSY), ("is full", _FULL),
                            ("readonly", _READONLY), ("unable to open", _CANTOPEN), ("disk i/o", _IOERR)):
        if needle in text:
            return primary
    return None


def is_corrupt(exc: sqlite3.Error) -> bool:
    """Real damage (SQLITE_CORRUPT, SQLITE_NOTADB): the only reason to move an outbox aside."""
    return _primary_code(exc) in _CORRUPT


def unusable(path: Path, exc: sqlite3.Error, doing: str) -> OutboxError:
    """An OutboxError for a healthy store that SQLite cannot use now, saying what to do."""
    code = _primary_code(exc)
    if code in (_BUSY, _LOCKED):
        hint = ("another program holds a lock on it (an sqlite3 shell, a backup?); close it, the alerts in it "
                "are kept", EXIT_RUNTIME)
    elif code == _FULL:
        hint = ("the disk is full; free space (old snapshots, JSON-lines files) or raise the disk quota; the "
                "alerts in it are kept", EXIT_RUNTIME)
    elif code in (_READONLY, _CANTOPEN, _PERM):
        hint = (f"edge-ad cannot write it or its folder {path.parent} (permissions, a read-only mount); fix "
                f"them or choose another --outbox; the alerts in it are kept", EXIT_USAGE)
    elif code == _IOERR:
        hint = "the disk reports I/O errors; check it (dmesg); the alerts in it are kept", EXIT_RUNTIME
    else:
        hint = "the alerts in it are kept", EXIT_RUNTIME
    return OutboxError(f"cannot {doing} the outbox {path}: {exc}: {hint[0]}", exit_code=hint[1])


@dataclass(frozen=True)
class Pending:
    """One stored event: `seq` orders delivery, `payload` is the exact JSON that was raised."""

    seq: int
    topic: str
    payload: str
    event_id: str


def state_dir() -> Path:
    """$STATE_DIRECTORY (systemd StateDirectory=, also set in the Docker image), else $XDG_STATE_HOME/edge-ad,
    else ~/.local/state/edge-ad."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "edge-ad"


def state_name(device: str, camera: str) -> str:
    """`device-camera` for state-file names, collision-free: '%' and '-' inside an id are percent-encoded
    (line-3/cam0 -> line%2D3-cam0, so it differs from line/3-cam0 -> line-3%2Dcam0); ids without them keep
    the names earlier versions used (line3-cam0)."""
    def quoted(part: str) -> str:
        return part.replace("%", "%25").replace("-", "%2D")
    return f"{quoted(device)}-{quoted(camera)}"


def default_path(device: str, camera: str) -> Path:
    """One outbox per device and camera, so two edge-ad processes never share one. An outbox stored under the
    name earlier versions gave hyphenated ids (which could collide) is still used, so no pending alert is lost."""
    path = state_dir() / f"outbox-{state_name(device, camera)}.sqlite"
    legacy = state_dir() / f"outbox-{device}-{camera}.sqlite"
    if legacy != path and not path.exists() and legacy.exists():
        log.warning("using the outbox %s (named as before edge-ad made hyphenated ids unambiguous); "
                    "move it to %s once it is empty", legacy, path)
        return legacy
    return path


class Outbox:
    """A bounded FIFO of events on disk. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: str | Path, max_rows: int = DEFAULT_MAX, busy_timeout: float = BUSY_TIMEOUT):
        if max_rows < 1:
            raise UsageError(f"--outbox-max must be >= 1, got {max_rows}")
        self.path = Path(path)
        self.max_rows = int(max_rows)
        self.busy_timeout = float(busy_timeout)
        self.dropped = 0  # dropped by this process (heartbeat `outbox_dropped`)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise UsageError(f"cannot create the outbox folder {self.path.parent}: {exc.strerror or exc} "
                             f"(set --outbox PATH)") from None
        self._lockfile = self._take_lock()
        try:
            self._db = self._open_or_quarantine()
            self._pending = self._count()
        except BaseException:
            self._lockfile.close()
            raise

    # -- opening -------------------------------------------------------------------------
    def _take_lock(self):
        """An advisory lock next to the database: a second edge-ad on the same outbox would deliver twice."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            handle = open(lock_path, "a+")
        except OSError as exc:
            raise UsageError(f"cannot open the outbox {self.path}: {exc.strerror or exc}") from None
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                raise UsageError(f"outbox {self.path} is in use by another edge-ad process; give each process "
                                 f"its own --outbox (or its own --device-id/--camera-id)") from None
        return handle

    def _open_or_quarantine(self) -> sqlite3.Connection:
        try:
            return self._open()
        except sqlite3.Error as exc:
            if not is_corrupt(exc):
                raise unusable(self.path, exc, "open") from None
            self._quarantine(exc)
        try:
            return self._open()
        except sqlite3.Error as exc:
            raise unusable(self.path, exc, "create") from None

    def _open(self) -> sqlite3.Connection:
        fresh = not self.path.exists()
        db = sqlite3.connect(str(self.path), timeout=self.busy_timeout, isolation_level=None,
                             check_same_thread=False)
        if fresh:
            try:
                os.chmod(self.path, 0o600)  # payloads name cameras and snapshot paths: not for other users
            except OSError:
                pass
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA:
                db.close()
                raise UsageError(f"outbox {self.path} was written by a newer edge-ad (schema {version}); "
                                 f"upgrade edge-ad or move the file aside")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                       "event_id TEXT NOT NULL, topic TEXT NOT NULL, payload TEXT NOT NULL, created REAL NOT NULL)")
            db.execute(f"PRAGMA user_version={SCHEMA}")
            db.execute("SELECT count(*) FROM outbox").fetchone()  # reads a page: a corrupt file fails here
        except BaseException:
            db.close()
            raise
        return db

    def _quarantine(self, exc: Exception) -> None:
        """A damaged file must not stop inspection: move it aside (loudly) and start an empty outbox."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            for suffix in ("", "-wal", "-shm"):
                source = Path(str(self.path) + suffix)
                if source.exists():
                    os.replace(source, Path(str(moved) + suffix))
        except OSError as err:
            raise OutboxError(f"outbox {self.path} is damaged ({exc}) and cannot be moved aside "
                              f"({err.strerror or err}); move it away by hand or choose another --outbox",
                              exit_code=EXIT_USAGE) from None
        log.error("outbox %s is not a usable SQLite database (%s); moved it to %s and started an empty one: "
                  "alerts stored in it cannot be delivered", self.path, exc, moved)

    # -- queries -------------------------------------------------------------------------
    def _count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def __len__(self) -> int:
        return self._pending

    def add(self, topic: str, payload: str, event_id: str) -> int:
        """Store one event durably (fsync) before anyone publishes it; returns its sequence number.

        OutboxError when SQLite cannot (disk full, locked, I/O): nothing was stored, nothing was lost
        from what the outbox already holds.
        """
        try:
            return self._add(topic, payload, event_id)
        except sqlite3.Error as exc:
            raise unusable(self.path, exc, "store an event in") from None

    def _add(self, topic: str, payload: str, event_id: str) -> int:
        with self._lock:
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                excess = self._pending + 1 - self.max_rows
                dropped_ids: list[str] = []
                if excess > 0:
                    rows = self._db.execute("SELECT seq, event_id FROM outbox ORDER BY seq LIMIT ?", (excess,)).fetchall()
                    dropped_ids = [event_id for _, event_id in rows]
                    self._db.execute("DELETE FROM outbox WHERE seq <= ?", (rows[-1][0],))
                cursor = self._db.execute("INSERT INTO outbox (event_id, topic, payload, created) VALUES (?, ?, ?, ?)",
                                          (event_id, topic, payload, time.time()))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._pending += 1 - len(dropped_ids)
            self.dropped += len(dropped_ids)
        if dropped_ids:
            log.warning("outbox %s is full (%d rows, --outbox-max): dropped the oldest %d undelivered event(s) "
                        "(%d dropped so far): %s", self.path, self.max_rows, len(dropped_ids), self.dropped,
                        ", ".join(dropped_ids[:5]) + (" ..." if len(dropped_ids) > 5 else ""))
        return int(cursor.lastrowid)

    def head(self, limit: int, after: int = 0) -> list[Pending]:
        """The oldest `limit` events with seq > `after`, in order."""
        with self._lock:
            rows = self._db.execute("SELECT seq, topic, payload, event_id FROM outbox WHERE seq > ? ORDER BY seq "
                                    "LIMIT ?", (after, limit)).fetchall()
        return [Pending(*row) for row in rows]

    def remove(self, seq: int) -> bool:
        """Forget a delivered event. Not fsync'ed: if a power cut undoes it, the event is sent once more."""
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            deleted = self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount
            self._pending -= deleted
        return bool(deleted)

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            finally:
                self._lockfile.close()  # releases the advisory lock
