"""HalfCheetah task families: target velocity and running direction.

Both are Gymnasium's ``HalfCheetah-v5`` (same model, frame_skip 5, dt 0.05 s, observations, reset noise
and dynamics) with the reward replaced through the v5 override point ``_get_rew``:

* ``HalfCheetahVel``: ``-|v_x - v*| - 0.05 ||a||^2``, ``v* ~ U[0, 3]`` (PEARL/VariBAD/ProMP range; the
  MAML lineage uses U[0, 2] and horizon 100). ``ood``: ``v*`` in (3, 4].
  info terms: ``reward_velocity``, ``reward_ctrl``.
* ``HalfCheetahDir``: ``d * v_x - 0.05 ||a||^2``, ``d in {-1, +1}``. Only two tasks exist, so the
  ``test`` split is both of them and cannot be disjoint from training; there is no ``ood`` split.
  info terms: ``reward_forward``, ``reward_ctrl``.

Where they differ from v5: v5 weights the control cost 0.1; these families use 0.05 (the meta-RL
convention). ``HalfCheetahDir(ctrl_cost_weight=0.1)`` at ``d = +1`` is exactly ``HalfCheetah-v5``.
Neither terminates; both are registered with horizon 200.

Example:
    >>> import gymnasium as gym, metarl
    >>> env = gym.make("metarl/HalfCheetahVel-v0")
    >>> metarl.family_of(env).set_task(metarl.VelocityTask("HalfCheetahVel", 2.0))
    >>> obs, info = env.reset(seed=0)
"""

from __future__ import annotations

import numpy as np
from gymnasium import utils
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

from metarl.envs._mujoco import quiet_settotalmass
from metarl.tasks import DirectionTask, TaskError, TaskFamily, VelocityTask


class HalfCheetahVel(TaskFamily, HalfCheetahEnv):
    family = "HalfCheetahVel"
    task_type = VelocityTask
    horizon = 200
    n_heldout = 30  # PEARL's test list size
    velocity_range = (0.0, 3.0)
    ood_range = (3.0, 4.0)

    def __init__(self, task: VelocityTask | None = None, ctrl_cost_weight: float = 0.05, **kwargs):
        with quiet_settotalmass():
            super().__init__(ctrl_cost_weight=ctrl_cost_weight, **kwargs)
        # Re-initialise EzPickle with *our* signature, or unpickling calls us with v5's arguments.
        utils.EzPickle.__init__(self, task, ctrl_cost_weight, **kwargs)
        self.set_task(task if task is not None else self.default_task())

    def default_task(self) -> VelocityTask:
        return VelocityTask(self.family, 1.5)

    def _draw_tasks(self, rng, n, split):
        if split == "train":
            values = rng.uniform(*self.velocity_range, size=n)
        else:
            values = rng.uniform(*self.ood_range, size=n)
            values = np.where(values <= self.ood_range[0], self.ood_range[1], values)  # (3, 4]
        return [VelocityTask(self.family, float(v)) for v in values]

    def _validate_task(self, task: VelocityTask) -> None:
        if not -10.0 <= task.velocity <= 10.0:
            raise TaskError(f"{self.family}: target velocity {task.velocity} is out of range [-10, 10] m/s")

    def _apply_task(self, task: VelocityTask) -> None:
        self._target_velocity = float(task.velocity)

    def _get_rew(self, x_velocity: float, action):
        velocity_reward = -abs(x_velocity - self._target_velocity)
        ctrl_cost = self.control_cost(action)
        reward = velocity_reward - ctrl_cost
        return reward, {"reward_velocity": velocity_reward, "reward_ctrl": -ctrl_cost}


class HalfCheetahDir(TaskFamily, HalfCheetahEnv):
    family = "HalfCheetahDir"
    task_type = DirectionTask
    horizon = 200
    n_heldout = 2
    disjoint_heldout = False
    has_ood = False

    def __init__(self, task: DirectionTask | None = None, ctrl_cost_weight: float = 0.05, **kwargs):
        with quiet_settotalmass():
            super().__init__(ctrl_cost_weight=ctrl_cost_weight, **kwargs)
        utils.EzPickle.__init__(self, task, ctrl_cost_weight, **kwargs)
        self.set_task(task if task is not None else self.default_task())

    def default_task(self) -> DirectionTask:
        return DirectionTask(self.family, 1.0)

    def heldout_tasks(self, split):
        self._check_heldout_split(split)
        return (DirectionTask(self.family, 1.0), DirectionTask(self.family, -1.0))

    def _draw_tasks(self, rng, n, split):
        return [DirectionTask(self.family, float(d)) for d in rng.choice([-1.0, 1.0], size=n)]

    def _validate_task(self, task: DirectionTask) -> None:
        if task.direction not in (-1.0, 1.0):
            raise TaskError(f"{self.family}: direction must be +1 or -1, got {task.direction}")

    def _apply_task(self, task: DirectionTask) -> None:
        self._direction = float(task.direction)

    def _get_rew(self, x_velocity: float, action):
        forward_reward = self._direction * x_velocity * self._forward_reward_weight
        ctrl_cost = self.control_cost(action)
        reward = forward_reward - ctrl_cost
        return reward, {"reward_forward": forward_reward, "reward_ctrl": -ctrl_cost}
