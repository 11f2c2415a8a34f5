"""Deployment files: the example config loads, the systemd unit is hardened (and verifies where
systemd-analyze exists), the Docker image installs the runtime only (no Docker daemon here: the
Dockerfile is parsed, and a wheel is built from exactly the files it copies)."""

from __future__ import annotations

import configparser
import glob
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from runtime_helpers import REPO, systemd_verify

from edge_ad.ops.config import build_config, load_config_file

DEPLOY = REPO / "deploy"


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in (DEPLOY / "docker" / "Dockerfile").read_text().splitlines():
        if raw.strip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        word, _, rest = current.strip().partition(" ")
        lines.append((word.upper(), rest.strip()))
        current = ""
    return lines


def test_dockerfile_installs_only_the_runtime_as_a_non_root_user():
    steps = dockerfile()
    base = [a for i, a in steps if i == "FROM"]
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    assert len(base) == 1 and base[0] == "${BASE_IMAGE}"  # overridable for a plant's own registry
    assert args["BASE_IMAGE"].startswith("python:") and args["BASE_IMAGE"].endswith("-slim")
    assert [a for i, a in steps if i == "RUN" and "apt-get" in a] == []  # the wheels bring their libraries
    copies = [shlex.split(a) for i, a in steps if i in ("COPY", "ADD")]
    assert [i for i, _ in steps if i == "ADD"] == []
    sources = [src for args in copies for src in args[:-1]]
    assert sorted(sources) == ["README*", "edge_ad", "pyproject.toml"]  # no training/, deploy/, calibration/
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert "pip install ." in runs and "[train]" not in runs and "torch" not in runs.lower()
    users = [a for i, a in steps if i == "USER"]
    assert users and users[-1] not in ("root", "0") and "useradd" in runs
    assert json.loads(next(a for i, a in steps if i == "ENTRYPOINT")) == ["edge-ad"]
    env = " ".join(a for i, a in steps if i == "ENV")
    assert "STATE_DIRECTORY=/var/lib/edge-ad" in env  # the outbox lands in the volume
    assert any(i == "VOLUME" and "/var/lib/edge-ad" in a for i, a in steps)
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*"):][:4] == ["*", "!pyproject.toml", "!README*", "!edge_ad/"]


def test_the_files_the_image_copies_build_a_runtime_only_wheel(tmp_path):
    """`pip install .` inside the image sees only what COPY brought: its wheel holds edge_ad and no torch."""
    stage = tmp_path / "src"
    stage.mkdir()
    for args in (shlex.split(a) for i, a in dockerfile() if i == "COPY"):
        for pattern in args[:-1]:
            matches = glob.glob(str(REPO / pattern))
            assert matches or "*" in pattern, f"COPY source {pattern} missing"
            for match in map(Path, matches):
                target = stage / match.name
                if match.is_dir():
                    shutil.copytree(match, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy2(match, target)
    out = tmp_path / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(stage)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build wheels offline here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {n.split("/")[0] for n in names} == {"edge_ad", wheel.name.split("-")[0] + "-" +
                                                wheel.name.split("-")[1] + ".dist-info"}
    required = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    name = lambda requirement: re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)  # noqa: E731
    unconditional = sorted(name(r) for r in required if ";" not in r)
    assert unconditional == ["cryptography", "numpy", "opencv-python-headless", "openvino", "paho-mqtt", "prometheus_client"]
    assert sorted(name(r) for r in required if ";" in r and "extra ==" not in r) == ["tomli"]  # Python 3.10 only


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    parser.read(DEPLOY / "systemd" / "edge-ad.service")
    return parser


def test_systemd_unit_is_hardened_and_restarts_with_back_off():
    service = unit()["Service"]
    assert service["User"] == "edge-ad" and service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict" and service["StateDirectory"] == "edge-ad"
    assert "/etc/edge-ad" in service["ReadOnlyPaths"] and "bundles" in service["ReadOnlyPaths"]
    assert service["ExecStart"].endswith("edge-ad --config /etc/edge-ad/config.toml")
    assert service["Restart"] == "on-failure" and service["RestartSec"] and service["RestartMaxDelaySec"]
    assert service["RestartPreventExitStatus"] == "2"  # bad configuration: restarting cannot fix it
    assert service["LoadCredential"].startswith("mqtt-password:")  # edge_ad.deliver.mqtt.CREDENTIAL_NAME
    assert "PASSWORD" not in service.get("Environment", "")


def test_systemd_analyze_verify(tmp_path):
    systemd_verify((DEPLOY / "systemd" / "edge-ad.service").read_text(), tmp_path / "edge-ad.service")


def test_example_config_loads(tmp_path):
    """The example parses with every key known; with its files present it is a valid configuration."""
    example = DEPLOY / "examples" / "config.toml"
    values = load_config_file(example)
    assert values["device_id"] == "line3-pc" and values["mqtt_username"] == "line3-pc"  # ACL: user = device
    assert values["mqtt_version"] == "5" and values["outbox_max"] == 10000 and values["camera"] == 0
    assert "mqtt_password_file" not in values  # systemd credential instead
    root = tmp_path / "root"
    for path in ("etc/edge-ad/ca.pem", "etc/edge-ad/line3-pc.pem", "etc/edge-ad/line3-pc.key"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("x")
    moved = tmp_path / "config.toml"
    moved.write_text(example.read_text().replace('"/etc/', f'"{root}/etc/'))
    config = build_config({}, moved)
    assert config.tls_enabled and config.port == 8883 and config.alert_n == 3 and config.cooldown == "30s"


def test_example_mosquitto_config_names_the_acl_and_refuses_anonymous():
    conf = (DEPLOY / "examples" / "mosquitto.conf").read_text().splitlines()
    settings = [line.split(None, 1) for line in conf if line.strip() and not line.startswith("#")]
    keys = {k: v for k, v in settings if len(settings)}
    assert keys["allow_anonymous"] == "false" and "acl_file" in keys and "password_file" in keys
    assert keys["require_certificate"] == "true" and keys["listener"] == "8883"
    acl = (DEPLOY / "examples" / "mosquitto-acl.conf").read_text()
    assert "pattern write edge-ad/%u/#" in acl.splitlines()
