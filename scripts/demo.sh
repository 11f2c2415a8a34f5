#!/usr/bin/env bash
# The README's main job: set up, then train -> export -> INT8 -> teach-in -> edge-ad -> MQTT alerts and per-part verdicts on generated data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
