"""Two cameras on one PC: one edge-ad process per camera, each with its own retained status, last will and
heartbeat (`<root>/<device>/<camera>/status|heartbeat`), so one process's `online` never masks another's
`offline`; the templated systemd unit runs them (edge-ad@<camera>.service)."""

from __future__ import annotations

import configparser
import json
import time
from pathlib import Path

import pytest
from runtime_helpers import (  # noqa: F401  (fixtures)
    systemd_verify,
    REPO, Subscriber, broker, bundle_dir, make_frame, mosquitto, run_cli, start_cli, write_video,
)

pytestmark = pytest.mark.mosquitto

TEMPLATE = REPO / "deploy" / "systemd" / "edge-ad@.service"


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cameras")
    return write_video(folder / "long.avi", [make_frame() for _ in range(500)], fps=25)  # 20 s in real time


def _camera(host, port, bundle_dir, video, camera):
    return start_cli("--video", video, "--realtime", "--model", bundle_dir, "--mqtt-host", host, "--mqtt-port", port,
                     "--device-id", "pc1", "--camera-id", camera, "--heartbeat", "0.3", "--mqtt-keepalive", "5")


def _retained_states(host, port) -> dict[str, str]:
    """What a dashboard that connects now sees: one retained status per camera."""
    late = Subscriber(host, port, "edge-ad/pc1/+/status")
    try:
        time.sleep(0.5)  # retained messages arrive right after SUBACK
        with late.lock:
            return {topic: payload["state"] for topic, payload in late.messages}
    finally:
        late.close()


def test_a_dead_camera_process_stays_offline_while_the_other_reports_online(mosquitto, bundle_dir, long_video):
    host, port = mosquitto
    sub = Subscriber(host, port, "edge-ad/pc1/#")
    a = _camera(host, port, bundle_dir, long_video, "camA")
    b = _camera(host, port, bundle_dir, long_video, "camB")
    try:
        sub.wait_for(lambda m: {t for t, p in m if p.get("event") == "heartbeat"}
                     >= {"edge-ad/pc1/camA/heartbeat", "edge-ad/pc1/camB/heartbeat"}, what="both heartbeats")
        assert _retained_states(host, port) == {"edge-ad/pc1/camA/status": "online",
                                                "edge-ad/pc1/camB/status": "online"}
        a.kill()  # no goodbye: only the broker's last will can say it
        killed = time.monotonic()
        messages = sub.wait_for(lambda m: any(t == "edge-ad/pc1/camA/status" and p["state"] == "offline"
                                              for t, p in m), timeout=15, what="camA's last will")
        will_s = time.monotonic() - killed
        # camB keeps beating after camA died, and its own state is untouched.
        seen = len(messages)
        sub.wait_for(lambda m: any(t == "edge-ad/pc1/camB/heartbeat" for t, _ in m[seen:]), what="camB alive")
        states = _retained_states(host, port)
    finally:
        sub.close()
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    assert states == {"edge-ad/pc1/camA/status": "offline", "edge-ad/pc1/camB/status": "online"}
    will = [p for t, p in messages if t == "edge-ad/pc1/camA/status"][-1]
    assert will["reason"] == "connection lost" and will["camera"] == "camA"
    assert not [t for t, _ in messages if t in ("edge-ad/pc1/status", "edge-ad/pc1/heartbeat")]
    print(f"last will of a killed camera process arrived {will_s * 1000:.0f} ms after kill -9")


def test_listen_prints_each_cameras_status(mosquitto, bundle_dir, tmp_path):
    """`edge-ad listen --events status` subscribes to the per-camera topics (the retained states included)."""
    host, port = mosquitto
    frames = tmp_path / "frames"
    frames.mkdir()
    import cv2

    cv2.imwrite(str(frames / "0.png"), make_frame())
    for camera in ("left", "right"):
        proc = run_cli("--images", frames, "--model", bundle_dir, "--mqtt-host", host, "--mqtt-port", port,
                       "--device-id", "pc2", "--camera-id", camera)
        assert proc.returncode == 0, proc.stderr
    heard = run_cli("listen", "--mqtt-host", host, "--mqtt-port", port, "--device", "pc2", "--events", "status",
                    "--count", 2, "--timeout", 10, "--json")
    assert heard.returncode == 0, heard.stderr
    got = sorted((m["topic"], m["state"]) for m in map(json.loads, heard.stdout.splitlines()))
    assert got == [("edge-ad/pc2/left/status", "offline"), ("edge-ad/pc2/right/status", "offline")]


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    parser.read(path)
    return parser


def test_templated_unit_runs_one_camera_per_instance():
    template, single = _unit(TEMPLATE)["Service"], _unit(TEMPLATE.with_name("edge-ad.service"))["Service"]
    assert template["ExecStart"] == "/usr/local/bin/edge-ad --config /etc/edge-ad/%i.toml --camera-id %i"
    # Everything else (hardening, restarts, credentials, state) is the single-camera unit's.
    assert {k: v for k, v in template.items() if k != "ExecStart"} == \
           {k: v for k, v in single.items() if k != "ExecStart"}


def test_templated_unit_passes_systemd_analyze_verify(tmp_path):
    for name in ("edge-ad@.service", "edge-ad@cam0.service"):  # the template, and an instance (specifiers resolved)
        systemd_verify(TEMPLATE.read_text(), tmp_path / name)
