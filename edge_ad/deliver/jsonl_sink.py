"""JSON lines: one event per line on stdout or appended to a file, flushed per line.

The simplest integration (`edge-ad ... | jq`), and a local audit log beside MQTT.
No outbox is needed: a line is written before the event counts as published.
Alerts and all-clears appended to a regular file are also fsync'ed, so they
survive a power cut, not only a crash (alerts are rare; heartbeats and status
lines are only flushed). After a power cut the last line may be cut short: a
reader should skip a line that does not parse.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
from pathlib import Path

from edge_ad.errors import UsageError
from edge_ad.deliver.sinks import Sink


DURABLE = ("alert", "clear")


class JsonlSink(Sink):
    def __init__(self, target: str | None = "-", events: tuple[str, ...] = ("alert", "clear", "status", "heartbeat")):
        self.events = set(events)
        self._lock = threading.Lock()
        if target in (None, "-"):
            self._stream, self._owned = sys.stdout, False
            self.target = "stdout"
        else:
            path = Path(target)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._stream, self._owned = open(path, "a", encoding="utf-8", buffering=1), True
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
            self._stream.write(line + "\n")
            self._stream.flush()
            if self._fsync and event in DURABLE:
                os.fsync(self._stream.fileno())

    def close(self) -> None:
        with self._lock:
            if self._owned:
                self._stream.close()
            else:
                self._stream.flush()
