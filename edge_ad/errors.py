"""Errors the operator sees as one line, each carrying the process exit code.

2 = bad configuration, which restarting cannot fix (options, config file,
bundle, a video file that is not there, credentials the broker rejects);
1 = anything time can cure (a camera or stream still missing after the
start-up retries, a broker unreachable or refusing for its own reasons, a
locked or full outbox, inference errors). The systemd unit restarts on 1,
never on 2 (RestartPreventExitStatus=2).
"""

from __future__ import annotations

EXIT_RUNTIME = 1
EXIT_USAGE = 2


class EdgeAdError(Exception):
    """Base for expected failures: shown as `edge-ad: error: <message>`, no traceback."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(EdgeAdError):
    """The operator asked for something impossible: fix the command line or config."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A config file or option value that cannot be used."""


class SourceError(EdgeAdError):
    """A camera, stream, video or image folder that cannot deliver frames."""


class BrokerError(EdgeAdError):
    """The MQTT broker cannot be reached or refused the connection."""


class InferenceError(EdgeAdError):
    """OpenVINO could not load, compile or run the model."""
