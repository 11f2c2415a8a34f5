"""JSON lines: one event per line on stdout or appended to a file, flushed per line.

The simplest integration (`edge-ad ... | jq`), and a local audit log beside MQTT.
No outbox is needed: a line is written before the event counts as published.
Alerts and all-clears appended to a regular file are also fsync'ed, so they
survive a power cut, not only a crash (alerts are rare; heartbeats and status
lines are only flushed). After a power cut the last line may be cut short: a
reader should skip a line that does not parse. A file is bounded: past
`max_bytes` it is rotated (alerts.jsonl -> alerts.jsonl.1 ...; the standard
library's RotatingFileHandler naming), keeping `backups` old files, so a
long-running device never fills its disk with heartbeats.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import stat
import sys
import threading
from pathlib import Path

from edge_ad.errors import UsageError
from edge_ad.deliver.sinks import Sink


DURABLE = ("alert", "clear", "verdict")


class JsonlSink(Sink):
    def __init__(self, target: str | None = "-", events: tuple[str, ...] = ("alert", "clear", "verdict", "status", "heartbeat"),
                 max_bytes: int = 0, backups: int = 5):
        self.events = set(events)
        self._lock = threading.Lock()
        self._rotation: logging.handlers.RotatingFileHandler | None = None
        if target in (None, "-"):
            self._stream, self._owned = sys.stdout, False
            self.target = "stdout"
        else:
            path = Path(target)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                if max_bytes > 0 and backups > 0 and not path.is_char_device() and not path.is_fifo():
                    # Only its size check and renaming chain are used; writing (and its errors) stays here.
                    self._rotation = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes,
                                                                          backupCount=backups, encoding="utf-8")
                    self._stream = self._rotation.stream
                else:
                    self._stream = open(path, "a", encoding="utf-8", buffering=1)
                self._owned = True
            except OSError as exc:
                raise UsageError(f"cannot write JSON lines to {path}: {exc.strerror or exc}") from None
            self.target = str(path)
        try:
            self._fsync = self._owned and stat.S_ISREG(os.fstat(self._stream.fileno()).st_mode)
        except (OSError, ValueError):
            self._fsync = False

    def publish(self, event: str, payload: dict) -> None:
        if event not in self.events:
            return
        line = json.dumps(payload, separators=(",", ":"), allow_nan=False)
        with self._lock:
            if self._rotation is not None and self._rotation.shouldRollover(logging.makeLogRecord({"msg": line})):
                self._rotation.doRollover()
                self._stream = self._rotation.stream
            self._stream.write(line + "\n")
            self._stream.flush()
            if self._fsync and event in DURABLE:
                os.fsync(self._stream.fileno())

    def close(self) -> None:
        with self._lock:
            if self._rotation is not None:
                self._rotation.close()  # closes the stream
            elif self._owned:
                self._stream.close()
            else:
                self._stream.flush()
