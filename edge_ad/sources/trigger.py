"""Triggered capture: one frame per trigger (MQTT message or a line on stdin), one verdict per part.

A trigger message on `<root>/<device>/<camera>/trigger` (payload: empty, a part
id as text, or JSON `{"part_id": "..."}`) grabs the next frame and inspects
it. With a live camera or stream, "next" means the first frame captured after
the trigger arrived (the frames in between are read and discarded, so the
camera's buffer stays fresh); with a video file or an image folder each trigger
takes the next frame of the file, which makes a recorded line replayable.

Triggers wait in a bounded queue (`--trigger-queue`). When the line triggers
faster than the model answers and the queue is full, the new trigger is not
inspected but answered at once with verdict ERROR ("dropped") and counted
(`triggers_dropped` in heartbeats): never silently lost. Time-to-verdict is
measured from the moment the trigger arrived (`Frame.captured`).
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator

from edge_ad.sources.capture import Frame, FrameSource

log = logging.getLogger("edge_ad.trigger")

DEFAULT_QUEUE = 4
MAX_PART_ID = 128


@dataclass
class PartFrame(Frame):
    """A frame that is one part: its id, what triggered it, and (watched files) a stable key for the event id."""

    part_id: str = ""
    trigger: str = "trigger"
    key: str | None = None


@dataclass(frozen=True)
class Trigger:
    part_id: str
    origin: str  # "mqtt" | "stdin"
    received: float  # monotonic
    utc: datetime


def parse_part_id(payload: bytes | str) -> str | None:
    """Trigger payload -> part id (None: use the trigger count). JSON {"part_id": ...}, or plain text."""
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    text = text.strip()
    if not text:
        return None
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            value = data.get("part_id", data.get("id"))
            text = "" if value is None else str(value).strip()
    clean = "".join(c for c in text if c.isprintable())[:MAX_PART_ID]
    return clean or None


class TriggeredSource(FrameSource):
    """Wraps a frame source and yields one PartFrame per trigger, in trigger order."""

    live = False  # the pipeline must never drop a triggered frame: waiting happens here, bounded

    def __init__(self, inner: FrameSource, stop: threading.Event, max_pending: int = DEFAULT_QUEUE,
                 on_dropped: Callable[[Trigger, str], None] | None = None):
        self.inner, self.stop = inner, stop
        self.max_pending = max(1, int(max_pending))
        self.on_dropped = on_dropped or (lambda trigger, reason: log.error("trigger %s dropped: %s",
                                                                           trigger.part_id, reason))
        self.description = f"{inner.description} (triggered)"
        self.default_id = inner.default_id
        self._pending: queue.Queue[Trigger | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0  # triggers received, no frame taken yet
        self.received = 0
        self.dropped = 0
        self._ended = False

    @property
    def skipped(self) -> int:  # type: ignore[override]
        return self.inner.skipped

    # -- trigger side (MQTT network thread, stdin thread) -------------------------------------------
    def trigger(self, part_id: str | None = None, origin: str = "mqtt") -> bool:
        """Queue one trigger; False (and an ERROR answer through on_dropped) when the queue is full."""
        with self._lock:
            self.received += 1
            trig = Trigger(part_id or f"trigger-{self.received}", origin, time.monotonic(),
                           datetime.now(timezone.utc))
            if self._ended:
                reason = "not inspected: the frame source has ended"
            elif self._waiting >= self.max_pending:
                self.dropped += 1
                reason = f"dropped: {self._waiting} trigger(s) already waiting for the model (--trigger-queue)"
            else:
                self._waiting += 1
                self._pending.put(trig)
                return True
        self.on_dropped(trig, reason)
        return False

    def on_message(self, payload: bytes) -> None:
        """MQTT handler for the trigger topic."""
        self.trigger(parse_part_id(payload), "mqtt")

    def end_of_triggers(self) -> None:
        """No more triggers will come (stdin closed): finish the waiting ones, then end the run."""
        self._pending.put(None)

    # -- capture side (pipeline thread) -------------------------------------------------------------------
    def open(self) -> None:
        self.inner.open()

    def _next_trigger(self, block: bool) -> Trigger | None | bool:
        """A trigger, None at end of triggers, False when none is waiting (or stopping)."""
        while not self.stop.is_set():
            try:
                return self._pending.get(timeout=0.1) if block else self._pending.get_nowait()
            except queue.Empty:
                if not block:
                    return False
        return False

    def _part(self, frame: Frame, trig: Trigger) -> PartFrame:
        with self._lock:
            self._waiting -= 1
        return PartFrame(index=frame.index, image=frame.image, timestamp=frame.timestamp, utc=trig.utc,
                         captured=trig.received, name=frame.name, part_id=trig.part_id, trigger=trig.origin)

    def __iter__(self) -> Iterator[Frame]:
        frames = iter(self.inner)
        trig: Trigger | None | bool = False
        try:
            while not self.stop.is_set():
                if self.inner.live:
                    frame = next(frames, None)  # keep reading: the camera's buffer must stay fresh
                    if frame is None:
                        return
                    if trig is False:
                        trig = self._next_trigger(block=False)
                    if trig is None:
                        return
                    if trig is False or frame.captured < trig.received:
                        continue  # no trigger yet, or a frame exposed before the trigger
                    yield self._part(frame, trig)
                    trig = False
                else:
                    trig = self._next_trigger(block=True)
                    if trig is None or trig is False:
                        return
                    frame = next(frames, None)
                    if frame is None:
                        with self._lock:
                            self._waiting -= 1
                        self.on_dropped(trig, "not inspected: the frame source has ended")
                        return
                    yield self._part(frame, trig)
                    trig = False
        finally:
            self._finish()

    def _finish(self) -> None:
        """Answer every trigger that will not get a frame (source ended, or stopping)."""
        with self._lock:
            self._ended = True
        while True:
            try:
                trig = self._pending.get_nowait()
            except queue.Empty:
                return
            if trig is not None:
                with self._lock:
                    self._waiting -= 1
                self.on_dropped(trig, "not inspected: edge-ad stopped before a frame was taken")

    def close(self) -> None:
        self.inner.close()


def read_stdin_triggers(source: TriggeredSource, stream=None) -> threading.Thread:
    """Software trigger: every line on stdin is one trigger (the line, if not empty, is the part id)."""
    stream = stream or sys.stdin

    def run() -> None:
        for line in stream:
            source.trigger(parse_part_id(line), "stdin")
        source.end_of_triggers()

    thread = threading.Thread(target=run, name="edge-ad-stdin-trigger", daemon=True)
    thread.start()
    return thread
