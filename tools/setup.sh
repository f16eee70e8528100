#!/usr/bin/env bash
# Makes the project's environment on a fresh machine, and does nothing that is already done:
#   1. .venv with the pinned Python packages and the ROS 2 Jazzy wheels (redone when a requirements
#      file changes);
#   2. the interfaces in msg/ and srv/ built with colcon into install/ (redone when they change).
# Usage: tools/setup.sh   (from anywhere; works in the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
stamps=$root/.stamps
mkdir -p "$stamps"
python=${PYTHON:-python3}

fingerprint() { cat "$@" | sha256sum | cut -d' ' -f1; }

venv_key=$(fingerprint requirements.txt requirements-ros.txt constraints.txt)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamps/venv" 2>/dev/null)" != "$venv_key" ]; then
    echo "[setup] creating .venv (pinned packages; a few minutes the first time)"
    "$python" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -r requirements.txt -r requirements-ros.txt -c constraints.txt
    .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
    echo "$venv_key" > "$stamps/venv"
fi

tools/build_interfaces.sh
