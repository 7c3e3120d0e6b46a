"""PointNav2D: a point mass on the plane that must reach a goal it cannot see.

The classic sanity-check family of MAML (Finn et al., 2017): the agent starts at the origin, observes
only its own position, and is rewarded by the negative distance to the goal, so the goal must be
inferred from rewards.

* task: goal ``g ~ U[-0.5, 0.5]^2`` (garage uses ``U[-2, 2]^2``; we follow the MAML paper); the keyword
  ``train_range=r`` draws training goals from ``U[-r, r]^2`` instead, the held-out splits unchanged;
  ``ood``: goals whose larger coordinate magnitude lies in (0.5, 1.0].
* step: ``p <- p + clip(a, -0.1, 0.1)``; reward ``-||p - g||_2`` after the move (``info["reward_goal"]``).
* never terminates; horizon 100 (the registered time limit).
* ``render_mode="rgb_array"``: a top view (``width`` x ``height`` pixels) of the training square, the
  goal (green), the path since the reset (blue) and the point, drawn with numpy.

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
    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, task: GoalTask | None = None, render_mode: str | None = None, width: int = 240,
                 height: int = 240, train_range: float | None = None):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"{self.family}: render_mode must be None or 'rgb_array', got {render_mode!r}")
        # The half-width of the training goal box (default goal_range); the test and ood splits stay the
        # fixed lists drawn with goal_range and ood_range, so a sweep over it measures how the width of
        # training shapes transfer (task diversity, docs/scaling.md).
        if train_range is not None and not 0 < float(train_range) <= 10.0:
            raise ValueError(f"{self.family}: train_range must be in (0, 10], got {train_range!r}")
        self.train_range = self.goal_range if train_range is None else float(train_range)
        self.render_mode, self.width, self.height = render_mode, int(width), int(height)
        self._path: list[np.ndarray] = []
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Box(-self.max_step, self.max_step, shape=(2,), dtype=np.float32)
        self._position = np.zeros(2, dtype=np.float64)
        self._goal = np.zeros(2, dtype=np.float64)
        self.set_task(task if task is not None else self.default_task())

    def default_task(self) -> GoalTask:
        return GoalTask(self.family, (0.0, 0.0))

    def heldout_tasks(self, split: str) -> tuple[GoalTask, ...]:
        # the fixed lists are drawn from the default ranges, whatever train_range is
        width, self.train_range = self.train_range, self.goal_range
        try:
            return super().heldout_tasks(split)
        finally:
            self.train_range = width

    def _draw_tasks(self, rng: np.random.Generator, n: int, split: str) -> list[GoalTask]:
        if split == "train":
            goals = rng.uniform(-self.train_range, self.train_range, size=(n, 2))
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
        self._path = [self._position]
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
        if self.render_mode is not None:
            self._path.append(self._position)
        return self._position.astype(np.float32), reward, False, False, info

    def render(self) -> np.ndarray | None:
        """The top view as an ``[height, width, 3]`` uint8 array (``render_mode="rgb_array"``)."""
        if self.render_mode != "rgb_array":
            return None
        h, w = self.height, self.width
        # A fixed view per task (the goal stays in sight), so every frame of an episode has the same scale;
        # a point that leaves the view is drawn at its edge.
        extent = max(1.2, 1.2 * float(np.abs(self._goal).max()))
        scale = 0.5 * min(w, h) / extent

        def px(points: np.ndarray) -> np.ndarray:  # world (x, y) -> pixel (column, row), y up
            points = np.clip(np.atleast_2d(points), -extent, extent)
            return np.stack([w / 2 + points[:, 0] * scale, h / 2 - points[:, 1] * scale], -1)

        img = np.full((h, w, 3), 250, np.uint8)
        rows, cols = np.mgrid[0:h, 0:w]
        for k in np.arange(-np.floor(extent / 0.5), np.floor(extent / 0.5) + 1):  # grid every 0.5
            c, r = px(np.array([k * 0.5, k * 0.5]))[0]
            shade = 200 if k == 0 else 228
            img[:, int(round(c)) % w] = np.minimum(img[:, int(round(c)) % w], shade)
            img[int(round(r)) % h, :] = np.minimum(img[int(round(r)) % h, :], shade)
        r = self.goal_range
        square = np.array([[-r, -r], [r, -r], [r, r], [-r, r], [-r, -r]])
        _polyline(img, px(square), (150, 150, 150), 1)                      # the training goal range
        if len(self._path) > 1:
            _polyline(img, px(np.asarray(self._path)), (120, 160, 230), 2)
        _disc(img, rows, cols, px(self._goal)[0], max(4.0, 0.06 * scale), (40, 170, 60))
        _disc(img, rows, cols, px(self._position)[0], max(3.0, 0.04 * scale), (20, 60, 200))
        return img


def _disc(img: np.ndarray, rows: np.ndarray, cols: np.ndarray, center: np.ndarray, radius: float,
          color: tuple[int, int, int]) -> None:
    img[(cols - center[0]) ** 2 + (rows - center[1]) ** 2 <= radius**2] = color


def _polyline(img: np.ndarray, points: np.ndarray, color: tuple[int, int, int], width: int) -> None:
    """Draw the segments between consecutive pixel ``points`` (``[P, 2]`` column, row), ``width`` pixels wide."""
    h, w = img.shape[:2]
    a, b = points[:-1], points[1:]
    steps = int(np.ceil(np.abs(b - a).max())) + 1
    t = np.linspace(0.0, 1.0, max(steps, 2))[:, None, None]
    samples = (a[None] + t * (b - a)[None]).reshape(-1, 2)
    for dc in range(width):
        for dr in range(width):
            c = np.clip(np.round(samples[:, 0]).astype(int) + dc - width // 2, 0, w - 1)
            r = np.clip(np.round(samples[:, 1]).astype(int) + dr - width // 2, 0, h - 1)
            img[r, c] = color
