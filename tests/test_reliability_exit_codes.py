"""Exit codes per cause, by running the CLI: 2 only for bad configuration, 1 for whatever time can cure.

The systemd unit restarts on failure except on the codes in RestartPreventExitStatus= (2): a PC that
boots before its USB camera, its NVR or its broker must come up by itself once they are there, and a
wrong password must not restart for ever. Each case is checked against the shipped unit file itself.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from runtime_helpers import MOSQUITTO, REPO, Broker, bundle_dir, free_port, make_frame, run_cli, write_video  # noqa: F401

UNITS = sorted((REPO / "deploy" / "systemd").glob("edge-ad*.service"))


def prevented_exit_codes(unit) -> set[int]:
    """The exit codes a unit file tells systemd not to restart on."""
    codes: set[int] = set()
    for line in unit.read_text().splitlines():
        match = re.match(r"\s*RestartPreventExitStatus\s*=\s*(.*)", line)
        if match:
            codes |= {int(code) for code in match.group(1).split() if code.isdigit()}
    return codes


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("exit") / "v.avi", [make_frame() for _ in range(5)])


def error_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edge-ad: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def assert_restarted(code: int, restarted: bool) -> None:
    """Every shipped unit restarts (or not) on this code as the cause requires."""
    assert UNITS, "no systemd unit in deploy/systemd"
    for unit in UNITS:
        assert restarted == (code not in prevented_exit_codes(unit)), (unit.name, code)


def test_camera_not_there_yet_exits_1_and_is_restarted(bundle_dir, tmp_path):
    proc = run_cli("--camera", 99, "--model", bundle_dir, "--source-retries", 1, "--retry-delay", 0.05,
                   "--jsonl", tmp_path / "events.jsonl")
    assert proc.returncode == 1 and "camera 99" in error_line(proc)
    assert_restarted(proc.returncode, True)


def test_stream_not_there_yet_exits_1(bundle_dir, tmp_path):
    proc = run_cli("--video", f"rtsp://127.0.0.1:{free_port()}/line3", "--model", bundle_dir,
                   "--source-retries", 0, "--jsonl", tmp_path / "events.jsonl", timeout=60)
    assert proc.returncode == 1 and "gave up after 1 attempt" in error_line(proc)
    assert_restarted(proc.returncode, True)


def test_broker_not_there_yet_exits_1(bundle_dir, video):
    proc = run_cli("--video", video, "--model", bundle_dir, "--mqtt-host", "127.0.0.1", "--mqtt-port", free_port(),
                   "--mqtt-retries", 1, "--mqtt-retry-delay", 0.05)
    assert proc.returncode == 1 and "cannot reach MQTT broker" in error_line(proc)
    assert_restarted(proc.returncode, True)


@pytest.mark.mosquitto
@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_wrong_credentials_exit_2_and_are_not_restarted(bundle_dir, video, tmp_path, version):
    if MOSQUITTO is None or not shutil.which("mosquitto_passwd"):
        pytest.skip("needs mosquitto and mosquitto_passwd")
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "line3", "right-Pa55"], check=True,
                   capture_output=True)
    broker = Broker(tmp_path, extra=f"allow_anonymous false\npassword_file {passwd}\n")
    broker.start()
    try:
        proc = run_cli("--video", video, "--model", bundle_dir, "--mqtt-host", broker.host, "--mqtt-port",
                       broker.port, "--mqtt-username", "line3", "--mqtt-version", version, "--mqtt-retries", 3,
                       "--outbox", tmp_path / "o.sqlite", env={"EDGE_AD_MQTT_PASSWORD": "wrong"})
    finally:
        broker.stop()
    line = error_line(proc)
    assert proc.returncode == 2 and "refused the connection" in line and "fix the credentials" in line, line
    assert "cannot reach" not in proc.stderr  # not retried: retrying cannot fix a password
    assert "wrong" not in proc.stderr
    assert_restarted(proc.returncode, False)


def test_temporary_connack_refusals_are_retryable():
    """paho names MQTT 3.1.1 return codes like their v5 counterparts; the broker's own state is retryable,
    our configuration (credentials, client id, protocol) is not."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from edge_ad.deliver.link import is_temporary_refusal

    def name(code: int) -> str:
        return str(ReasonCode(PacketTypes.CONNACK, identifier=code))

    assert all(is_temporary_refusal(name(code)) for code in (136, 137, 151, 159))  # unavailable, busy, quota, rate
    assert not any(is_temporary_refusal(name(code)) for code in (132, 133, 134, 135, 138, 140))


@pytest.mark.parametrize("args,fragment", [
    (["--video", "{video}", "--model", "{missing}"], "bundle folder not found"),
    (["--video", "{missing}.avi", "--model", "{bundle}"], "video file not found"),
    (["--video", "{video}", "--model", "{bundle}", "--bogus"], "unrecognized arguments"),
    (["--video", "{video}", "--model", "{bundle}", "--config", "{missing}.toml"], "config file not found"),
])
def test_bad_configuration_exits_2_and_is_not_restarted(bundle_dir, video, tmp_path, args, fragment):
    values = {"video": video, "bundle": bundle_dir, "missing": tmp_path / "nope"}
    proc = run_cli(*[a.format(**values) for a in args], "--jsonl", tmp_path / "events.jsonl")
    assert proc.returncode == 2 and fragment in error_line(proc)
    assert_restarted(proc.returncode, False)
