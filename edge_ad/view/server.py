"""`--http HOST:PORT`: the live view's HTTP server, standard library only, in daemon threads.

Cameras register one by one (`add_camera`), so one server shows every camera of the
process (a selector on the page). Requests never touch the pipeline's threads: they read
the references the observers keep and render on their own thread. Every request is
checked by `edge_ad.view.access` (token, or loopback Host); state-changing requests
(the ROI editor) must be same-origin JSON, so another web page cannot post them.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlencode, urlsplit

from edge_ad import __version__
from edge_ad.decide.scoring import Scorer
from edge_ad.errors import ConfigError, EdgeAdError
from edge_ad.ops.shared_server import SharedServers
from edge_ad.ops.stats import RuntimeStats
from edge_ad.view import access
from edge_ad.view.frames import CameraView
from edge_ad.view.roi_editor import RoiEditor, default_roi_path

log = logging.getLogger("edge_ad.view")

STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
MAX_BODY = 1 << 20
HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",  # a ?token= URL must not leak to other sites
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'",
}
UNAUTHORIZED_PAGE = ("<!doctype html><meta charset=utf-8><title>edge-ad live view</title>"
                     "<p>This edge-ad live view is token-protected. Open it as <code>/?token=YOUR_TOKEN</code> "
                     "(the token is in the file given by <code>--http-token-file</code> or in "
                     "<code>$EDGE_AD_HTTP_TOKEN</code> on the edge PC).</p>")


def _load_static() -> dict[str, bytes]:
    folder = resources.files("edge_ad.view") / "static"
    return {name: (folder / name).read_bytes() for name in STATIC}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, view: "LiveView"):
        self.view = view
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:
        """A client that went away (or sent garbage) is not the operator's problem: debug, no traceback on stderr."""
        log.debug("http %s: request failed", client_address[0] if client_address else "?", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = f"edge-ad/{__version__}"
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a connection may stay silent: idle browsers and stalled clients do not pile up threads

    def log_message(self, format: str, *args) -> None:  # noqa: A002  (BaseHTTPRequestHandler's name)
        log.debug("http %s: %s", self.address_string(), format % args)

    # -- plumbing ---------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in {**HEADERS, **(extra or {})}.items():
            self.send_header(key, value)
        try:
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (ConnectionError, TimeoutError) as exc:  # the browser left (BrokenPipe, reset): nothing to tell
            log.debug("http %s: client gone (%s)", self.address_string(), exc)
            self.close_connection = True

    def _json(self, status: int, data, extra: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), "application/json", extra)

    def _error(self, status: int, message: str) -> None:
        if self.command not in ("GET", "HEAD"):
            self.close_connection = True  # the request body may be unread
        if self.path.startswith("/api/"):
            self._json(status, {"error": message})
        elif status == HTTPStatus.UNAUTHORIZED:
            self._send(status, UNAUTHORIZED_PAGE.encode(), "text/html; charset=utf-8")
        else:
            self._send(status, f"{status} {message}\n".encode(), "text/plain; charset=utf-8")

    def _authorized(self, query: dict) -> bool:
        """True to go on; otherwise the answer (401, 403, or the redirect that sets the cookie) was sent."""
        view = self.server.view
        if view.token is None:
            if not access.host_is_loopback(self.headers.get("Host")):
                self._error(HTTPStatus.FORBIDDEN, "this live view answers on localhost only")
                return False
            return True
        given = None
        header = self.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            given = header[7:].strip()
        if given is None and "token" in query:
            given = query["token"][0]
            if access.token_matches(view.token, given) and self.command == "GET" and not self.path.startswith("/api/"):
                rest = {k: v for k, v in query.items() if k != "token"}
                target = urlsplit(self.path).path + (("?" + urlencode(rest, doseq=True)) if rest else "")
                cookie = f"{access.COOKIE}={access.cookie_value(view.token)}; Path=/; HttpOnly; SameSite=Strict"
                self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": target, "Set-Cookie": cookie})
                return False
        expected = view.token
        if given is None and self.headers.get("Cookie"):
            cookie = SimpleCookie()
            try:
                cookie.load(self.headers["Cookie"])
            except Exception:  # noqa: BLE001  a malformed cookie is no token
                pass
            if access.COOKIE in cookie:
                given, expected = cookie[access.COOKIE].value, access.cookie_value(view.token)
        if given is None:
            self._error(HTTPStatus.UNAUTHORIZED, "token required")
            return False
        if not access.token_matches(expected, given):
            self._error(HTTPStatus.FORBIDDEN, "wrong token")
            return False
        return True

    def _route(self):
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if not self._authorized(query):
            return None
        return parts.path, query

    def _camera(self, query: dict) -> CameraView | None:
        view = self.server.view
        name = query.get("camera", [None])[0]
        camera = view.camera(name)
        if camera is None:
            self._error(HTTPStatus.NOT_FOUND, f"no camera {name!r}" if name else "no camera registered yet")
        return camera

    # -- methods ----------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        routed = self._route()
        if routed is None:
            return
        path, query = routed
        view = self.server.view
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, view.static["index.html"], STATIC["index.html"])
        elif path.startswith("/static/") and path[8:] in STATIC:
            self._send(HTTPStatus.OK, view.static[path[8:]], STATIC[path[8:]])
        elif path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        elif path == "/api/info":
            self._json(HTTPStatus.OK, {"cameras": view.camera_ids(), "protected": view.token is not None,
                                       "version": __version__})
        elif path == "/api/state":
            camera = self._camera(query)
            if camera is not None:
                try:
                    seconds = min(3600.0, max(5.0, float(query.get("seconds", ["300"])[0])))
                except ValueError:
                    seconds = 300.0
                self._json(HTTPStatus.OK, camera.state(seconds))
        elif path == "/api/frame":
            camera = self._camera(query)
            if camera is not None:
                picture = camera.frame_jpeg()
                if picture is None:
                    self._error(HTTPStatus.SERVICE_UNAVAILABLE, "no frame yet")
                else:
                    info = picture[0]
                    self._send(HTTPStatus.OK, picture[1], "image/jpeg",
                               {"X-Frame-Index": str(info["index"]), "X-Score": str(info["score"]),
                                "X-Anomalous": str(info["anomalous"]).lower(), "X-Regions": str(info["regions"])})
        elif path == "/api/snapshot":
            camera = self._camera(query)
            if camera is not None:
                self._snapshot(camera, query.get("event", [""])[0])
        else:
            self._error(HTTPStatus.NOT_FOUND, "not found")

    def _snapshot(self, camera: CameraView, event_id: str) -> None:
        path = camera.alerts.snapshot_path(event_id)
        try:
            data = Path(path).read_bytes() if path else None
        except OSError:
            data = None  # pruned by --snapshot-max-files, or never written (disk reserve)
        if data is None:
            self._error(HTTPStatus.NOT_FOUND, "no snapshot for this alert")
        else:
            self._send(HTTPStatus.OK, data, "image/jpeg", {"Cache-Control": "private, max-age=3600"})

    def _same_origin(self) -> bool:
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != self.headers.get("Host"):
            self._error(HTTPStatus.FORBIDDEN, "cross-origin request refused")
            return False
        return True

    def do_POST(self) -> None:  # noqa: N802
        routed = self._route()
        if routed is None or not self._same_origin():
            return
        path, query = routed
        if path != "/api/roi":
            self._error(HTTPStatus.NOT_FOUND, "not found")
            return
        if not self.headers.get("Content-Type", "").startswith("application/json"):
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the ROI as application/json")
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length > MAX_BODY else HTTPStatus.LENGTH_REQUIRED,
                        "a JSON body of at most 1 MiB is expected")
            return
        body = self.rfile.read(length)
        camera = self._camera(query)
        if camera is None:
            return
        try:
            data = json.loads(body)
            saved = camera.roi.save(data.get("polygons"), data.get("width"), data.get("height"))
        except (ValueError, AttributeError, TypeError) as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
            return
        except RecursionError:  # deeply nested JSON
            self._error(HTTPStatus.BAD_REQUEST, "the ROI JSON is nested too deeply")
            return
        except OSError as exc:
            log.error("cannot write the ROI mask %s: %s", camera.roi.path, exc.strerror or exc)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"cannot write {camera.roi.path}: {exc.strerror or exc}")
            return
        latest = camera.state(5.0)["last"]
        self._json(HTTPStatus.OK, {"saved": str(saved), "roi": camera.roi.current(),
                                   "after_frame": latest["index"] if latest else None})

    def do_DELETE(self) -> None:  # noqa: N802
        routed = self._route()
        if routed is None or not self._same_origin():
            return
        path, query = routed
        camera = self._camera(query) if path == "/api/roi" else None
        if camera is None:
            if path != "/api/roi":
                self._error(HTTPStatus.NOT_FOUND, "not found")
            return
        try:
            camera.roi.clear()
        except OSError as exc:
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"cannot change {camera.roi.path}: {exc.strerror or exc}")
            return
        self._json(HTTPStatus.OK, {"roi": None})


_SHARED: SharedServers["LiveView"] = SharedServers()  # one server per port and process


class LiveView:
    """The server and its cameras. `start` binds at once (a busy port is an error at start-up, not later)."""

    def __init__(self, host: str, port: int, token: str | None):
        self.token = token
        self.static = _load_static()
        self._cameras: dict[str, CameraView] = {}
        self._lock = threading.Lock()
        try:
            self._server = _Server((host, port), _Handler, self)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE:
                raise EdgeAdError(f"--http {host}:{port}: the port is in use ({reason})") from None
            raise ConfigError(f"--http {host}:{port}: cannot listen there ({reason})") from None
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="edge-ad-http", daemon=True)
        self._thread.start()
        shown = f"[{host}]" if ":" in host else host
        log.info("live view on http://%s:%d/%s", shown, self.port,
                 " (token-protected)" if token else " (this machine only)")

    @classmethod
    def for_config(cls, config) -> "LiveView | None":
        """The process's live view for config.http (None without it): the first camera starts the server, the
        others of the same process join it. Pair every call with `release(camera)`."""
        if not config.http:
            return None
        host, port = access.parse_bind(config.http)
        token = access.load_token(config.http_token_file)

        def join(view: "LiveView") -> None:
            if view.host != host:
                raise ConfigError(f"--http {config.http}: the cameras of one process must use one host for port "
                                  f"{port} (got {view.host} and {host})")
            if view.token != token:
                raise ConfigError(f"--http {config.http}: the cameras of one process must share one view token")
        return _SHARED.acquire(port, lambda: cls(host, port, token), join)

    def release(self, camera: "CameraView | None" = None) -> None:
        """A camera's run ended: it leaves the page (only the entry `add_camera` returned to it: a camera whose
        add_camera failed must not remove another camera of the same name); the last one stops the server."""
        if camera is not None:
            with self._lock:
                if self._cameras.get(camera.camera) is camera:
                    del self._cameras[camera.camera]
        _SHARED.release(self, self.close)

    def add_camera(self, topics, scorer: Scorer, stats: RuntimeStats, health: Callable[[], dict] | None = None,
                   roi_mask: str | None = None) -> CameraView:
        """Register one camera; wire `view.observe` into Pipeline.observers and `view.alerts` into its sinks."""
        path = Path(roi_mask) if roi_mask else default_roi_path(topics.device, topics.camera)
        camera = CameraView(topics.camera, scorer, stats, health, RoiEditor(scorer, path, configured=bool(roi_mask)))
        with self._lock:
            if topics.camera in self._cameras:
                raise ConfigError(f"two cameras named {topics.camera!r} in one live view: give each a --camera-id")
            self._cameras[topics.camera] = camera
        return camera

    def camera_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._cameras)

    def camera(self, name: str | None) -> CameraView | None:
        """The named camera; without a name the first (by name), as the page starts with it."""
        with self._lock:
            if name is None:
                name = min(self._cameras, default=None)
            return self._cameras.get(name) if name is not None else None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
