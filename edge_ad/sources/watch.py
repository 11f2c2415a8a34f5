"""Watched folder: the camera software writes one image per part; each is inspected once, when complete.

`edge-ad --images DIR --watch` polls DIR (works on local disks and network
shares alike, where inotify events do not arrive) and takes a new image file
only once its writer has finished: a PNG as soon as it ends in its IEND chunk
(the last chunk by the format's definition); a JPEG when it ends in its
end-of-image marker and its size and modification time did not change between
two polls (an EXIF thumbnail's marker can end a partial file); any file that
stayed unchanged for `--watch-settle` seconds (other formats, or a writer that
pauses mid-file). A file that still cannot be decoded after it
settled is answered with verdict ERROR, never skipped silently.

What was done survives a restart: after a part's verdict is published (safe in
the outbox), its key (name, size, modification time) is appended to a ledger
file and fsync'ed; at start-up the files in the ledger are not inspected again.
A file replaced under the same name has a new key and is inspected again.
Ledger entries of files that are gone are dropped when it is compacted (at
start-up), so the ledger stays as large as the folder. Temporary names
(dot files, suffixes that are not images) are ignored, so writers that write
`x.png.tmp` and rename are picked up at the rename.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from edge_ad.atomic import write_atomic
from edge_ad.errors import SourceError
from edge_ad.sources.capture import Frame, FrameSource, safe_id
from edge_ad.sources.images import IMAGE_SUFFIXES, ImageReadError, read_image
from edge_ad.sources.trigger import PartFrame

log = logging.getLogger("edge_ad.watch")

DEFAULT_POLL = 0.05
DEFAULT_SETTLE = 0.5
_PNG_END = b"IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    first_seen: float  # monotonic: the part's "trigger" time
    stable_since: float
    failed: bool = False  # decoded once unsuccessfully after settling


def has_trailer(path: Path, size: int) -> bool:
    """True when a PNG ends in its IEND chunk or a JPEG in its end-of-image marker."""
    suffix = path.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg") or size < 16:
        return False
    try:
        with open(path, "rb") as handle:
            handle.seek(size - 16)
            tail = handle.read(16)
    except OSError:
        return False
    if suffix == ".png":
        return tail.endswith(_PNG_END)
    return tail.rstrip(b"\x00").endswith(_JPEG_END)


class Ledger:
    """Append-only record of inspected files (name, size, mtime_ns), one tab-separated line each, fsync'ed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.done: set[tuple[str, int, int]] = set()
        self._handle = None
        self._lock = threading.Lock()

    def load(self, folder: Path) -> int:
        """Read the ledger, keep the entries whose file is still there unchanged, rewrite it compacted."""
        entries: set[tuple[str, int, int]] = set()
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split("\t")
                if len(parts) != 3:
                    continue  # a line torn by a power cut
                try:
                    entries.add((parts[0], int(parts[1]), int(parts[2])))
                except ValueError:
                    continue
        for name, size, mtime_ns in entries:
            try:
                st = os.stat(folder / name)
            except OSError:
                continue
            if (st.st_size, st.st_mtime_ns) == (size, mtime_ns):
                self.done.add((name, size, mtime_ns))
        write_atomic(self.path, "".join(f"{n}\t{s}\t{m}\n" for n, s, m in sorted(self.done)))
        self._handle = open(self.path, "a", encoding="utf-8")
        return len(self.done)

    def add(self, key: tuple[str, int, int]) -> None:
        with self._lock:
            self.done.add(key)
            if self._handle is not None:
                self._handle.write(f"{key[0]}\t{key[1]}\t{key[2]}\n")
                self._handle.flush()
                os.fsync(self._handle.fileno())

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None


def default_ledger(state_dir: Path, device: str, camera: str) -> Path:
    return state_dir / f"watch-{safe_id(device)}-{safe_id(camera)}.done"


class WatchedFolderSource(FrameSource):
    """New complete image files of one folder, each once (also across restarts), until stopped."""

    live = False  # every part is inspected; the pipeline waits rather than drops

    def __init__(self, folder: str | Path, stop: threading.Event, ledger: Path | None = None,
                 poll: float = DEFAULT_POLL, settle: float = DEFAULT_SETTLE,
                 on_unreadable: Callable[[PartFrame, str], None] | None = None):
        self.folder = Path(folder)
        self.stop = stop
        self.ledger_path = ledger  # set by the caller (it knows device and camera) before open()
        self.poll, self.settle = float(poll), float(settle)
        self.on_unreadable = on_unreadable
        self.description = f"watched folder {self.folder}"
        self.default_id = safe_id(self.folder.name) or "images"
        self.skipped = 0
        self._ledger: Ledger | None = None
        self._seen: dict[str, _Seen] = {}
        self._taken: set[tuple[str, int, int]] = set()  # yielded this run, done or not yet
        self._index = 0

    def open(self) -> None:
        if not self.folder.is_dir():
            raise SourceError(f"--watch needs an existing folder, not found: {self.folder}", exit_code=2)
        if self._ledger is None:
            if self.ledger_path is None:
                raise SourceError("watched folder: no ledger path", exit_code=2)
            self._ledger = Ledger(self.ledger_path)
            try:
                known = self._ledger.load(self.folder)
            except OSError as exc:
                raise SourceError(f"cannot use the watch ledger {self.ledger_path}: {exc.strerror or exc}",
                                  exit_code=2) from None
            log.info("watching %s for new images (poll %.0f ms, settle %.2f s); %d file(s) already inspected "
                     "according to %s", self.folder, self.poll * 1000, self.settle, known, self.ledger_path)

    def mark_done(self, frame: Frame) -> None:
        """The verdict for this file is published: never inspect it again (the pipeline's on_done)."""
        key = getattr(frame, "key", None)
        if key and self._ledger is not None:
            name, size, mtime = key.rsplit("|", 2)
            self._ledger.add((name, int(size), int(mtime)))

    def _scan(self) -> list[tuple[str, int, int, float]]:
        """Files ready for inspection now: (name, size, mtime_ns, first_seen), in name order."""
        now = time.monotonic()
        ready = []
        present = set()
        try:
            entries = list(os.scandir(self.folder))
        except OSError as exc:
            log.warning("cannot list %s: %s", self.folder, exc.strerror or exc)
            return []
        for entry in entries:
            name = entry.name
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                continue
            try:
                if not entry.is_file():
                    continue
                st = entry.stat()
            except OSError:
                continue
            present.add(name)
            key = (name, st.st_size, st.st_mtime_ns)
            if key in self._taken or (self._ledger is not None and key in self._ledger.done):
                continue
            seen = self._seen.get(name)
            if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
                first = seen.first_seen if seen is not None else now
                self._seen[name] = _Seen(st.st_size, st.st_mtime_ns, first, now)
                if name.lower().endswith(".png") and has_trailer(self.folder / name, st.st_size):
                    ready.append((name, st.st_size, st.st_mtime_ns, first))  # IEND is the last chunk: complete
                continue  # changed since the last poll: the writer may still be busy
            if st.st_size == 0:
                continue
            settled = now - seen.stable_since >= self.settle
            if settled or has_trailer(self.folder / name, st.st_size):
                ready.append((name, st.st_size, st.st_mtime_ns, seen.first_seen))
        for name in list(self._seen):
            if name not in present:
                del self._seen[name]
        if len(self._taken) > 2 * len(present) + 1000:  # files moved away: forget them (bounded memory)
            self._taken = {k for k in self._taken if k[0] in present}
            if self._ledger is not None:
                self._ledger.done = {k for k in self._ledger.done if k[0] in present}
        return sorted(ready)

    def __iter__(self) -> Iterator[Frame]:
        if self._ledger is None:
            self.open()
        while not self.stop.is_set():
            started = time.monotonic()
            for name, size, mtime_ns, first_seen in self._scan():
                if self.stop.is_set():
                    return
                frame = self._read(name, size, mtime_ns, first_seen)
                if frame is not None:
                    yield frame
            self.stop.wait(max(0.0, self.poll - (time.monotonic() - started)))

    def _read(self, name: str, size: int, mtime_ns: int, first_seen: float) -> PartFrame | None:
        key = (name, size, mtime_ns)
        part = PartFrame(index=self._index, image=None, timestamp=time.monotonic(), captured=first_seen,  # type: ignore[arg-type]
                         name=name, part_id=name, trigger="file", key=f"{name}|{size}|{mtime_ns}")
        try:
            image = read_image(self.folder / name)
        except ImageReadError as exc:
            seen = self._seen.get(name)
            settled = seen is not None and time.monotonic() - seen.stable_since >= self.settle
            if not settled:
                return None  # a trailer in the middle of a file still being written: try again later
            self._taken.add(key)
            self.skipped += 1
            self._index += 1
            if self.on_unreadable is not None:
                self.on_unreadable(part, f"unreadable: {exc}")
            else:
                log.warning("skipping unreadable image (%d so far): %s", self.skipped, exc)
            return None
        self._taken.add(key)
        self._index += 1
        part.image = image
        return part

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
