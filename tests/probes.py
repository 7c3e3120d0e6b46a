"""Probe task families shared by the tests (imported as ``probes``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from metarl.tasks import DirectionTask, TaskError, TaskFamily


class HiddenSide(TaskFamily, gym.Env):
    """A probe family: the goal g = 0.8 d (d = +-1) is never observed (the observation is a constant);
    reward -|a - g| per step, 4 steps per episode. A memoryless policy cannot do better in episode 2
    than in episode 1; a recurrent one that remembers episode 1 can."""

    family = "HiddenSide"
    task_type = DirectionTask
    horizon = 4
    n_heldout = 2
    disjoint_heldout = False
    has_ood = False

    def __init__(self):
        self.observation_space = spaces.Box(-1, 1, (1,), np.float32)
        self.action_space = spaces.Box(-1, 1, (1,), np.float32)
        self.set_task(self.default_task())

    def default_task(self):
        return DirectionTask(self.family, 1.0)

    def heldout_tasks(self, split):
        return (DirectionTask(self.family, 1.0), DirectionTask(self.family, -1.0))

    def _draw_tasks(self, rng, n, split):
        return [DirectionTask(self.family, float(d)) for d in rng.choice([-1.0, 1.0], n)]

    def _validate_task(self, task):
        if task.direction not in (-1.0, 1.0):
            raise TaskError(f"{self.family}: direction must be +-1")

    def _apply_task(self, task):
        self._goal = 0.8 * task.direction

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}

    def step(self, action):
        reward = -abs(float(action[0]) - self._goal)
        return np.zeros(1, np.float32), reward, False, False, {"reward_goal": reward}


if "tests/HiddenSide-v0" not in gym.registry:
    gym.register("tests/HiddenSide-v0", entry_point=HiddenSide, max_episode_steps=4)
