"""A throw-away mosquitto on a free loopback port: the one launcher of tests, benchmarks and the demo.

Dev tooling, not runtime code: it lives beside the benchmarks (not in `edge_ad`, which ships to the edge
PC) and the tests import it from here. It can be stopped, killed (-9) and started again on the same port;
`persistent=True` saves sessions and queued QoS 1 messages after every change, so a subscriber with a
persistent session gets what arrived while it was away even across a kill -9. A broker that does not
come up raises BrokerStartError (with the end of mosquitto's log), never silently.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

START_TIMEOUT = 10.0


class BrokerStartError(RuntimeError):
    """mosquitto is missing, or did not accept connections in time."""


def find_mosquitto() -> str | None:
    """The mosquitto binary ($PATH, then Debian's /usr/sbin), or None."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def bridge(name: str, address: str, topic: str = "edge-ad/#", remote_clientid: str | None = None,
           keepalive: int = 60, restart_timeout: str = "5 30") -> str:
    """mosquitto.conf lines for a bridge forwarding `topic` to a plant broker at `address` (host:port): QoS 1 and a
    persistent session (cleansession false), so what arrives while the plant broker or the link is away is queued
    here (persistent=True keeps that queue across a restart). Pass it in `extra`; docs/PLANT.md shows it."""
    return (f"connection {name}\naddress {address}\ntopic {topic} out 1\ncleansession false\n"
            f"remote_clientid {remote_clientid or name}\nkeepalive_interval {keepalive}\n"
            f"restart_timeout {restart_timeout}\nstart_type automatic\nnotifications true\n")


class Mosquitto:
    """`extra` is appended to the generated mosquitto.conf (auth, TLS listeners, ACLs)."""

    def __init__(self, folder: Path, extra: str = "allow_anonymous true\n", persistent: bool = False,
                 binary: str | None = None):
        self.binary = binary or find_mosquitto()
        if self.binary is None:
            raise BrokerStartError("mosquitto broker binary not installed (apt-get install mosquitto)")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.host, self.port = "127.0.0.1", free_port()
        self.conf = self.folder / "mosquitto.conf"
        self.log = self.folder / "mosquitto.log"
        stay = "user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""  # keep access to tmp files
        keep = (f"persistence true\npersistence_location {self.folder}/\nautosave_interval 1\n"
                "autosave_on_changes true\n" if persistent else "persistence false\n")
        self.conf.write_text(f"listener {self.port} 127.0.0.1\n{keep}{stay}{extra}")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Mosquitto":
        """Start and wait until it accepts TCP connections; BrokerStartError otherwise."""
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = self.log.read_text(errors="replace")[-300:].strip()
                    raise BrokerStartError(f"mosquitto did not start on port {self.port}: {tail}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients, nothing saved beyond what autosave already wrote."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def version(self) -> str:
        out = subprocess.run([self.binary, "-h"], capture_output=True, text=True).stdout
        match = re.search(r"mosquitto version (\S+)", out)
        return match.group(1) if match else "?"

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
