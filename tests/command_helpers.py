"""Helpers for the remote-command and rollout tests: an MQTT operator client, a background edge-ad whose log
is read as it runs, a local HTTP server, bundle archives."""

from __future__ import annotations

import hashlib
import http.server
import json
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from runtime_helpers import REPO, cli_env


class WaitTimeout(AssertionError):
    """A wait that ran out of time (an assertion raised by a predicate passes through as itself)."""


class Operator:
    """Sends commands to one camera and collects its answers, snapshots and status (an MQTT client)."""

    def __init__(self, host: str, port: int, device: str, camera: str, root: str = "edge-ad",
                 username: str | None = None, password: str | None = None):
        self.base = f"{root}/{device}/{camera}"
        self.results: list[dict] = []
        self.snapshots: list[bytes] = []
        self.status: list[dict] = []
        self.heartbeats: list[dict] = []
        self.alerts: list[dict] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"op-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [(f"{self.base}/cmd/result", 1), (f"{self.base}/snapshot", 1), (f"{self.base}/status", 1),
             (f"{self.base}/heartbeat", 0), (f"{self.base}/alert", 1)])
        self.client.on_subscribe = lambda c, u, mid, rcs, p: ready.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()
        assert ready.wait(10), "operator subscription not acknowledged"

    def _on_message(self, client, userdata, message) -> None:
        with self.lock:
            if message.topic.endswith("/snapshot"):
                self.snapshots.append(bytes(message.payload))
                return
            payload = json.loads(message.payload)
            {"cmd_result": self.results, "status": self.status, "heartbeat": self.heartbeats,
             "alert": self.alerts}.get(payload.get("event"), []).append(payload)

    def publish(self, payload) -> None:
        data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        self.client.publish(f"{self.base}/cmd", data, qos=1).wait_for_publish(5)

    def send(self, command: str, args: dict | None = None, ident: str | None = None, timeout: float = 30.0,
             resend: float = 5.0) -> dict:
        """Publish a command and wait for its answer; without one after `resend` s, publish it again with the same
        id (the documented retry: a command published before edge-ad's subscription reached the broker is lost)."""
        ident = ident or uuid.uuid4().hex[:10]
        with self.lock:
            before = sum(1 for r in self.results if r.get("id") == ident)
        message = {"id": ident, "command": command, "args": args or {}}
        self.publish(message)
        return self.wait_result(lambda r: r.get("id") == ident, timeout, skip=before, what=f"{command} {ident}",
                                resend=(resend, lambda: self.publish(message)))

    def wait_result(self, match, timeout: float = 30.0, skip: int = 0, what: str = "result", resend=None) -> dict:
        def found(operator):
            matching = [r for r in operator.results if match(r)]
            return matching[skip] if len(matching) > skip else None

        try:
            return self.wait(found, timeout, resend=resend)
        except WaitTimeout:
            raise WaitTimeout(f"no answer for {what} within {timeout} s; got {self.results}") from None

    def wait(self, predicate, timeout: float = 30.0, what: str = "condition", interval: float = 0.02, resend=None):
        """Poll predicate(self) until it is truthy; resend=(seconds, publish) publishes again each time that long
        passes without it (a command sent before edge-ad's subscription reached the broker is lost, see `send`)."""
        deadline = time.monotonic() + timeout
        again = time.monotonic() + resend[0] if resend else None
        while time.monotonic() < deadline:
            if again is not None and time.monotonic() > again:
                resend[1]()
                again = time.monotonic() + resend[0]
            with self.lock:
                value = predicate(self)
            if value:
                return value
            time.sleep(interval)
        raise WaitTimeout(f"timed out waiting for {what}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class EdgeAd:
    """`python -m edge_ad ARGS` in the background; its stderr is collected line by line while it runs."""

    def __init__(self, *args, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_ad", *map(str, args)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, cwd=REPO, env=env or cli_env())
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def running(self) -> bool:
        """True while edge-ad runs; once it has exited, an AssertionError with its exit code and log."""
        if self.proc.poll() is None:
            return True
        self._reader.join(2)
        raise AssertionError(f"edge-ad exited ({self.proc.returncode}):\n{self.log[-3000:]}")

    def wait_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in list(self.lines)):
                return
            if self.proc.poll() is not None:
                self._reader.join(2)
                if any(text in line for line in self.lines):
                    return
                raise AssertionError(f"edge-ad exited ({self.proc.returncode}) before logging {text!r}:\n{self.log}")
            time.sleep(0.005)
        raise AssertionError(f"edge-ad did not log {text!r} within {timeout} s:\n{self.log[-3000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)


def shared_env(state: Path) -> dict:
    """cli_env with a fixed state folder, so a restart finds what the first run left."""
    return cli_env({"XDG_STATE_HOME": str(state)})


def archive(bundle: Path, out: Path, top: str = "bundle") -> tuple[Path, str]:
    """A .tar.gz of the bundle folder (inside one top-level folder) and its sha256."""
    with tarfile.open(out, "w:gz") as tar:
        tar.add(bundle, arcname=top)
    return out, hashlib.sha256(out.read_bytes()).hexdigest()


class HttpServer:
    """http.server on a free loopback port serving `folder`, in a thread; `delay` s before each 64 kB chunk."""

    def __init__(self, folder: Path, delay: float = 0.0):
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=str(folder), **k)

            def log_message(self, *a):
                pass

            def copyfile(self, source, outputfile):
                while True:
                    chunk = source.read(65536)
                    if not chunk:
                        return
                    if server.delay:
                        time.sleep(server.delay)
                    outputfile.write(chunk)

        self.delay = delay
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.handle_error = lambda request, address: None  # a client killed mid-download: expected here
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
