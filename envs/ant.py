"""Ant task families: heading (2-D or forward/backward) and goal reaching.

All are Gymnasium's ``Ant-v5`` (model, frame_skip 5, dt 0.05 s, observations with clipped contact
forces, reset noise, dynamics). The forward term of v5's reward only sees ``v_x``; these families need
``v_y`` too, so they override ``step`` and rebuild the reward from the terms v5 reports in ``info``.

* ``AntDir``: heading ``theta ~ U[0, 2 pi)``; reward
  ``<(cos theta, sin theta), v_xy> + 1.0 healthy - 0.5 ||a||^2 - 5e-4 ||clip(cfrc_ext, +-1)||^2`` (the
  v5 weights); terminates when the torso height leaves [0.2, 1.0]; horizon 200. The heading covers the
  whole circle, so there is no ``ood`` split. At ``theta = 0`` it is exactly ``Ant-v5``.
  (cbfinn/pytorch-maml-rl use survive bonus 0.05 and control weight 0.005.)
* ``AntFwdBwd``: the same with ``theta in {0, pi}`` (the learn2learn/ProMP "Ant fwd/bwd" task); only two
  tasks exist, so ``test`` is both and is not disjoint from training.
* ``AntGoal``: goal uniform in the disc of radius 3 (``r = 3 sqrt(U)``, angle ``2 pi U``); reward
  ``-||xy - g||_1 - 0.1 ||a||^2 - 5e-4 contact``; never terminates; horizon 200. ``ood``: goals at radius
  (3, 4]. Differs from v5 on purpose: control weight 0.1, no healthy bonus, no termination, and the
  observation *includes* the torso's x, y (``exclude_current_positions_from_observation=False``, 107
  values instead of 105), since an agent must know where it is to reach a goal.
  (cbfinn/pytorch-maml-rl: goal in the square [-3, 3]^2, reward offset +4, terminates.)

info terms: ``reward_forward``/``reward_goal``, ``reward_ctrl``, ``reward_contact`` and, for the heading
families, ``reward_survive``.
"""

from __future__ import annotations

import math

import numpy as np
from gymnasium import utils
from gymnasium.envs.mujoco.ant_v5 import AntEnv

from metarl.tasks import GoalTask, HeadingTask, TaskError, TaskFamily


class AntDir(TaskFamily, AntEnv):
    family = "AntDir"
    task_type = HeadingTask
    horizon = 200
    n_heldout = 30
    has_ood = False

    def __init__(self, task: HeadingTask | None = None, **kwargs):
        super().__init__(**kwargs)
        utils.EzPickle.__init__(self, task, **kwargs)
        self.set_task(task if task is not None else self.default_task())

    def default_task(self) -> HeadingTask:
        return HeadingTask(self.family, 0.0)

    def _draw_tasks(self, rng, n, split):
        return [HeadingTask(self.family, float(a)) for a in rng.uniform(0.0, 2 * math.pi, size=n)]

    def _validate_task(self, task: HeadingTask) -> None:
        if not 0.0 <= task.angle < 2 * math.pi:
            raise TaskError(f"{self.family}: heading angle {task.angle} is out of range [0, 2*pi)")

    def _apply_task(self, task: HeadingTask) -> None:
        self._heading = (math.cos(task.angle), math.sin(task.angle))

    def step(self, action):
        obs, _, terminated, truncated, info = super().step(action)
        cos_a, sin_a = self._heading
        forward = (cos_a * info["x_velocity"] + sin_a * info["y_velocity"]) * self._forward_reward_weight
        info["reward_forward"] = forward
        # Same association as v5 ((forward + healthy) - (ctrl + contact)), so theta = 0 is bit-exact.
        reward = (forward + info["reward_survive"]) - (-info["reward_ctrl"] - info["reward_contact"])
        return obs, reward, terminated, truncated, info


class AntFwdBwd(AntDir):
    family = "AntFwdBwd"
    n_heldout = 2
    disjoint_heldout = False

    def heldout_tasks(self, split):
        self._check_heldout_split(split)
        return (HeadingTask(self.family, 0.0), HeadingTask(self.family, math.pi))

    def _draw_tasks(self, rng, n, split):
        return [HeadingTask(self.family, float(a)) for a in rng.choice([0.0, math.pi], size=n)]

    def _validate_task(self, task: HeadingTask) -> None:
        if task.angle not in (0.0, math.pi):
            raise TaskError(f"{self.family}: heading must be 0 (forward) or pi (backward), got {task.angle}")

    def _apply_task(self, task: HeadingTask) -> None:
        # Exact +-1 (cos(pi) is -1 but sin(pi) is 1.2e-16, which would leak v_y into the reward).
        self._heading = (1.0, 0.0) if task.angle == 0.0 else (-1.0, 0.0)


class AntGoal(TaskFamily, AntEnv):
    family = "AntGoal"
    task_type = GoalTask
    horizon = 200
    n_heldout = 30  # PEARL's test list size
    radius = 3.0
    ood_radius = 4.0

    def __init__(
        self,
        task: GoalTask | None = None,
        ctrl_cost_weight: float = 0.1,
        healthy_reward: float = 0.0,
        terminate_when_unhealthy: bool = False,
        exclude_current_positions_from_observation: bool = False,
        **kwargs,
    ):
        super().__init__(
            ctrl_cost_weight=ctrl_cost_weight,
            healthy_reward=healthy_reward,
            terminate_when_unhealthy=terminate_when_unhealthy,
            exclude_current_positions_from_observation=exclude_current_positions_from_observation,
            **kwargs,
        )
        utils.EzPickle.__init__(
            self,
            task,
            ctrl_cost_weight,
            healthy_reward,
            terminate_when_unhealthy,
            exclude_current_positions_from_observation,
            **kwargs,
        )
        self.set_task(task if task is not None else self.default_task())

    def default_task(self) -> GoalTask:
        return GoalTask(self.family, (0.0, 0.0))

    def _draw_tasks(self, rng, n, split):
        if split == "train":
            r = self.radius * np.sqrt(rng.uniform(size=n))
        else:  # uniform over the annulus radius in (3, 4]
            r = np.sqrt(self.ood_radius**2 - rng.uniform(size=n) * (self.ood_radius**2 - self.radius**2))
        angle = rng.uniform(0.0, 2 * math.pi, size=n)
        return [GoalTask(self.family, (float(x), float(y))) for x, y in zip(r * np.cos(angle), r * np.sin(angle), strict=True)]

    def _validate_task(self, task: GoalTask) -> None:
        if len(task.goal) != 2:
            raise TaskError(f"{self.family}: goal must have 2 coordinates, got {task.goal!r}")
        if math.hypot(*task.goal) > 10.0:
            raise TaskError(f"{self.family}: goal {task.goal} is out of range (distance from origin <= 10)")

    def _apply_task(self, task: GoalTask) -> None:
        self._goal = np.asarray(task.goal, dtype=np.float64)

    def step(self, action):
        obs, _, terminated, truncated, info = super().step(action)
        goal_reward = -float(np.sum(np.abs(self.data.qpos[:2] - self._goal)))
        del info["reward_forward"], info["reward_survive"]  # not part of this family's reward
        info["reward_goal"] = goal_reward
        reward = goal_reward + info["reward_ctrl"] + info["reward_contact"]
        return obs, reward, terminated, truncated, info
