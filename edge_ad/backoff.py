"""The one retry schedule of edge-ad: cameras, streams, broker connections and refused deliveries.

Delays double from `initial` up to `maximum`, each multiplied by a random 0.5..1:
a plant full of devices whose broker (or NVR) just came back does not hammer it
in lock-step. The loops that wait stay with their callers, because each one
reports its state between attempts and waits on its own stop event.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

_rng = random.Random()


@dataclass(frozen=True)
class Backoff:
    """`retries` more attempts after the first; delay n (0-based) is min(maximum, initial * 2^n) * U(0.5, 1)."""

    retries: int = 10
    initial: float = 1.0
    maximum: float = 30.0

    def delay(self, attempt: int) -> float:
        """Delay before retry `attempt` (0-based), jittered; never more than `maximum`, even after years."""
        base = min(self.maximum, self.initial * (2.0 ** min(max(attempt, 0), 60)))
        return base * _rng.uniform(0.5, 1.0)

    def delays(self) -> Iterator[float]:
        """The delays of all `retries` retries, in order."""
        for attempt in range(self.retries):
            yield self.delay(attempt)
