"""Atomic file replacement: a kill or power cut leaves the old content or the new one, never a torn file.

One implementation for every small state file (threshold overrides, command record, active-bundle
pointer, ROI mask): a temporary file in the same folder (same file system, so the rename is atomic),
fsync'ed, renamed over the target, then the folder fsync'ed so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (some file systems cannot fsync a folder: ignored there)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` (text or bytes) atomically and durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique per process and thread: two writers never share a temporary file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
