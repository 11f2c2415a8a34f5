"""RTSP credentials never on the command line, never in a log; MQTT credentials without TLS are warned about.

A fake RTSP camera (a TCP server answering 401 with a Basic challenge, as a real camera does) records the
Authorization header FFmpeg sends, which proves the password read from the environment, a file or a
systemd credential reaches the camera, and only the camera.
"""

from __future__ import annotations

import base64
import logging
import socket
import threading

import pytest
from runtime_helpers import bundle_dir, mosquitto, broker, run_cli  # noqa: F401  (fixtures)

from edge_ad.deliver.mqtt import MqttSettings
from edge_ad.ops.credentials import warn_cleartext

PASSWORD = "p@ss:w/rd 7"  # characters that must be escaped in a URL


class FakeCamera:
    """Answers every RTSP request with 401 + `WWW-Authenticate: Basic`; keeps the credentials it was sent."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.port = self.server.getsockname()[1]
        self.credentials: list[str] = []
        self.requests: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        buffer = b""
        try:
            while data := conn.recv(4096):
                buffer += data
                while b"\r\n\r\n" in buffer:
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    lines = head.decode("latin-1").split("\r\n")
                    self.requests.append(lines[0])
                    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                    if fields.get("authorization", "").startswith("Basic "):
                        self.credentials.append(base64.b64decode(fields["authorization"][6:]).decode())
                    conn.sendall(f"RTSP/1.0 401 Unauthorized\r\nCSeq: {fields.get('cseq', '1')}\r\n"
                                 f'WWW-Authenticate: Basic realm="cam"\r\n\r\n'.encode())
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def camera():
    cam = FakeCamera()
    yield cam
    cam.close()


def _run(bundle_dir, url, *extra, env=None):
    return run_cli("--video", url, "--model", bundle_dir, "--jsonl", "-", "--source-retries", 0, *extra, env=env,
                   timeout=120)


def _leaks(text: str) -> list[str]:
    from urllib.parse import quote

    forms = [PASSWORD, quote(PASSWORD, safe=""), base64.b64encode(f"admin:{PASSWORD}".encode()).decode()]
    return [form for form in forms if form in text]


@pytest.mark.parametrize("url", ["rtsp://admin:s3cret@10.0.0.7:554/stream1", "http://op:s3cret@cam.local/mjpg"])
def test_a_password_in_the_url_on_the_command_line_is_refused(bundle_dir, url):
    proc = _run(bundle_dir, url)
    assert proc.returncode == 2, proc.stderr
    assert "passwords are not accepted in a URL on the command line" in proc.stderr
    assert "EDGE_AD_VIDEO_PASSWORD" in proc.stderr and "--video-password-file" in proc.stderr
    assert "s3cret" not in proc.stderr + proc.stdout and len(proc.stderr.strip().splitlines()) == 1


def test_password_from_the_environment_reaches_the_camera_only(bundle_dir, camera):
    proc = _run(bundle_dir, f"rtsp://admin@127.0.0.1:{camera.port}/stream", env={"EDGE_AD_VIDEO_PASSWORD": PASSWORD})
    assert proc.returncode == 1, proc.stderr  # the fake camera never streams: camera unavailable
    assert f"admin:{PASSWORD}" in camera.credentials
    assert _leaks(proc.stderr + proc.stdout) == [], proc.stderr


def test_password_from_a_file_and_from_a_systemd_credential(bundle_dir, camera, tmp_path):
    secret = tmp_path / "cam.pass"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    url = f"rtsp://admin@127.0.0.1:{camera.port}/stream"
    by_file = _run(bundle_dir, url, "--video-password-file", secret)
    assert by_file.returncode == 1 and camera.credentials[-1:] == [f"admin:{PASSWORD}"], by_file.stderr
    camera.credentials.clear()
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "video-password").write_text(PASSWORD + "\n")
    by_credential = _run(bundle_dir, url, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert by_credential.returncode == 1 and camera.credentials[-1:] == [f"admin:{PASSWORD}"], by_credential.stderr
    assert _leaks(by_file.stderr + by_credential.stderr) == []


def test_without_a_password_the_url_is_used_as_given(bundle_dir, camera):
    proc = _run(bundle_dir, f"rtsp://admin@127.0.0.1:{camera.port}/stream")
    assert proc.returncode == 1
    assert not any(c.startswith("admin:") and c != "admin:" for c in camera.credentials)


def test_password_file_needs_a_user_in_the_url(bundle_dir, tmp_path):
    secret = tmp_path / "cam.pass"
    secret.write_text("x\n")
    proc = _run(bundle_dir, "rtsp://127.0.0.1:1/stream", "--video-password-file", secret)
    assert proc.returncode == 2 and "needs --video with a stream URL naming the user" in proc.stderr


def test_mqtt_credentials_without_tls_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="edge_ad"):
        warn_cleartext(MqttSettings(host="broker", username="line3"))
        warn_cleartext(MqttSettings(host="broker", username="line3", tls=True, port=8883))
        warn_cleartext(MqttSettings(host="broker"))
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["MQTT credentials of user 'line3' go to broker:1883 WITHOUT TLS: anyone on the network path "
                        "can read the password; enable TLS (--mqtt-tls, --mqtt-ca) on the broker and here"]


def test_the_runtime_warns_before_sending_a_password_in_clear_text(mosquitto, bundle_dir, tmp_path):
    import cv2

    from runtime_helpers import make_frame

    host, port = mosquitto
    cv2.imwrite(str(tmp_path / "0.png"), make_frame())
    proc = run_cli("--images", tmp_path, "--model", bundle_dir, "--mqtt-host", host, "--mqtt-port", port,
                   "--mqtt-username", "line3", env={"EDGE_AD_MQTT_PASSWORD": "hunter2"})
    assert proc.returncode == 0, proc.stderr
    assert "WITHOUT TLS" in proc.stderr and "hunter2" not in proc.stderr


def test_teach_in_refuses_a_password_in_the_url_too(bundle_dir):
    proc = run_cli("teach", "--model", bundle_dir, "--video", "rtsp://admin:s3cret@10.0.0.7:554/stream1")
    assert proc.returncode == 2 and "passwords are not accepted in a URL" in proc.stderr
    assert "s3cret" not in proc.stderr + proc.stdout
