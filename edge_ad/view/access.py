"""Who may see the live view: loopback by default; any other address only with a token.

The page shows camera images and lets its user change the inspection region, so a
view reachable from the plant network must not be open to whoever finds the port.
A token comes from `--http-token-file` or $EDGE_AD_HTTP_TOKEN; a browser presents it
once as `?token=` (then a cookie carries it), scripts send `Authorization: Bearer ...`.
On a loopback bind without a token, the Host header must name the loopback too, so a
web page elsewhere cannot reach the view through DNS rebinding.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from pathlib import Path

from edge_ad.errors import ConfigError

TOKEN_ENV = "EDGE_AD_HTTP_TOKEN"
COOKIE = "edge_ad_token"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def parse_bind(text: str) -> tuple[str, int]:
    """'PORT', 'HOST:PORT' or '[V6]:PORT' -> (host, port); the host defaults to 127.0.0.1."""
    text = str(text).strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"--http must be PORT or HOST:PORT (e.g. 127.0.0.1:8080), got {text!r}") from None
    if not 0 <= number < 65536:
        raise ConfigError(f"--http port must be 0..65535, got {number}")
    return host, number


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_token(token_file: str | None) -> str | None:
    """The token from the file (first line) or $EDGE_AD_HTTP_TOKEN; None when neither is set."""
    if token_file:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"--http-token-file: cannot read {token_file}: {exc.strerror or exc}") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise ConfigError(f"--http-token-file {token_file} is empty")
    else:
        token = os.environ.get(TOKEN_ENV, "").strip() or None
    if token is not None and len(token) < 8:
        raise ConfigError("the live view token must be at least 8 characters")
    return token


def validate_http(http: str | None, token_file: str | None) -> None:
    """Config-time check: a bind beyond loopback without a token is refused, as one line."""
    if http is None:
        if token_file:
            raise ConfigError("--http-token-file is only used with --http")
        return
    host, _ = parse_bind(http)
    if load_token(token_file) is None and not is_loopback(host):
        raise ConfigError(f"--http {http}: the live view beyond this machine needs a token "
                          f"(--http-token-file FILE or ${TOKEN_ENV}); or bind 127.0.0.1")


def token_matches(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def cookie_value(token: str) -> str:
    """What the browser keeps: a digest of the token (cookie-safe whatever the token's characters)."""
    return hashlib.sha256(b"edge-ad live view\0" + token.encode()).hexdigest()


def host_is_loopback(host_header: str | None) -> bool:
    """The Host header of a request names this machine's loopback (any port)."""
    if not host_header:
        return False
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return is_loopback(host)
