"""Credentials that must not leak: the stream password of an RTSP camera, and passwords sent without TLS.

A password on the command line is readable by every user (ps, /proc/PID/cmdline) and lands in shell
history; that is why `--mqtt-password` is refused. The same holds for `--video rtsp://user:pass@cam/...`:
the URL names the user only, and the password comes the way the MQTT password does (the one mechanism,
`edge_ad.deliver.mqtt.read_secret`): `--video-password-file`, $EDGE_AD_VIDEO_PASSWORD, or the systemd
credential `video-password`. It is put into the URL handed to OpenCV only, never logged (sources show
`redact_url`).
"""

from __future__ import annotations

import logging
from urllib.parse import quote, urlsplit, urlunsplit

from edge_ad.deliver.mqtt import MqttSettings, read_secret
from edge_ad.ops.config import VIDEO_PASSWORD_ENV, stream_user

log = logging.getLogger("edge_ad")

VIDEO_CREDENTIAL = "video-password"  # systemd LoadCredential=video-password:/etc/edge-ad/<camera>.video.pass
URL_PASSWORD_REFUSED = (
    "passwords are not accepted in a URL on the command line (they leak into shell history and ps); "
    f"give rtsp://USER@host/... and set ${VIDEO_PASSWORD_ENV} or use --video-password-file")


def url_has_password(url: str | None) -> bool:
    if not url or "://" not in url:
        return False
    try:
        return urlsplit(url).password is not None
    except ValueError:
        return False


def stream_url(url: str | None, password_file: str | None) -> str | None:
    """The URL OpenCV opens: `url` with the stream password added when the URL names a user and has none."""
    user = stream_user(url)
    if user is None or url_has_password(url):
        return url
    password = read_secret(password_file, env=VIDEO_PASSWORD_ENV, credential=VIDEO_CREDENTIAL, username=user,
                           option="--video-password-file")
    if password is None:
        return url  # a camera that wants a user name only
    parts = urlsplit(url)
    userinfo, host = parts.netloc.rsplit("@", 1)
    secret = quote(password, safe="!$&'()*+,;=-._~")  # RFC 3986 userinfo: ':', '@', '/' must be escaped
    return urlunsplit(parts._replace(netloc=f"{userinfo}:{secret}@{host}"))


def warn_cleartext(settings: MqttSettings) -> None:
    """Loudly: a user name (and password) going to a broker without TLS can be read off the network."""
    if settings.username and not (settings.tls or settings.ca or settings.cert):
        log.warning("MQTT credentials of user %r go to %s WITHOUT TLS: anyone on the network path can read the "
                    "password; enable TLS (--mqtt-tls, --mqtt-ca) on the broker and here", settings.username,
                    settings.address)
