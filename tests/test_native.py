"""The native MuJoCo backend: same numbers as Gymnasium for every MuJoCo family, selection, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import metarl
from metarl.envs.native import NativeSlots, native_kernel, supported_families, unsupported_reason
from metarl.policies import GaussianActor, GaussianMLPPolicy
from metarl.sampling import GymnasiumSampler, NativeSampler, Sampler, make_sampler
from metarl.tasks import TaskError

MUJOCO_FAMILIES = [name for name in metarl.FAMILIES if name != "PointNav2D"]


def _collect(backend: str, family: str, episodes: int = 4, trial: int = 2, std: float = 1.0, seed: int = 3,
             env_kwargs: dict | None = None):
    with Sampler(metarl.env_id(family), env_kwargs, workers=0, backend=backend) as s:
        torch.manual_seed(0)
        policy = GaussianMLPPolicy(s.observation_space.shape[0], s.action_space.shape[0], (16,), init_std=std)
        tasks = s.family.sample_tasks(2, "train", seed=1) + s.family.sample_tasks(1, "test", seed=0)
        return s.sample(GaussianActor(policy.config, policy.params(), seed=5), tasks, episodes, seed,
                        episodes_per_trial=trial)


def test_every_mujoco_family_has_a_native_kernel():
    assert sorted(supported_families()) == sorted(MUJOCO_FAMILIES)
    for name in MUJOCO_FAMILIES:
        assert native_kernel(gym.make(metarl.env_id(name))) is not None, name


@pytest.mark.parametrize("family", MUJOCO_FAMILIES)
def test_native_equals_gymnasium_over_full_episodes_with_resets(family):
    # 3 tasks (two train, one held-out) x 4 episodes at the full horizon (200 steps), as trials of 2
    # episodes, so every slot also resets mid-trial; a wide policy makes the Ant/Hopper/Walker fall
    # (terminations) and exercises contacts.
    g, n = _collect("gymnasium", family, std=2.0), _collect("native", family, std=2.0)
    assert g.observations.shape == n.observations.shape and g.observations.shape[2] == 200
    assert torch.equal(g.mask, n.mask)
    assert torch.equal(g.terminated, n.terminated) and torch.equal(g.truncated, n.truncated)
    torch.testing.assert_close(n.observations, g.observations, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(n.rewards, g.rewards, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(n.last_observations, g.last_observations, rtol=1e-6, atol=1e-6)
    assert sorted(n.reward_terms) == sorted(g.reward_terms)
    for key in g.reward_terms:
        torch.testing.assert_close(n.reward_terms[key], g.reward_terms[key], rtol=1e-5, atol=1e-5)
    # the episodes really differ from one another (the comparison is not between empty arrays)
    assert g.returns.std() > 0 and g.env_steps > 200


@pytest.mark.parametrize("family,kwargs", [
    ("HalfCheetahVel", {"ctrl_cost_weight": 0.2, "exclude_current_positions_from_observation": False}),
    ("AntDir", {"include_cfrc_ext_in_observation": False, "terminate_when_unhealthy": False,
                "healthy_reward": 0.5, "max_episode_steps": 60}),
    ("HopperRandParams", {"forward_reward_weight": 2.0, "reset_noise_scale": 0.05}),
])
def test_native_follows_non_default_env_arguments(family, kwargs):
    g = _collect("gymnasium", family, env_kwargs=kwargs, std=2.0)
    n = _collect("native", family, env_kwargs=kwargs, std=2.0)
    assert g.observations.shape == n.observations.shape
    assert torch.equal(g.mask, n.mask) and torch.equal(g.terminated, n.terminated)
    torch.testing.assert_close(n.observations, g.observations, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(n.rewards, g.rewards, rtol=1e-6, atol=1e-6)
    # and the arguments took effect (this is not the default env)
    d = _collect("native", family, std=2.0, env_kwargs={"max_episode_steps": kwargs.get("max_episode_steps", 200)})
    assert g.observations.shape[-1] != d.observations.shape[-1] or not torch.equal(n.rewards, d.rewards)


@pytest.mark.parametrize("family", MUJOCO_FAMILIES)
def test_native_steps_are_bit_identical_to_gymnasium_with_the_native_settings(family):
    """The native slots run with MuJoCo 4's stage timers off (as the sampler workers do) and the island
    search off; Gymnasium's envs with MuJoCo's defaults. Every observation, reward and termination over
    300 steps with resets, and at the end every slot's whole integration state (warm start included), must
    be the same float64 numbers."""
    import mujoco

    from metarl.system import mujoco_timers_skipped

    if mujoco.get_mjcb_time() is not None:
        pytest.skip("a MuJoCo clock is installed in this process")
    env_id = metarl.env_id(family)
    family_env = metarl.family_of(gym.make(env_id))
    tasks = family_env.sample_tasks(2, "train", seed=2)
    slots = NativeSlots(env_id, {})
    slots.configure(tasks, 2)
    envs = []
    for task in tasks:
        for _ in range(2):
            env = gym.make(env_id)
            metarl.family_of(env).set_task(task)
            envs.append(env)
    island_flag = int(getattr(mujoco.mjtDisableBit, "mjDSBL_ISLAND", 0))  # MuJoCo >= 3.3.6
    assert slots.models[0].opt.disableflags & island_flag == island_flag
    rng = np.random.default_rng(0)
    for s, env in enumerate(envs):
        assert np.array_equal(slots.reset(s, 10 + s), env.reset(seed=10 + s)[0])
    resets = 0
    for t in range(300):
        actions = rng.uniform(slots.low, slots.high, (len(envs), slots.low.size))
        with mujoco_timers_skipped():
            obs, reward, terminated, _, _ = slots.step(np.arange(len(envs)), actions)
        for s, env in enumerate(envs):
            o, r, term, trunc, _ = env.step(actions[s])
            assert np.array_equal(obs[s], o) and reward[s] == r and terminated[s] == term, (family, t, s)
            if term or trunc:
                resets += 1
                assert np.array_equal(slots.reset(s, 1000 * t + s), env.reset(seed=1000 * t + s)[0])
    assert resets > 0
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    for s, env in enumerate(envs):
        u = env.unwrapped
        native, reference = np.zeros(mujoco.mj_stateSize(u.model, spec)), np.zeros(mujoco.mj_stateSize(u.model, spec))
        # The slot's row loaded into the shared MjData, read back as the full integration state:
        mujoco.mj_setState(slots.models[s], slots._datas[s], slots.full[s], slots._SPEC)
        mujoco.mj_getState(slots.models[s], slots._datas[s], native, spec)
        mujoco.mj_getState(u.model, u.data, reference, spec)
        assert np.array_equal(native, reference), (family, s)


def test_mujoco_timers_are_skipped_in_a_fresh_process_only_where_mujoco_times_itself():
    code = ("import mujoco; from metarl.system import skip_mujoco_timers, _mujoco_times_itself as t; "
            "before = t(); print(before, skip_mujoco_timers(), t(), mujoco.get_mjcb_time() is not None)")
    env = {k: v for k, v in os.environ.items() if k != "METARL_MUJOCO_TIMERS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split()
    times_itself = out[0] == "True"
    # MuJoCo 4 times every step by itself: skipped, and no duration is measured any more. MuJoCo 3 does
    # not: nothing to skip, nothing installed.
    assert out[1:] == (["True", "False", "True"] if times_itself else ["False", "False", "False"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "METARL_MUJOCO_TIMERS": "1"}).stdout.split()
    assert out[1] == "False" and out[2] == out[0]


def test_terminating_families_do_terminate_in_the_comparison():
    for family in ("AntDir", "HopperRandParams", "Walker2DRandParams"):
        batch = _collect("native", family, std=2.0)
        assert batch.terminated.any(), family
        assert (batch.lengths[batch.terminated] < 200).all()


def test_native_results_do_not_depend_on_the_worker_count():
    policy = GaussianMLPPolicy(17, 6, (8,))
    results = []
    for workers in (0, 2):
        with NativeSampler("metarl/HalfCheetahVel-v0", {"max_episode_steps": 25}, workers=workers) as s:
            tasks = s.family.sample_tasks(3, "train", seed=0)
            results.append(s.sample(GaussianActor(policy.config, policy.params(), seed=1), tasks, 2, seed=4))
    assert torch.equal(results[0].observations, results[1].observations)
    assert torch.equal(results[0].rewards, results[1].rewards)


def test_dynamics_tasks_change_the_native_model_per_slot():
    # two tasks with different dynamics sampled side by side must give different trajectories, each equal
    # to the Gymnasium env set to that task
    with NativeSampler("metarl/Walker2DRandParams-v0", {"max_episode_steps": 40}, workers=0) as s:
        policy = GaussianMLPPolicy(17, 6, (8,), init_std=0.5)
        tasks = s.family.sample_tasks(2, "train", seed=11)
        actor = GaussianActor(policy.config, policy.params(), seed=0, deterministic=True)
        batch = s.sample(actor, tasks, 1, seed=0)
    assert not torch.equal(batch.observations[0], batch.observations[1])
    with GymnasiumSampler("metarl/Walker2DRandParams-v0", {"max_episode_steps": 40}, workers=0) as s:
        ref = s.sample(actor, tasks, 1, seed=0)
    torch.testing.assert_close(batch.observations, ref.observations, rtol=1e-6, atol=1e-6)


def test_backend_selection_and_unsupported_envs():
    with make_sampler("metarl/HalfCheetahVel-v0", backend="auto", workers=0) as s:
        assert s.backend == "native"
    with make_sampler("metarl/PointNav2D-v0", backend="auto", workers=0) as s:
        assert s.backend == "gymnasium"
    # PointNav2D is not a MuJoCo env; a render mode or a subclass that changes step is not reproduced
    assert native_kernel(gym.make("metarl/PointNav2D-v0")) is None
    assert native_kernel(gym.make("metarl/HalfCheetahVel-v0", render_mode="rgb_array")) is None

    from metarl.envs.half_cheetah import HalfCheetahVel

    class Shaped(HalfCheetahVel):
        def step(self, action):
            return super().step(action)

    assert native_kernel(Shaped()) is None
    # a wrapper that may change rewards or observations is not reproduced either
    assert native_kernel(gym.wrappers.ClipReward(gym.make("metarl/HalfCheetahVel-v0"), -1.0, 1.0)) is None
    assert native_kernel(gym.wrappers.TimeLimit(gym.make("metarl/HalfCheetahVel-v0"), 50)) is not None
    with pytest.raises(TaskError, match="native sampler backend does not run .*not one of Gymnasium's v5"):
        NativeSampler("metarl/PointNav2D-v0", workers=0)
    with pytest.raises(TaskError, match="render_mode='rgb_array'"):
        NativeSampler("metarl/HalfCheetahVel-v0", {"render_mode": "rgb_array"}, workers=0)
    # a dynamics family over an env the kernels do not cover runs on Gymnasium
    from metarl.envs import DynamicsFamily, Vary

    swimmer = DynamicsFamily("Swimmer-v5", [Vary("body_mass")], family="SwimmerMass")
    assert native_kernel(swimmer) is None
    assert "not one of Gymnasium's v5" in unsupported_reason(swimmer)
    with pytest.raises(ValueError, match="unknown sampler backend 'ray'"):
        make_sampler("metarl/PointNav2D-v0", backend="ray")
    with pytest.raises(ValueError, match="does not support"):
        NativeSlots("metarl/PointNav2D-v0", {})


def test_training_curves_are_the_same_with_either_backend(tmp_path):
    from metarl.config import load_config
    from metarl.training import train

    curves = {}
    for backend in ("gymnasium", "native"):
        config = load_config("experiments/maml_trpo/half_cheetah_vel.yaml", [
            "iterations=2", "agent.tasks_per_batch=2", "agent.episodes_per_task=2", "env_kwargs.max_episode_steps=15",
            "agent.hidden=[8]", "eval.every=0", "eval.tasks=1", "eval.episodes=1", "eval.steps=1", f"sampler.backend={backend}", "sampler.workers=0",
        ])
        run_dir = train(config, run_dir=tmp_path / backend, verbose=False)
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves[backend] = [(m["meta/return_pre_adaptation"], m["meta/return_post_adaptation"], m["loss/surrogate_before"])
                           for m in lines]
    assert len(curves["native"]) == 2
    np.testing.assert_allclose(curves["native"], curves["gymnasium"], rtol=1e-6, atol=1e-7)


def test_config_rejects_an_unknown_backend_and_native_on_an_unsupported_env(tmp_path, capsys):
    from metarl.cli import main

    assert main(["train", "experiments/maml_trpo/point_nav_2d.yaml", "sampler.backend=fast",
                 "--run-dir", str(tmp_path / "a")]) == 2
    assert "sampler.backend: expected 'auto', 'native' or 'gymnasium', got 'fast'" in capsys.readouterr().err
    assert main(["train", "experiments/maml_trpo/point_nav_2d.yaml", "sampler.backend=native",
                 "--run-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "native sampler backend does not run" in err and "use sampler.backend gymnasium" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_speed_command_writes_the_rates(tmp_path, capsys):
    from metarl.cli import main

    out = tmp_path / "speed.json"
    assert main(["speed", "--family", "HalfCheetahVel", "--tasks", "2", "--episodes", "1", "--repeats", "1",
                 "--steps", "200", "--workers", "0", "--async-envs", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["family"] == "HalfCheetahVel"
    assert set(result["rates"]) == {"raw_mj_step", "raw_mj_step_native_settings", "gymnasium_env", "gymnasium_vector",
                                    "native", "gymnasium_async_vector"}
    assert result["async_vector_envs"] == 2
    assert result["native_over_async_vector_env"] == pytest.approx(
        result["rates"]["native"] / result["rates"]["gymnasium_async_vector"])
    assert all(rate > 0 for rate in result["rates"].values())
    assert "native / gym vector" in capsys.readouterr().out
    assert main(["speed", "--family", "PointNav2D"]) == 2
