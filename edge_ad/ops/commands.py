"""Remote commands on `<root>/<device>/<camera>/cmd`, answered on `.../cmd/result`: parsing, one worker, ids.

A command is JSON `{"id": "...", "command": "...", "args": {...}}`. Each one gets
exactly one answer `{"event": "cmd_result", "id", "command", "ok", "outcome" | "error", ...}`:
a malformed message or an unknown command is answered with an error, never a crash.
Commands run one at a time, in arrival order, on a worker thread of their own (the
MQTT network thread only parses and queues), so a deploy or a teach-in never holds
up the broker link or the frames. Ids make commands idempotent: the answers of the
last `RECORD_SIZE` commands are kept in a JSON file in the state dir (replaced
atomically), and a command whose id was already answered gets that stored answer
again (`"repeated": true`) without running twice, also after a restart. That is the
retry path: results are QoS 1 but not queued while the broker is away, so a sender
that saw no answer sends the same command again.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge_ad.deliver.events import SCHEMA, utc_iso
from edge_ad.atomic import write_atomic
from edge_ad.model.rollout import redact

log = logging.getLogger("edge_ad.commands")

RECORD_SIZE = 200  # answered ids kept (and persisted)
QUEUE_SIZE = 8  # commands waiting; one more is answered "busy"
MAX_PAYLOAD = 64 * 1024
MAX_ID = 128


class CommandError(Exception):
    """What a command answers as `error` (one line)."""


class Interrupted(CommandError):
    """The command could not finish because edge-ad is stopping: answered, but not recorded (a retry runs it)."""


@dataclass
class Command:
    id: str
    command: str
    args: dict


def parse(payload: bytes) -> Command:
    """A command message -> Command; CommandError saying what is wrong (the id, when readable, is kept in
    `.id` of the error so the answer can name it)."""
    if len(payload) > MAX_PAYLOAD:
        raise CommandError(f"command message is {len(payload)} bytes, more than {MAX_PAYLOAD}")
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CommandError(f"command message is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CommandError('command message must be a JSON object {"id": ..., "command": ..., "args": {...}}')
    ident = data.get("id")
    error = None
    if not isinstance(ident, str) or not ident.strip() or len(ident) > MAX_ID:
        error = f"command needs an \"id\": a non-empty string of at most {MAX_ID} characters"
        ident = None
    elif not isinstance(data.get("command"), str) or not data["command"]:
        error = "command needs a \"command\" name (string)"
    elif not isinstance(data.get("args", {}), dict):
        error = "\"args\" must be a JSON object"
    elif set(data) - {"id", "command", "args"}:
        error = f"unknown field(s) {sorted(set(data) - {'id', 'command', 'args'})}: a command has id, command, args"
    if error:
        exc = CommandError(error)
        exc.id, exc.command = ident, data.get("command") if isinstance(data.get("command"), str) else None
        raise exc
    return Command(ident, data["command"], dict(data.get("args") or {}))


class Record:
    """The answers of the last `size` commands by id, persisted in one JSON file (atomic replace)."""

    def __init__(self, path: Path | None, size: int = RECORD_SIZE):
        self.path, self.size = path, int(size)
        self._answers: OrderedDict[str, dict] = OrderedDict()
        if path is not None and path.exists():
            try:
                for answer in json.loads(path.read_text()):
                    self._answers[answer["id"]] = answer
            except (OSError, ValueError, TypeError, KeyError) as exc:
                log.error("command record %s unreadable (%s); starting a new one", path, exc)

    def get(self, ident: str) -> dict | None:
        return self._answers.get(ident)

    def put(self, answer: dict) -> str:
        """Keep the answer (dropping the oldest beyond `size`); returns the record's text for `save`."""
        self._answers[answer["id"]] = answer
        while len(self._answers) > self.size:
            self._answers.popitem(last=False)
        return json.dumps(list(self._answers.values()), separators=(",", ":"))

    def save(self, text: str) -> None:
        if self.path is not None:
            try:
                write_atomic(self.path, text)
            except OSError as exc:
                log.error("cannot save the command record %s: %s (a repeated id may run again after a restart)",
                          self.path, exc.strerror or exc)


Handler = Callable[[dict, str], dict]  # (args, command id) -> outcome; raises CommandError (or anything) to fail


class CommandService:
    """Receives command messages (`on_message`, network thread), runs them on its worker, publishes answers."""

    def __init__(self, handlers: dict[str, Handler], publish: Callable[[dict], None], device: str, camera: str,
                 record: Record, stop: threading.Event | None = None):
        self.handlers, self.publish, self.record = handlers, publish, record
        self.device, self.camera = device, camera
        self.stop = stop or threading.Event()
        self._queue: queue.Queue[Command | None] = queue.Queue(QUEUE_SIZE)
        self._lock = threading.Lock()
        self._waiting: set[str] = set()  # queued or running ids
        self.counts = {"ok": 0, "failed": 0, "rejected": 0, "repeated": 0}
        self._worker = threading.Thread(target=self._work, name=f"edge-ad-commands-{camera}", daemon=True)
        self._worker.start()

    def answer(self, ident: str | None, command: str | None, ok: bool, outcome: dict | None = None,
               error: str | None = None, duration: float | None = None) -> dict:
        payload = {"event": "cmd_result", "schema": SCHEMA, "id": ident, "command": command, "ok": ok,
                   "device": self.device, "camera": self.camera, "timestamp": utc_iso()}
        if ok:
            payload["outcome"] = outcome or {}
        else:
            payload["error"] = error
        if duration is not None:
            payload["duration_s"] = round(duration, 3)
        return payload

    def _send(self, payload: dict) -> None:
        try:
            self.publish(payload)
        except Exception as exc:  # noqa: BLE001
            log.error("cannot publish the answer to command %s: %s", payload.get("id"), exc)

    def on_message(self, payload: bytes) -> None:
        """Parse and queue (MQTT network thread: never blocks, never raises)."""
        try:
            command = parse(payload)
        except CommandError as exc:
            with self._lock:
                self.counts["rejected"] += 1
            log.warning("rejected command message: %s", exc)
            self._send(self.answer(getattr(exc, "id", None), getattr(exc, "command", None), False, error=str(exc)))
            return
        with self._lock:
            stored = self.record.get(command.id)
            running = command.id in self._waiting
            if stored is None and not running:
                self._waiting.add(command.id)
        if stored is not None:
            with self._lock:
                self.counts["repeated"] += 1
            log.info("command %s (%s) was already answered: sending the stored answer again", command.id,
                     command.command)
            self._send({**stored, "repeated": True})
            return
        if running:
            log.info("command %s is already waiting or running; its answer follows", command.id)
            return
        try:
            self._queue.put_nowait(command)
        except queue.Full:
            with self._lock:
                self._waiting.discard(command.id)
                self.counts["rejected"] += 1
            self._send(self.answer(command.id, command.command, False,
                                   error=f"busy: {QUEUE_SIZE} commands are waiting; send it again later"))

    def _work(self) -> None:
        try:  # downloads, hashing and compiling must not take CPU from inspection (Linux: per-thread nice)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while True:
            command = self._queue.get()
            if command is None:
                return
            if self.stop.is_set():  # queued before the stop: answered, not run, not recorded (a retry runs it)
                self._refuse(command)
                continue
            self._run(command)

    def _refuse(self, command: Command) -> None:
        with self._lock:
            self.counts["failed"] += 1
            self._waiting.discard(command.id)
        log.warning("command %s (%s) not run: edge-ad is shutting down", command.id, command.command)
        self._send(self.answer(command.id, command.command, False, error="interrupted: shutting down"))

    def _run(self, command: Command) -> None:
        began = time.monotonic()
        handler = self.handlers.get(command.command)
        interrupted = False
        if handler is None:
            answer = self.answer(command.id, command.command, False, error=f"unknown command {command.command!r}; "
                                 f"known: {', '.join(sorted(self.handlers))}")
        else:
            shown = {k: redact(v) if isinstance(v, str) else v for k, v in command.args.items()}
            log.info("command %s: %s %s", command.id, command.command, json.dumps(shown)[:300])
            try:
                outcome = handler(command.args, command.id)
                answer = self.answer(command.id, command.command, True, outcome, duration=time.monotonic() - began)
            except CommandError as exc:
                interrupted = isinstance(exc, Interrupted)
                answer = self.answer(command.id, command.command, False, error=str(exc),
                                     duration=time.monotonic() - began)
            except Exception as exc:  # noqa: BLE001  a failing command must never stop the worker
                log.exception("command %s (%s) failed", command.id, command.command)
                answer = self.answer(command.id, command.command, False, error=f"{type(exc).__name__}: {exc}",
                                     duration=time.monotonic() - began)
        with self._lock:
            self.counts["ok" if answer["ok"] else "failed"] += 1
            text = None if interrupted else self.record.put(answer)
            self._waiting.discard(command.id)
        if text is not None:
            self.record.save(text)  # the fsync outside the lock the network thread takes
        level = logging.INFO if answer["ok"] else logging.WARNING
        log.log(level, "command %s (%s): %s", command.id, command.command,
                "ok" if answer["ok"] else f"failed: {answer['error']}")
        self._send(answer)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker: what is still queued is answered "interrupted", a running command is told to stop."""
        self.stop.set()
        deadline = time.monotonic() + timeout
        try:  # the queue may be full: the worker empties it quickly now that stop is set
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.warning("the command worker of %s did not take the stop within %g s", self.camera, timeout)
        self._worker.join(max(0.0, deadline - time.monotonic()))
