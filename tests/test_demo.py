"""The demo's own test: scripts/demo.py end to end on generated data, alert counts asserted.

The demo trains STFPM, exports, quantizes to INT8, teaches in on normal parts of the line (edge-ad
teach), plays the production-line video through edge-ad into a real mosquitto and inspects a
station's image folder part by part. What must hold on any x86 CPU: exactly one alert per defective
stretch and none on normal frames; NOK for exactly the defective parts. The README's settings: about
1 to 4 minutes (2.5 min of CPU) on 2 shared cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime_helpers import MOSQUITTO, REPO

pytestmark = pytest.mark.slow


def test_demo_one_alert_per_defective_stretch_none_on_normal_frames(tmp_path):
    if MOSQUITTO is None:
        pytest.skip("mosquitto broker binary not installed (the demo then uses JSON lines)")
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "scripts/demo.py", "--out", str(out)],  # the README's settings
        cwd=REPO, capture_output=True, text=True, timeout=1500,
    )
    summary_path = out / "summary.json"
    assert summary_path.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["alerts_per_stretch"] == [1] * summary["stretches"] and summary["stretches"] == 2, summary
    assert summary["alerts_on_normal_frames"] == 0, summary
    assert summary["parts"] == 20 and summary["nok_defective"] == summary["defective_parts"] == 10, summary
    assert summary["nok_good"] == 0, summary
    assert result.returncode == 0, result.stdout[-3000:]
    bundle = json.loads((out / "bundles" / "int8" / "bundle.json").read_text())
    assert bundle["thresholds"]["source"].startswith("teach-in: ") and "line_normal.avi" in bundle["thresholds"]["source"]
    assert (out / "bundles" / "int8" / "bundle.json.v1").exists()  # the quantizer's thresholds, kept
