#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the test suite (extra arguments go to its pytest), then the optional
# integrations' tests, each in a venv of its own: Ray (scripts/test_ray.sh), Meta-World (scripts/test_metaworld.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pytest -q "$@"
bash scripts/test_ray.sh
bash scripts/test_metaworld.sh
