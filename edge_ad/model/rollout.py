"""Model rollout on the device: fetch a bundle, check it, keep it, and remember which one is active.

A deploy never touches the bundle in force until the new one is complete and
verified: the archive (or folder) is fetched into a staging folder under the
state dir, streamed with a size cap and hashed on the way, compared with the
sha256 the operator gave, unpacked refusing any name that leaves the folder
(links, `..`, absolute paths, devices), checked against its own checksums
(bundle.json) and, with a public key configured, its signature. Only then is
it renamed (atomic, same file system) into the store `bundles/<device>-<camera>/`
and fsync'ed. Which bundle is active is one small JSON file, replaced atomically
(write, fsync, rename, fsync the folder) after the new model runs: a kill at any
moment leaves the pointer naming either the old or the new bundle, both complete
on disk. The previous bundle is kept (one step back); older ones are pruned.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edge_ad.atomic import fsync_dir, write_atomic
from edge_ad.deliver.outbox import state_name
from edge_ad.model.bundle import BUNDLE_FILE, BundleError, read_bundle
from edge_ad.model.signing import check_bundle

log = logging.getLogger("edge_ad.rollout")

MB = 1024 * 1024
DEFAULT_MAX_BYTES = 2048 * MB
DOWNLOAD_TIMEOUT = 30.0  # seconds without a byte before a download is given up
KEEP = 2  # bundles kept in the store: the active one and the one before


class RolloutError(RuntimeError):
    """A deploy that cannot go ahead (one line for the command's answer); the running model stays."""


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


# -- fetching --------------------------------------------------------------------------------------------
def local_path(source: str) -> Path | None:
    """The local file or folder a deploy source names (a path or file:// URL); None for http(s)."""
    scheme = urllib.parse.urlsplit(source).scheme.lower()
    if scheme in ("http", "https"):
        return None
    if scheme == "file":
        return Path(urllib.request.url2pathname(urllib.parse.urlsplit(source).path))
    if scheme and len(scheme) > 1:
        raise RolloutError(f"deploy url must be http(s)://, file:// or a path on the device, got {scheme}://")
    return Path(source)


def fetch(source: str, dest: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Stream `source` (http(s) URL, file:// URL or path) to `dest`, at most `max_bytes`; returns its sha256."""
    digest = hashlib.sha256()
    total = 0
    path = local_path(source)
    try:
        if path is None:
            request = urllib.request.Request(source, headers={"User-Agent": "edge-ad"})
            handle = urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT)  # noqa: S310  (scheme checked)
            length = handle.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                handle.close()
                raise RolloutError(f"download is {int(length) / MB:.1f} MB, above the {max_bytes / MB:.0f} MB cap "
                                   "(--deploy-max-mb)")
        else:
            handle = open(path, "rb")
        with handle, open(dest, "wb") as out:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                total += len(chunk)
                if total > max_bytes:
                    raise RolloutError(f"download exceeds the {max_bytes / MB:.0f} MB cap (--deploy-max-mb); stopped")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except RolloutError:
        raise
    except urllib.error.HTTPError as exc:
        raise RolloutError(f"download failed: HTTP {exc.code} {exc.reason} from {redact(source)}") from None
    except http.client.IncompleteRead as exc:
        raise RolloutError(f"download from {redact(source)} ended early ({len(exc.partial)} bytes of this "
                           "chunk read)") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or _one_line(exc)
        raise RolloutError(f"cannot fetch {redact(source)}: {reason}") from None
    return digest.hexdigest()


def redact(url: str) -> str:
    """`url` without its credentials (user:password@ -> ***@), for logs, answers and the pointer file."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    if parts.username is None and parts.password is None:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))




def _one_line(exc: BaseException) -> str:
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        src, _, why = exc.args[0][0]
        return f"{len(exc.args[0])} file(s) not copied, first {src}: {why}"
    text = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def unpack(archive: Path, dest: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Extract a .tar(.gz|.xz|.bz2) or .zip into `dest`: regular files and folders only, all inside `dest`,
    at most `max_bytes` unpacked (a small archive must not fill the disk)."""
    dest.mkdir(parents=True, exist_ok=True)
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                if not (member.isfile() or member.isdir()):
                    raise RolloutError(f"archive member {member.name!r} is not a regular file or folder; refused")
                _check_name(member.name)
            if sum(m.size for m in members) > max_bytes:
                raise RolloutError(f"archive unpacks to more than {max_bytes / MB:.0f} MB; refused")
            # the data filter (Python >= 3.10.12 / 3.11.4) is a second guard; the checks above are the first
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, **extra)
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                _check_name(info.filename)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise RolloutError(f"archive member {info.filename!r} is a symbolic link; refused")
            if sum(i.file_size for i in infos) > max_bytes:
                raise RolloutError(f"archive unpacks to more than {max_bytes / MB:.0f} MB; refused")
            zf.extractall(dest)
    else:
        raise RolloutError("the download is neither a tar(.gz) nor a zip archive of a bundle folder")


def _check_name(name: str) -> None:
    parts = Path(name).parts
    if not name or name.startswith(("/", "\\")) or ".." in parts or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise RolloutError(f"archive member {name!r} would land outside the bundle folder; refused")


def bundle_root(folder: Path) -> Path:
    """The folder holding bundle.json: the archive's top level, or its one top-level folder."""
    if (folder / BUNDLE_FILE).is_file():
        return folder
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / BUNDLE_FILE).is_file():
        return entries[0]
    raise RolloutError(f"no {BUNDLE_FILE} at the top of the archive or in its one top-level folder")


# -- the store and the active pointer --------------------------------------------------------------------
@dataclass
class Active:
    """What the pointer file says: the active bundle folder and where it came from."""

    path: str
    sha256: str | None
    source: str
    utc: str
    configured_model: str  # --model when it was written: a changed --model means the operator chose again
    command_id: str | None = None


class Rollout:
    """Staging, store and active pointer of one camera (`<state>/bundles/<device>-<camera>/`)."""

    def __init__(self, state: str | Path, device: str, camera: str, public_key: str | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        self.state = Path(state)
        name = state_name(device, camera)  # collision-free for hyphenated ids
        self.store = self.state / "bundles" / name
        self.pointer = self.state / f"active-bundle-{name}.json"
        self.public_key, self.max_bytes = public_key, int(max_bytes)

    def stage(self, source: str, sha256: str | None, timings: dict | None = None) -> Path:
        """Fetch, verify and store a bundle; returns its folder in the store (not yet active)."""
        timings = timings if timings is not None else {}
        began = time.monotonic()
        path = local_path(source)
        is_folder = path is not None and path.is_dir()
        if sha256 is not None:
            sha256 = str(sha256).strip().lower()
            if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
                raise RolloutError("sha256 must be 64 hexadecimal digits")
        elif not is_folder:
            raise RolloutError("deploy needs the archive's sha256 (args.sha256)")
        if is_folder:
            if not (path / BUNDLE_FILE).is_file():
                raise RolloutError(f"{path} is not a bundle folder (no {BUNDLE_FILE})")
            links = [p for p in path.rglob("*") if p.is_symlink()]
            if links:
                raise RolloutError(f"{links[0]} is a symbolic link; a bundle folder must hold regular files only")
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            if size > self.max_bytes:
                raise RolloutError(f"{path} holds {size / MB:.0f} MB, above the {self.max_bytes / MB:.0f} MB cap")
        if is_folder and sha256 is not None:
            raise RolloutError("sha256 is the hash of an archive; a bundle folder on the device is checked by its "
                               "own checksums (and signature): leave sha256 out")
        self.store.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.clean_staging()
        staging = self.store / f".staging-{uuid.uuid4().hex[:12]}"
        staging.mkdir()
        try:
            unpacked = staging / "bundle"
            if is_folder:
                shutil.copytree(path, unpacked, symlinks=True)  # links were refused above; a late one stays a link
                if any(p.is_symlink() for p in unpacked.rglob("*")):
                    raise RolloutError(f"{path} gained a symbolic link while copied; refused")
                digest = None
            else:
                digest = fetch(source, staging / "download", self.max_bytes)
                timings["download_s"] = round(time.monotonic() - began, 3)
                if digest != sha256:
                    has = f"the download has {digest}, " if path is None else ""  # no hashes of local files
                    raise RolloutError(f"sha256 mismatch: {has}the command said {sha256}; refused (corrupt or "
                                       "wrong file)")
                unpack(staging / "download", unpacked, self.max_bytes)
                (staging / "download").unlink()
            root = bundle_root(unpacked)
            try:
                read_bundle(root)  # schema and the checksum of every file
                check_bundle(root, self.public_key)  # with a key configured: signed by it, unchanged
            except BundleError as exc:
                raise RolloutError(f"bundle refused: {exc}") from None
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
            # a random tail: the same archive twice within one second must not collide
            final = self.store / f"{stamp}-{(digest or '')[:12] or 'folder'}-{uuid.uuid4().hex[:6]}"
            _fsync_tree(root)
            os.rename(root, final)
            fsync_dir(self.store)
            timings["stage_s"] = round(time.monotonic() - began, 3)
            return final
        except RolloutError:
            raise
        except (OSError, shutil.Error, tarfile.TarError, zipfile.BadZipFile, http.client.HTTPException,
                EOFError, ValueError) as exc:
            raise RolloutError(f"staging failed: {_one_line(exc)}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def clean_staging(self) -> None:
        """Remove half-finished stagings (a kill during a download)."""
        if self.store.is_dir():
            for leftover in self.store.glob(".staging-*"):
                shutil.rmtree(leftover, ignore_errors=True)

    def read_active(self) -> Active | None:
        try:
            data = json.loads(self.pointer.read_text())
            return Active(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.error("cannot read the active-bundle record %s (%s); ignoring it", self.pointer, exc)
            return None

    def activate(self, folder: Path, configured_model: str, source: str, sha256: str | None,
                 command_id: str | None = None) -> None:
        """Record `folder` as the active bundle (atomically), then prune the store down to it and the one before."""
        previous = self.read_active()
        record = Active(str(Path(folder).resolve()), sha256, redact(source),
                        datetime.now(timezone.utc).isoformat(timespec="seconds"), configured_model, command_id)
        write_atomic(self.pointer, json.dumps(record.__dict__, indent=1) + "\n")
        keep = {Path(folder).resolve()}
        if previous is not None:
            keep.add(Path(previous.path).resolve())
        self.prune(keep)

    def prune(self, keep: set[Path]) -> None:
        if not self.store.is_dir():
            return
        for entry in sorted(self.store.iterdir()):
            if entry.is_dir() and not entry.name.startswith(".") and entry.resolve() not in keep:
                shutil.rmtree(entry, ignore_errors=True)
                log.info("removed old bundle %s", entry)

    def startup_model(self, configured: str) -> str:
        """The bundle to start with: the recorded active one (if still complete and loadable), else `configured`."""
        active = self.read_active()
        self.clean_staging()
        if active is None:
            return configured
        if active.configured_model != str(Path(configured).resolve()):
            log.warning("--model is now %s (was %s when %s was deployed remotely): using --model; the remote "
                        "deploy record %s is ignored", configured, active.configured_model, active.path, self.pointer)
            return configured
        try:
            read_bundle(active.path)
            check_bundle(active.path, self.public_key)
        except (BundleError, OSError) as exc:
            log.error("the remotely deployed bundle %s cannot be loaded (%s): starting with --model %s instead",
                      active.path, exc, configured)
            return configured
        log.info("using the remotely deployed bundle %s (deployed %s from %s; record %s) instead of --model %s",
                 active.path, active.utc, active.source, self.pointer, configured)
        return active.path
