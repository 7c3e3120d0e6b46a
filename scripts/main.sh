#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the main job on a quick default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
metarl families
metarl rollout --all --episodes 1
