"""Shared fixtures for the task-family tests.

The fixtures hand out small callables rather than importable helpers so that the test modules need
no package of their own:

* ``make``: make a family by name (``metarl.make_family``, so with its registered time limit) and close
  it when the test ends;
* ``random_actions``: a reproducible block of actions drawn uniformly from an action space, in the
  space's dtype (MuJoCo control costs are computed in that dtype, so both envs of a comparison must
  see the very same arrays);
* ``rollout``: reset with a seed, apply a fixed action sequence, and reset (unseeded, so the env's own
  RNG carries on) whenever an episode ends, recording everything;
* ``assert_same_rollout``: bit-for-bit comparison of two rollouts.
"""

from __future__ import annotations

import os

# The suite trains in this process with sampler workers beside it on few cores: PyTorch's OpenMP threads sleep
# while they wait, as the metarl command makes them (metarl.system.sleeping_openmp_threads; before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

import metarl


@dataclass
class Rollout:
    """What a rollout saw. ``resets[k]`` is the index into the step lists at which episode ``k`` began."""

    reset_obs: list[np.ndarray] = field(default_factory=list)
    resets: list[int] = field(default_factory=list)
    obs: list[np.ndarray] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    terminated: list[bool] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    infos: list[dict[str, Any]] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)

    @property
    def n_episode_ends(self) -> int:
        return sum(t or u for t, u in zip(self.terminated, self.truncated, strict=True))


def _rollout(env: gym.Env, actions: Sequence[np.ndarray], seed: int | None) -> Rollout:
    out = Rollout()
    obs, _ = env.reset(seed=seed)
    out.reset_obs.append(np.array(obs, copy=True))
    out.resets.append(0)
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        out.obs.append(np.array(obs, copy=True))
        out.rewards.append(reward)
        out.terminated.append(bool(terminated))
        out.truncated.append(bool(truncated))
        out.infos.append(dict(info))
        out.actions.append(action)
        if terminated or truncated:
            obs, _ = env.reset()
            out.reset_obs.append(np.array(obs, copy=True))
            out.resets.append(len(out.obs))
    return out


def _assert_same_rollout(a: Rollout, b: Rollout) -> None:
    assert a.resets == b.resets, "episodes ended at different steps"
    for k, (x, y) in enumerate(zip(a.reset_obs, b.reset_obs, strict=True)):
        assert x.dtype == y.dtype and np.array_equal(x, y), f"reset observation {k} differs"
    assert len(a.obs) == len(b.obs)
    for t in range(len(a.obs)):
        assert a.obs[t].dtype == b.obs[t].dtype, f"step {t}: observation dtype differs"
        assert np.array_equal(a.obs[t], b.obs[t]), f"step {t}: observation differs"
        assert a.rewards[t] == b.rewards[t], f"step {t}: reward {a.rewards[t]!r} != {b.rewards[t]!r}"
        assert a.terminated[t] == b.terminated[t], f"step {t}: terminated differs"
        assert a.truncated[t] == b.truncated[t], f"step {t}: truncated differs"


def _random_actions(space: gym.spaces.Box, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(space.low, space.high, size=(n, *space.shape)).astype(space.dtype)


@pytest.fixture
def make() -> Callable[..., gym.Env]:
    envs: list[gym.Env] = []

    def _make(name: str, **kwargs: Any) -> gym.Env:
        env = metarl.make_family(name, **kwargs)
        envs.append(env)
        return env

    yield _make
    for env in envs:
        env.close()


@pytest.fixture
def rollout() -> Callable[..., Rollout]:
    return _rollout


@pytest.fixture
def assert_same_rollout() -> Callable[[Rollout, Rollout], None]:
    return _assert_same_rollout


@pytest.fixture
def random_actions() -> Callable[..., np.ndarray]:
    return _random_actions
