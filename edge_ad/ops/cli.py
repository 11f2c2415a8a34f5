"""Command line: `edge-ad [run] ...`, `edge-ad bench ...`, `edge-ad listen ...`.

Every expected failure is one line on stderr and an exit code (2: bad
configuration, 1: a runtime failure a restart may cure), never a traceback;
`--log-level debug` shows tracebacks.
Run options default to "not given" so that a config file fills what the
command line leaves out (defaults < config file < command line).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from edge_ad import __version__
from edge_ad.model.bundle import BundleError
from edge_ad.ops.config import MODES, MQTT_VERSIONS, PASSWORD_ENV, PRECISIONS, build_config, default, load_config_file
from edge_ad.errors import EXIT_RUNTIME, EXIT_USAGE, EdgeAdError, UsageError
from edge_ad.ops.statusline import setup_logging

log = logging.getLogger("edge_ad")

COMMANDS = ("run", "bench", "listen", "teach")


class _Parser(argparse.ArgumentParser):
    """Parse errors become one-line UsageErrors (exit 2) instead of usage dumps."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


PRECISION_HELP = ("OpenVINO inference precision (default auto: on CPU bf16 if the CPU has it and the bundle "
                  "verified it at export, else f32, the precision its thresholds were set in; other devices: "
                  "their own choice); f32, bf16, f16 pin it")


def _d(name: str) -> str:
    return f" (default: {default(name)})"


class _RefusePassword(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        raise UsageError(f"passwords are not accepted on the command line (they leak into shell history and ps); "
                         f"set ${PASSWORD_ENV} or use --mqtt-password-file")


def _no_url_password(text: str) -> str:
    """--video: a stream URL with a password in it would leak like --mqtt-password (see ops/credentials.py)."""
    from edge_ad.ops.credentials import URL_PASSWORD_REFUSED, url_has_password

    if url_has_password(text):
        raise argparse.ArgumentTypeError(URL_PASSWORD_REFUSED)
    return text


def _add_mqtt_connection(group, suppress: bool = True) -> None:
    """Broker options shared by `run` and `listen`."""
    group.add_argument("--mqtt-host", metavar="HOST", help="MQTT broker host; alerts go to MQTT when given")
    group.add_argument("--mqtt-port", type=int, metavar="PORT", help="broker port (default: 1883, 8883 with TLS)")
    group.add_argument("--mqtt-client-id", metavar="ID", help="client id (default: edge-ad-<device>-<camera>)")
    group.add_argument("--mqtt-username", metavar="USER", help="user name")
    group.add_argument("--mqtt-password-file", metavar="FILE",
                       help=f"file whose first line is the password (or set ${PASSWORD_ENV})")
    group.add_argument("--mqtt-password", nargs="?", action=_RefusePassword, help=argparse.SUPPRESS)
    group.add_argument("--mqtt-tls", action=argparse.BooleanOptionalAction, help="use TLS (implied by --mqtt-ca/--mqtt-cert)")
    group.add_argument("--mqtt-ca", metavar="PEM", help="CA certificate(s) to verify the broker (default: system CAs)")
    group.add_argument("--mqtt-cert", metavar="PEM", help="client certificate for mutual TLS")
    group.add_argument("--mqtt-key", metavar="PEM", help="private key of the client certificate")
    group.add_argument("--mqtt-keepalive", type=int, metavar="S", help="keepalive seconds" + _d("mqtt_keepalive"))
    group.add_argument("--mqtt-retries", type=int, metavar="N",
                       help="connection retries at start-up before giving up" + _d("mqtt_retries"))
    group.add_argument("--mqtt-retry-delay", type=float, metavar="S",
                       help="first (re)connection delay, doubling each time, with jitter" + _d("mqtt_retry_delay"))
    group.add_argument("--mqtt-retry-max-delay", type=float, metavar="S",
                       help="longest (re)connection delay" + _d("mqtt_retry_max_delay"))
    group.add_argument("--mqtt-version", choices=MQTT_VERSIONS,
                       help="MQTT protocol; with 5 the broker reports refused publishes (ACL)" + _d("mqtt_version"))


def run_parser(prog: str = "edge-ad") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog, allow_abbrev=False, argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Visual anomaly detection at the edge: frames -> OpenVINO bundle -> alerts over MQTT / JSON lines.",
        epilog=(
            "commands:\n"
            "  edge-ad [run] ...      detect (this help); `run` may be omitted\n"
            "  edge-ad bench ...      measure latency and throughput of a bundle\n"
            "  edge-ad listen ...     print alerts arriving on a broker\n"
            "  edge-ad teach ...      teach-in: new thresholds from normal frames of the line\n\n"
            "examples:\n"
            "  edge-ad --camera 0 --model bundles/stfpm-int8 --mqtt-host broker.local\n"
            "  edge-ad --video line3.mp4 --realtime --model bundle --jsonl alerts.jsonl\n"
            "  edge-ad --config /etc/edge-ad.toml --camera 1\n\n"
            f"The MQTT password comes from ${PASSWORD_ENV} or --mqtt-password-file, never the command line.\n"
            "Exit codes: 0 done; 1 runtime failure that a restart may cure (camera or broker not there yet,\n"
            "outbox locked or disk full); 2 bad configuration (options, config file, bundle, credentials)."
        ),
    )
    src = parser.add_argument_group("frame source (exactly one)")
    src.add_argument("--camera", type=int, metavar="N", help="OpenCV camera index")
    src.add_argument("--video", metavar="PATH_OR_URL", type=_no_url_password,
                     help="video file, or RTSP/HTTP stream URL (rtsp://USER@host/...: no password here)")
    src.add_argument("--video-password-file", metavar="FILE",
                     help="file whose first line is the stream password (or set $EDGE_AD_VIDEO_PASSWORD)")
    src.add_argument("--images", metavar="DIR_OR_GLOB", help="folder or glob of still images")
    src.add_argument("--realtime", action=argparse.BooleanOptionalAction,
                     help="play video files at their frame rate, dropping frames the model cannot keep up with "
                          "(default: as fast as possible, every frame)")
    src.add_argument("--source-retries", type=int, metavar="N",
                     help="reconnection attempts for a camera/stream before giving up" + _d("source_retries"))
    src.add_argument("--retry-delay", type=float, metavar="S",
                     help="first reconnection delay, doubling, with jitter" + _d("retry_delay"))
    src.add_argument("--retry-max-delay", type=float, metavar="S", help="longest reconnection delay" + _d("retry_max_delay"))
    src.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames")

    model = parser.add_argument_group("model")
    model.add_argument("--model", "-m", metavar="BUNDLE", help="bundle folder (bundle.json, model.xml, model.bin)")
    model.add_argument("--device", metavar="DEV", help="OpenVINO device: CPU, GPU, NPU, AUTO..." + _d("device"))
    model.add_argument("--mode", choices=MODES, help="OpenVINO performance hint" + _d("mode"))
    model.add_argument("--requests", type=int, metavar="N",
                       help="inference requests in flight (default: OpenVINO's optimum for the mode)")
    model.add_argument("--inference-precision", choices=PRECISIONS, help=PRECISION_HELP)
    model.add_argument("--bundle-public-key", metavar="PEM",
                       help="ed25519 public key: refuse bundles that are not signed with it (python -m deploy.keys)")

    dec = parser.add_argument_group("decision")
    dec.add_argument("--image-threshold", type=float, metavar="T",
                     help="normalized frame score at or above which a frame is anomalous; 0.5 = the bundle's "
                          "threshold" + _d("image_threshold"))
    dec.add_argument("--pixel-threshold", type=float, metavar="T",
                     help="normalized pixel score for defect regions" + _d("pixel_threshold"))
    dec.add_argument("--min-area", type=int, metavar="PX", help="ignore regions smaller than this (frame pixels)" + _d("min_area"))
    dec.add_argument("--roi-mask", metavar="PNG", help="region of interest image, nonzero = inspect (any size)")
    dec.add_argument("--max-regions", type=int, metavar="K",
                     help="defect regions an alert carries, largest first; the alert's regions_total counts all"
                          + _d("max_regions"))

    pol = parser.add_argument_group("alert policy")
    pol.add_argument("--alert-n", type=int, metavar="N", help="alert when N of the last M frames are anomalous" + _d("alert_n"))
    pol.add_argument("--alert-m", type=int, metavar="M", help="window of the N-of-M rule" + _d("alert_m"))
    pol.add_argument("--cooldown", metavar="T",
                     help="quiet time before the camera alerts again: seconds ('10', '500ms') or frames ('30f')"
                          + _d("cooldown"))
    pol.add_argument("--clear-after", type=int, metavar="K",
                     help="consecutive normal frames that end an alert (all clear; default: M)")

    part = parser.add_argument_group("per-part inspection (one verdict per part, instead of the alert policy)")
    part.add_argument("--per-part", action=argparse.BooleanOptionalAction,
                      help="publish one verdict (OK/NOK) per inspected image on <root>/<device>/<camera>/verdict; "
                           "NOK verdicts also as alerts; no N-of-M, no cool-down (implied by --watch and --trigger)")
    part.add_argument("--watch", action=argparse.BooleanOptionalAction,
                      help="with --images DIR: inspect new files as they appear, once each, when complete; "
                           "remembered across restarts")
    part.add_argument("--watch-poll", type=float, metavar="S", help="seconds between folder scans" + _d("watch_poll"))
    part.add_argument("--watch-settle", type=float, metavar="S",
                      help="seconds a file without a complete PNG/JPEG trailer must stay unchanged"
                           + _d("watch_settle"))
    part.add_argument("--watch-state", metavar="PATH",
                      help="ledger of inspected files (default: beside the outbox, watch-<device>-<camera>.done)")
    part.add_argument("--trigger", choices=("mqtt", "stdin"),
                      help="inspect one frame per trigger: a message on <root>/<device>/<camera>/trigger "
                           "(payload: part id, optional), or a line on stdin")
    part.add_argument("--trigger-queue", type=int, metavar="N",
                      help="triggers waiting for the model; more are answered ERROR (dropped)" + _d("trigger_queue"))
    part.add_argument("--drift-bound", type=float, metavar="F",
                      help="status degraded when recent normal scores moved this fraction of the validation "
                           "margin to the threshold; 0 = off" + _d("drift_bound"))
    part.add_argument("--drift-window", type=int, metavar="N",
                      help="recent normal frames the drift watch compares" + _d("drift_window"))

    out = parser.add_argument_group("identity and outputs")
    out.add_argument("--device-id", metavar="NAME", help="device name in topics and payloads (default: host name)")
    out.add_argument("--camera-id", metavar="NAME", help="camera name (default: from the source, e.g. cam0)")
    out.add_argument("--topic-root", metavar="ROOT", help="MQTT topic root" + _d("topic_root"))
    out.add_argument("--heartbeat", type=float, metavar="S", help="heartbeat period in seconds" + _d("heartbeat"))
    out.add_argument("--jsonl", metavar="PATH",
                     help="append events as JSON lines to PATH ('-' = stdout; the default without --mqtt-host)")
    out.add_argument("--snapshots", metavar="DIR", help="write a heatmap-overlay JPEG per alert into DIR")
    out.add_argument("--snapshot-quality", type=int, metavar="Q", help="JPEG quality 1-100" + _d("snapshot_quality"))
    out.add_argument("--snapshot-max-files", type=int, metavar="N",
                     help="keep at most N snapshots, deleting the oldest; 0 = no limit" + _d("snapshot_max_files"))
    out.add_argument("--snapshot-max-mb", type=float, metavar="MB",
                     help="keep at most MB of snapshots, deleting the oldest; 0 = no limit" + _d("snapshot_max_mb"))
    out.add_argument("--disk-reserve-mb", type=float, metavar="MB",
                     help="write no snapshot while less than MB is free on its disk (room for the outbox)"
                          + _d("disk_reserve_mb"))
    out.add_argument("--jsonl-max-mb", type=float, metavar="MB",
                     help="rotate the --jsonl file at MB (PATH.1, PATH.2, ...); 0 = never" + _d("jsonl_max_mb"))
    out.add_argument("--jsonl-backups", type=int, metavar="N", help="rotated --jsonl files kept" + _d("jsonl_backups"))
    out.add_argument("--outbox", metavar="PATH",
                     help="SQLite file where alerts wait for the broker's acknowledgement (default: "
                          "$STATE_DIRECTORY or ~/.local/state/edge-ad/outbox-<device>-<camera>.sqlite)")
    out.add_argument("--outbox-max", type=int, metavar="N",
                     help="most alerts kept while the broker is away; then the oldest are dropped" + _d("outbox_max"))
    out.add_argument("--commands", action=argparse.BooleanOptionalAction,
                     help="accept remote commands on <root>/<device>/<camera>/cmd (set-thresholds, reload, snapshot, "
                          "teach, deploy), answered on .../cmd/result" + _d("commands"))
    out.add_argument("--deploy-max-mb", type=float, metavar="MB",
                     help="largest bundle archive a deploy command downloads" + _d("deploy_max_mb"))

    _add_mqtt_connection(parser.add_argument_group("MQTT broker"))
    opc = parser.add_argument_group("OPC UA (pip install \"edge-ad[opcua]\")")
    opc.add_argument("--opcua-url", metavar="URL",
                     help="also write the latest verdict/alert, its score, part id, time and counters into "
                          "this server's variables (opc.tcp://HOST:PORT)")
    opc.add_argument("--opcua-namespace", metavar="NS",
                     help="namespace URI (or index) of those variables" + _d("opcua_namespace"))
    opc.add_argument("--opcua-node-prefix", metavar="PREFIX",
                     help="string node ids are PREFIX + state, score, part_id, ..." + _d("opcua_node_prefix"))
    opc.add_argument("--opcua-username", metavar="USER", help="user name")
    opc.add_argument("--opcua-password-file", metavar="FILE",
                     help="file whose first line is the password (or set $EDGE_AD_OPCUA_PASSWORD)")

    view = parser.add_argument_group("live view (a web page on this PC: frame, heatmap, scores, alerts, ROI editor)")
    view.add_argument("--http", metavar="[HOST:]PORT",
                      help="serve the live view, e.g. 127.0.0.1:8080 (default host); another address needs a token")
    view.add_argument("--http-token-file", metavar="FILE",
                      help="file whose first line is the view's token (or set $EDGE_AD_HTTP_TOKEN)")

    gen = parser.add_argument_group("general")
    gen.add_argument("--config", metavar="FILE", help="YAML or TOML file with any of these options (command line wins)")
    gen.add_argument("--print-config", action="store_true", help="print the effective options as JSON and exit")
    gen.add_argument("--status-interval", type=float, metavar="S",
                     help="seconds between status log lines when stderr is not a terminal" + _d("status_interval"))
    gen.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="logging level" + _d("log_level"))
    gen.add_argument("--metrics-port", type=int, metavar="PORT",
                     help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)")
    gen.add_argument("--metrics-host", metavar="HOST", help="address /metrics listens on" + _d("metrics_host"))
    gen.add_argument("--version", action="version", version=f"edge-ad {__version__}")
    return parser


def bench_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edge-ad bench", allow_abbrev=False,
                     description="Measure a bundle: latency (median, p99 of single synchronous requests after "
                                 "warm-up) and throughput (asynchronous queue).")
    parser.add_argument("--model", "-m", required=True, metavar="BUNDLE", help="bundle folder")
    parser.add_argument("--device", default="CPU", metavar="DEV", help="OpenVINO device (default: CPU)")
    parser.add_argument("--mode", choices=MODES, default="latency", help="OpenVINO performance hint (default: latency)")
    parser.add_argument("--seconds", type=float, default=6.0, metavar="S",
                        help="total measuring time, split between latency and throughput (default: 6)")
    parser.add_argument("--requests", type=int, default=0, metavar="N",
                        help="requests in flight for throughput (default: OpenVINO's optimum, as edge-ad run)")
    parser.add_argument("--inference-precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning")
    return parser


def listen_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edge-ad listen", allow_abbrev=False,
                     description="Subscribe to a broker and print edge-ad alerts as they arrive.")
    parser.add_argument("--config", metavar="FILE", help="read mqtt_* options and topic_root from an edge-ad config file")
    parser.add_argument("--device", default="+", metavar="NAME", help="device name, '+' = all (default: +)")
    parser.add_argument("--camera", default="+", metavar="NAME", help="camera name, '+' = all (default: +)")
    parser.add_argument("--topic-root", default=None, metavar="ROOT", help="topic root (default: edge-ad)")
    parser.add_argument("--events", default="alert", metavar="LIST",
                        help="comma list of alert,clear,verdict,status,heartbeat, or 'all' (default: alert)")
    parser.add_argument("--count", type=int, metavar="N", help="exit after N messages")
    parser.add_argument("--timeout", type=float, metavar="S", help="exit after S seconds (exit 1 if --count not reached)")
    parser.add_argument("--json", action="store_true", help="print raw JSON lines (with their topic)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning")
    group = parser.add_argument_group("MQTT broker")
    _add_mqtt_connection(group)
    group.set_defaults(mqtt_host=None, mqtt_port=None, mqtt_client_id=None, mqtt_username=None,
                       mqtt_password_file=None, mqtt_tls=None, mqtt_ca=None, mqtt_cert=None, mqtt_key=None,
                       mqtt_keepalive=None, mqtt_retries=None, mqtt_retry_delay=None, mqtt_retry_max_delay=None,
                       mqtt_version=None)
    return parser


def teach_parser() -> argparse.ArgumentParser:
    from edge_ad.ops.teach import DEFAULT_FRAMES, MIN_FRAMES

    parser = _Parser(prog="edge-ad teach", allow_abbrev=False,
                     description="Teach-in on site: run the bundle over frames of normal parts and write new "
                                 "thresholds and normalization into bundle.json (the previous one is kept as "
                                 "bundle.json.vN; --revert restores it). Needs no torch.")
    parser.add_argument("--model", "-m", required=True, metavar="BUNDLE", help="bundle folder")
    src = parser.add_argument_group("frame source of normal parts (exactly one; not with --revert)")
    src.add_argument("--camera", type=int, metavar="N", help="OpenCV camera index")
    src.add_argument("--video", metavar="PATH_OR_URL", type=_no_url_password,
                     help="video file, or RTSP/HTTP stream URL (rtsp://USER@host/...; password: $EDGE_AD_VIDEO_PASSWORD)")
    src.add_argument("--images", metavar="DIR_OR_GLOB", help="folder or glob of still images")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES, metavar="N",
                        help="frames to collect (default: %(default)s)")
    parser.add_argument("--every", type=int, default=1, metavar="K",
                        help="use every K-th frame (a camera's consecutive frames often show the same part; "
                             "default: %(default)s)")
    parser.add_argument("--min-frames", type=int, default=MIN_FRAMES, metavar="N",
                        help="refuse fewer usable frames than this (default: %(default)s)")
    parser.add_argument("--target-fpr", type=float, default=0.01, metavar="P",
                        help="false-positive rate on normal parts the image threshold aims at (default: %(default)s)")
    parser.add_argument("--pixel-fpr", type=float, default=0.001, metavar="P",
                        help="pixel false-positive rate for defect regions (default: %(default)s)")
    parser.add_argument("--device", default="CPU", metavar="DEV", help="OpenVINO device (default: CPU)")
    parser.add_argument("--inference-precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)
    parser.add_argument("--dry-run", action="store_true", help="report the new thresholds, change nothing")
    parser.add_argument("--revert", action="store_true", help="restore the previous bundle.json (undo one teach-in)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    return parser


def cmd_teach(argv: list[str]) -> int:
    from edge_ad.ops.teach import TeachConfig, TeachError, revert, teach

    args = teach_parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.revert:
        if any(v is not None for v in (args.camera, args.video, args.images)):
            raise TeachError("--revert takes no frame source")
        print(f"restored {revert(args.model)}")
        return 0
    config = TeachConfig(model=args.model, camera=args.camera, video=args.video, images=args.images,
                         frames=args.frames, min_frames=args.min_frames, every=args.every, target_fpr=args.target_fpr,
                         pixel_fpr=args.pixel_fpr, device=args.device, inference_precision=args.inference_precision,
                         dry_run=args.dry_run)
    report = teach(config)
    print("\n".join(report.lines()))
    return 0


def cmd_run(argv: list[str]) -> int:
    parser = run_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    values = vars(parser.parse_args(argv))
    config_file = values.pop("config", None)
    print_config = values.pop("print_config", False)
    from edge_ad.ops.camera_config import has_cameras

    if has_cameras(config_file):
        return _run_cameras(values, config_file, print_config)
    config = build_config(values, config_file)
    setup_logging(config.log_level)
    if print_config:
        from edge_ad.sources.capture import redact_url

        shown = config.to_dict()
        shown["video"] = redact_url(shown["video"]) if shown["video"] else None
        print(json.dumps(shown, indent=2))
        return 0
    from edge_ad.app import run  # imports OpenVINO: only when actually running

    return run(config)


def _run_cameras(values: dict, config_file: str, print_config: bool) -> int:
    """A config file with a `cameras` list: every camera in this process (edge_ad/multicamera.py)."""
    from edge_ad.ops.camera_config import build_camera_configs
    from edge_ad.sources.capture import redact_url

    configs = build_camera_configs(values, config_file)
    setup_logging(configs[0].log_level)
    if print_config:
        print(json.dumps([{**c.to_dict(), "video": redact_url(c.video) if c.video else None} for c in configs],
                         indent=2))
        return 0
    from edge_ad.multicamera import run_cameras

    return run_cameras(configs)


def cmd_bench(argv: list[str]) -> int:
    args = bench_parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.seconds <= 0:
        raise UsageError("--seconds must be > 0")
    if args.requests < 0:
        raise UsageError("--requests must be >= 0")
    from edge_ad.ops.bench import benchmark, format_report, to_json

    result = benchmark(args.model, device=args.device, mode=args.mode, seconds=args.seconds, requests=args.requests,
                       precision=args.inference_precision)
    print(to_json(result) if args.json else format_report(result))
    return 0


def cmd_listen(argv: list[str]) -> int:
    from edge_ad.ops.config import RunConfig
    from edge_ad.ops.listen import EVENTS, listen
    from edge_ad.deliver.mqtt import MqttSettings

    args = listen_parser().parse_args(argv)
    setup_logging(args.log_level)
    merged = RunConfig()
    file_values = load_config_file(args.config) if args.config else {}
    for key, value in file_values.items():
        if key.startswith("mqtt_") or key == "topic_root":
            setattr(merged, key, value)
    for key, value in vars(args).items():
        if key.startswith("mqtt_") and value is not None:
            setattr(merged, key, value)
    if args.topic_root:
        merged.topic_root = args.topic_root
    if not merged.mqtt_host:
        raise UsageError("edge-ad listen needs --mqtt-host (or mqtt_host in --config)")
    events = EVENTS if args.events.strip() == "all" else tuple(e.strip() for e in args.events.split(",") if e.strip())
    unknown = [e for e in events if e not in EVENTS]
    if unknown or not events:
        raise UsageError(f"--events: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(EVENTS)} or all")
    if args.count is not None and args.count < 1:
        raise UsageError("--count must be >= 1")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be > 0")
    settings = MqttSettings(
        host=merged.mqtt_host, port=merged.port, client_id=merged.mqtt_client_id or f"edge-ad-listen-{os.getpid()}",
        username=merged.mqtt_username, password_file=merged.mqtt_password_file, tls=merged.tls_enabled,
        ca=merged.mqtt_ca, cert=merged.mqtt_cert, key=merged.mqtt_key, keepalive=merged.mqtt_keepalive,
        retries=merged.mqtt_retries, retry_delay=merged.mqtt_retry_delay,
        retry_max_delay=merged.mqtt_retry_max_delay, version=merged.mqtt_version,
    )
    from edge_ad.ops.credentials import warn_cleartext

    warn_cleartext(settings)
    try:
        listen(settings, root=merged.topic_root, device=args.device, camera=args.camera, events=events,
               count=args.count, timeout=args.timeout, as_json=args.json)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how an operator stops listening
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `edge-ad` and `python -m edge_ad`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    setup_logging("info")
    handlers = {"run": cmd_run, "bench": cmd_bench, "listen": cmd_listen, "teach": cmd_teach}
    try:
        return handlers[command](argv)
    except EdgeAdError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except BundleError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except KeyboardInterrupt:
        log.error("aborted")
        return 130
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:
        log.error("unexpected failure: %s: %s (rerun with --log-level debug for the traceback)",
                  type(exc).__name__, exc, exc_info=True)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
