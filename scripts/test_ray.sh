#!/usr/bin/env bash
# The Ray integration's tests (tests/test_ray*.py) in a venv of their own, .venv-ray (the dev and ray extras), so the
# base install stays light; in the base venv those tests skip. The tests start a two-node Ray cluster on the
# loopback address (the `cluster` fixture in tests/test_ray.py) and stop it afterwards. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
METARL_VENV=.venv-ray METARL_EXTRAS=dev,ray bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv-ray/bin/activate
python -m pytest -q -p no:cacheprovider tests/test_ray.py "$@"
