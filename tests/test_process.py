"""Importing metarl changes nothing process-wide (environment variables, torch's threads, matplotlib's backend);
metarl's thread settings apply where it runs work: the ``metarl`` command, training, evaluation, the sampler's
workers. Checked in fresh interpreters, where the order of imports matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MPLBACKEND")


def _python(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         cwd=ROOT, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_importing_metarl_changes_no_environment_variable_thread_setting_or_plotting_backend(tmp_path):
    code = f"""
import json, os, sys
import matplotlib, torch, threadpoolctl
env, threads, interop = dict(os.environ), torch.get_num_threads(), torch.get_num_interop_threads()
blas = [i["num_threads"] for i in threadpoolctl.threadpool_info()]
import metarl, metarl.api, metarl.sweep, metarl.bench, metarl.cli, metarl.training, metarl.evaluation, metarl.video
import metarl.agents.maml_trpo, metarl.agents.rl2, metarl.agents.pearl, metarl.sampling
from metarl.sweep import _plot, load_sweep
import yaml
path = {str(tmp_path / "sweep.yaml")!r}
open(path, "w").write(yaml.safe_dump({{"name": "s", "config": "experiments/maml_trpo/point_nav_2d.yaml",
                                        "params": {{"agent.inner_lr": [0.05, 0.1]}}}}))
sweep = load_sweep(path, out={str(tmp_path / "out")!r})
_plot(sweep, [("test", "agent.inner_lr", [("0.05", 1.0, 0.5, 1.5, 0.0, 1.0), ("0.1", 2.0, 1.5, 2.5, 0.0, 2.0)])],
      sweep.out / "sensitivity.png")
print(json.dumps({{"env_changed": sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)),
                   "threads": [threads, torch.get_num_threads(), interop, torch.get_num_interop_threads()],
                   "blas": [blas, [i["num_threads"] for i in threadpoolctl.threadpool_info()]],
                   "backend": matplotlib.get_backend(), "plotted": (sweep.out / "sensitivity.png").is_file()}}))
"""
    out = json.loads(_python(code, MPLBACKEND="svg"))
    assert out["env_changed"] == []
    assert out["threads"][0] == out["threads"][1] and out["threads"][2] == out["threads"][3]
    assert out["blas"][0] == out["blas"][1]
    assert out["backend"] == "svg" and out["plotted"]  # the sweep's plot drew on its own canvas


def test_the_metarl_command_makes_openmp_threads_sleep_unless_the_user_chose():
    """OMP_WAIT_POLICY=PASSIVE is set by the command before torch loads OpenMP (a shared machine otherwise
    collapses the update 4x); a value the user set is kept."""
    code = ("import os, sys; sys.argv = ['metarl', 'families']; from metarl.cli import main; main(); "
            "import torch; print(os.environ.get('OMP_WAIT_POLICY'))")
    assert _python(code) == "PASSIVE"
    assert _python(code, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    # imported by Python code that loaded torch first, it is too late for OpenMP: nothing is set
    code = "import torch, os; from metarl.system import sleeping_openmp_threads as s; print(s(), os.environ.get('OMP_WAIT_POLICY'))"
    assert _python(code) == "False None"


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenBLAS uses one thread on a one-core machine anyway")
def test_work_runs_on_one_openblas_thread_and_restores_the_users_setting():
    code = """
import threadpoolctl
from metarl.system import work_threads
def n(): return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["internal_api"] == "openblas"]
before = n()
with work_threads():
    inside = n()
print(before, inside, n())
"""
    before, inside, after = (json.loads(x) for x in _python(code).replace("] [", "]|[").split("|"))
    assert inside == [1] * len(before) and after == before and before and before[0] > 1
    # a value the user set wins
    assert _python(code, OPENBLAS_NUM_THREADS="2") == "[2] [2] [2]"


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenBLAS uses one thread on a one-core machine anyway")
def test_a_sampler_worker_process_runs_one_torch_and_one_openblas_thread():
    code = """
import threadpoolctl, torch
from metarl.sampling.local import prepare_worker
slots = prepare_worker("gym", "metarl/PointNav2D-v0", {})
print([i["num_threads"] for i in threadpoolctl.threadpool_info() if i["internal_api"] == "openblas"], torch.get_num_threads())
"""
    assert _python(code) == "[1] 1"
