#!/usr/bin/env bash
# Install metarl into ./.venv (created when missing; see METARL_VENV). Safe to run again; it only adds what is missing.
#
#   METARL_TORCH   pip requirement for torch (default: the CPU build "torch==2.13.0" on machines
#                  without an NVIDIA GPU, else "torch>=2.3", which pip resolves to a CUDA build).
#   PYTHON         interpreter that creates the venv (default: python3, >= 3.10).
#   METARL_VENV    the venv's folder (default: .venv); the optional integrations' tests use their own
#                  (.venv-ray, .venv-metaworld), so the base install stays light.
#   METARL_EXTRAS  the extras installed with metarl (default: dev,docs).
#
# Last, it checks that MuJoCo can render off-screen (videos: metarl eval --video) through EGL or OSMesa; where
# neither works and it runs as root with apt-get, it installs their Debian/Ubuntu packages, else it says which
# to install (the video test that needs them is skipped until then). It never fails for want of them.
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

# Off-screen OpenGL for MuJoCo's renderer (metarl.video.probe_gl: a context made in a fresh interpreter).
gl_works() { python -c "import sys; from metarl.video import probe_gl; sys.exit(probe_gl(sys.argv[1]) is not None)" "$1"; }
gl_report() {
    if gl_works egl; then echo "[setup] off-screen rendering: EGL works (MUJOCO_GL=egl, the default without a display)"
    elif gl_works osmesa; then echo "[setup] off-screen rendering: OSMesa works, EGL does not: set MUJOCO_GL=osmesa for videos"
    else return 1; fi
}
if ! gl_report; then
    packages="libegl1 libegl-mesa0 libosmesa6"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] no off-screen OpenGL for MuJoCo: installing $packages with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq $packages >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $packages >/dev/null 2>&1; } \
            || echo "[setup] apt-get could not install $packages"
        gl_report || echo "[setup] off-screen rendering still fails: videos of MuJoCo envs cannot be made here and their test is skipped"
    else
        echo "[setup] no off-screen OpenGL for MuJoCo: videos of MuJoCo envs (metarl eval --video) cannot be made and their" \
             "test is skipped; install EGL (Debian/Ubuntu: sudo apt-get install libegl1 libegl-mesa0) or OSMesa (libosmesa6, then MUJOCO_GL=osmesa)"
    fi
fi
