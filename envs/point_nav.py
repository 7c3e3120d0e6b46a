"""PointNav2D: a point mass on the plane that must reach a goal it cannot see.

The classic sanity-check family of MAML (Finn et al., 2017): the agent starts at the origin, observes
only its own position, and is rewarded by the negative distance to the goal, so the goal must be
inferred from rewards.

* task: goal ``g ~ U[-0.5, 0.5]^2`` (garage uses ``U[-2, 2]^2``; we follow the MAML paper);
  ``ood``: goals whose larger coordinate magnitude lies in (0.5, 1.0].
* step: ``p <- p + clip(a, -0.1, 0.1)``; reward ``-||p - g||_2`` after the move (``info["reward_goal"]``).
* never terminates; horizon 100 (the registered time limit).

Example:
    >>> import gymnasium as gym, metarl
    >>> env = gym.make("metarl/PointNav2D-v0")
    >>> fam = metarl.family_of(env)
    >>> fam.set_task(fam.sample_tasks(1, "test")[0])
    >>> obs, info = env.reset(seed=0)
    >>> obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from metarl.tasks import GoalTask, TaskError, TaskFamily, uniform_outside


class PointNav2D(TaskFamily, gym.Env):
    family = "PointNav2D"
    task_type = GoalTask
    horizon = 100
    n_heldout = 40  # cbfinn's meta-test uses 40 goals
    goal_range = 0.5
    ood_range = 1.0
    max_step = 0.1
    metadata = {"render_modes": []}

    def __init__(self, task: GoalTask | None = None):
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Box(-self.max_step, self.max_step, shape=(2,), dtype=np.float32)
        self._position = np.zeros(2, dtype=np.float64)
        self._goal = np.zeros(2, dtype=np.float64)
        self.set_task(task if task is not None else self.default_task())

    def default_task(self) -> GoalTask:
        return GoalTask(self.family, (0.0, 0.0))

    def _draw_tasks(self, rng: np.random.Generator, n: int, split: str) -> list[GoalTask]:
        if split == "train":
            goals = rng.uniform(-self.goal_range, self.goal_range, size=(n, 2))
        else:
            # Pick the coordinate that leaves the training square, put it in the outer band, keep
            # the other anywhere within the ood square.
            goals = rng.uniform(-self.ood_range, self.ood_range, size=(n, 2))
            axis = rng.integers(0, 2, size=n)
            band = uniform_outside(rng, -self.goal_range, self.goal_range, -self.ood_range, self.ood_range, n)
            goals[np.arange(n), axis] = band
        return [GoalTask(self.family, (float(x), float(y))) for x, y in goals]

    def _validate_task(self, task: GoalTask) -> None:
        if len(task.goal) != 2:
            raise TaskError(f"{self.family}: goal must have 2 coordinates, got {task.goal!r}")
        if max(abs(c) for c in task.goal) > 10.0:
            raise TaskError(f"{self.family}: goal {task.goal} is out of range (|coordinate| <= 10)")

    def _apply_task(self, task: GoalTask) -> None:
        self._goal = np.asarray(task.goal, dtype=np.float64)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._position = np.zeros(2, dtype=np.float64)
        return self._position.astype(np.float32), {}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,):
            raise ValueError(f"{self.family}.step: action must have shape (2,), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"{self.family}.step: action is not finite: {action}")
        self._position = self._position + np.clip(action, -self.max_step, self.max_step)
        distance = float(np.linalg.norm(self._position - self._goal))
        reward = -distance
        info = {"reward_goal": reward, "distance": distance}
        return self._position.astype(np.float32), reward, False, False, info
