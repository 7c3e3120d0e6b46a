"""Env slots: what the rollout loop (`metarl.sampling.rollout`) steps.

The slot protocol: ``horizon``, ``low``/``high`` (action bounds), ``configure(tasks, slots_per_task)``,
``reset(slot, seed) -> obs``, ``step(slots, actions) -> (obs, rewards, terminated, truncated, terms)``,
``close()``. `GymSlots` (one Gymnasium env per slot, any registered family) is the reference; the native
MuJoCo backend's `metarl.envs.native.NativeSlots` computes the built-in families in batches, and the video
recorder (`metarl.video`) renders a `GymSlots`. For the Python API (`metarl.api`): `EnvSlots` runs one env
instance of the user's, and `ReplaySlots` with a `Replayed` actor replays episodes recorded anywhere.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from metarl.tasks import Task, TaskError, episode_limit, family_of

#: Set in a sampler worker whose main process has died (`metarl.sampling.local`): the rollout loop and the slots'
#: construction stop at their next step with `Abandoned`, so that the worker leaves through its cleanup.
ABANDONED = threading.Event()


class Abandoned(BaseException):  # noqa: N818 (not an error: nobody is left to report to)
    """Raised in a sampler worker whose main process has gone; not an error of the env or the policy, so it
    passes through their ``except Exception``."""


def check_abandoned() -> None:
    """Raise `Abandoned` if this worker's main process has gone (`ABANDONED`)."""
    if ABANDONED.is_set():
        raise Abandoned()


def slot_seed(seed: int, task_index: int, episode: int) -> int:
    """The reset seed of one episode slot: independent of how slots are spread over workers."""
    return int(np.random.SeedSequence([seed, task_index, episode]).generate_state(1)[0])


class GymSlots:
    """Env slots stepped one at a time through Gymnasium (the reference backend; any registered family).

    The slot protocol that `rollout` drives, which `metarl.envs.native.NativeSlots` and the video recorder
    (`metarl.video`, a subclass that renders) also follow: ``horizon``, ``low``/``high`` (action bounds),
    ``configure(tasks, slots_per_task)``, ``reset(slot, seed) -> obs``, ``step(slots, actions)``, ``close()``.
    """

    def __init__(self, env_id: str, env_kwargs: dict[str, Any]):
        self.env_id, self.env_kwargs = env_id, env_kwargs
        self.envs: list[gym.Env] = [gym.make(env_id, **env_kwargs)]
        probe = self.envs[0]
        self.horizon = episode_limit(probe)  # the rollout loop truncates there (also envs without a time limit)
        space = probe.action_space
        self.low, self.high = space.low.astype(np.float64), space.high.astype(np.float64)

    def configure(self, tasks: Sequence[Task], slots_per_task: int) -> None:
        """Give slot ``j * slots_per_task + m`` task ``j``."""
        while len(self.envs) < len(tasks) * slots_per_task:
            check_abandoned()
            self.envs.append(gym.make(self.env_id, **self.env_kwargs))
        for j, task in enumerate(tasks):
            check_abandoned()
            for m in range(slots_per_task):
                family_of(self.envs[j * slots_per_task + m]).set_task(task)

    def reset(self, s: int, seed: int) -> np.ndarray:
        return self.envs[s].reset(seed=seed)[0]

    def step(self, idx: np.ndarray, actions: np.ndarray):
        """Step slots ``idx`` with (already clipped) ``actions``; ``(obs, reward, terminated, truncated,
        terms)`` for those slots, ``terms`` holding the ``reward_*`` entries of ``info`` and, where the env
        reports one, ``success`` (``info["success"]`` as 0 or 1)."""
        B = len(idx)
        obs, rewards = [], np.zeros(B)
        terminated, truncated = np.zeros(B, bool), np.zeros(B, bool)
        terms: dict[str, np.ndarray] = {}
        for b, s in enumerate(idx.tolist()):
            o, r, term, trunc, info = self.envs[s].step(actions[b])
            obs.append(o)
            rewards[b], terminated[b], truncated[b] = r, term, trunc
            for key, value in info.items():
                if key.startswith("reward_"):
                    terms.setdefault(key, np.zeros(B))[b] = value
            if "success" in info:
                terms.setdefault("success", np.zeros(B))[b] = float(bool(info["success"]))
        return np.stack(obs), rewards, terminated, truncated, terms

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.envs = []


def _time_limit(env: gym.Env) -> int | None:
    """The ``max_episode_steps`` of the outermost `gymnasium.wrappers.TimeLimit` around ``env``, if any."""
    while isinstance(env, gym.Wrapper):
        if isinstance(env, gym.wrappers.TimeLimit):
            return int(env._max_episode_steps)
        env = env.env
    return None


class EnvSlots(GymSlots):
    """The rollout's slot protocol over one given env instance (a user's, with its task already set; `metarl.api`)."""

    def __init__(self, env: gym.Env, spaces: tuple[tuple[int, ...], tuple[int, ...]], horizon: int | None):
        self.env_id, self.env_kwargs = None, {}
        self.envs = [env]
        if horizon is None:
            spec = getattr(env, "spec", None)
            horizon = getattr(spec, "max_episode_steps", None)
            if horizon is None:
                horizon = _time_limit(env)  # a TimeLimit wrapped around an unregistered env has no spec
            if horizon is None:
                try:
                    horizon = family_of(env).horizon
                except TaskError:
                    raise ValueError("adapt: the env has no time limit and no family horizon; pass horizon=") from None
        if int(horizon) < 1:
            raise ValueError(f"adapt: horizon must be >= 1, got {horizon}")
        self.horizon = int(horizon)
        space = env.action_space
        self.low, self.high = space.low.astype(np.float64), space.high.astype(np.float64)

    def configure(self, tasks: Any, slots_per_task: int) -> None:
        """The env keeps the task it was given: nothing to set."""

    def close(self) -> None:
        """The env is the caller's: it stays open."""


class ReplaySlots:
    """The rollout's slot protocol over recorded episodes, one after another on one slot: each step returns the
    recorded outcome whatever the action (the actor is `Replayed`, so the action is the recorded one too)."""

    def __init__(self, episodes: list[Any], low: np.ndarray, high: np.ndarray):
        self._episodes = list(episodes)
        self.horizon = max(len(ep.rewards) for ep in episodes)
        self.low, self.high = low, high
        self.current: Any = None
        self.t = 0

    def configure(self, tasks: Any, slots_per_task: int) -> None:
        """Replayed episodes have their task already."""

    def reset(self, slot: int, seed: int) -> np.ndarray:
        self.current, self.t = self._episodes.pop(0), 0
        return self.current.observations[0]

    def action(self) -> np.ndarray:
        assert self.current is not None
        return self.current.actions[self.t]

    def step(self, idx: np.ndarray, actions: np.ndarray) -> tuple:
        ep, t = self.current, self.t
        assert ep is not None
        self.t += 1
        last = self.t == len(ep.rewards)
        obs = ep.last_observation if last else ep.observations[self.t]
        terminated = bool(last and ep.terminated)
        return (obs[None], np.array([ep.rewards[t]], np.float32), np.array([terminated]),
                np.array([last and not terminated]), {})

    def close(self) -> None:
        """Nothing to close."""


class Replayed:
    """An actor driven through recorded episodes: it acts as usual (so its state advances), then the recorded
    action replaces its own (`force`, where the actor keeps the action in its state: RL², PEARL)."""

    action_scale = 1.0  # the replayed slots ignore the action; the recorded one is what the batch keeps

    def __init__(self, actor: Any, slots: ReplaySlots):
        self.actor, self.slots = actor, slots
        if hasattr(actor, "observe"):
            self.observe = actor.observe

    def start(self, task_indices: list[int], slots_per_task: int) -> None:
        self.actor.start(task_indices, slots_per_task)

    def act(self, obs: np.ndarray) -> np.ndarray:
        self.actor.act(obs)
        recorded = self.slots.action().reshape(1, 1, -1)
        force = getattr(self.actor, "force", None)
        if force is not None:
            force(recorded)
        return recorded
