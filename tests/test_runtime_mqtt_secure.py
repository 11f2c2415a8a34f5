"""A broker with TLS and passwords: the password comes from the environment or a file, never echoed."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading
import uuid

import paho.mqtt.client as mqtt
import pytest
from prerequisites import missing
from runtime_helpers import MOSQUITTO, Broker, bundle_dir, make_frame, run_cli, write_video  # noqa: F401

pytestmark = pytest.mark.mosquitto
PASSWORD = "s3cret-Pa55"


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    if MOSQUITTO is None or not shutil.which("openssl") or not shutil.which("mosquitto_passwd"):
        missing("mosquitto", "needs mosquitto, mosquitto_passwd and openssl")
    folder = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=edge-ad test CA",
             cwd=folder)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=folder)
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "san.ext", cwd=folder)
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(folder / "passwd"), "edge", PASSWORD], check=True,
                   capture_output=True)
    broker = Broker(folder, extra=(f"cafile {folder / 'ca.pem'}\ncertfile {folder / 'server.pem'}\n"
                                   f"keyfile {folder / 'server.key'}\nallow_anonymous false\n"
                                   f"password_file {folder / 'passwd'}\n"))
    broker.start()
    yield broker, folder
    broker.stop()


@pytest.fixture(scope="module")
def short_video(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video")
    return write_video(folder / "v.avi", [make_frame([(64, 48, 64, 48)] if i >= 2 else []) for i in range(8)])


def subscribe(broker, folder, topic):
    received, ready = [], threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:6]}")
    client.username_pw_set("edge", PASSWORD)
    client.tls_set(ca_certs=str(folder / "ca.pem"), cert_reqs=ssl.CERT_REQUIRED)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda c, u, mid, rcs, p: ready.set()
    client.on_message = lambda c, u, m: received.append(json.loads(m.payload))
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert ready.wait(5)
    return client, received


def base_args(broker, folder, bundle, video):
    return ["--video", video, "--model", bundle, "--mqtt-host", "localhost", "--mqtt-port", broker.port,
            "--mqtt-ca", folder / "ca.pem", "--mqtt-username", "edge", "--device-id", "tls", "--alert-n", 1,
            "--alert-m", 1, "--cooldown", "100f", "--mqtt-retries", 0, "--log-level", "debug"]


def test_tls_and_password_from_environment(secure_broker, bundle_dir, short_video):
    broker, folder = secure_broker
    client, received = subscribe(broker, folder, "edge-ad/tls/+/alert")
    try:
        proc = run_cli(*base_args(broker, folder, bundle_dir, short_video), env={"EDGE_AD_MQTT_PASSWORD": PASSWORD})
    finally:
        client.disconnect()
        client.loop_stop()
    assert proc.returncode == 0, proc.stderr
    assert PASSWORD not in proc.stderr + proc.stdout
    # at-least-once: a PUBACK lost under load may deliver an alert twice; consumers dedupe by event id
    unique = {a["event_id"]: a for a in received}
    assert [a["frame_index"] for a in unique.values()] == [2]


def test_password_file(secure_broker, bundle_dir, short_video, tmp_path):
    broker, folder = secure_broker
    secret = tmp_path / "mqtt.pass"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    proc = run_cli(*base_args(broker, folder, bundle_dir, short_video), "--mqtt-password-file", secret)
    assert proc.returncode == 0, proc.stderr
    assert PASSWORD not in proc.stderr + proc.stdout


def test_wrong_password_is_refused_in_one_line(secure_broker, bundle_dir, short_video):
    broker, folder = secure_broker
    proc = run_cli(*base_args(broker, folder, bundle_dir, short_video), env={"EDGE_AD_MQTT_PASSWORD": "wrong-guess"})
    assert proc.returncode == 2
    assert "wrong-guess" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edge-ad: error:")]
    assert len(errors) == 1 and f"localhost:{broker.port} refused the connection" in errors[0]


def test_untrusted_broker_certificate_fails_clearly(secure_broker, bundle_dir, short_video, tmp_path):
    broker, folder = secure_broker
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "other.key", "-out", "other.pem", "-days", "1", "-subj", "/CN=other", cwd=tmp_path)
    args = base_args(broker, folder, bundle_dir, short_video)
    args[args.index(folder / "ca.pem")] = tmp_path / "other.pem"
    proc = run_cli(*args, env={"EDGE_AD_MQTT_PASSWORD": PASSWORD})
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edge-ad: error:")]
    assert len(errors) == 1 and "TLS error" in errors[0] and f"localhost:{broker.port}" in errors[0]


def test_tls_link_writes_only_from_its_network_thread(secure_broker, monkeypatch):
    """Alerts are published from other threads while the link's thread reads PUBACKs on the same SSL
    connection, which two threads must never use at once: under load that broke TLS links (the broker
    dropped the connection mid-shutdown and edge-ad hung). Every socket write must come from the link's
    thread. (paho's _sock_send is wrapped to see who writes: the one private name this test uses.)"""
    from edge_ad.deliver.link import Link
    from edge_ad.deliver.mqtt import MqttSettings, make_client

    broker, folder = secure_broker
    monkeypatch.setenv("EDGE_AD_MQTT_PASSWORD", PASSWORD)
    settings = MqttSettings(host="localhost", port=int(broker.port), client_id=f"writer-{uuid.uuid4().hex[:6]}",
                            username="edge", tls=True, ca=str(folder / "ca.pem"), retries=0)
    client = make_client(settings)
    lost, acked, writers, done = [], [], set(), threading.Event()
    per_thread, threads = 200, 3

    def on_publish(c, userdata, mid, reason_code, properties):
        acked.append(mid)
        if len(acked) == per_thread * threads:
            done.set()

    client.on_publish = on_publish
    link = Link(client, settings, on_up=lambda: None, on_down=lost.append)
    link.start()
    send = client._sock_send

    def recording_send(data):
        writers.add(threading.current_thread().name)
        return send(data)

    client._sock_send = recording_send
    try:
        def publish_many():
            for _ in range(per_thread):
                client.publish("edge-ad/writer/x", b"x" * 2000, qos=1)

        workers = [threading.Thread(target=publish_many, name=f"publisher-{n}") for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert done.wait(60), f"{len(acked)} of {per_thread * threads} acknowledged; connection lost: {lost}"
        assert lost == [] and link.reconnects == 0
        assert writers == {"edge-ad-mqtt"}
    finally:
        link.close()
