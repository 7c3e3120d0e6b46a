#!/usr/bin/env bash
# The wheel as a user gets it: build it from the repository's files (tracked, or untracked and not ignored),
# install it with its dependencies into a fresh venv outside the repository, and from a folder outside the
# repository run `metarl --version`, `metarl families`, load every shipped config (quick=true) and suite, train
# each agent's shipped PointNav2D config (quick=true, 2 iterations) and the custom-agent example, evaluate one
# run, run cells of the shipped smoke suite, and load every zoo entry and adapt it. Nothing in the repository
# is written. About 3-4 minutes on 2 cores, most of it the install; scripts/test.sh runs it as its fourth suite.
#
#   PYTHON        interpreter that creates the venv (default: python3, >= 3.10).
#   METARL_TORCH  pip requirement for torch, as for scripts/setup.sh (default: torch==2.13.0, the CPU build,
#                 without an NVIDIA GPU).
#   KEEP=1        keep the temporary folder (printed) for a look afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/metarl-wheel.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "[wheel] keeping $work"; else trap 'rm -rf "$work"' EXIT; fi
start=$SECONDS
step() { echo "[wheel] $((SECONDS - start)) s: $*"; }
pip() {  # quiet, without the notes about this machine's local package folders
    "$work/venv/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

step "copying the repository's files to $work/src"
mkdir -p "$work/src" "$work/dist" "$work/elsewhere"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"
done | xargs -0 cp --parents -t "$work/src"

step "creating a fresh venv with $($PYTHON --version)"
"$PYTHON" -m venv "$work/venv"
py="$work/venv/bin/python"
pip install --quiet --upgrade pip

step "building the wheel (pip wheel, with the build-system requirements of pyproject.toml)"
pip wheel --quiet --no-deps -w "$work/dist" "$work/src"
wheel=$(ls "$work/dist"/metarl_robotics-*.whl)
step "built $(basename "$wheel")"

if [ -z "${METARL_TORCH:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then METARL_TORCH="torch>=2.3"; else METARL_TORCH="torch==2.13.0"; fi
fi
step "installing $METARL_TORCH, then the wheel and its dependencies"
pip install --quiet "$METARL_TORCH"
pip install --quiet "$wheel"

cd "$work/elsewhere"  # nothing of the repository on the path: the installed package and its data only
export PATH="$work/venv/bin:$PATH" MPLBACKEND=Agg
step "metarl --version; metarl families"
metarl --version
metarl families
"$py" - <<'EOF'
"""The installed package, not the repository, and every shipped config and suite loads from it."""
from pathlib import Path

import metarl
from metarl.bench import load_suite
from metarl.config import ConfigError, load_config, shipped

assert "site-packages" in metarl.__file__, metarl.__file__
configs = sorted(p for agent in ("maml_trpo", "rl2", "pearl", "custom_agent") for p in (shipped() / agent).glob("*.yaml"))
for path in configs:
    load_config(f"{path.parent.name}/{path.name}", ["quick=true"])
suites = sorted((shipped() / "benchmarks").glob("*.yaml"))
for path in suites:
    try:
        load_suite(f"benchmarks/{path.name}")
    except ConfigError as exc:  # the Meta-World suite without the extra: one line saying what to install
        assert path.name == "metaworld.yaml" and "metarl-robotics[metaworld]" in str(exc), exc
print(f"[wheel] {len(configs)} shipped configs and {len(suites)} suites load from {shipped()}")
assert len(configs) >= 30 and not Path("experiments").exists()
EOF
for agent in maml_trpo rl2 pearl; do
    step "metarl train $agent/point_nav_2d.yaml quick=true iterations=2"
    metarl train "$agent/point_nav_2d.yaml" quick=true iterations=2 --run-dir "runs/$agent" --quiet
    test -f "runs/$agent/eval/test/summary.json"
done
step "metarl train custom_agent/fomaml_point_nav_2d.yaml quick=true iterations=2 (the agent in a file beside it)"
metarl train custom_agent/fomaml_point_nav_2d.yaml quick=true iterations=2 --run-dir runs/fomaml --quiet
test -f runs/fomaml/eval/test/summary.json
step "metarl eval runs/rl2 --tasks 2"
metarl eval runs/rl2 --tasks 2 --steps 1 --episodes 1
test -f runs/rl2/eval/test/adaptation_curve.png
step "metarl bench benchmarks/smoke.yaml, its MAML-TRPO, random and oracle cells"
metarl bench benchmarks/smoke.yaml --out bench --only '*/maml_trpo/*' --only '*/random/*' --only '*/oracle/*' --quiet
test -f bench/report.md
step "metarl zoo; every entry loads from the installed package and adapts (one short episode)"
metarl zoo
"$py" - <<'EOF'
import numpy as np

import metarl
import metarl.api as mrl
from metarl import zoo

names = zoo.names()
assert len(names) >= 6 and all("site-packages" in str(zoo.find("zoo:" + n).folder) for n in names), names
runnable = [n for n in names if not zoo.find("zoo:" + n).missing()]  # an entry of an extra not installed here: skipped
assert len(runnable) >= 6, runnable
for name in runnable:
    with mrl.load(f"zoo:{name}") as learner:
        env = metarl.make_family(learner.config.env, **learner.config.env_kwargs)
        policy = learner.adapt(env, steps=1, episodes=1, horizon=5)
        obs, _ = env.reset(seed=0)
        assert np.isfinite(policy.predict(obs, deterministic=True)).all(), name
        env.close()
print(f"[wheel] {len(runnable)} zoo entries load and adapt ({len(names) - len(runnable)} need an extra not installed here)")
EOF
step "passed"
