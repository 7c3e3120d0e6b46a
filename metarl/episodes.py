"""`EpisodeBatch`: the typed container between collection and update.

Every array is padded to the family's horizon ``T`` and carries a leading task axis ``N`` and an episode
axis ``E``; ``mask`` is 1 on real steps (a prefix of each row) and 0 on padding after an episode ended.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from metarl.tasks import Task

WITHIN_EPISODE_BINS = 10  # the evaluation reports the return in each tenth of the horizon


@dataclasses.dataclass
class EpisodeBatch:
    """Episodes of ``N`` tasks x ``E`` episodes, padded to ``T`` steps.

    Attributes:
        tasks: the ``N`` tasks, in the order of the leading axis.
        observations: ``[N, E, T, obs_dim]`` observation each action was taken in.
        actions: ``[N, E, T, act_dim]`` actions as sampled (before clipping to the action space).
        rewards: ``[N, E, T]``.
        mask: ``[N, E, T]`` float, 1 on real steps.
        terminated: ``[N, E]`` bool, the episode ended in a terminal state (no bootstrap).
        truncated: ``[N, E]`` bool, the episode was cut by the time limit (bootstrap if you want to).
        last_observations: ``[N, E, obs_dim]`` the observation after each episode's last step.
        reward_terms: episode sums of every ``info["reward_*"]`` term, ``{name: [N, E]}``.
        success: ``[N, E]`` bool, the episode had a step with ``info["success"]`` true; None where the env
            reports no success.
    """

    tasks: list[Task]
    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    mask: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    last_observations: torch.Tensor
    reward_terms: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    success: torch.Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return self.rewards.shape[0]

    @property
    def episodes_per_task(self) -> int:
        return self.rewards.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        """``[N, E]`` number of real steps per episode."""
        return self.mask.sum(-1)

    @property
    def returns(self) -> torch.Tensor:
        """``[N, E]`` undiscounted episode returns."""
        return (self.rewards * self.mask).sum(-1)

    def binned_returns(self, bins: int = WITHIN_EPISODE_BINS) -> torch.Tensor:
        """``[N, E, bins]`` rewards summed within each of ``bins`` equal spans of the horizon ``T`` (step t is
        in bin ``floor(t * bins / T)``): the return over time inside each episode. An episode that ended
        early has 0 in the bins after its end; the bins sum to `returns`."""
        T = self.rewards.shape[-1]
        which = (torch.arange(T) * bins) // T
        out = torch.zeros(*self.rewards.shape[:-1], bins, dtype=self.rewards.dtype)
        return out.index_add_(-1, which, self.rewards * self.mask)

    @property
    def env_steps(self) -> int:
        return int(self.mask.sum().item())

    def task_slice(self, index: Any) -> EpisodeBatch:
        """The batch restricted to some tasks (``index``: int, slice or index list), keeping the task axis."""
        if isinstance(index, int):
            index = [index]
        idx = torch.as_tensor(np.arange(self.num_tasks)[index])
        return EpisodeBatch(
            tasks=[self.tasks[i] for i in idx.tolist()],
            observations=self.observations[idx],
            actions=self.actions[idx],
            rewards=self.rewards[idx],
            mask=self.mask[idx],
            terminated=self.terminated[idx],
            truncated=self.truncated[idx],
            last_observations=self.last_observations[idx],
            reward_terms={k: v[idx] for k, v in self.reward_terms.items()},
            success=None if self.success is None else self.success[idx],
        )

    def episode_slice(self, index: slice) -> EpisodeBatch:
        """The batch restricted to some episodes of every task (``index``: a slice of the episode axis)."""
        return dataclasses.replace(
            self, observations=self.observations[:, index], actions=self.actions[:, index],
            rewards=self.rewards[:, index], mask=self.mask[:, index], terminated=self.terminated[:, index],
            truncated=self.truncated[:, index], last_observations=self.last_observations[:, index],
            reward_terms={k: v[:, index] for k, v in self.reward_terms.items()},
            success=None if self.success is None else self.success[:, index],
        )

    def to(self, device: Any) -> EpisodeBatch:
        """The batch on a torch ``device`` (itself where it is there already): an update on a GPU moves the
        episodes the CPU workers collected."""
        if self.observations.device == torch.device(device):
            return self
        move = lambda t: t.to(device)  # noqa: E731
        return dataclasses.replace(
            self, observations=move(self.observations), actions=move(self.actions), rewards=move(self.rewards),
            mask=move(self.mask), terminated=move(self.terminated), truncated=move(self.truncated),
            last_observations=move(self.last_observations),
            reward_terms={k: move(v) for k, v in self.reward_terms.items()},
            success=None if self.success is None else move(self.success))

    @staticmethod
    def from_numpy(tasks: list[Task], arrays: dict[str, Any]) -> EpisodeBatch:
        f32 = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        return EpisodeBatch(
            tasks=list(tasks),
            observations=f32(arrays["observations"]),
            actions=f32(arrays["actions"]),
            rewards=f32(arrays["rewards"]),
            mask=f32(arrays["mask"]),
            terminated=torch.as_tensor(np.asarray(arrays["terminated"], dtype=bool)),
            truncated=torch.as_tensor(np.asarray(arrays["truncated"], dtype=bool)),
            last_observations=f32(arrays["last_observations"]),
            reward_terms={k: f32(v) for k, v in arrays.get("reward_terms", {}).items()},
            success=None if arrays.get("success") is None else torch.as_tensor(np.asarray(arrays["success"], bool)),
        )
