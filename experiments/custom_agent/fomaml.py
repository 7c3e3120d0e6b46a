"""First-order MAML with a policy-gradient inner step: a meta-learner written outside metarl, in one file.

This file is all it takes to bring an algorithm to metarl: a config dataclass, a subclass of
`metarl.agent.Agent` with ``train_step``, ``state_dict`` / ``load_state_dict`` and the adaptation primitive
``adaptation``, registered under a name. Name the file in a config's ``imports:`` (or ``--import fomaml.py``)
and ``metarl train``, ``eval`` (``--video`` too), ``bench`` beside the built-in agents, ``--ray`` and
``metarl.api`` all run it (docs/custom-agents.md).

The algorithm is first-order MAML (Finn, Abbeel and Levine 2017, section 5.2): per task, one REINFORCE step
from theta on episodes of theta (the inner step), then episodes of the adapted policy; the meta-gradient is the
policy gradient at the adapted parameters, applied to theta as if the inner step's Jacobian were the identity
(no second-order terms), by Adam. The advantage is the reward-to-go minus a time-indexed mean over the task's
episodes, normalised per task. metarl's pieces it reuses: the Gaussian MLP policy and its sampling-side actor
(per-task parameters), the discounted returns, the sampler.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from metarl.agent import Agent, Collect, register_agent
from metarl.policies import GaussianActor, GaussianMLPPolicy, batch_params
from metarl.returns import discounted_returns


@dataclasses.dataclass(frozen=True)
class FOMAMLConfig:
    tasks_per_batch: int = 20       # tasks per meta-batch (the training loop draws this many)
    episodes_per_task: int = 10     # episodes per task before and after the inner step
    hidden: tuple[int, ...] = (64, 64)
    inner_lr: float = 0.1           # the inner REINFORCE step's size
    outer_lr: float = 1e-3          # Adam on theta
    gamma: float = 0.99
    init_std: float = 1.0
    action_scale: float = 1.0       # the env steps with clip(action_scale * a)

    def __post_init__(self) -> None:
        for name in ("tasks_per_batch", "episodes_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("inner_lr", "outer_lr", "init_std", "action_scale"):
            if not (np.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)}")


@register_agent
class FOMAML(Agent):
    """First-order MAML with a REINFORCE inner step (see the module docstring)."""

    name = "fomaml"
    config_class = FOMAMLConfig

    def __init__(self, config: FOMAMLConfig, sampler: Any, seed: int = 0):
        self.config, self.sampler = config, sampler
        torch.manual_seed(seed)
        self.policy = GaussianMLPPolicy(sampler.observation_space.shape[0], sampler.action_space.shape[0],
                                        config.hidden, init_std=config.init_std, action_scale=config.action_scale)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=config.outer_lr)
        self.rng = np.random.default_rng(seed)
        self.iteration = 0
        self.env_steps = 0

    def _seed(self) -> int:
        return int(self.rng.integers(2**31 - 1))

    def _loss(self, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """REINFORCE's surrogate over every task's episodes, at per-task parameters ``params`` ``[N, ...]``."""
        mask = batch.mask
        returns = discounted_returns(batch.rewards, mask, self.config.gamma)  # [N, E, T]
        count = mask.sum(1, keepdim=True).clamp_min(1.0)
        baseline = (returns * mask).sum(1, keepdim=True) / count  # per task and time step, over its episodes
        advantages = (returns - baseline) * mask
        std = ((advantages**2).sum((1, 2), keepdim=True) / mask.sum((1, 2), keepdim=True)).sqrt()
        advantages = advantages / (std + 1e-8)
        log_prob = self.policy.log_prob(batch.observations, batch.actions, params)  # [N, E, T]
        return -(log_prob * advantages).sum() / mask.sum()

    def _inner_step(self, params: dict[str, torch.Tensor], batch: Any) -> OrderedDict[str, torch.Tensor]:
        """One REINFORCE step per task from ``params`` on its episodes (first order: no graph kept)."""
        leaves = OrderedDict((k, v.detach().clone().requires_grad_()) for k, v in params.items())
        grads = torch.autograd.grad(self._loss(leaves, batch), list(leaves.values()))
        # the loss averages over all tasks' steps: scale back to each task's own average
        n = batch.mask.shape[0]
        return OrderedDict((k, (v - self.config.inner_lr * n * g).detach())
                           for (k, v), g in zip(leaves.items(), grads, strict=True))

    def train_step(self, tasks: list) -> dict[str, float]:
        c, n = self.config, len(tasks)
        theta = OrderedDict((k, v.detach()) for k, v in batch_params(self.policy.params(), n).items())
        before = self.sampler.sample(GaussianActor(self.policy.config, theta, seed=self._seed()), tasks,
                                     c.episodes_per_task, self._seed())
        adapted = self._inner_step(theta, before)
        after = self.sampler.sample(GaussianActor(self.policy.config, adapted, seed=self._seed()), tasks,
                                    c.episodes_per_task, self._seed())
        # first-order meta-gradient: the outer loss's gradient at the adapted parameters, summed over tasks
        leaves = OrderedDict((k, v.clone().requires_grad_()) for k, v in adapted.items())
        outer = self._loss(leaves, after)
        grads = torch.autograd.grad(outer, list(leaves.values()))
        self.optimizer.zero_grad()
        for p, g in zip(self.policy.parameters(), grads, strict=True):
            p.grad = g.sum(0)
        self.optimizer.step()
        self.iteration += 1
        self.env_steps += before.env_steps + after.env_steps
        # the two returns under these keys are also the training progress line's "pre" and "post"
        return {"meta/return_pre_adaptation": float(before.returns.mean()),
                "meta/return_post_adaptation": float(after.returns.mean()), "loss/outer": float(outer.detach())}

    def adaptation(self, tasks: list, steps: int, episodes: int, seed: int, collect: Collect,
                   final: bool = True) -> GaussianActor:
        """Stage k: ``episodes`` episodes per task after k inner steps, each on the previous stage's episodes."""
        rng = np.random.default_rng(seed)
        params = OrderedDict((k, v.detach()) for k, v in batch_params(self.policy.params(), len(tasks)).items())
        for stage in range(steps + 1):
            actor = GaussianActor(self.policy.config, params, seed=int(rng.integers(2**31 - 1)))
            sample_seed = int(rng.integers(2**31 - 1))
            if stage == steps and not final:
                actor.start([0], 1)  # deployment: the adapted policy, ready to act on one env
                return actor
            batch = collect(actor, tasks, episodes, sample_seed)
            if stage < steps:
                params = self._inner_step(params, batch)
        return actor

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": self.rng.bit_generator.state, "iteration": self.iteration, "env_steps": self.env_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self.iteration, self.env_steps = int(state["iteration"]), int(state["env_steps"])

    @classmethod
    def save_actor(cls, actor: GaussianActor) -> dict[str, Any]:
        return {"policy_config": dict(actor.policy_config), "seed": actor.seed,
                "params": {k: torch.from_numpy(np.asarray(v)[0]) for k, v in actor.params.items()}}

    @classmethod
    def load_actor(cls, state: dict[str, Any]) -> GaussianActor:
        actor = GaussianActor(state["policy_config"], state["params"], seed=state["seed"])
        actor.start([0], 1)
        return actor
