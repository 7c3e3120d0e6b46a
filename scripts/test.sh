#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the four test suites, each whatever the others gave: the base suite in
# .venv (extra arguments go to its pytest), Ray's (scripts/test_ray.sh, .venv-ray), Meta-World's
# (scripts/test_metaworld.sh, .venv-metaworld) and the wheel's (scripts/test_wheel.sh: the built wheel installed
# into a fresh venv outside the repository and run from another folder). Ends with one line per suite and exits
# non-zero if any failed.
#
#   METARL_TEST_THREADS  also run the base suite again with that many threads for torch, OpenMP, MKL and
#                        OpenBLAS (e.g. 1; CI sets it), so that no result hangs on one thread setting; the files
#                        whose checks compare a run with itself or test plumbing (docs, reliability, learning.py,
#                        manifest, provenance, config headers, process settings, a user's own agent and env
#                        through every command, bench reports, the zoo's entries, videos, sweep files) run
#                        once, in the first run; the agents' numerics, the samplers and the envs run in both.
#   METARL_TEST_WORKERS  pytest-xdist workers for the base and Meta-World suites (default: auto, one per core;
#                        0 runs them in this process)
set -uo pipefail
cd "$(dirname "$0")/.."

summary=()
failed=0
suite() {  # suite NAME COMMAND...: run it, time it, record how it ended
    local name=$1 start=$SECONDS
    shift
    echo "[test] $name"
    if "$@"; then
        summary+=("$name: passed ($((SECONDS - start)) s)")
    else
        summary+=("$name: FAILED, exit $? ($((SECONDS - start)) s)")
        failed=1
    fi
}
export METARL_TEST_WORKERS=${METARL_TEST_WORKERS:-auto}
base() {  # the base suite, optionally pinned to a thread count (OMP_NUM_THREADS also sets torch's)
    local threads=$1
    shift
    if [ -n "$threads" ]; then
        env OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads" OPENBLAS_NUM_THREADS="$threads" \
            .venv/bin/python -m pytest -q -p no:cacheprovider -n "$METARL_TEST_WORKERS" "$@"
    else
        .venv/bin/python -m pytest -q -n "$METARL_TEST_WORKERS" "$@"
    fi
}

if bash scripts/setup.sh; then
    suite "base suite" base "" "$@"
    if [ -n "${METARL_TEST_THREADS:-}" ]; then
        suite "base suite, ${METARL_TEST_THREADS} thread(s)" base "$METARL_TEST_THREADS" \
            --ignore=tests/test_docs.py --ignore=tests/test_reliability.py --ignore=tests/test_learning.py \
            --ignore=tests/test_manifest.py --ignore=tests/test_provenance.py --ignore=tests/test_config_headers.py \
            --ignore=tests/test_process.py --ignore=tests/test_custom_agent.py --ignore=tests/test_custom_env.py \
            --ignore=tests/test_bench.py --ignore=tests/test_zoo.py --ignore=tests/test_video.py \
            --ignore=tests/test_sweep.py "$@"
    fi
else
    summary+=("base suite: not run, the install (scripts/setup.sh) failed")
    failed=1
fi
suite "Ray suite" bash scripts/test_ray.sh
suite "Meta-World suite" bash scripts/test_metaworld.sh
suite "wheel suite" bash scripts/test_wheel.sh

echo "[test] summary"
for line in "${summary[@]}"; do
    echo "[test]   $line"
done
exit "$failed"
