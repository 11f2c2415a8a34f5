"""One server per bind address per process, shared by the cameras that ask for it (metrics, live view).

Why one mechanism: the first camera starts the server, the others join it, the last one to leave closes it.
The close happens under the same lock as the start, so a camera starting just as the last one leaves
either joins the open server or binds after it is closed, never "port in use" against a closing one.
"""

from __future__ import annotations

import threading
from typing import Callable, Generic, Hashable, TypeVar

T = TypeVar("T")


class SharedServers(Generic[T]):
    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[Hashable, list] = {}  # key -> [server, users]

    def acquire(self, key: Hashable, start: Callable[[], T], join: Callable[[T], None] | None = None) -> T:
        """The server for `key`, started by `start` if there is none; `join(server)` may refuse an existing one
        (raise). Pair every call with `release`."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = [start(), 0]
            elif join is not None:
                join(entry[0])
            entry[1] += 1
            return entry[0]

    def release(self, server: T, close: Callable[[], None]) -> None:
        """One user of `server` left; the last one closes it (under the lock)."""
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry[0] is server:
                    entry[1] -= 1
                    if entry[1] <= 0:
                        del self._entries[key]
                        close()
                    return
