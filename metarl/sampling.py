"""Parallel episode collection for a meta-batch: ``N`` tasks x ``E`` episodes, one env per episode slot.

The sampler owns worker processes (one per core by default), each holding the env slots of a contiguous
chunk of tasks. A call ships an *actor* (a small picklable object with the policy's parameters for
every task) to the workers; each worker rolls out all its slots to the end of their episodes, running
batched policy inference for its slots every step, and sends the padded arrays back. There is no
per-step traffic between processes, and the main process is idle while the workers use the cores.

Actor protocol (see `metarl.agents.policies.GaussianActor`):

* ``actor.start(task_indices, slots_per_task)``: called in the worker before a rollout, with the
  global indices of the worker's tasks (to pick per-task parameters and seed per-task noise);
* ``actor.act(obs) -> actions``: ``obs`` is ``[n_tasks, slots, obs_dim]``, returns ``[n_tasks, slots, act_dim]``;
* optional ``actor.observe(rewards, dones)``: ``[n_tasks, slots]`` after every step, ``dones`` marking
  episode ends (recurrent actors; a slot runs ``episodes_per_trial`` episodes without a restart).

Results do not depend on the number of workers: env seeds are derived from (seed, task index, episode
index) and actors seed their noise per task. Each slot runs exactly one trial (``episodes_per_trial`` episodes, default 1) per call; no autoreset.

Backends: ``gymnasium`` (this module: Gymnasium envs made with ``gymnasium.make``) is the reference and
works with any registered task family. A faster backend only has to offer the same ``sample``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from metarl.episodes import EpisodeBatch
from metarl.tasks import Task, TaskError, family_of


def slot_seed(seed: int, task_index: int, episode: int) -> int:
    """The reset seed of one episode slot: independent of how slots are spread over workers."""
    return int(np.random.SeedSequence([seed, task_index, episode]).generate_state(1)[0])


class _Rollouts:
    """The env slots of one process and the rollout loop over them."""

    def __init__(self, env_id: str, env_kwargs: dict[str, Any]):
        self.env_id, self.env_kwargs = env_id, env_kwargs
        self.envs: list[gym.Env] = []

    def _ensure(self, slots: int) -> None:
        while len(self.envs) < slots:
            self.envs.append(gym.make(self.env_id, **self.env_kwargs))

    def run(self, actor: Any, tasks: Sequence[Task], task_indices: Sequence[int], episodes: int,
            seed: int, episodes_per_trial: int = 1) -> dict[str, Any]:
        K = episodes_per_trial
        n, E = len(tasks), episodes
        M = E // K  # slots (trials) per task
        S = n * M
        self._ensure(S)
        envs = self.envs[:S]
        for j, task in enumerate(tasks):
            for m in range(M):
                family_of(envs[j * M + m]).set_task(task)
        horizon = envs[0].spec.max_episode_steps if envs[0].spec and envs[0].spec.max_episode_steps else None
        if horizon is None:
            horizon = family_of(envs[0]).horizon
        # Episode (j, m*K + k) is the k-th episode of slot m of task j; its env seed depends only on that.
        first = [envs[j * M + m].reset(seed=slot_seed(seed, task_indices[j], m * K))[0]
                 for j in range(n) for m in range(M)]
        obs = np.stack(first).astype(np.float32)
        obs_dim = obs.shape[1]
        space = envs[0].action_space
        act_dim = int(np.prod(space.shape))
        low, high = space.low.astype(np.float64), space.high.astype(np.float64)

        observations = np.zeros((n, E, horizon, obs_dim), np.float32)
        actions = np.zeros((n, E, horizon, act_dim), np.float32)
        rewards = np.zeros((n, E, horizon), np.float32)
        mask = np.zeros((n, E, horizon), np.float32)
        terminated = np.zeros((n, E), bool)
        truncated = np.zeros((n, E), bool)
        last_obs = np.zeros((n, E, obs_dim), np.float32)
        terms: dict[str, np.ndarray] = {}
        active = np.ones(S, bool)
        episode_in_trial = np.zeros(S, int)
        step_in_episode = np.zeros(S, int)
        observe = getattr(actor, "observe", None)

        actor.start(list(task_indices), M)
        t = 0
        while active.any():
            act = np.asarray(actor.act(obs.reshape(n, M, obs_dim)), dtype=np.float32).reshape(S, act_dim)
            if not np.all(np.isfinite(act)):
                raise FloatingPointError(f"the policy produced non-finite actions at step {t}")
            step_rewards = np.zeros(S, np.float32)
            step_dones = np.zeros(S, bool)
            for s in np.flatnonzero(active):
                j, e, i = s // M, (s % M) * K + episode_in_trial[s], step_in_episode[s]
                o, r, term, trunc, info = envs[s].step(np.clip(act[s], low, high))
                observations[j, e, i] = obs[s]
                actions[j, e, i] = act[s]
                rewards[j, e, i] = r
                mask[j, e, i] = 1.0
                step_rewards[s] = r
                for key, value in info.items():
                    if key.startswith("reward_"):
                        if key not in terms:
                            terms[key] = np.zeros((n, E), np.float32)
                        terms[key][j, e] += value
                obs[s] = o
                step_in_episode[s] += 1
                # An env registered without a time limit is cut at the family's horizon.
                trunc = bool(trunc) or (not term and step_in_episode[s] >= horizon)
                if term or trunc:
                    step_dones[s] = True
                    terminated[j, e], truncated[j, e] = bool(term), not term
                    last_obs[j, e] = o
                    if episode_in_trial[s] + 1 < K:  # next episode of the same trial, same task
                        episode_in_trial[s] += 1
                        step_in_episode[s] = 0
                        obs[s] = envs[s].reset(seed=slot_seed(seed, task_indices[j], e + 1))[0]
                    else:
                        active[s] = False
            if observe is not None:
                observe(step_rewards.reshape(n, M), step_dones.reshape(n, M))
            t += 1

        return {
            "observations": observations, "actions": actions, "rewards": rewards, "mask": mask,
            "terminated": terminated, "truncated": truncated, "last_observations": last_obs,
            "reward_terms": terms,
        }

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.envs = []


def _worker(conn: Any, env_id: str, env_kwargs: dict[str, Any], sys_path: list[str]) -> None:
    import sys

    import torch

    sys.path[:] = sys_path
    torch.set_num_threads(1)  # one core per worker; the workers are the parallelism
    import metarl  # noqa: F401  (registers the families)

    rollouts = _Rollouts(env_id, env_kwargs)
    try:
        while True:
            command, payload = conn.recv()
            if command == "close":
                break
            try:
                conn.send(("ok", rollouts.run(*payload)))
            except Exception:  # sent to the main process, which raises it there
                conn.send(("error", traceback.format_exc()))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        rollouts.close()
        conn.close()


class WorkerError(RuntimeError):
    """An exception raised inside a sampler worker (its traceback is in the message)."""


class GymnasiumSampler:
    """Collects a meta-batch with Gymnasium envs in ``workers`` processes (0: in this process).

    Args:
        env_id: a registered task family id (``metarl/HalfCheetahVel-v0``, ``module:me/Mine-v0``).
        env_kwargs: passed to ``gymnasium.make``.
        workers: processes to use (default: one per core); capped at the number of tasks per call.
    """

    backend = "gymnasium"

    def __init__(self, env_id: str, env_kwargs: dict[str, Any] | None = None, workers: int | None = None):
        self.env_id, self.env_kwargs = env_id, dict(env_kwargs or {})
        probe = gym.make(env_id, **self.env_kwargs)
        try:
            self.family = family_of(probe)
            self.observation_space, self.action_space = probe.observation_space, probe.action_space
        finally:
            probe.close()
        if not isinstance(self.action_space, gym.spaces.Box) or not isinstance(self.observation_space, gym.spaces.Box):
            raise TaskError(f"{env_id}: metarl's agents need Box observation and action spaces")
        self.workers = (os.cpu_count() or 1) if workers is None else int(workers)
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self._local: _Rollouts | None = None
        self._procs: list[Any] = []
        self._conns: list[Any] = []

    def _start(self, count: int) -> None:
        if len(self._procs) >= count:
            return
        import sys

        ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock workers
        while len(self._procs) < count:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, self.env_id, self.env_kwargs, list(sys.path)),
                               daemon=True)
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)

    def sample(self, actor: Any, tasks: Sequence[Task], episodes_per_task: int, seed: int,
               episodes_per_trial: int = 1) -> EpisodeBatch:
        """Roll out ``episodes_per_task`` episodes of every task with ``actor``; returns an `EpisodeBatch`.

        With ``episodes_per_trial = K > 1`` each slot runs K consecutive episodes of its task (a trial),
        and the actor is not restarted in between (recurrent actors keep their state; ``observe`` gets
        ``dones`` at every episode end). Episode ``m * K + k`` of a task is episode k of its trial m.
        """
        tasks = list(tasks)
        if not tasks:
            raise ValueError("sample: no tasks given")
        if episodes_per_task < 1:
            raise ValueError(f"sample: episodes_per_task must be >= 1, got {episodes_per_task}")
        if episodes_per_trial < 1 or episodes_per_task % episodes_per_trial:
            raise ValueError(f"sample: episodes_per_trial ({episodes_per_trial}) must be >= 1 and divide "
                             f"episodes_per_task ({episodes_per_task})")
        for task in tasks:
            self.family.check_task(task)
        chunks = [c for c in np.array_split(np.arange(len(tasks)), max(1, min(self.workers, len(tasks)))) if len(c)]
        if self.workers == 0:
            if self._local is None:
                self._local = _Rollouts(self.env_id, self.env_kwargs)
            parts = [self._local.run(actor, tasks, list(range(len(tasks))), episodes_per_task, seed, episodes_per_trial)]
        else:
            self._start(len(chunks))
            parts, errors = [], []
            try:
                for conn, chunk in zip(self._conns, chunks, strict=False):
                    conn.send(("sample", (actor, [tasks[i] for i in chunk], chunk.tolist(), episodes_per_task, seed,
                                          episodes_per_trial)))
                for conn in self._conns[: len(chunks)]:
                    status, result = conn.recv()
                    (parts if status == "ok" else errors).append(result)
            except (EOFError, OSError) as exc:  # a worker died (killed, out of memory, crashed)
                codes = [p.exitcode for p in self._procs]
                self.close()  # no stale replies can be read by a later call
                raise WorkerError(f"a sampler worker died (exit codes {codes}): {exc!r}") from exc
            if errors:
                raise WorkerError("a sampler worker failed:\n" + errors[0])
        return EpisodeBatch.from_numpy(tasks, _concat(parts))

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        self._procs, self._conns = [], []
        if self._local is not None:
            self._local.close()
            self._local = None

    def __enter__(self) -> GymnasiumSampler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _concat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    if len(parts) == 1:
        return parts[0]
    horizon = max(p["rewards"].shape[2] for p in parts)
    out: dict[str, Any] = {}
    for key in ("observations", "actions", "rewards", "mask"):
        padded = []
        for p in parts:
            a = p[key]
            pad = [(0, 0)] * a.ndim
            pad[2] = (0, horizon - a.shape[2])
            padded.append(np.pad(a, pad))
        out[key] = np.concatenate(padded)
    for key in ("terminated", "truncated", "last_observations"):
        out[key] = np.concatenate([p[key] for p in parts])
    names = sorted({k for p in parts for k in p["reward_terms"]})
    out["reward_terms"] = {
        k: np.concatenate([p["reward_terms"].get(k, np.zeros(p["rewards"].shape[:2], np.float32)) for p in parts])
        for k in names
    }
    return out


def make_sampler(env_id: str, env_kwargs: dict[str, Any] | None = None, backend: str = "gymnasium",
                 workers: int | None = None) -> GymnasiumSampler:
    """The sampler for ``backend`` (``gymnasium``; others register here as they are added)."""
    if backend == "gymnasium":
        return GymnasiumSampler(env_id, env_kwargs, workers)
    raise ValueError(f"unknown sampler backend {backend!r}; available: gymnasium")
