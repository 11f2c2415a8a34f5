"""Signed bundles: a manifest of the sha256 of every file (bundle.json included) and a detached ed25519
signature over it, so nothing in a bundle - weights, graph, thresholds - can change unnoticed.

bundle.json's own `files` checksums only say "the IR matches the JSON beside it": anyone who can edit
the IR can edit the JSON too. The signature is made where the private key lives (the engineering PC:
`python -m deploy.export|calibration.quantize|calibration.threshold ... --sign-key KEY`, or
`python -m deploy.keys --sign BUNDLE --sign-key KEY`), and checked where only the public key is
(the edge PC: `bundle_public_key`). With a public key configured the runtime refuses a bundle that is
unsigned, signed by another key, or changed, added to or shortened after signing, naming the file.

Files in a signed bundle:
  manifest.sha256  `sha256sum` format ("<hex>  <name>" per line, sorted): `sha256sum -c manifest.sha256`
  manifest.sig     the raw 64-byte ed25519 signature of manifest.sha256, checkable without edge-ad:
                   openssl pkeyutl -verify -pubin -inkey KEY.pub -rawin -in manifest.sha256 -sigfile manifest.sig
Keys are PEM (PKCS#8 private key, file mode 0600; SubjectPublicKeyInfo public key).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_ad.atomic import write_atomic
from edge_ad.model.bundle import BUNDLE_FILE, BundleError, safe_member, sha256_file

log = logging.getLogger("edge_ad.signing")

MANIFEST = "manifest.sha256"
SIGNATURE = "manifest.sig"
PRIVATE_KEY = "bundle-signing.key"
PUBLIC_KEY = "bundle-signing.pub"


class SigningError(BundleError, ValueError):
    """A key that cannot be used, or a bundle that fails its signature check (one line, exit code 2)."""


# -- keys -------------------------------------------------------------------------------------------

def generate_keypair(out_dir: str | Path) -> tuple[Path, Path]:
    """Write a new key pair into `out_dir`; never overwrites a key (a lost private key cannot be recovered)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / PRIVATE_KEY, out / PUBLIC_KEY
    for path in (private, public):
        if path.exists():
            raise SigningError(f"{path} already exists; move it away first (keys are never overwritten)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # 0600 from the first byte
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    data = _read(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} is not an ed25519 key (make one with python -m deploy.keys --out DIR)")
    if Path(path).stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("signing key %s is readable by other users; chmod 600 it", path)
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    data = _read(path, "bundle public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SigningError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path} is not an ed25519 public key")
    return key


# -- manifest -----------------------------------------------------------------------------------------

def bundle_files(folder: Path) -> list[str]:
    """Every file in the bundle folder (sub-folders too), as sorted relative names; not the manifest itself."""
    names = []
    for path in folder.rglob("*"):
        name = path.relative_to(folder).as_posix()
        if name in (MANIFEST, SIGNATURE) or path.is_dir():
            continue
        names.append(name)
    return sorted(names)


def manifest_text(folder: str | Path) -> str:
    folder = Path(folder)
    return "".join(f"{sha256_file(safe_member(folder, name))}  {name}\n" for name in bundle_files(folder))


def _parse_manifest(text: str, path: Path) -> dict[str, str]:
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name:
            raise SigningError(f"{path}: line {number} is not '<sha256>  <file>'")
        entries[name] = digest
    return entries


def sign_bundle(folder: str | Path, key: Ed25519PrivateKey) -> Path:
    """Write manifest.sha256 (every file, bundle.json included) and its signature manifest.sig."""
    folder = Path(folder)
    if not (folder / BUNDLE_FILE).is_file():
        raise SigningError(f"not a bundle (no {BUNDLE_FILE}): {folder}")
    text = manifest_text(folder).encode()
    for name, data in ((MANIFEST, text), (SIGNATURE, key.sign(text))):
        write_atomic(folder / name, data)
    log.info("signed %s: %d files in %s, signature in %s", folder, text.count(b"\n"), MANIFEST, SIGNATURE)
    return folder / SIGNATURE


def verify_bundle(folder: str | Path, key: Ed25519PublicKey, key_name: str = "the configured key") -> int:
    """Check the signature, then every file against the manifest; SigningError naming the first problem.

    Returns the number of files checked.
    """
    folder = Path(folder)
    manifest, signature = folder / MANIFEST, folder / SIGNATURE
    if not manifest.is_file() or not signature.is_file():
        absent = MANIFEST if not manifest.is_file() else SIGNATURE
        raise SigningError(f"bundle {folder} is not signed (no {absent}) and a bundle public key is configured; "
                           "sign it with --sign-key, or remove bundle_public_key")
    text = manifest.read_bytes()
    try:
        key.verify(signature.read_bytes(), text)
    except InvalidSignature:
        raise SigningError(f"bundle {folder}: signature does not verify with {key_name} (signed with another key, "
                           f"or {MANIFEST} was edited); refusing to load") from None
    try:
        listed = _parse_manifest(text.decode("utf-8"), manifest)
    except UnicodeDecodeError:
        raise SigningError(f"{manifest} is not UTF-8 text") from None
    for name, expected in listed.items():  # changed files first: the likelier cause (e.g. a threshold edit)
        path = safe_member(folder, name)
        if not path.is_file():
            raise SigningError(f"bundle {folder}: {name} is in the signed manifest but missing; refusing to load")
        if sha256_file(path) != expected:
            hint = (" (thresholds changed on site? re-sign the bundle where the private key is: "
                    "python -m deploy.keys --sign BUNDLE --sign-key KEY)") if name == BUNDLE_FILE else ""
            raise SigningError(f"bundle {folder}: {name} was changed after signing{hint}; refusing to load")
    extra = [name for name in bundle_files(folder) if name not in listed]
    if extra:
        raise SigningError(f"bundle {folder}: {extra[0]} is not in the signed manifest (added after signing); "
                           "refusing to load")
    return len(listed)


def check_bundle(folder: str | Path, public_key: str | Path | None) -> None:
    """The runtime's gate: with a public key configured, the bundle must verify; without one, nothing changes."""
    if public_key is None:
        return
    count = verify_bundle(folder, load_public_key(public_key), key_name=str(public_key))
    log.info("bundle %s: signature verified with %s (%d files)", folder, public_key, count)


# -- hooks for the offline tools ------------------------------------------------------------------------

def add_sign_key_option(parser) -> None:
    parser.add_argument("--sign-key", type=Path, default=None, metavar="KEY",
                        help="ed25519 private key (python -m deploy.keys): sign the written bundle")


def signing(action: Callable[[], object], key_path: str | Path | None) -> Callable[[], object]:
    """Wrap a tool action that returns a bundle folder: load the key first (a bad key fails before
    minutes of work), sign the folder afterwards."""
    def run():
        key = load_private_key(key_path) if key_path is not None else None
        out = action()
        if key is not None:
            sign_bundle(out, key)
        return out
    return run
