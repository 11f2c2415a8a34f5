"""When a stream of per-frame decisions becomes an alert, and when it is all clear again.

One anomalous frame is noise; N anomalous frames among the last M is a defect.
After an alert, the same camera stays quiet for a cool-down (seconds of frame
time, or frames), so a defect that sits in view is not reported on every
frame; if it is still there after the cool-down it is reported again. After an
alert, `clear_after` consecutive normal frames produce one "all clear".
Pure logic: the caller passes frame timestamps, so tests are deterministic.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass


class Event(str, enum.Enum):
    ALERT = "alert"
    CLEAR = "clear"


_COOLDOWN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|secs|seconds?|ms|f|frames?)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Cooldown:
    """Quiet period after an alert: `seconds` of frame time, or `frames` source frames."""

    seconds: float = 0.0
    frames: int = 0

    @classmethod
    def parse(cls, text: str | float | int) -> "Cooldown":
        """'10', '10s', '2.5s', '500ms' -> seconds; '30f', '30 frames' -> frames."""
        match = _COOLDOWN.match(str(text))
        if not match:
            raise ValueError(f"cannot read {text!r}: use seconds ('10', '2.5s', '500ms') or frames ('30f')")
        number, unit = float(match.group(1)), (match.group(2) or "s").lower()
        if unit.startswith("f"):
            if number != int(number):
                raise ValueError(f"a number of frames must be whole, got {text!r}")
            return cls(frames=int(number))
        return cls(seconds=number / 1000.0 if unit == "ms" else number)

    def elapsed(self, since_time: float, since_frame: int, now_time: float, now_frame: int) -> bool:
        if self.frames:
            return now_frame - since_frame >= self.frames
        return now_time - since_time >= self.seconds

    def __str__(self) -> str:
        return f"{self.frames} frames" if self.frames else f"{self.seconds:g} s"


class AlertPolicy:
    """N-of-M alerting with cool-down and all-clear, for one camera."""

    def __init__(self, n: int = 3, m: int = 5, cooldown: Cooldown = Cooldown(), clear_after: int | None = None):
        if not 1 <= n <= m:
            raise ValueError(f"need 1 <= n <= m, got n={n}, m={m}")
        self.n, self.m = n, m
        self.cooldown = cooldown
        self.clear_after = clear_after if clear_after is not None else m
        if self.clear_after < 1:
            raise ValueError("clear_after must be >= 1")
        self._window: deque[bool] = deque(maxlen=m)
        self._normal_run = 0
        self._last_alert: tuple[float, int] | None = None
        self.active = False  # an alert was raised and no all-clear has followed yet

    @property
    def anomalous_in_window(self) -> int:
        return sum(self._window)

    def update(self, anomalous: bool, timestamp: float, frame_index: int) -> Event | None:
        """Feed one processed frame (in order); returns the event it causes, if any."""
        self._window.append(bool(anomalous))
        self._normal_run = 0 if anomalous else self._normal_run + 1
        if anomalous and self.anomalous_in_window >= self.n and self._cooled_down(timestamp, frame_index):
            self._last_alert = (timestamp, frame_index)
            self._window.clear()  # the next alert needs N fresh anomalous frames
            self.active = True
            return Event.ALERT
        if self.active and self._normal_run >= self.clear_after:
            self.active = False
            return Event.CLEAR
        return None

    def _cooled_down(self, timestamp: float, frame_index: int) -> bool:
        if self._last_alert is None:
            return True
        return self.cooldown.elapsed(*self._last_alert, timestamp, frame_index)
