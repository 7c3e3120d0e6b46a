#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the main job on a quick default: meta-train MAML-TRPO on
# PointNav2D (about 2 minutes on 2 cores) and evaluate it on the held-out test goals.
# Extra arguments are config overrides, e.g. `bash scripts/main.sh quick=false` for the full run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
metarl families
metarl train experiments/maml_trpo/point_nav_2d.yaml quick=true "$@"
