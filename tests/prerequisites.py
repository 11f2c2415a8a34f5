"""Test prerequisites that CI must not silently lose: EDGE_AD_REQUIRE=mosquitto,mvtec.

Without the switch a test whose prerequisite is missing is skipped (a laptop without
mosquitto still runs the rest). With it (set by .ci/run) the same test fails, naming
what is missing, so a CI image that lost mosquitto or the MVTec data cannot go green
by skipping the very tests that prove "no alert lost".
"""

from __future__ import annotations

import os

import pytest

KNOWN = {
    "mosquitto": "the mosquitto broker and its tools (apt-get install mosquitto mosquitto-clients openssl)",
    "mvtec": "the real MVTec AD data (../shared/data/mvtec_ad or $EDGE_AD_MVTEC_ROOT)",
    "opcua": 'the asyncua package (pip install "edge-ad[opcua]"; scripts/setup.sh installs it)',
    "browser": "headless Chromium, its WebDriver and Selenium (apt-get install chromium chromium-driver; "
               'pip install selenium, in the [dev] extra)',
}
ENV = "EDGE_AD_REQUIRE"


def required() -> set[str]:
    """The names in $EDGE_AD_REQUIRE; a name not in KNOWN is a usage error (a typo would disable the check)."""
    names = {n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()}
    unknown = sorted(names - set(KNOWN))
    if unknown:
        raise pytest.UsageError(f"{ENV}: unknown prerequisite(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN))}")
    return names


def missing(name: str, reason: str) -> None:
    """A test cannot run because prerequisite `name` is missing: skip it, or fail when $EDGE_AD_REQUIRE names it."""
    assert name in KNOWN, name
    if name in required():
        pytest.fail(f"{reason}; {ENV}={os.environ[ENV]} requires {KNOWN[name]}", pytrace=False)
    pytest.skip(reason)
