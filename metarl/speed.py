"""``metarl speed``: how fast each way of stepping a MuJoCo family runs here, measured side by side.

For one family and one meta-batch (default the standard 40 tasks x 20 episodes x horizon), in one run:

* ``raw_mj_step``: the simulator's own limit: ``mj_step(model, data, nstep=frame_skip)`` in a bare loop on
  one thread, random controls (one env step per call, so the rate is comparable to the others);
* ``raw_mj_step_native_settings``: the same loop with the MuJoCo settings the native workers use (MuJoCo
  4's stage timers skipped, the island search off; same results), the limit for the native sampler's
  per-core rate;
* ``gymnasium_env``: one Gymnasium env, ``env.step`` with random actions, resets on episode end (in this
  process, with MuJoCo's defaults, as a user's own loop runs it);
* ``gymnasium_vector``: the ``gymnasium`` sampler backend collecting the meta-batch with policy inference
  (a 64x64 Gaussian MLP, per-task parameters) on all workers, whose processes skip MuJoCo 4's stage
  timers as the native ones do (with ``--workers 0`` both samplers run here, with MuJoCo's defaults);
* ``native``: the ``native`` backend on the same batch, same policy, same workers;
* ``gymnasium_async_vector``: Gymnasium's own ``gymnasium.vector.AsyncVectorEnv`` (``async_envs`` env
  processes, MuJoCo's defaults, same-step autoreset) stepping the same number of env steps with the same
  policy inference on its batched observations in this process; each env keeps one task of the meta-batch
  (switching tasks between episodes costs nothing in the simulator), the way a user who vectorises the
  family with Gymnasium alone collects it;
* ``envpool`` (with ``envpool_python``; HalfCheetah families only): EnvPool's C++ MuJoCo ``HalfCheetah-v5``
  (``async_envs`` envs, one thread per core, synchronous batches) stepping the same number of env steps with
  the same policy inference, run by ``experiments/benchmarks/envpool_rate.py`` under that Python (EnvPool pins
  numpy < 2, so it lives in an environment of its own); its env is the plain HalfCheetah, with no task
  parameters to set per env, so it is a speed reference for batched stepping, not a meta-RL backend.

Rates are env steps per second (median over ``repeats``), printed with their ratio to ``raw_mj_step``;
``--json FILE`` writes ``{"family": ..., "rates": {...}, ..., "provenance": {...}}`` (for several families
``{"results": [...], "provenance": {...}}``).
"""

from __future__ import annotations

import copy
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

from metarl.provenance import Recorder, write_result

RATE_KEYS = ("raw_mj_step", "raw_mj_step_native_settings", "gymnasium_env", "gymnasium_vector", "native",
             "gymnasium_async_vector")
#: AsyncVectorEnv's env processes: the fastest of 2, 8 and 16 on 2 cores (2026-12-07: 1.7k, 2.0k, 2.2k steps/s).
ASYNC_ENVS = 16
DEFAULT_FAMILIES = ("HalfCheetahVel", "AntGoal", "HopperRandParams")


def _raw_rate(env: gym.Env, steps: int, seed: int, native_settings: bool = False) -> float:
    u = env.unwrapped
    model = u.model
    if native_settings:
        from metarl.envs.native import skip_island_search
        from metarl.system import mujoco_timers_skipped

        model = copy.deepcopy(model)
        skip_island_search(model)
        with mujoco_timers_skipped():
            return _raw_loop(env, model, steps, seed)
    return _raw_loop(env, model, steps, seed)


def _raw_loop(env: gym.Env, model: mujoco.MjModel, steps: int, seed: int) -> float:
    u = env.unwrapped
    data = mujoco.MjData(model)
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    controls = rng.uniform(low, high, size=(steps, low.size))
    horizon = env.spec.max_episode_steps or 200
    mujoco.mj_resetData(model, data)
    mujoco.mj_forward(model, data)
    frame_skip = int(u.frame_skip)
    start = time.perf_counter()
    for t in range(steps):
        if t % horizon == 0:
            mujoco.mj_resetData(model, data)
        data.ctrl[:] = controls[t]
        mujoco.mj_step(model, data, frame_skip)
    return steps / (time.perf_counter() - start)


def gym_env_rate(env: gym.Env, steps: int, seed: int) -> float:
    """``env.step`` rate with random actions (seeded), resetting at episode ends; env steps per second."""
    env.action_space.seed(seed)
    actions = [env.action_space.sample() for _ in range(steps)]
    env.reset(seed=seed)
    start = time.perf_counter()
    for t in range(steps):
        _, _, terminated, truncated, _ = env.step(actions[t])
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


def _peak_rss_mib(pid: int | str = "self") -> float | None:
    """Peak resident memory of a process (Linux ``VmHWM``), MiB; None where /proc is not available."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _sampler_rate(sampler: Any, tasks: list, episodes: int, seed: int) -> float:
    import torch

    from metarl.policies import GaussianActor, GaussianMLPPolicy, batch_params

    obs_dim = int(np.prod(sampler.observation_space.shape))
    act_dim = int(np.prod(sampler.action_space.shape))
    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(obs_dim, act_dim, (64, 64))
    params = {k: v.detach() for k, v in batch_params(policy.params(), len(tasks)).items()}
    actor = GaussianActor(policy.config, params, seed=seed)
    start = time.perf_counter()
    batch = sampler.sample(actor, tasks, episodes, seed)
    return batch.env_steps / (time.perf_counter() - start)


def _task_env(env_id: str, task: Any) -> Callable[[], gym.Env]:
    return functools.partial(_make_task_env, env_id, task)


def _make_task_env(env_id: str, task: Any) -> gym.Env:
    import metarl

    env = gym.make(env_id)
    metarl.family_of(env).set_task(task)
    return env


def _async_rate(vec: gym.vector.VectorEnv, steps: int, seed: int) -> float:
    """Env steps per second of ``vec`` stepping ``steps`` env steps with a 64x64 tanh Gaussian MLP's actions
    (numpy, batched over its envs, as the samplers' actors compute them)."""
    rng = np.random.default_rng(seed)
    obs, _ = vec.reset(seed=seed)
    obs_dim, act_dim = obs.shape[1], vec.single_action_space.shape[0]
    w1, w2, w3 = (rng.normal(size=shape) / np.sqrt(shape[0]) for shape in ((obs_dim, 64), (64, 64), (64, act_dim)))
    low, high = vec.single_action_space.low, vec.single_action_space.high
    done, n = 0, vec.num_envs
    start = time.perf_counter()
    while done < steps:
        mean = np.tanh(np.tanh(obs @ w1) @ w2) @ w3
        obs, *_ = vec.step(np.clip(mean + rng.normal(size=mean.shape), low, high))
        done += n
    return done / (time.perf_counter() - start)


def _envpool_rate(python: str, steps: int, envs: int, horizon: int, seed: int) -> tuple[float, str]:
    import json
    import subprocess

    script = Path(__file__).resolve().parent.parent / "experiments" / "benchmarks" / "envpool_rate.py"
    done = subprocess.run([python, str(script), "--steps", str(steps), "--envs", str(envs), "--threads",
                           str(os.cpu_count() or 1), "--horizon", str(horizon), "--seed", str(seed)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"metarl speed: the EnvPool measurement failed under {python}: "
                         f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    line = json.loads(done.stdout.strip().splitlines()[-1])
    return float(line["rate"]), str(line["envpool"])


def measure(family: str, tasks: int = 40, episodes: int = 20, repeats: int = 3, workers: int | None = None,
            single_steps: int = 4000, seed: int = 0, log: Any = print, async_envs: int = ASYNC_ENVS,
            envpool_python: str | None = None) -> dict[str, Any]:
    """Measure the four rates for ``family`` (a built-in MuJoCo family name); returns the result record."""
    import metarl
    from metarl.envs.native import supported_families
    from metarl.sampling import Sampler
    from metarl.tasks import TaskError

    if family not in supported_families():
        raise TaskError(f"metarl speed: {family!r} is not a MuJoCo family the native backend runs; "
                        f"choose from {', '.join(supported_families())}")
    if envpool_python and not family.startswith("HalfCheetah"):
        raise ValueError(f"metarl speed: --envpool-python times EnvPool's HalfCheetah-v5, a reference for the "
                         f"HalfCheetah families only, not {family}")
    for name, value in (("tasks", tasks), ("episodes", episodes), ("repeats", repeats), ("steps", single_steps)):
        if value < 1:
            raise ValueError(f"metarl speed: --{name} must be >= 1, got {value}")
    env_id = metarl.env_id(family)
    env = gym.make(env_id)
    family_env = metarl.family_of(env)
    task_list = family_env.sample_tasks(tasks, "train", seed=seed)
    family_env.set_task(task_list[0])
    samples: dict[str, list[float]] = {k: [] for k in RATE_KEYS}
    samplers: dict[str, Sampler] = {}
    async_vec = None
    try:
        samplers["gymnasium_vector"] = Sampler(env_id, workers=workers, backend="gymnasium")
        samplers["native"] = Sampler(env_id, workers=workers, backend="native")
        for sampler in samplers.values():  # start the workers and build the env slots before timing
            _sampler_rate(sampler, task_list, episodes, seed)
        async_vec = gym.vector.AsyncVectorEnv([_task_env(env_id, task_list[i % len(task_list)])
                                               for i in range(async_envs)],
                                              autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        batch_steps = tasks * episodes * family_env.horizon
        for r in range(repeats):
            # Interleaved, so a slow spell on a shared machine hits every method alike.
            samples["raw_mj_step"].append(_raw_rate(env, single_steps, seed + r))
            samples["raw_mj_step_native_settings"].append(_raw_rate(env, single_steps, seed + r, native_settings=True))
            samples["gymnasium_env"].append(gym_env_rate(env, single_steps, seed + r))
            for key, sampler in samplers.items():
                samples[key].append(_sampler_rate(sampler, task_list, episodes, seed + r))
            samples["gymnasium_async_vector"].append(_async_rate(async_vec, batch_steps, seed + r))
            if envpool_python:
                rate, envpool_version = _envpool_rate(envpool_python, batch_steps, async_envs, family_env.horizon,
                                                      seed + r)
                samples.setdefault("envpool", []).append(rate)
            log(f"  {family} repeat {r + 1}/{repeats}: "
                + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in samples.items()))
        # Peak memory of the native workers, which hold the MjData of every slot and the batch arrays.
        worker_rss = [_peak_rss_mib(p.pid) for p in samplers["native"]._procs]
    finally:
        env.close()
        if async_vec is not None:
            async_vec.close()
        for sampler in samplers.values():
            sampler.close()
    rates = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "family": family,
        "rates": rates,
        "ratios_to_raw": {k: v / rates["raw_mj_step"] for k, v in rates.items()},
        "native_over_gymnasium_vector": rates["native"] / rates["gymnasium_vector"],
        "native_over_async_vector_env": rates["native"] / rates["gymnasium_async_vector"],
        **({"native_over_envpool": rates["native"] / rates["envpool"], "envpool_version": envpool_version,
            "envpool_env": "HalfCheetah-v5"} if "envpool" in rates else {}),
        "async_vector_envs": async_envs,
        "samples": samples,
        "batch": {"tasks": tasks, "episodes_per_task": episodes, "horizon": family_env.horizon},
        "workers": samplers["native"].workers,
        "memory_mib": {"native_workers_peak_rss": worker_rss, "main_process_peak_rss": _peak_rss_mib()},
        "repeats": repeats,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "mujoco": mujoco.__version__,
                    "gymnasium": gym.__version__},
    }


def format_table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'family':<20}{'method':<30}{'env steps/s':>14}{'x raw':>8}"]
    for res in results:
        for key in res["rates"]:
            lines.append(f"{res['family']:<20}{key:<30}{res['rates'][key]:>14,.0f}{res['ratios_to_raw'][key]:>8.2f}")
        lines.append(f"{'':<20}{'native / gym vector':<44}{res['native_over_gymnasium_vector']:>8.2f}")
        if "native_over_async_vector_env" in res:
            lines.append(f"{'':<20}{'native / AsyncVectorEnv':<44}{res['native_over_async_vector_env']:>8.2f}")
        if "native_over_envpool" in res:
            lines.append(f"{'':<20}{'native / EnvPool':<44}{res['native_over_envpool']:>8.2f}")
        rss = [r for r in res["memory_mib"]["native_workers_peak_rss"] if r is not None]
        if rss:
            lines.append(f"{'':<20}native workers' peak memory: {' + '.join(f'{r:.0f}' for r in rss)} MiB")
    return "\n".join(lines)


def write_json(results: list[dict[str, Any]], path: str | Path, recorder: Recorder) -> None:
    """One family's result as it is, several as ``{"results": [...]}``; with the provenance of the work."""
    write_result(path, results[0] if len(results) == 1 else {"results": results}, recorder)
