"""The sampler's Ray placement and ``metarl bench --ray`` on a real two-node Ray cluster on this machine.

The module's fixture starts a head (``ray start --head``) and a worker node (``ray start --address``) on the
loopback address, one CPU each, with small object stores, in a process group of their own, and stops exactly
those processes afterwards. Needs ``pip install -e ".[ray]"`` (scripts/test_ray.sh runs these tests in
.venv-ray); elsewhere they skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ray = pytest.importorskip("ray")

from metarl.policies import GaussianActor, GaussianMLPPolicy  # noqa: E402
from metarl.sampling import Sampler, WorkerError, make_sampler  # noqa: E402

STORE = str(100 * 1024 * 1024)  # object store bytes per node: the machine is small and shared


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A loopback test cluster without Ray's token authentication, whatever ~/.ray/auth_token holds (Ray >= 2.5x
# turns it on for a cluster once a token exists there); set for the nodes, the probes and this driver alike.
AUTH = {"RAY_AUTH_MODE": "disabled"}


def _ray_start(*args: str, log: Path) -> subprocess.Popen:
    """``ray start ... --block`` in a new session: stopping its process group stops that node and its workers."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    return subprocess.Popen([ray_bin, "start", "--block", "--num-cpus=1", f"--object-store-memory={STORE}",
                             "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **AUTH})


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            time.sleep(1)  # the group's other processes (raylet, workers) go with their leader's signal
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of the group still there
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def cluster():
    """The address of a two-node cluster (head + worker, one CPU each), this process connected as the driver."""
    saved = {k: os.environ.get(k) for k in AUTH}
    os.environ.update(AUTH)
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    port = _free_port()
    address = f"127.0.0.1:{port}"
    procs = [_ray_start("--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false",
                        log=temp / "head.log")]
    try:
        deadline = time.monotonic() + 90
        while True:  # the worker node joins once the head's GCS answers
            time.sleep(2)
            if procs[0].poll() is not None:
                pytest.fail(f"ray start --head exited: {(temp / 'head.log').read_text()[-2000:]}")
            if len(procs) == 1:
                probe = subprocess.run([str(Path(sys.executable).with_name("ray")), "health-check",
                                        f"--address={address}"], capture_output=True, env={**os.environ, **AUTH})
                if probe.returncode == 0:
                    procs.append(_ray_start(f"--address={address}", log=temp / "worker.log"))
            if len(procs) == 2:
                ray.init(address=address, logging_level="WARNING", log_to_driver=False)
                while time.monotonic() < deadline and len([n for n in ray.nodes() if n["Alive"]]) < 2:
                    time.sleep(1)
                assert len([n for n in ray.nodes() if n["Alive"]]) == 2, "the worker node did not join"
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not come up: {(temp / 'head.log').read_text()[-2000:]}")
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _actor(obs_dim: int, act_dim: int, seed: int = 7) -> GaussianActor:
    torch.manual_seed(3)
    policy = GaussianMLPPolicy(obs_dim, act_dim, (16,), init_std=1.0)
    return GaussianActor(policy.config, policy.params(), seed=seed)


def _same(a, b) -> None:
    for name in ("observations", "actions", "rewards", "mask", "terminated", "truncated"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


CASES = {"gymnasium": ("metarl/PointNav2D-v0", {}, 2, 2), "native": ("metarl/HalfCheetahVel-v0",
                                                                      {"max_episode_steps": 40}, 17, 6)}


@pytest.mark.parametrize("backend", sorted(CASES))
def test_a_batch_on_ray_equals_the_local_batch(cluster, backend):
    env_id, kwargs, obs_dim, act_dim = CASES[backend]
    with Sampler(env_id, kwargs, workers=0, backend=backend) as local:
        tasks = local.family.sample_tasks(5, "train", seed=1)
        expected = local.sample(_actor(obs_dim, act_dim), tasks, 3, seed=11)
        expected_again = local.sample(_actor(obs_dim, act_dim, seed=8), tasks[1:], 3, seed=12)
    with make_sampler(env_id, kwargs, backend, placement="ray", timeout=120) as s:
        assert s.workers == 2 and s.backend == backend  # the cluster's two CPUs, one actor each
        where = s.placement()
        assert os.getpid() not in [w["pid"] for w in where]
        assert len({w["node"] for w in where}) == 2  # SPREAD: one actor on each node
        got = s.sample(_actor(obs_dim, act_dim), tasks, 3, seed=11)
        _same(got, expected)
        # a second call on the same actors, with other tasks, noise and env seeds
        _same(s.sample(_actor(obs_dim, act_dim, seed=8), tasks[1:], 3, seed=12), expected_again)


def test_a_killed_actor_has_its_chunk_rerun_and_the_batch_is_unchanged(cluster, tmp_path, monkeypatch):
    env_id, kwargs, obs_dim, act_dim = CASES["gymnasium"]
    with Sampler(env_id, kwargs, workers=0) as local:
        tasks = local.family.sample_tasks(4, "train", seed=2)
        expected = local.sample(_actor(obs_dim, act_dim), tasks, 2, seed=5)
    # one actor kills itself (SIGKILL) inside the call, before its rollout; the first to claim the file
    monkeypatch.setenv("METARL_FAULT", "ray_actor")
    monkeypatch.setenv("METARL_FAULT_ONCE", str(tmp_path / "fault"))
    with make_sampler(env_id, kwargs, "gymnasium", placement="ray", retries=2, timeout=120) as s:
        got = s.sample(_actor(obs_dim, act_dim), tasks, 2, seed=5)
        assert (tmp_path / "fault").exists() and s.restarts == 1
        _same(got, expected)
        # an actor killed from outside between calls (as a lost node would be): the next call reruns its chunk
        os.kill(s.placement()[1]["pid"], signal.SIGKILL)
        time.sleep(1)
        got = s.sample(_actor(obs_dim, act_dim), tasks, 2, seed=5)
        assert s.restarts == 2
        _same(got, expected)


def test_repeated_failures_end_in_one_clear_error(cluster, monkeypatch):
    env_id, kwargs, obs_dim, act_dim = CASES["gymnasium"]
    monkeypatch.setenv("METARL_FAULT", "ray_actor")  # every actor dies at its first rollout
    with make_sampler(env_id, kwargs, "gymnasium", placement="ray", retries=1, timeout=120) as s:
        tasks = s.family.sample_tasks(2, "train", seed=2)
        start = time.monotonic()
        with pytest.raises(WorkerError, match=r"failed on 2 actors in a row \(sampler.retries = 1\)"):
            s.sample(_actor(obs_dim, act_dim), tasks, 2, seed=5)
        assert time.monotonic() - start < 100


def test_a_call_that_cannot_be_placed_times_out_instead_of_hanging(cluster):
    env_id, kwargs, obs_dim, act_dim = CASES["gymnasium"]
    # no node has 4 CPUs: Ray would keep the actors pending forever
    with make_sampler(env_id, kwargs, "gymnasium", workers=1, placement="ray", cpus_per_actor=4, timeout=5) as s:
        tasks = s.family.sample_tasks(2, "train", seed=2)
        with pytest.raises(WorkerError, match=r"did not come back within sampler.timeout = 5 s; each actor asks "
                                              r"for 4 CPUs \(sampler.cpus_per_actor\) and the cluster has 2"):
            s.sample(_actor(obs_dim, act_dim), tasks, 2, seed=5)


def test_an_actors_default_slot_bound_counts_the_actors_its_cores_fit(cluster, monkeypatch):
    """A family that declares large envs is bounded per actor as if its node were this machine holding as many
    actors as its cores fit at cpus_per_actor each: two CPUs an actor, half as many actors, twice the slots."""
    from metarl.sampling import default_max_slots

    env_id, kwargs, _, _ = CASES["gymnasium"]
    with Sampler(env_id, kwargs, workers=0) as local:
        family = type(local.family)
    monkeypatch.setattr(family, "slot_memory_mb", 45.0)
    cores = os.cpu_count() or 1
    for cpus_per_actor in (1.0, 2.0):
        with make_sampler(env_id, kwargs, "gymnasium", workers=1, placement="ray",
                          cpus_per_actor=cpus_per_actor, timeout=30) as s:
            assert s.max_slots == default_max_slots(s.family, max(1, int(cores // cpus_per_actor)))
    if cores >= 2:
        assert default_max_slots(s.family, cores // 2) > default_max_slots(s.family, cores)


def _train(tmp_path: Path, name: str, *flags: str) -> list[dict]:
    from metarl.cli import main

    run_dir = tmp_path / name
    assert main(["train", "experiments/maml_trpo/point_nav_2d.yaml", "iterations=2", "agent.tasks_per_batch=4",
                 "agent.episodes_per_task=2", "agent.hidden=[16]", "eval.every=0", "eval.tasks=4", "eval.episodes=2",
                 "eval.steps=1", "sampler.workers=2", "--run-dir", str(run_dir), "--quiet", *flags]) == 0
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in lines]


def test_a_training_run_on_ray_gives_the_local_metrics(cluster, tmp_path):
    local = _train(tmp_path, "local")
    on_ray = _train(tmp_path, "ray", "--address", cluster)
    assert len(local) == 2 and on_ray == local
    stored = yaml.safe_load((tmp_path / "ray" / "config.yaml").read_text())
    assert stored["sampler"]["placement"] == "ray" and stored["sampler"]["address"] == cluster
    # real updates: every TRPO step was accepted and lowered the surrogate loss
    assert all(m["loss/line_search_accepted"] == 1 and m["loss/surrogate_after"] < m["loss/surrogate_before"]
               for m in local)
    # the local run continues on the cluster (placement settings may change on --resume), the Ray run on Ray
    from metarl.cli import main

    for name, flags in (("local", ["--address", cluster]), ("ray", [])):
        assert main(["train", "--resume", str(tmp_path / name), "iterations=3", "--quiet", *flags]) == 0
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("local", "ray")}
    assert len(rows["local"]) == 3
    assert [{k: v for k, v in m.items() if not k.startswith("time/")} for m in rows["local"]] == \
        [{k: v for k, v in m.items() if not k.startswith("time/")} for m in rows["ray"]]
    # a run trained on the cluster loads (to evaluate, to deploy) with the local sampler
    import metarl.api as mrl

    with mrl.load(tmp_path / "ray") as learner:
        assert learner.config.sampler.placement == "local" and type(learner.agent.sampler).__name__ == "Sampler"


def test_a_bench_suite_on_ray_gives_the_local_report(cluster, tmp_path, capsys):
    from metarl.cli import main

    suite = {"name": "tiny", "seeds": [0, 1], "eval": {"tasks": 2, "steps": 1, "episodes": 2},
             "families": {"PointNav2D": {}},
             "methods": {"maml_trpo": {"overrides": ["iterations=2", "agent.tasks_per_batch=3", "agent.episodes_per_task=2",
                                                     "agent.hidden=[8]", "sampler.workers=0"]},
                         "random": {}}}
    reports = {}
    for where in ("local", "ray"):
        path = tmp_path / f"{where}.yaml"
        path.write_text(yaml.safe_dump({**suite, "out": str(tmp_path / where)}))
        assert main(["bench", str(path), "--quiet", *(["--address", cluster] if where == "ray" else [])]) == 0
        reports[where] = json.loads((tmp_path / where / "results.json").read_text())
    assert "on Ray (2 CPUs, 1 per cell): 4 cells, 0 finished already" in capsys.readouterr().out

    def numbers(value):  # the figures, without the timings and provenance (where and when each cell ran)
        if isinstance(value, dict):
            return {k: numbers(v) for k, v in value.items() if k not in ("wall_time_s", "provenance")}
        return [numbers(v) for v in value] if isinstance(value, list) else value

    assert numbers(reports["ray"]) == numbers(reports["local"])
    # each cell's provenance names the driver's command, not the Ray worker's
    for row in reports["ray"]:
        for cell in row["cells"]:
            assert cell["provenance"]["command"] == f"metarl bench {tmp_path / 'ray.yaml'} --quiet --address {cluster}"
    assert len(list((tmp_path / "ray").glob("cells/*/*/*/cell.json"))) == 4
    assert (tmp_path / "ray" / "cells" / "PointNav2D" / "maml_trpo" / "seed1" / "run" / "checkpoints").is_dir()
    # resumable as without Ray: a finished cell is kept, a removed one reruns (on the cluster) to the same numbers
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").glob("cells/*/*/*/cell.json")}
    removed = [tmp_path / "ray" / "cells" / "PointNav2D" / method / "seed1" for method in ("random", "maml_trpo")]
    for folder in removed:
        shutil.rmtree(folder)
    # --only: just the matching cell reruns
    assert main(["bench", str(tmp_path / "ray.yaml"), "--quiet", "--ray", "--only", "*/random/*"]) == 0
    out = capsys.readouterr().out
    assert "4 cells, 2 finished already, 1 to run by --only" in out and "[1/1] PointNav2D/random/seed1 done" in out
    assert (removed[0] / "cell.json").is_file() and not (removed[1] / "cell.json").exists()
    assert main(["bench", str(tmp_path / "ray.yaml"), "--quiet", "--ray"]) == 0
    assert "4 cells, 3 finished already" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if not set(removed) & set(p.parents))
    assert numbers(json.loads((tmp_path / "ray" / "results.json").read_text())) == numbers(reports["local"])


def test_bad_ray_settings_are_one_clear_line(tmp_path):
    from metarl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="sampler.placement: expected 'local' or 'ray', got 'cluster'"):
        load_config("experiments/maml_trpo/point_nav_2d.yaml", ["sampler.placement=cluster"])
    with pytest.raises(ConfigError, match="sampler.cpus_per_actor: expected a number > 0"):
        load_config("experiments/maml_trpo/point_nav_2d.yaml", ["sampler.placement=ray", "sampler.cpus_per_actor=0"])
    np.testing.assert_equal(load_config("experiments/maml_trpo/point_nav_2d.yaml", []).to_dict()["sampler"],
                            {"backend": "auto", "workers": None})  # a local config is written as before


def test_a_sweep_on_ray_scores_each_trial_by_the_protocol_and_resumes(cluster, tmp_path, capsys):
    from metarl.cli import main

    sweep = {"name": "tiny", "config": str(Path("experiments/maml_trpo/point_nav_2d.yaml").resolve()),
             "out": str(tmp_path / "out"), "seeds": [0],
             "overrides": ["iterations=1", "agent.tasks_per_batch=2", "agent.episodes_per_task=2", "agent.hidden=[8]",
                           "eval.every=0", "eval.tasks=3", "eval.steps=1", "eval.episodes=2", "sampler.workers=0"],
             "params": {"env_kwargs.train_range": [0.25, 1.0]}, "splits": ["test", "ood"]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["sweep", str(path), "--address", cluster]) == 0
    out = tmp_path / "out"
    trials = sorted(out.glob("trials/*/seed0/trial.json"))
    assert len(trials) == 2
    for trial in trials:  # the score is the protocol's gain per held-out task, as the run's own evaluation wrote it
        record = json.loads(trial.read_text())
        for split in ("test", "ood"):
            summary = json.loads((trial.parent / "run" / "eval" / split / "summary.json").read_text())
            gain = np.subtract(summary["stages"][1]["per_task"], summary["stages"][0]["per_task"])
            np.testing.assert_allclose(record["per_task"][split], gain)
            assert len(gain) == 3
    report = (out / "report.md").read_text()
    assert "2 of 2 trials finished" in report and "## Split `ood`" in report and "| 0.25 | " in report
    assert (out / "sensitivity.png").stat().st_size > 10_000
    rows = json.loads((out / "results.json").read_text())
    assert sorted((r["split"], r["point"]["env_kwargs.train_range"]) for r in rows) == [
        ("ood", 0.25), ("ood", 1.0), ("test", 0.25), ("test", 1.0)]
    stamps = {p: p.stat().st_mtime_ns for p in trials}
    capsys.readouterr()
    assert main(["sweep", str(path), "--address", cluster]) == 0
    assert "2 trials finished already" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in trials} == stamps


def test_an_agent_in_a_users_own_file_trains_on_ray(cluster, tmp_path):
    """The example agent of docs/custom-agents.md (a file outside the repository, named by the config's imports)
    trains on the two-node cluster: its actors import the file, and the run's metrics equal the local run's."""
    from metarl.cli import main

    example = Path(__file__).resolve().parents[1] / "experiments" / "custom_agent"
    shutil.copy(example / "fomaml.py", tmp_path / "fomaml.py")
    shutil.copy(example / "fomaml_point_nav_2d.yaml", tmp_path / "fomaml.yaml")
    rows = {}
    for name, flags in (("local", []), ("ray", ["--address", cluster])):
        run_dir = tmp_path / name
        assert main(["train", str(tmp_path / "fomaml.yaml"), "iterations=2", "agent.tasks_per_batch=4",
                     "agent.episodes_per_task=2", "agent.hidden=[16]", "eval.every=0", "eval.tasks=2",
                     "eval.episodes=2", "eval.steps=1", "sampler.workers=2", "--run-dir", str(run_dir), "--quiet",
                     *flags]) == 0
        rows[name] = [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
                      for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows["local"]) == 2 and rows["ray"] == rows["local"]
    assert yaml.safe_load((tmp_path / "ray" / "config.yaml").read_text())["sampler"]["placement"] == "ray"


def _sweep_file(tmp_path: Path, name: str, **spec) -> Path:
    base = {"name": name, "config": str(Path("experiments/maml_trpo/point_nav_2d.yaml").resolve()),
            "out": str(tmp_path / name), "seeds": [0],
            "overrides": ["iterations=3", "agent.tasks_per_batch=2", "agent.episodes_per_task=2", "agent.hidden=[8]",
                          "eval.every=1", "eval.tasks=3", "eval.steps=1", "eval.episodes=2", "sampler.workers=0"]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**base, **spec}))
    return path


def test_asha_stops_the_poor_trials_early_and_the_report_records_them(cluster, tmp_path, capsys):
    """An inner step of 30-50 wrecks the adapted policy. One trial at a time (max_concurrent: 1) in the grid's
    order: the first (a sensible step) reaches each rung unopposed and trains to the end, and ASHA (reduction
    factor 2) stops both wrecking ones at their first evaluation, below the median of those before them (the
    50's: the midpoint of the sensible step's score and the 30's)."""
    from metarl.cli import main

    path = _sweep_file(tmp_path, "asha", params={"agent.inner_lr": [0.05, 30.0, 50.0]}, max_concurrent=1,
                       scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2})
    assert main(["sweep", str(path), "--address", cluster]) == 0
    assert "trials stopped early by the scheduler" in capsys.readouterr().out
    trials = json.loads((tmp_path / "asha" / "trials.json").read_text())
    status = {t["point"]["agent.inner_lr"]: t["status"] for t in trials["trials"]}
    assert status[0.05] == "completed" and status[30.0] == status[50.0] == "stopped"
    stopped = [t for t in trials["trials"] if t["status"] == "stopped"]
    for t in stopped:  # what it reached: the last evaluation it reported, before the end of training
        assert t["reached"]["iteration"] < 3 and t["reached"] == t["history"][-1] and t["reached"]["env_steps"] > 0
    assert {t["reached"]["iteration"] for t in stopped} == {1}
    compute = trials["compute"]
    assert compute["stopped"] == len(stopped) == 2 and compute["iterations"] < compute["iterations_to_the_end"] == 9
    report = (tmp_path / "asha" / "report.md").read_text()
    assert "## Trials stopped early" in report and f"{len(stopped)} of them stopped early" in report
    assert "## Compute" in report
    # the sensitivity tables compare the trials trained to the end only
    assert {r["point"]["agent.inner_lr"] for r in json.loads((tmp_path / "asha" / "results.json").read_text())} \
        == {t["point"]["agent.inner_lr"] for t in trials["trials"] if t["status"] == "completed"}
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "asha").glob("trials/*/seed0/trial.json")}
    assert main(["sweep", str(path), "--address", cluster]) == 0  # replayed to Tune, none trained again
    assert "3 trials finished already (2 stopped early)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "asha").glob("trials/*/seed0/trial.json")} == stamps


def test_an_optuna_search_draws_configurations_finishes_and_resumes(cluster, tmp_path, capsys):
    pytest.importorskip("optuna")
    from metarl.cli import main

    path = _sweep_file(tmp_path, "optuna", search="optuna", samples=2, seed=0,
                       params={"agent.inner_lr": {"loguniform": [0.01, 1.0]}, "agent.max_kl": [0.005, 0.01]})
    assert main(["sweep", str(path), "--address", cluster]) == 0
    folders = sorted((tmp_path / "optuna" / "trials").glob("optuna-*/seed0/trial.json"))
    assert len(folders) == 2
    points = [json.loads(p.read_text())["point"] for p in folders]
    assert all(0.01 <= p["agent.inner_lr"] <= 1.0 and p["agent.max_kl"] in (0.005, 0.01) for p in points)
    assert "2 of 2 trials finished" in (tmp_path / "optuna" / "report.md").read_text()
    capsys.readouterr()
    assert main(["sweep", str(path), "--address", cluster]) == 0  # the tried configurations first, replayed
    assert "2 trials finished already" in capsys.readouterr().out
    assert sorted((tmp_path / "optuna" / "trials").glob("optuna-*/seed0/trial.json")) == folders


USER_ENV = '''
"""A user's env module: PointNav2D under an id of its own (only the runtime_env brings it to the Ray nodes)."""
import gymnasium as gym

gym.register("SweepUserPointNav-v0", entry_point="metarl.envs.point_nav:PointNav2D", max_episode_steps=100)
'''


def test_a_sweep_ships_user_modules_to_the_nodes_with_runtime_env(cluster, tmp_path):
    """The user's module lives in a folder only the driver's Python path has (the nodes were started without it);
    the sweep's trials make its env on both nodes of the cluster, so it came with the job's runtime_env."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "sweep_user_env.py").write_text(USER_ENV)
    path = _sweep_file(tmp_path, "shipped", params={"agent.inner_lr": [0.05, 0.1]},
                       overrides=["env=SweepUserPointNav-v0", "iterations=1", "agent.tasks_per_batch=2",
                                  "agent.episodes_per_task=2", "agent.hidden=[8]", "eval.every=0", "eval.tasks=3",
                                  "eval.steps=1", "eval.episodes=2", "sampler.workers=0"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(mods), *filter(None, [os.environ.get("PYTHONPATH")])])}
    run = subprocess.run([sys.executable, "-m", "metarl.cli", "sweep", str(path), "--address", cluster,
                          "--import", "sweep_user_env"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "shipped").glob("trials/*/seed0/trial.json"))]
    assert len(records) == 2 and all(r["status"] == "completed" for r in records)
    assert len({r["where"]["node"] for r in records}) == 2  # one trial on each node
    run_config = yaml.safe_load(next((tmp_path / "shipped").glob("trials/*/seed0/run/config.yaml")).read_text())
    assert run_config["env"] == "SweepUserPointNav-v0" and run_config["imports"] == ["sweep_user_env"]
