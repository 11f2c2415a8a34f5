"""Config: defaults < file (YAML/TOML) < command line; unknown keys and bad values are clear errors."""

from __future__ import annotations

import json

import pytest

from edge_ad.ops.cli import main
from edge_ad.ops.config import RunConfig, build_config, load_config_file
from edge_ad.errors import ConfigError

BASE = {"video": "v.avi", "model": "bundle"}


def test_defaults():
    config = build_config(dict(BASE))
    assert config.device == "CPU" and config.mode == "latency" and config.topic_root == "edge-ad"
    assert config.alert_n == 3 and config.alert_m == 5 and config.port == 1883


def test_precision_and_region_cap_from_a_config_file(tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text('video = "v.avi"\nmodel = "b"\ninference_precision = "bf16"\nmax_regions = 3\n')
    config = build_config({}, path)
    assert config.inference_precision == "bf16" and config.max_regions == 3
    defaults = build_config(dict(BASE))
    assert defaults.inference_precision is None and defaults.max_regions == 10  # None: f32 on CPU


def test_file_then_command_line(tmp_path):
    path = tmp_path / "edge.yaml"
    path.write_text("alert_n: 2\nalert-m: 4\ncooldown: 30f\nmqtt:\n  host: broker.local\n  port: 1884\n"
                    "video: line.avi\nmodel: bundles/a\n")
    config = build_config({"alert_n": 3, "mqtt_port": 1999}, path)
    assert config.alert_n == 3  # command line wins
    assert config.alert_m == 4 and config.cooldown == "30f"  # from the file
    assert config.mqtt_host == "broker.local" and config.mqtt_port == 1999
    assert config.video == str(tmp_path / "line.avi")  # relative to the config file
    assert config.model == str(tmp_path / "bundles/a")


def test_toml_with_sections(tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text('model = "/opt/bundle"\ncamera = 0\nheartbeat = 5\n\n[mqtt]\nhost = "b"\ntls = true\n'
                    'keepalive = 30\n\n[alert]\nn = 1\nm = 2\n')
    config = build_config({}, path)
    assert config.camera == 0 and config.heartbeat == 5.0 and isinstance(config.heartbeat, float)
    assert config.mqtt_tls and config.port == 8883 and config.mqtt_keepalive == 30
    assert (config.alert_n, config.alert_m) == (1, 2)


def test_unknown_key_is_an_error_with_suggestion(tmp_path):
    path = tmp_path / "edge.yaml"
    path.write_text("alert_nn: 2\n")
    with pytest.raises(ConfigError, match=r"unknown option 'alert_nn' \(did you mean 'alert_n'\?\)"):
        load_config_file(path)


def test_password_in_config_is_refused(tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text('[mqtt]\npassword = "hunter2"\n')
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert "hunter2" not in str(info.value) and "EDGE_AD_MQTT_PASSWORD" in str(info.value)


@pytest.mark.parametrize("text,match", [
    ("alert_n: many\n", "'alert_n' must be int"),
    ("realtime: 1\n", "must be true or false"),
    ("alert_n: [1\n", "invalid YAML"),
    ("- a\n- b\n", "mapping"),
])
def test_bad_values(tmp_path, text, match):
    path = tmp_path / "edge.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config_file(path)


def test_bad_file_kinds(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "missing.yaml")
    (tmp_path / "edge.ini").write_text("[x]\n")
    with pytest.raises(ConfigError, match=r"\.yaml, \.yml, \.toml"):
        load_config_file(tmp_path / "edge.ini")
    (tmp_path / "bad.toml").write_text("a = = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config_file(tmp_path / "bad.toml")


@pytest.mark.parametrize("values,match", [
    ({"model": "b"}, "no frame source"),
    ({"video": "a", "camera": 0, "model": "b"}, "only one frame source"),
    ({"video": "a"}, "no model"),
    ({**BASE, "alert_n": 6}, "cannot exceed"),
    ({**BASE, "image_threshold": 1.5}, r"must be in \(0, 1\)"),
    ({**BASE, "cooldown": "soon"}, "--cooldown"),
    ({**BASE, "camera_id": "a/b"}, "must not be empty or contain"),
    ({**BASE, "mqtt_username": "u"}, "without --mqtt-host"),
    ({**BASE, "mqtt_host": "h", "mqtt_port": 70000}, "1..65535"),
    ({**BASE, "mqtt_host": "h", "mqtt_ca": "/nonexistent/ca.pem"}, "file not found"),
    ({**BASE, "heartbeat": 0.0}, "--heartbeat must be > 0"),
    ({**BASE, "max_regions": 0}, "--max-regions must be > 0"),
    ({**BASE, "max_regions": 5000}, "--max-regions must be at most 1000"),
    ({**BASE, "inference_precision": "f64"}, "--inference-precision must be one of auto, f32, bf16, f16"),
])
def test_validation(values, match):
    with pytest.raises(ConfigError, match=match):
        build_config(values)


def test_cli_precedence_via_print_config(tmp_path, capsys):
    path = tmp_path / "edge.toml"
    path.write_text('video = "v.avi"\nmodel = "b"\nalert_n = 2\nalert_m = 7\nrealtime = true\n')
    code = main(["--config", str(path), "--alert-n", "4", "--no-realtime", "--print-config"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["alert_n"] == 4 and printed["alert_m"] == 7 and printed["realtime"] is False
    assert set(printed) == set(RunConfig().to_dict())
    assert not any("password" in key and not key.endswith("_password_file") for key in printed)  # names, no secrets


def test_cli_config_errors_are_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "edge.yaml"
    path.write_text("video: v.avi\nmodel: b\nbogus_option: 1\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown option 'bogus_option'" in err[0] and err[0].startswith("edge-ad: error:")
