"""Plug your own Gymnasium env into metarl, two ways. Run: ``python experiments/custom_env/pendulum_mass.py``.

1. Write the family yourself: mix `metarl.TaskFamily` into your env class, define a task record, and
   implement four small methods (``default_task``, ``_draw_tasks``, ``_validate_task``, ``_apply_task``).
   Here: Gymnasium's Pendulum with a random pole mass and length.
2. Let metarl build it: `metarl.envs.DynamicsFamily` turns any MuJoCo env id into a family over the
   model fields you name. Here: Swimmer-v5 with random body masses and joint damping.

Register either under a Gymnasium id with the family's horizon as ``max_episode_steps`` and every metarl
sampler, agent, evaluator and baseline can use it; ``metarl.checks.check_family`` (or
``metarl check module:Id-v0`` from the shell) tells you if anything is missing.
"""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.pendulum import PendulumEnv

import metarl
from metarl.checks import check_family
from metarl.envs import DynamicsFamily, Vary


# ---- 1. a hand-written family ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PendulumTask(metarl.Task):
    """A task record: frozen, plain floats, so it pickles and round-trips through JSON."""

    mass: float
    length: float


class PendulumMass(metarl.TaskFamily, PendulumEnv):
    family = "PendulumMass"
    task_type = PendulumTask
    horizon = 200
    n_heldout = 20  # size of the fixed test and ood lists

    def __init__(self, task: PendulumTask | None = None, **kwargs):
        super().__init__(**kwargs)
        self.set_task(task if task is not None else self.default_task())

    def default_task(self) -> PendulumTask:
        return PendulumTask(self.family, mass=1.0, length=1.0)  # Pendulum-v1's own constants

    def _draw_tasks(self, rng: np.random.Generator, n: int, split: str) -> list[PendulumTask]:
        # train (and the held-out test list): mass and length x U[0.5, 2]; ood: x U[2, 3].
        low, high = (0.5, 2.0) if split == "train" else (2.0, 3.0)
        values = rng.uniform(low, high, size=(n, 2))
        return [PendulumTask(self.family, float(m), float(length)) for m, length in values]

    def _validate_task(self, task: PendulumTask) -> None:
        if task.mass <= 0 or task.length <= 0:
            raise metarl.TaskError(f"{self.family}: mass and length must be > 0, got {task}")

    def _apply_task(self, task: PendulumTask) -> None:
        self.m, self.l = task.mass, task.length

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        info["reward_swingup"] = reward  # metarl convention: reward == sum of info["reward_*"]
        return obs, reward, terminated, truncated, info


# ---- 2. a generic dynamics family ------------------------------------------------------------------
def swimmer_dynamics(**kwargs) -> DynamicsFamily:
    return DynamicsFamily(
        "Swimmer-v5",
        [Vary("body_mass", -1.0, 1.0, base=2.0), Vary("dof_damping", -1.0, 1.0, base=2.0)],
        family="SwimmerDynamics",
        horizon=200,
        **kwargs,
    )


def register() -> None:
    """Register both families with Gymnasium (idempotent)."""
    if "custom/PendulumMass-v0" not in gym.registry:
        gym.register("custom/PendulumMass-v0", entry_point=PendulumMass, max_episode_steps=PendulumMass.horizon)
    if "custom/SwimmerDynamics-v0" not in gym.registry:
        gym.register("custom/SwimmerDynamics-v0", entry_point=swimmer_dynamics, max_episode_steps=200)


register()

if __name__ == "__main__":
    for env_id in ("custom/PendulumMass-v0", "custom/SwimmerDynamics-v0"):
        passed = check_family(env_id)
        env = gym.make(env_id)
        family = metarl.family_of(env)
        returns = []
        for task in family.sample_tasks(3, "test"):
            family.set_task(task)
            env.reset(seed=0)
            env.action_space.seed(0)
            total, done = 0.0, False
            while not done:
                _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
                total, done = total + float(reward), terminated or truncated
            returns.append(round(total, 1))
        print(f"{env_id}: {len(passed)} checks passed; random-policy returns on 3 test tasks: {returns}")
