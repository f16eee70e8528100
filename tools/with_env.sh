#!/usr/bin/env bash
# Runs a command inside the project's environment: .venv, the built interfaces (install/), ROS
# discovery kept on this machine, logs under a temporary folder, no model hub.
set -eo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck disable=SC1091
source "$root/.venv/bin/activate"
set +u
# shellcheck disable=SC1091
source "$root/install/setup.bash"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( 1 + RANDOM % 100 ))}
export ROS_LOG_DIR=${ROS_LOG_DIR:-${TMPDIR:-/tmp}/lisa_ros_logs}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONUNBUFFERED=1
exec "$@"
