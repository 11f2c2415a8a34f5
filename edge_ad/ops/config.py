"""Run options as one typed dataclass: defaults < config file (YAML/TOML) < command line.

A config file may hold every option (flat keys, or one level of sections such as
`[mqtt] host = ...` meaning `mqtt_host`). Unknown keys are an error, not a silent
typo. Relative paths in a config file are taken relative to that file. The MQTT
password is never an option: it comes from $EDGE_AD_MQTT_PASSWORD or a file.
Any value that would only fail later (NaN, a delay of 1e300 s, a 100 kB topic)
is refused here, as one ConfigError line.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import urlsplit

from edge_ad.errors import ConfigError
from edge_ad.decide.policy import Cooldown

PASSWORD_ENV = "EDGE_AD_MQTT_PASSWORD"
VIDEO_PASSWORD_ENV = "EDGE_AD_VIDEO_PASSWORD"
MODES = ("latency", "throughput")
PRECISIONS = ("auto", "f32", "bf16", "f16")  # OpenVINO INFERENCE_PRECISION_HINT; auto = the device's choice
LOG_LEVELS = ("debug", "info", "warning", "error")
MQTT_VERSIONS = ("3.1.1", "5")
MAX_ID = 128  # device, camera, topic root: MQTT topics stay short and readable


@dataclass
class RunConfig:
    """Everything `edge-ad run` needs; field names are the long options with `_` for `-`."""

    # frame source (exactly one of camera / video / images)
    camera: int | None = None
    video: str | None = None
    video_password_file: str | None = None  # stream password (or $EDGE_AD_VIDEO_PASSWORD); the URL names the user
    images: str | None = None
    realtime: bool = False
    source_retries: int = 10
    retry_delay: float = 1.0
    retry_max_delay: float = 30.0
    max_frames: int | None = None
    # model and inference
    model: str | None = None
    device: str = "CPU"
    mode: str = "latency"
    requests: int = 0  # 0 = OpenVINO's optimal number of in-flight requests
    inference_precision: str | None = None  # None = auto: bf16 on CPU if it has it and the bundle verified it, else f32
    bundle_public_key: str | None = None  # ed25519 public key (PEM): refuse bundles not signed with it
    image_threshold: float = 0.5  # normalized; 0.5 = the bundle's raw threshold
    pixel_threshold: float = 0.5
    min_area: int = 1
    roi_mask: str | None = None
    max_regions: int = 10  # regions an alert carries (largest first); regions_total says how many there were
    # alert policy
    alert_n: int = 3
    alert_m: int = 5
    cooldown: str = "10s"
    clear_after: int | None = None  # consecutive normal frames; default alert_m
    # per-part inspection (edge_ad.decide.part_policy): one verdict per part instead of the alert policy
    per_part: bool = False  # implied by watch and trigger
    watch: bool = False  # --images DIR: inspect new files as they appear, each once (also across restarts)
    watch_poll: float = 0.05  # seconds between folder scans
    watch_settle: float = 0.5  # seconds a file without a complete PNG/JPEG trailer must stay unchanged
    watch_state: str | None = None  # ledger of inspected files; default beside the outbox
    trigger: str | None = None  # "mqtt" | "stdin": one frame per trigger
    trigger_queue: int = 4  # triggers waiting for the model; more are answered ERROR (dropped)
    # drift watch (edge_ad.decide.drift): recent normal scores vs the bundle's validation figures
    drift_bound: float = 0.5  # fraction of the validation margin to the threshold; 0 = off
    drift_window: int = 500  # recent normal frames compared
    # identity and outputs
    device_id: str | None = None  # default: host name
    camera_id: str | None = None  # default: derived from the source
    topic_root: str = "edge-ad"
    heartbeat: float = 30.0
    jsonl: str | None = None  # path, or "-" for stdout
    snapshots: str | None = None
    snapshot_quality: int = 90
    # disk bounds: a full disk would stop the outbox, which holds the alerts themselves (0 = no limit)
    snapshot_max_files: int = 1000  # oldest snapshots deleted beyond this count
    snapshot_max_mb: float = 1000.0  # ... or beyond this total size
    disk_reserve_mb: float = 256.0  # no snapshot is written while less than this is free on its disk
    jsonl_max_mb: float = 100.0  # a JSON-lines file is rotated at this size (PATH.1, PATH.2, ...)
    jsonl_backups: int = 5  # rotated JSON-lines files kept
    # MQTT broker
    mqtt_host: str | None = None
    mqtt_port: int | None = None  # default 1883, or 8883 with TLS
    mqtt_client_id: str | None = None
    mqtt_username: str | None = None
    mqtt_password_file: str | None = None
    mqtt_tls: bool = False
    mqtt_ca: str | None = None
    mqtt_cert: str | None = None
    mqtt_key: str | None = None
    mqtt_keepalive: int = 60
    mqtt_retries: int = 5
    mqtt_retry_delay: float = 1.0
    mqtt_retry_max_delay: float = 30.0
    mqtt_version: str = "5"  # PUBACK reason codes show publishes refused by the broker (ACL); 3.1.1 cannot
    # OPC UA (optional extra): the latest verdict/alert written into the server's variables (deliver/opcua_sink.py)
    opcua_url: str | None = None  # opc.tcp://host:4840
    opcua_namespace: str = "urn:edge-ad"  # namespace URI of the variables, or its index
    opcua_node_prefix: str = "edge-ad."  # string node ids <prefix>state, <prefix>score, ...
    opcua_username: str | None = None
    opcua_password_file: str | None = None  # or $EDGE_AD_OPCUA_PASSWORD
    # outbox: alerts wait here (SQLite) until the broker acknowledges them
    outbox: str | None = None  # default: $STATE_DIRECTORY or ~/.local/state/edge-ad/outbox-<device>-<camera>.sqlite
    outbox_max: int = 10000  # rows; when full the oldest are dropped (logged, counted in heartbeats)
    # remote commands on <root>/<device>/<camera>/cmd (edge_ad.ops.commands, edge_ad.model.rollout)
    commands: bool = True  # with MQTT: set-thresholds, reload, snapshot, teach, deploy
    deploy_max_mb: float = 2048.0  # largest bundle archive a deploy downloads (and unpacks)
    # operator
    status_interval: float = 10.0
    log_level: str = "info"
    metrics_port: int | None = None  # Prometheus /metrics (edge_ad/ops/metrics.py); None = off
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 (or ::) to let a Prometheus on another machine scrape
    http: str | None = None  # live view (edge_ad/view/): [HOST:]PORT, 127.0.0.1 unless a token is configured
    http_token_file: str | None = None  # live view token (or $EDGE_AD_HTTP_TOKEN); required beyond loopback

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def part_mode(self) -> bool:
        """Per-part inspection: asked for, or implied by a watched folder or a trigger."""
        return self.per_part or self.watch or self.trigger is not None

    @property
    def cooldown_value(self) -> Cooldown:
        return Cooldown.parse(self.cooldown)

    @property
    def port(self) -> int:
        if self.mqtt_port is not None:
            return self.mqtt_port
        return 8883 if self.tls_enabled else 1883

    @property
    def tls_enabled(self) -> bool:
        return bool(self.mqtt_tls or self.mqtt_ca or self.mqtt_cert or self.mqtt_key)


FIELD_NAMES = tuple(f.name for f in fields(RunConfig))
PATH_FIELDS = ("model", "video", "images", "roi_mask", "bundle_public_key", "video_password_file",
               "snapshots", "jsonl", "mqtt_password_file", "opcua_password_file", "mqtt_ca",
               "mqtt_cert", "mqtt_key", "outbox", "watch_state", "http_token_file")
TRIGGERS = ("mqtt", "stdin")
CAMERAS = "cameras"  # config file key: several cameras in one process (edge_ad/ops/camera_config.py)
# Upper bounds: beyond these a value is a typo, and would fail late (or exhaust memory) instead of now.
LIMITS = {"requests": 64, "alert_m": 100000, "clear_after": 100000, "mqtt_keepalive": 65535, "heartbeat": 86400.0,
          "retry_delay": 3600.0, "retry_max_delay": 86400.0, "mqtt_retry_delay": 3600.0,
          "mqtt_retry_max_delay": 86400.0, "status_interval": 86400.0, "outbox_max": 10_000_000, "deploy_max_mb": 10**6,
          "source_retries": 10**9, "mqtt_retries": 10**9, "min_area": 10**9, "camera": 10**6, "max_regions": 1000,
          "snapshot_max_files": 10**9, "snapshot_max_mb": 10**8, "disk_reserve_mb": 10**8, "jsonl_max_mb": 10**8,
          "jsonl_backups": 1000}
_HINTS = get_type_hints(RunConfig)


def default(name: str) -> Any:
    """Default of one option, for help texts."""
    return RunConfig.__dataclass_fields__[name].default


def _coerce(name: str, value: Any, origin: str) -> Any:
    hint = _HINTS[name]
    allowed = getattr(hint, "__args__", (hint,))
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{origin}: '{name}' must not be empty")
    if bool in allowed:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{origin}: '{name}' must be true or false, got {value!r}")
    if int in allowed and isinstance(value, int) and not isinstance(value, bool):
        return value
    if float in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{origin}: '{name}' must be a finite number, got {value!r}")
        return number
    if str in allowed and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        text = str(value)
        if "\x00" in text:
            raise ConfigError(f"{origin}: '{name}' must not contain NUL characters")
        return text
    wanted = " or ".join(t.__name__ for t in allowed if t is not type(None))
    raise ConfigError(f"{origin}: '{name}' must be {wanted}, got {value!r}")


def _flatten(data: dict) -> dict:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        if isinstance(value, dict):
            for sub, subvalue in value.items():
                flat[f"{key}_{str(sub).replace('-', '_')}"] = subvalue
        else:
            flat[key] = value
    return flat


def _check_keys(flat: dict, origin: str) -> None:
    if "mqtt_password" in flat:
        raise ConfigError(
            f"{origin}: 'mqtt_password' is not accepted in a config file; "
            f"set ${PASSWORD_ENV} or mqtt_password_file instead"
        )
    if "opcua_password" in flat:
        raise ConfigError(f"{origin}: 'opcua_password' is not accepted in a config file; "
                          "set $EDGE_AD_OPCUA_PASSWORD or opcua_password_file instead")
    for key in flat:
        if key not in FIELD_NAMES:
            close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{origin}: unknown option {key!r}{hint}")


def _parse_file(path: Path) -> dict:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use a .toml config") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    elif suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise ConfigError(f"{path}: reading TOML on Python 3.10 needs tomli; or use a .yaml config") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON: {exc}") from None
    else:
        raise ConfigError(f"{path}: config file must end in .yaml, .yml, .toml or .json")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config file must hold a mapping of option: value")
    return data


def read_config_file(path: str | Path) -> dict:
    """The file's mapping as parsed (ConfigError when it cannot be read or parsed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return _parse_file(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except (ValueError, RecursionError) as exc:  # e.g. a 5000-digit number, absurd nesting
        raise ConfigError(f"{path}: cannot parse: {' '.join(str(exc).split())[:200]}") from None


def load_config_file(path: str | Path) -> dict:
    """Config file -> {field: value}, checked and typed, paths made relative to the file. A `cameras` list
    (several cameras in one process) is read by edge_ad.ops.camera_config, not here."""
    raw = read_config_file(path)
    raw.pop(CAMERAS, None)
    return typed_values(raw, Path(path), str(path))


def typed_values(raw: dict, path: Path, origin: str) -> dict:
    """A mapping of options from the file `path` -> {field: value}, checked and typed, paths relative to it."""
    flat = _flatten(raw)
    _check_keys(flat, origin)
    values = {key: _coerce(key, value, origin) for key, value in flat.items()}
    for key in PATH_FIELDS:
        value = values.get(key)
        if isinstance(value, str) and value != "-" and "://" not in value:
            expanded = Path(os.path.expanduser(value))
            values[key] = str(expanded if expanded.is_absolute() else path.parent / expanded)
    return values


def build_config(cli_values: dict, config_file: str | Path | None = None) -> RunConfig:
    """Merge defaults < config file < command line, then validate."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        merged.update(load_config_file(config_file))
    for key, value in cli_values.items():
        _check_keys({key: value}, "command line")
        merged[key] = _coerce(key, value, "command line")
    config = RunConfig(**merged)
    validate(config)
    return config


def _bounded(config: RunConfig, name: str) -> None:
    value, limit = getattr(config, name), LIMITS[name]
    if value is not None and value > limit:
        raise ConfigError(f"--{name.replace('_', '-')} must be at most {limit:g}, got {value:g}")


_ID = re.compile(r"^[^/+#\s\x00]+$")


def _positive(config: RunConfig, name: str, allow_zero: bool = False) -> None:
    value = getattr(config, name)
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        option = "--" + name.replace("_", "-")
        raise ConfigError(f"{option} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def stream_user(url: str | None) -> str | None:
    """The user name in a stream URL (rtsp://USER@host/...), or None."""
    if not url or "://" not in url:
        return None
    try:
        return urlsplit(url).username
    except ValueError:
        return None


def validate(config: RunConfig) -> None:
    """Semantic checks that do not touch the network, the camera or the model."""
    sources = [name for name in ("camera", "video", "images") if getattr(config, name) is not None]
    if not sources:
        raise ConfigError("no frame source: give --camera N, --video PATH_OR_URL or --images DIR_OR_GLOB")
    if len(sources) > 1:
        raise ConfigError("give only one frame source, got " + " and ".join("--" + s for s in sources))
    if config.camera is not None and config.camera < 0:
        raise ConfigError(f"--camera must be a device index >= 0, got {config.camera}")
    if not config.model:
        raise ConfigError("no model: give --model BUNDLE_DIR (a folder with bundle.json, model.xml, model.bin)")
    if config.mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    if config.inference_precision is not None and config.inference_precision not in PRECISIONS:
        raise ConfigError(f"--inference-precision must be one of {', '.join(PRECISIONS)}, "
                          f"got {config.inference_precision!r}")
    if config.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {config.log_level!r}")
    for name in ("image_threshold", "pixel_threshold"):
        value = getattr(config, name)
        if not 0.0 < value < 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} is a normalized score and must be in (0, 1), got {value}")
    for name in ("alert_n", "alert_m", "heartbeat", "min_area", "max_regions", "retry_delay", "retry_max_delay",
                 "max_frames", "clear_after", "status_interval", "mqtt_keepalive", "mqtt_retry_delay", "snapshot_quality"):
        _positive(config, name)
    for name in ("source_retries", "mqtt_retries", "requests", "snapshot_max_files", "snapshot_max_mb",
                 "disk_reserve_mb", "jsonl_max_mb"):
        _positive(config, name, allow_zero=True)
    _positive(config, "jsonl_backups")
    _positive(config, "mqtt_retry_max_delay")
    _positive(config, "outbox_max")
    _positive(config, "deploy_max_mb")
    for name in LIMITS:
        _bounded(config, name)
    if config.mqtt_version not in MQTT_VERSIONS:
        raise ConfigError(f"--mqtt-version must be one of {', '.join(MQTT_VERSIONS)}, got {config.mqtt_version!r}")
    if config.alert_n > config.alert_m:
        raise ConfigError(f"--alert-n ({config.alert_n}) cannot exceed --alert-m ({config.alert_m})")
    if config.snapshot_quality > 100:
        raise ConfigError(f"--snapshot-quality must be 1..100, got {config.snapshot_quality}")
    try:
        cooldown = Cooldown.parse(config.cooldown)
    except ValueError as exc:
        raise ConfigError(f"--cooldown: {exc}") from None
    if not math.isfinite(cooldown.seconds) or cooldown.seconds > 10**7 or cooldown.frames > 10**9:
        raise ConfigError(f"--cooldown {config.cooldown!r} is too long")
    for name in ("device_id", "camera_id", "topic_root"):
        value = getattr(config, name)
        if value is not None and len(value) > MAX_ID:
            raise ConfigError(f"--{name.replace('_', '-')} must be at most {MAX_ID} characters, got {len(value)}")
        if value is not None and not _ID.match(value):
            if name == "topic_root" and "/" in value and all(_ID.match(p) for p in value.split("/")):
                continue
            raise ConfigError(f"--{name.replace('_', '-')} {value!r} must not be empty or contain '/', '+', '#' or spaces")
    if config.mqtt_port is not None and not 0 < config.mqtt_port < 65536:
        raise ConfigError(f"--mqtt-port must be 1..65535, got {config.mqtt_port}")
    if config.metrics_port is not None and not 0 < config.metrics_port < 65536:
        raise ConfigError(f"--metrics-port must be 1..65535, got {config.metrics_port}")
    if not config.metrics_host or len(config.metrics_host) > 255 or any(c.isspace() for c in config.metrics_host):
        raise ConfigError(f"--metrics-host must be a host name or address, got {config.metrics_host!r}")
    for name in ("mqtt_password_file", "mqtt_ca", "mqtt_cert", "mqtt_key", "roi_mask", "bundle_public_key",
                 "video_password_file"):
        value = getattr(config, name)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"--{name.replace('_', '-')} file not found: {value}")
    if config.mqtt_key and not config.mqtt_cert:
        raise ConfigError("--mqtt-key needs --mqtt-cert (the client certificate it belongs to)")
    mqtt_only = ("mqtt_username", "mqtt_password_file", "mqtt_ca", "mqtt_cert", "mqtt_key", "mqtt_client_id", "outbox")
    if config.mqtt_host is None and (config.mqtt_tls or any(getattr(config, n) for n in mqtt_only)):
        raise ConfigError("MQTT options given without --mqtt-host")
    _validate_parts(config)
    from edge_ad.view.access import validate_http  # no bind beyond loopback without a token

    validate_http(config.http, config.http_token_file)
    if config.mqtt_password_file and not config.mqtt_username:
        raise ConfigError("--mqtt-password-file needs --mqtt-username")
    if config.opcua_url is None and (config.opcua_username or config.opcua_password_file):
        raise ConfigError("OPC UA options given without --opcua-url")
    if config.opcua_url is not None and not re.match(r"^opc\.tcp://[^\s/]+", config.opcua_url):
        raise ConfigError(f"--opcua-url must look like opc.tcp://HOST:PORT, got {config.opcua_url!r}")
    for name in ("opcua_url", "opcua_namespace", "opcua_node_prefix", "opcua_username"):
        value = getattr(config, name)
        if value is not None and len(value) > 512:
            raise ConfigError(f"--{name.replace('_', '-')} must be at most 512 characters, got {len(value)}")
    if config.opcua_password_file and not config.opcua_username:
        raise ConfigError("--opcua-password-file needs --opcua-username")
    if config.opcua_password_file is not None and not Path(config.opcua_password_file).is_file():
        raise ConfigError(f"--opcua-password-file file not found: {config.opcua_password_file}")
    if config.video_password_file and not stream_user(config.video):
        raise ConfigError("--video-password-file needs --video with a stream URL naming the user "
                          "(rtsp://USER@host/...)")


def _validate_parts(config: RunConfig) -> None:
    """Per-part mode, triggers, watched folder, drift watch."""
    if config.trigger is not None and config.trigger not in TRIGGERS:
        raise ConfigError(f"--trigger must be one of {', '.join(TRIGGERS)}, got {config.trigger!r}")
    if config.watch:
        if config.images is None:
            raise ConfigError("--watch needs --images DIR (the folder the camera software writes into)")
        if not Path(config.images).is_dir():
            raise ConfigError(f"--watch needs --images to be an existing folder, got {config.images!r}")
        if config.trigger is not None:
            raise ConfigError("--watch and --trigger are two different triggers; give one")
    if config.trigger == "mqtt" and not config.mqtt_host:
        raise ConfigError("--trigger mqtt needs --mqtt-host (triggers arrive on <root>/<device>/<camera>/trigger)")
    if config.watch_state is not None and not config.watch:
        raise ConfigError("--watch-state is only used with --watch")
    for name, limit in (("watch_poll", 60.0), ("trigger_queue", 10000), ("drift_window", 100000),
                        ("watch_settle", 3600.0)):
        _positive(config, name, allow_zero=name == "watch_settle")
        if getattr(config, name) > limit:
            raise ConfigError(f"--{name.replace('_', '-')} must be at most {limit:g}, got {getattr(config, name):g}")
    if not 0.0 <= config.drift_bound <= 100.0:
        raise ConfigError(f"--drift-bound must be in [0, 100] (0 = off), got {config.drift_bound}")
