"""One AsyncInferQueue for all cameras on a compiled model, each camera seeing it as a queue of its own.

Why: on the same compiled model, 4 cameras feeding one shared queue got 0.94x (quiet) to 1.33x (busy
cores) the throughput of a queue per camera, at the same CPU time per frame
(`python -m benchmarks.multicamera --queues-only`, paired rounds, 2 cores); batching a frame of each
camera was slower than either (0.63-0.71x). In the whole pipeline, though, a queue per camera was faster
in 16 of 18 paired runs, so `edge-ad` gives each camera a queue of its own: a SharedInferQueue with one view,
for the non-blocking callbacks below (one shared by all: SharedModels(shared_queue=True), for
benchmarks/multicamera.py). A `QueueView` has
the three calls `Detector` and `SwappableDetector` make (set_callback, start_async, wait_all): its
callback gets only its camera's requests, so each camera's frames keep their own sequence, and its
wait_all waits only for them, so one camera draining does not wait for the others. OpenVINO's
AsyncInferQueue is not safe for concurrent start_async callers (two can take the same idle request),
so starts take a lock; a start that waits for a free request holds it, which is the queue's point.

A camera's completion callback must never block: OpenVINO runs them on threads all cameras share, so
one camera whose decision thread stalls (its results queue full) would stall every camera. A view that
knows its camera's results queue (`deliver_to`) lets a start through only while that camera's requests
in flight plus its queued results leave room in that queue, so the callback's put finds room; a camera
that falls behind waits in its own start_async, in its own thread: its frames keep their order and none
is lost (a live source drops and counts frames before they are started, as it does on a queue of its own).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import openvino as ov


class SharedInferQueue:
    def __init__(self, compiled: ov.CompiledModel, requests: int):
        self.requests = requests
        self.queue = ov.AsyncInferQueue(compiled, requests)
        self.queue.set_callback(self._done)
        self._start = threading.Lock()

    @staticmethod
    def _done(request: ov.InferRequest, userdata) -> None:
        view, job = userdata
        view._done(request, job)

    def view(self) -> "QueueView":
        return QueueView(self)


class QueueView:
    """One camera's side of a SharedInferQueue."""

    def __init__(self, shared: SharedInferQueue):
        self.shared = shared
        self._callback: Callable[[ov.InferRequest, Any], None] = lambda request, job: None
        self._in_flight = 0
        self._idle = threading.Condition()
        self._results: queue.Queue | None = None

    def __len__(self) -> int:
        return self.shared.requests

    def deliver_to(self, results: queue.Queue) -> None:
        """The bounded queue this camera's callback puts into: starts wait until it has room for them."""
        self._results = results if results.maxsize > 0 else None

    def _room(self) -> bool:
        results = self._results
        return results is None or self._in_flight + results.qsize() < results.maxsize

    def set_callback(self, callback: Callable[[ov.InferRequest, Any], None]) -> None:
        self._callback = callback

    def start_async(self, inputs: dict, userdata: Any = None, share_inputs: bool = False) -> None:
        with self._idle:
            while not self._room():  # this camera's consumer is behind: wait here, not in the shared callback
                self._idle.wait(0.005)  # (the consumer's gets do not notify: polled, only while it is behind)
            self._in_flight += 1
        try:
            with self.shared._start:
                self.shared.queue.start_async(inputs, userdata=(self, userdata), share_inputs=share_inputs)
        except BaseException:
            self._finished()
            raise

    def _done(self, request: ov.InferRequest, job: Any) -> None:
        try:
            self._callback(request, job)
        finally:
            self._finished()

    def _finished(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()

    def wait_all(self) -> None:
        """Until every request this camera started has finished (its callback included)."""
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0)
