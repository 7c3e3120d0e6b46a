#!/usr/bin/env bash
# Install metarl into ./.venv (created when missing; see METARL_VENV). Safe to run again; it only adds what is missing.
#
#   METARL_TORCH   pip requirement for torch (default: the CPU build "torch==2.13.0" on machines
#                  without an NVIDIA GPU, else "torch>=2.3", which pip resolves to a CUDA build).
#   PYTHON         interpreter that creates the venv (default: python3, >= 3.10).
#   METARL_VENV    the venv's folder (default: .venv); the optional integrations' tests use their own
#                  (.venv-ray, .venv-metaworld), so the base install stays light.
#   METARL_EXTRAS  the extras installed with metarl (default: dev,docs).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${METARL_VENV:-.venv}
EXTRAS=${METARL_EXTRAS:-dev,docs}
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip

if ! python -c "import torch" >/dev/null 2>&1; then
    if [ -z "${METARL_TORCH:-}" ]; then
        if command -v nvidia-smi >/dev/null 2>&1; then METARL_TORCH="torch>=2.3"; else METARL_TORCH="torch==2.13.0"; fi
    fi
    echo "[setup] installing $METARL_TORCH"
    python -m pip install --quiet "$METARL_TORCH"
fi

# The distribution is metarl-robotics; a distribution named "metarl" (this project's former name, or the unrelated
# project of that name on the public index) would provide the same import name: remove it first.
if python -m pip show metarl >/dev/null 2>&1; then
    echo "[setup] removing the installed distribution 'metarl' (it claims the import name metarl; this project installs as metarl-robotics)"
    python -m pip uninstall --quiet --yes metarl
fi
echo "[setup] installing metarl (distribution metarl-robotics) and its dependencies"
python -m pip install --quiet -e ".[$EXTRAS]"  # docs: tests/test_docs.py builds the site
python -c "import metarl, torch, mujoco, gymnasium; print(f'[setup] metarl {metarl.__version__}, torch {torch.__version__}, mujoco {mujoco.__version__}, gymnasium {gymnasium.__version__}')"
