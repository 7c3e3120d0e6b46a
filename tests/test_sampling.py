"""The sampler: shapes and masks, trial arguments, and a worker that dies."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys

import pytest
import torch

from metarl.policies import GaussianActor, GaussianMLPPolicy
from metarl.sampling import GymnasiumSampler, Sampler, WorkerError


def test_batch_layout_and_bad_arguments():
    with GymnasiumSampler("metarl/AntDir-v0", env_kwargs={"max_episode_steps": 30}, workers=0) as s:
        policy = GaussianMLPPolicy(105, 8, (8,), init_std=2.0)
        tasks = s.family.sample_tasks(2, "train", seed=0)
        batch = s.sample(GaussianActor(policy.config, policy.params(), seed=0), tasks, 3, seed=0)
        assert batch.observations.shape == (2, 3, 30, 105) and batch.actions.shape == (2, 3, 30, 8)
        # valid steps are a prefix; an episode ends terminated (fell) or truncated (time limit), not both
        lengths = batch.lengths
        for i in range(2):
            for e in range(3):
                n = int(lengths[i, e])
                assert batch.mask[i, e, :n].eq(1).all() and batch.mask[i, e, n:].eq(0).all()
                assert bool(batch.terminated[i, e]) != bool(batch.truncated[i, e])
                assert not bool(batch.truncated[i, e]) or n == 30  # truncation only at the time limit
        assert batch.env_steps == int(lengths.sum())
        with pytest.raises(ValueError, match="divide"):
            s.sample(GaussianActor(policy.config, policy.params(), seed=0), tasks, 3, seed=0, episodes_per_trial=2)
        with pytest.raises(ValueError, match="episodes_per_task"):
            s.sample(GaussianActor(policy.config, policy.params(), seed=0), tasks, 0, seed=0)


def test_a_dead_worker_is_reported_and_the_sampler_recovers():
    with GymnasiumSampler("metarl/PointNav2D-v0", workers=2) as s:
        policy = GaussianMLPPolicy(2, 2)
        tasks = s.family.sample_tasks(4, "train", seed=0)
        first = s.sample(GaussianActor(policy.config, policy.params(), seed=0), tasks, 2, seed=0)
        os.kill(s._procs[0].pid, signal.SIGKILL)
        s._procs[0].join()
        with pytest.raises(WorkerError, match="died"):
            s.sample(GaussianActor(policy.config, policy.params(), seed=0), tasks, 2, seed=0)
        again = s.sample(GaussianActor(policy.config, policy.params(), seed=0), tasks, 2, seed=0)
        assert (again.rewards == first.rewards).all()  # fresh workers, same numbers


@pytest.mark.parametrize("env_id", ["metarl/PointNav2D-v0", "metarl/NoSuchFamily-v0"])
def test_a_worker_whose_main_process_has_gone_exits_quietly(capfd, env_id):
    # a killed `metarl train` used to leave a BrokenPipeError traceback from every worker mid-reply; the worker
    # runs in a process of its own, as the sampler starts it (its env setup changes process-wide settings)
    import multiprocessing as mp

    from metarl.sampling.local import _worker

    policy = GaussianMLPPolicy(2, 2)
    with GymnasiumSampler("metarl/PointNav2D-v0", workers=0) as s:
        tasks = s.family.sample_tasks(1, "train", seed=0)
    context = mp.get_context("spawn")
    parent, child = context.Pipe()
    # a real rollout request (the reply would be a batch), or, for an env that cannot be made, an error reply
    parent.send(("sample", (GaussianActor(policy.config, policy.params(), seed=0), tasks, [0], 1, 0, 1)))
    worker = context.Process(target=_worker, args=(child, "gymnasium", env_id, {}, list(sys.path)))
    worker.start()
    child.close()
    parent.close()  # gone before the reply
    worker.join(60)
    assert worker.exitcode == 0 and "Traceback" not in capfd.readouterr().err


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (an exited one not yet reaped is a zombie: not running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return not os.path.exists("/proc")  # no /proc (not Linux): the signal answered


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process model (init adopts orphans)")
def test_a_worker_leaves_mid_rollout_when_its_main_process_is_killed(tmp_path):
    """A `metarl train` or `eval` killed in the middle of a long sampling call takes its workers with it at once,
    not after their rollouts (minutes of both cores and GBs of env slots on a large Meta-World call)."""
    import time

    script = tmp_path / "long_call.py"
    script.write_text(
        "from metarl.policies import GaussianActor, GaussianMLPPolicy\n"
        "from metarl.sampling import GymnasiumSampler\n"
        "if __name__ == '__main__':\n"
        "    with GymnasiumSampler('metarl/HalfCheetahVel-v0', workers=1) as s:\n"
        "        tasks = s.family.sample_tasks(40, 'train', seed=0)\n"
        "        policy = GaussianMLPPolicy(17, 6)\n"
        "        s._start(1)\n"
        "        print(s._procs[0].pid, flush=True)\n"
        "        s.sample(GaussianActor(policy.config, policy.params(), seed=0), tasks, 100, seed=0)  # minutes\n")
    err = (tmp_path / "stderr").open("w")  # the worker's too: it inherits it
    main = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        worker = int(main.stdout.readline())
        time.sleep(4)  # the worker is inside the call: building its 4,000 slots or stepping them
        assert _running(worker)
        main.kill()
        main.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not _running(worker):
                break
            time.sleep(0.1)
        else:
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the sampler worker outlived its killed main process by 10 s")
    finally:
        main.kill()
        err.close()
    # it left through its own cleanup (its envs closed), quietly: no traceback, no abort
    said = (tmp_path / "stderr").read_text()
    assert "Traceback" not in said and "terminat" not in said, said


def test_sampler_reports_the_episode_limit_it_uses():
    with GymnasiumSampler("metarl/HalfCheetahDir-v0", env_kwargs={"max_episode_steps": 100}, workers=0) as s:
        assert s.horizon == 100 and s.family.horizon == 200
    with GymnasiumSampler("metarl/PointNav2D-v0", workers=0) as s:
        assert s.horizon == 100


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_malloc_tuning_applies_and_can_be_switched_off():
    code = "from metarl.system import keep_freed_memory; print(keep_freed_memory())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "METARL_MALLOC_TUNING": "0"})
    assert off.stdout.strip() == "False"
    if platform.libc_ver()[0] == "glibc":  # mallopt exists and accepts one of the two settings
        assert on.stdout.strip() == "True"


def _placement_actors(sampler):
    """Each agent's sampling-side actor, as its training collects with it, on ``sampler``'s spaces."""
    from metarl.agents.pearl import PEARL, PEARLActor, PEARLConfig
    from metarl.agents.rl2 import RL2, RL2Config
    from metarl.policies import batch_params

    obs_dim, act_dim = sampler.observation_space.shape[0], sampler.action_space.shape[0]
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(obs_dim, act_dim, (32, 32))
    # MAML-TRPO's adapted policies: a parameter set per task (perturbed, as an inner step leaves them)
    adapted = {k: v + 0.05 * torch.randn_like(v) for k, v in batch_params(policy.params(), 5).items()}
    rl2 = RL2(RL2Config(tasks_per_batch=5, trials_per_task=1, episodes_per_trial=3, hidden_size=32), sampler, seed=0)
    pearl = PEARL(PEARLConfig(latent_dim=3, hidden=(32, 32), encoder_hidden=(32,)), sampler, seed=0)
    low, high = sampler.action_space.low, sampler.action_space.high
    return {"maml_trpo": (GaussianActor(policy.config, adapted, seed=5), 1),
            "rl2": (rl2.actor(), 3),
            "pearl": (PEARLActor(pearl.policy.state_dict(), pearl.encoder.state_dict(), act_dim, 3, low, high, seed=5,
                                 infer=True), 3)}


@pytest.mark.parametrize("agent", ["maml_trpo", "rl2", "pearl"])
def test_a_tasks_actions_do_not_depend_on_the_tasks_beside_it(agent):
    """The same batch in this process and split over 2 worker processes (3 tasks and 2), for every agent's
    actor, number for number. HalfCheetah is the witness: an ulp of difference in one action parts its
    trajectories within the episode. The placement promise rests on this (a chunk's numbers depend only on
    its tasks and the seed), and it held on one CPU but not on another while the Gaussian actor multiplied
    all tasks in one batched matmul, whose rows' rounding depended on how many tasks it held."""
    kwargs = {"max_episode_steps": 40}
    with Sampler("metarl/HalfCheetahVel-v0", kwargs, workers=0, backend="native") as local:
        actor, trial = _placement_actors(local)[agent]
        tasks = local.family.sample_tasks(5, "train", seed=1)
        expected = local.sample(actor, tasks, 3, seed=11, episodes_per_trial=trial)
    with Sampler("metarl/HalfCheetahVel-v0", kwargs, workers=2, backend="native") as split:
        got = split.sample(actor, tasks, 3, seed=11, episodes_per_trial=trial)
    for name in ("observations", "actions", "rewards", "mask", "terminated", "truncated"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


@pytest.mark.parametrize("agent", ["maml_trpo", "rl2"])
def test_capped_slots_run_in_rounds_with_the_same_episodes(agent):
    """``max_slots`` bounds the env slots a worker (or this process) holds: 5 tasks x 3 episodes with at most 4
    slots run one task per chunk in rounds, and give the uncapped batch number for number."""
    kwargs = {"max_episode_steps": 40}
    with Sampler("metarl/HalfCheetahVel-v0", kwargs, workers=0, backend="gymnasium") as local:
        actor, trial = _placement_actors(local)[agent]
        tasks = local.family.sample_tasks(5, "train", seed=1)
        expected = local.sample(actor, tasks, 3, seed=11, episodes_per_trial=trial)
        assert len(local._local.envs) == 5 * 3 // trial  # uncapped: every slot at once
    for workers in (0, 2):
        with Sampler("metarl/HalfCheetahVel-v0", kwargs, workers=workers, backend="gymnasium", max_slots=4) as capped:
            got = capped.sample(actor, tasks, 3, seed=11, episodes_per_trial=trial)
            held = capped._local.envs if workers == 0 else None
        for name in ("observations", "actions", "rewards", "mask", "terminated", "truncated"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), (workers, name)
        if held is not None:  # MAML-TRPO: 3 slots a task, one task a chunk; RL²: 1 a task, 3 and 2 tasks
            assert len(held) == {"maml_trpo": 3, "rl2": 3}[agent] <= 4
    with pytest.raises(ValueError, match="max_slots must be an integer >= 1 or None, got 0"):
        Sampler("metarl/PointNav2D-v0", workers=0, max_slots=0)


def test_the_max_slots_setting_is_checked_and_may_change_on_resume():
    from pathlib import Path

    from metarl.config import ConfigError, load_config
    from metarl.runfolder import config_changes, config_record

    path = Path(__file__).resolve().parents[1] / "experiments" / "maml_trpo" / "point_nav_2d.yaml"
    for bad in ("0", "true", "2.5"):
        with pytest.raises(ConfigError, match=r"^sampler.max_slots: expected an integer"):
            load_config(path, [f"sampler.max_slots={bad}"])
    plain, capped = load_config(path), load_config(path, ["sampler.max_slots=100"])
    assert "max_slots" not in plain.to_dict()["sampler"] and capped.to_dict()["sampler"]["max_slots"] == 100
    assert config_changes(config_record(plain.to_dict()), capped.to_dict()) == []  # the same episodes: resumable


def test_default_max_slots_hand_computed():
    from metarl.sampling import default_max_slots

    class Large:
        slot_memory_mb = 45.0

    gib = 2**30
    # half of 24 GiB is 12,288 MiB: 273.07 envs of 45 MiB, shared by 2 workers -> 136 each; in-process (0) -> 273
    assert default_max_slots(Large, 2, memory_bytes=24 * gib) == 136
    assert default_max_slots(Large, 0, memory_bytes=24 * gib) == default_max_slots(Large, 1, memory_bytes=24 * gib) == 273
    assert default_max_slots(Large, 16, memory_bytes=gib // 4) == 1  # never below one slot
    assert default_max_slots(Large, 2, memory_bytes=24 * gib, share=0.25) == 68
    assert default_max_slots(object(), 2, memory_bytes=24 * gib) is None  # small envs: no bound


def test_the_slot_bound_reads_a_containers_memory_limit(tmp_path, monkeypatch):
    """A container's or job's memory limit (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``) below the
    machine's memory is the memory the bound divides; ``max`` (no limit) or no file: the machine's."""
    from metarl.sampling import local

    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    monkeypatch.setattr(local, "CGROUP_LIMITS", (str(v2), str(v1)))
    assert local._memory_bytes() == machine  # neither file
    v2.write_text("max\n")
    v1.write_text(f"{2**62}\n")  # v1's "no limit" is a huge number
    assert local._memory_bytes() == machine
    v2.write_text(f"{2**30}\n")  # a 1 GiB container
    assert local._memory_bytes() == 2**30

    class Large:
        slot_memory_mb = 64.0

    assert local.default_max_slots(Large, 2) == 4  # half of 1 GiB: 8 slots of 64 MiB, 4 a worker


def test_a_family_declaring_large_envs_bounds_the_slots_by_default_with_the_same_episodes(monkeypatch):
    """A family's ``slot_memory_mb`` bounds a sampler left at ``max_slots=None`` by the machine's memory (here
    declared so large that 2 slots fit); the episodes are the unbounded sampler's, number for number."""
    from metarl.sampling import local

    policy = GaussianMLPPolicy(2, 2)
    actor = GaussianActor(policy.config, policy.params(), seed=0)
    with Sampler("metarl/PointNav2D-v0", workers=0) as plain:
        assert plain.max_slots is None  # small envs: every slot of a call at once
        tasks = plain.family.sample_tasks(5, "train", seed=2)
        expected = plain.sample(actor, tasks, 2, seed=3)
        assert len(plain._local.envs) == 10
    memory = local._memory_bytes()
    monkeypatch.setattr(type(plain.family), "slot_memory_mb", memory / 2**20 / 4.5, raising=False)  # 2.25 in half of it
    with Sampler("metarl/PointNav2D-v0", workers=0) as bounded:
        assert bounded.max_slots == 2
        got = bounded.sample(actor, tasks, 2, seed=3)
        assert len(bounded._local.envs) == 2
    with Sampler("metarl/PointNav2D-v0", workers=0, max_slots=7) as chosen:  # a setting of one's own wins
        assert chosen.max_slots == 7
    for name in ("observations", "actions", "rewards", "mask"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
