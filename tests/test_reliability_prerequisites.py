"""Checks that cannot be skipped: EDGE_AD_REQUIRE turns a missing prerequisite into a failure (CI sets it in
.ci/run), and a broker that does not (re)start is an error, never a skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prerequisites import missing
from runtime_helpers import MOSQUITTO, REPO, Broker, BrokerStartError

from benchmarks.broker import Mosquitto

PROBE = '''
import sys
sys.path.insert(0, {tests!r})
from prerequisites import missing

def test_needs_a_broker():
    missing("mosquitto", "mosquitto broker binary not installed")
'''


def _pytest(tmp_path: Path, require: str | None) -> subprocess.CompletedProcess:
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE.format(tests=str(REPO / "tests")))
    env = {k: v for k, v in os.environ.items() if k != "EDGE_AD_REQUIRE"}
    if require is not None:
        env["EDGE_AD_REQUIRE"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(probe)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


def test_a_missing_prerequisite_is_a_skip_without_the_switch(tmp_path):
    proc = _pytest(tmp_path, None)
    assert proc.returncode == 0 and "1 skipped" in proc.stdout, proc.stdout


def test_a_missing_prerequisite_named_in_edge_ad_require_is_a_failure(tmp_path):
    proc = _pytest(tmp_path, "mosquitto,mvtec")
    assert proc.returncode == 1 and "1 failed" in proc.stdout, proc.stdout
    assert "mosquitto broker binary not installed; EDGE_AD_REQUIRE=mosquitto,mvtec requires the mosquitto" \
        in proc.stdout


def test_a_prerequisite_not_named_stays_a_skip(tmp_path):
    proc = _pytest(tmp_path, "mvtec")
    assert proc.returncode == 0 and "1 skipped" in proc.stdout, proc.stdout


def test_a_typo_in_edge_ad_require_is_refused(tmp_path):
    proc = _pytest(tmp_path, "mosquito")
    assert proc.returncode != 0 and "unknown prerequisite(s) mosquito" in proc.stdout + proc.stderr


def test_ci_sets_the_switch_before_running_the_tests():
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    export = next(i for i, line in enumerate(lines) if line.startswith("export EDGE_AD_REQUIRE="))
    assert "mosquitto,mvtec" in lines[export]
    assert export < next(i for i, line in enumerate(lines) if "scripts/test.sh" in line)


def test_tests_and_benchmarks_share_one_broker_launcher():
    assert Broker is Mosquitto
    for script in ("benchmarks/soak.py", "benchmarks/pipeline_fps.py", "scripts/demo.py"):
        text = (REPO / script).read_text()
        assert "from benchmarks.broker import" in text, script
        assert "runtime_helpers" not in text and "mosquitto.conf" not in text, script  # no launcher of its own


def test_a_broker_that_does_not_start_raises_instead_of_skipping(tmp_path):
    if MOSQUITTO is None:
        missing("mosquitto", "needs the mosquitto binary to start a misconfigured one")
    broker = Broker(tmp_path, extra="no_such_option 1\n")
    with pytest.raises(BrokerStartError, match="did not start on port"):
        broker.start()
    assert broker.proc is None
