"""The operator's one-line status: refreshed in place on a terminal, a periodic log line otherwise.

Log messages and the in-place line share stderr; `StatusAwareHandler` wipes
the line before a log record is printed so the two never interleave.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

log = logging.getLogger("edge_ad")

_active: "StatusLine | None" = None
_write_lock = threading.Lock()


class StatusLine:
    def __init__(self, stream=None, interval: float = 10.0):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self._shown = False
        self._last_log = time.monotonic()

    def __enter__(self) -> "StatusLine":
        global _active
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        self.wipe()

    def update(self, text: str, force: bool = False) -> None:
        if self.tty:
            with _write_lock:
                self.stream.write("\r\x1b[K" + text)
                self.stream.flush()
                self._shown = True
        elif force or time.monotonic() - self._last_log >= self.interval:
            self._last_log = time.monotonic()
            log.info("%s", text)

    def wipe(self) -> None:
        if self.tty and self._shown:
            with _write_lock:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._shown = False


class StatusAwareHandler(logging.StreamHandler):
    """A stderr handler that clears an in-place status line before writing. It looks up sys.stderr at
    each record, so a replaced stderr (a service wrapper, a test harness) never leaves it writing to a
    closed stream."""

    def emit(self, record: logging.LogRecord) -> None:
        if _active is not None:
            _active.wipe()
        self.stream = sys.stderr
        super().emit(record)


class _Formatter(logging.Formatter):
    """One record, one line: CR/LF inside a message (a file name, a stream URL, a config key) are escaped,
    so nothing read from outside can forge log lines."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace("\r", "\\r").replace("\n", "\\n")
        text = f"edge-ad: {record.levelname.lower()}: {message}"
        if record.exc_info and logging.getLogger().isEnabledFor(logging.DEBUG):
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(level: str = "info") -> None:
    """`edge-ad: <level>: <message>` on stderr; tracebacks only at debug level."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, StatusAwareHandler):
            root.removeHandler(handler)
    handler = StatusAwareHandler()
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for noisy in ("paho", "openvino"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
