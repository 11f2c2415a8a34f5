"""No one let in, nothing lost: TLS with a test CA and client certificates, passwords from a file or the
environment, and credentials that stop working while edge-ad runs (alerts wait in the outbox and go
out once the password file is fixed, without a restart). The passwords never appear anywhere."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from prerequisites import missing
from runtime_helpers import (  # noqa: F401  (fixtures)
    MOSQUITTO, Broker, Subscriber, bundle_dir, jsonl, make_frame, outbox_rows, run_cli, start_cli, wait_until,
    write_video,
)

from edge_ad.deliver.outbox import Outbox

pytestmark = pytest.mark.mosquitto
OLD, NEW, DASH, WRONG = "0ld-Pa55word", "n3w-Pa55word", "dash-Pa55word", "wr0ng-Gue55"
BOX = (64, 48, 64, 48)


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A test CA, a broker certificate for localhost, client certificates for the device and the dashboard."""
    if MOSQUITTO is None or not shutil.which("openssl") or not shutil.which("mosquitto_passwd"):
        missing("mosquitto", "needs mosquitto, mosquitto_passwd and openssl")
    folder = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=edge-ad test CA",
             cwd=folder)
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (folder / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subject, ext in (("server", "/CN=localhost", "server.ext"), ("line3", "/CN=line3", "client.ext"),
                               ("dashboard", "/CN=dashboard", "client.ext")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", ext, cwd=folder)
    return folder


def set_password(passwd: Path, user: str, password: str) -> None:
    subprocess.run(["mosquitto_passwd", "-b", *([] if passwd.exists() else ["-c"]), str(passwd), user, password],
                   check=True, capture_output=True)


@pytest.fixture
def tls_broker(pki, tmp_path):
    passwd = tmp_path / "passwd"
    set_password(passwd, "line3", OLD)
    set_password(passwd, "dashboard", DASH)
    broker = Broker(tmp_path, persistent=True, extra=(
        f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'server.pem'}\nkeyfile {pki / 'server.key'}\n"
        f"require_certificate true\ntls_version tlsv1.2\nallow_anonymous false\npassword_file {passwd}\n"))
    broker.start()
    yield broker, passwd
    broker.stop()


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    frames = [make_frame([BOX] if any(s <= i < s + 10 for s in (25, 70, 115)) else []) for i in range(150)]
    return write_video(tmp_path_factory.mktemp("tlsvideo") / "line.avi", frames, fps=25)


def dashboard(broker, pki) -> Subscriber:
    return Subscriber("localhost", broker.port, "edge-ad/line3/#", username="dashboard", password=DASH,
                      tls_ca=pki / "ca.pem", tls_cert=pki / "dashboard.pem", tls_key=pki / "dashboard.key",
                      client_id="dashboard-1")


def device_args(broker, pki, bundle, video, folder, *extra, realtime=True) -> list:
    return ["--video", video, *(["--realtime"] if realtime else []), "--model", bundle, "--mqtt-host", "localhost",
            "--mqtt-port", broker.port, "--mqtt-ca", pki / "ca.pem", "--mqtt-cert", pki / "line3.pem",
            "--mqtt-key", pki / "line3.key", "--mqtt-username", "line3", "--device-id", "line3", "--camera-id",
            "cam", "--cooldown", "10f", "--heartbeat", 0.5, "--jsonl", folder / "raised.jsonl", "--outbox",
            folder / "outbox.sqlite", "--snapshots", folder / "snaps", "--mqtt-retry-delay", 0.2,
            "--mqtt-retry-max-delay", 1, "--mqtt-retries", 0, "--log-level", "debug", *extra]


def assert_no_secret_anywhere(folder: Path, *texts: str) -> None:
    """Not in the logs, not in the payloads, not in the outbox (with its WAL), not in any file name."""
    blobs = [t.encode() for t in texts]
    for path in folder.rglob("*"):
        blobs.append(str(path).encode())
        if path.is_file() and path.name != "mqtt.pass":
            blobs.append(path.read_bytes())
    for secret in (OLD, NEW, DASH, WRONG):
        assert not any(secret.encode() in blob for blob in blobs), f"{secret} leaked"


def test_credentials_revoked_at_runtime_alerts_wait_and_go_out_once_the_file_is_fixed(tls_broker, pki, bundle_dir,
                                                                                       video, tmp_path):
    broker, passwd = tls_broker
    secret = tmp_path / "mqtt.pass"
    secret.write_text(OLD + "\n")
    secret.chmod(0o600)
    sub = dashboard(broker, pki)
    proc = start_cli(*device_args(broker, pki, bundle_dir, video, tmp_path, "--mqtt-password-file", secret))
    try:
        sub.wait_for(lambda m: any(p["event"] == "alert" for _, p in m), timeout=40, what="the first alert")
        set_password(passwd, "line3", NEW)  # the broker's admin rotates the password ...
        broker.stop()
        broker.start()  # ... and restarts the broker: edge-ad's reconnection is refused
        wait_until(lambda: any("Not authorized" in b.get("reason", "") for b in jsonl(tmp_path / "raised.jsonl",
                                                                                  "heartbeat")),
                   timeout=20, what="a degraded heartbeat naming the refusal")
        refused_at = len(jsonl(tmp_path / "raised.jsonl", "alert", "clear"))
        wait_until(lambda: len(jsonl(tmp_path / "raised.jsonl", "alert", "clear")) > refused_at, timeout=20,
                   what="an event raised while refused")
        assert outbox_rows(tmp_path / "outbox.sqlite")
        secret.write_text(NEW + "\n")  # the operator fixes the file; no restart
        out, err = proc.communicate(timeout=45)
        raised = jsonl(tmp_path / "raised.jsonl", "alert", "clear")
        ids = [e["event_id"] for e in raised]
        wait_until(lambda: set(sub.event_ids()) >= set(ids), timeout=15, what="every raised event")
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
    print(f"\nFIGURES password revoked, file fixed: raised {len(ids)}, delivered "
          f"{len(set(ids) & set(sub.event_ids()))}, raised while refused {len(ids) - refused_at}")
    assert proc.returncode == 0, err
    assert sub.event_ids() == ids and len(ids) >= 4
    assert f"MQTT broker localhost:{broker.port} refused the connection: Not authorized" in err
    assert "they are re-read before every attempt" in err and "reconnected to MQTT broker" in err
    assert outbox_rows(tmp_path / "outbox.sqlite") == []
    assert_no_secret_anywhere(tmp_path, out, err, json.dumps(sub.events()))


def test_wrong_password_at_start_is_one_line_and_keeps_the_outbox(tls_broker, pki, bundle_dir, video, tmp_path):
    broker, _ = tls_broker
    outbox = Outbox(tmp_path / "outbox.sqlite")
    earlier = [{"event": "alert", "schema": 1, "event_id": f"earlier-{i}", "device": "line3", "camera": "cam",
                "timestamp": f"2026-01-0{i + 1}T00:00:00.000Z", "frame_index": i} for i in range(2)]
    for event in earlier:
        outbox.add("edge-ad/line3/cam/alert", json.dumps(event), event["event_id"])
    outbox.close()
    proc = run_cli(*device_args(broker, pki, bundle_dir, video, tmp_path, realtime=False),
                   env={"EDGE_AD_MQTT_PASSWORD": WRONG})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edge-ad: error:")]
    assert errors == [f"edge-ad: error: MQTT broker at localhost:{broker.port} refused the connection: "
                      f"Not authorized (fix the credentials, client id or --mqtt-version)"]
    assert "Traceback" not in proc.stderr
    assert [p for _, _, p in outbox_rows(tmp_path / "outbox.sqlite")] == earlier  # nothing lost

    sub = dashboard(broker, pki)
    try:
        short = write_video(tmp_path / "short.avi", [make_frame() for _ in range(5)])
        fixed = run_cli(*device_args(broker, pki, bundle_dir, short, tmp_path, realtime=False),
                        env={"EDGE_AD_MQTT_PASSWORD": OLD})
        wait_until(lambda: len(sub.event_ids()) >= 2, timeout=15, what="the stored alerts")
    finally:
        sub.close()
    assert fixed.returncode == 0, fixed.stderr
    assert sub.event_ids() == ["earlier-0", "earlier-1"] and sub.events("alert") == earlier
    assert outbox_rows(tmp_path / "outbox.sqlite") == []
    assert_no_secret_anywhere(tmp_path, proc.stdout, proc.stderr, fixed.stdout, fixed.stderr)


def test_without_a_client_certificate_the_broker_is_not_reached(tls_broker, pki, bundle_dir, video, tmp_path):
    broker, _ = tls_broker
    args = device_args(broker, pki, bundle_dir, video, tmp_path, realtime=False)
    for option in ("--mqtt-cert", "--mqtt-key"):
        at = args.index(option)
        del args[at:at + 2]
    proc = run_cli(*args, env={"EDGE_AD_MQTT_PASSWORD": OLD})
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edge-ad: error:")]
    assert len(errors) == 1 and f"cannot reach MQTT broker at localhost:{broker.port} (TLS error" in errors[0]
    assert "Traceback" not in proc.stderr and OLD not in proc.stderr


def test_tls_always_verifies_the_broker_certificate_and_name(pki):
    """TLS on means: the broker's certificate must chain to the CA *and* name the host we dialled."""
    import ssl

    from edge_ad.deliver.mqtt import MqttSettings, make_client

    for settings in (MqttSettings(host="localhost", tls=True), MqttSettings(host="localhost", ca=str(pki / "ca.pem")),
                     MqttSettings(host="localhost", ca=str(pki / "ca.pem"), cert=str(pki / "line3.pem"),
                                  key=str(pki / "line3.key"))):
        context = make_client(settings)._ssl_context
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
