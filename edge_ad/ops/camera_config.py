"""Several cameras in one process: a config file's `cameras` list -> one checked RunConfig per camera.

The file's top level holds what the cameras share (broker, device id, topic root...) and the
defaults of every option; each entry of `cameras` names its own frame source and may set any
other option for that camera (bundle, thresholds, ROI mask, policy, camera id, outbox...).
Precedence: defaults < top level < camera entry < command line (a command-line option applies to
every camera). Each camera's options are validated as a single-camera run's are, and anything two
cameras would fight over (topics, outbox, ledger, JSON-lines file, MQTT client id, OPC UA nodes,
stdin) is refused before anything starts: one ConfigError line naming the camera.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge_ad.errors import ConfigError
from edge_ad.ops.config import CAMERAS, RunConfig, _check_keys, _coerce, read_config_file, typed_values, validate

SOURCES = ("camera", "video", "images")
PROCESS_WIDE = ("log_level", "status_interval")  # one process: one log, one status line


def has_cameras(config_file: str | Path | None) -> bool:
    """Does this config file list cameras (so `edge-ad run` runs several in one process)?"""
    return config_file is not None and CAMERAS in read_config_file(config_file)


def _label(entry, number: int) -> str:
    if isinstance(entry, dict):
        name = entry.get("camera_id", entry.get("camera-id"))
        if isinstance(name, str) and name:
            return name
    return f"#{number}"


def build_camera_configs(cli_values: dict, config_file: str | Path) -> list[RunConfig]:
    """Merge defaults < top level < entry < command line for each camera, then validate each and the set."""
    path = Path(config_file)
    raw = read_config_file(path)
    entries = raw.pop(CAMERAS)
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: '{CAMERAS}' must be a non-empty list of cameras (each a mapping of options)")
    top = typed_values(raw, path, str(path))
    for name in SOURCES:
        if name in top:
            raise ConfigError(f"{path}: '{name}' at the top level: with a '{CAMERAS}' list each camera names "
                              "its own source")
    cli = {}
    for key, value in cli_values.items():
        _check_keys({key: value}, "command line")
        if key in SOURCES or key == "camera_id":
            raise ConfigError(f"--{key.replace('_', '-')} cannot be combined with the '{CAMERAS}' list of {path} "
                              "(it would apply to every camera); set it in the camera's entry")
        cli[key] = _coerce(key, value, "command line")
    configs = []
    for number, entry in enumerate(entries, 1):
        origin = f"{path}: camera {_label(entry, number)}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: {CAMERAS} entry {number} must be a mapping of options, got {entry!r:.60}")
        values = typed_values(entry, path, origin)
        for name in PROCESS_WIDE:
            if name in values:
                raise ConfigError(f"{origin}: '{name}' is shared by all cameras; set it at the top level")
        config = RunConfig(**{**top, **values, **cli})
        try:
            validate(config)
        except ConfigError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
        configs.append(config)
    check_distinct(configs, path)
    return configs


def camera_ids(configs: list[RunConfig]) -> list[str]:
    """Each camera's id: camera_id, or the one its source gives (cam0, the video's name...), as a run would."""
    from edge_ad.sources.capture import open_source  # the sources' own naming (imports OpenCV)

    return [config.camera_id or open_source(config.camera, config.video, config.images).default_id
            for config in configs]


def check_distinct(configs: list[RunConfig], origin: str | Path = "cameras") -> None:
    """Refuse what two cameras of one process cannot share."""
    ids = camera_ids(configs)

    def one_each(what: str, key, hint: str = "") -> None:
        seen: dict = {}
        for camera, config in zip(ids, configs):
            value = key(config, camera)
            if value is None:
                continue
            if value in seen:
                raise ConfigError(f"{origin}: cameras {seen[value]} and {camera} {what}{hint}")
            seen[value] = camera

    def resolved(text: str | None):
        return None if text in (None, "-") else os.path.realpath(os.path.expanduser(text))

    one_each("have the same topics", lambda c, camera: (c.topic_root, c.device_id, camera),
             "; give each its own camera_id")
    one_each("share one outbox file", lambda c, _: resolved(c.outbox))
    one_each("share one watch_state ledger", lambda c, _: resolved(c.watch_state))
    one_each("write the same JSON-lines file", lambda c, _: resolved(c.jsonl), " (stdout, '-', may be shared)")
    one_each("have the same mqtt_client_id", lambda c, _: c.mqtt_client_id,
             " (the broker would disconnect one of them; the default edge-ad-<device>-<camera> differs)")
    one_each("write the same OPC UA variables",
             lambda c, _: c.opcua_url and (c.opcua_url, c.opcua_namespace, c.opcua_node_prefix),
             "; give each its own opcua_node_prefix")
    one_each("both read triggers from stdin", lambda c, _: "stdin" if c.trigger == "stdin" else None)
