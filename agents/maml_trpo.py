"""MAML-TRPO (Finn et al., 2017): gradient-based meta-learning with a TRPO outer step.

One meta-iteration, for a batch of N training tasks:

1. *Inner loop.* Sample E episodes per task with theta; for each of ``inner_steps`` steps take a vanilla
   policy-gradient step per task, ``theta'_i = theta - alpha * grad L_i(theta)``, with advantages from
   the linear feature baseline refitted on that task's episodes (normalised per task), and sample fresh
   episodes with the adapted parameters for the next step.
2. *Outer loop.* On the episodes of the final adapted policies, the surrogate
   ``L(theta) = -mean_i E[pi_{theta'_i(theta)}(a|s) / pi_old(a|s) * A]`` is differentiated through the
   adaptation (second order: ``create_graph=True``; ``first_order=True`` treats the inner gradient as
   a constant, so d theta'/d theta = I). TRPO: solve ``F x = -g`` by conjugate gradient with
   Hessian-vector products of the mean KL(pi_old || pi_{theta'(theta)}) (also through the
   adaptation), scale to the KL bound, and backtrack until the KL bound holds and the surrogate
   improves with finite values.

All tasks are processed at once: theta is expanded along a leading task axis, so one batched network
evaluation and one backward pass give every task's inner gradient (each task's loss only touches its
own slice). Settings default to the anchors' (docs/anchors.md): 40 tasks x 20 episodes, alpha 0.1, one
inner step, max KL 0.01, 10 CG iterations, damping 1e-5, 15 line-search steps x 0.8, gamma 0.99, GAE
lambda 1, linear baseline.

The finite-horizon return is the objective: episodes cut at the horizon are not bootstrapped (the
baseline sees time as a feature, as in the anchors); terminations are true ends.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from metarl.agent import Agent, Collect
from metarl.agents.baselines import LinearFeatureBaseline
from metarl.config import check_ranges
from metarl.episodes import EpisodeBatch
from metarl.optim import (
    backtracking_line_search,
    conjugate_gradient,
    flatten,
    unflatten_like,
)
from metarl.policies import GaussianActor, GaussianMLPPolicy, batch_params
from metarl.returns import discounted_returns, gae, normalize
from metarl.system import keep_freed_memory
from metarl.tasks import Task

Params = OrderedDict  # name -> tensor
INNER_OBJECTIVES = ("log_prob", "lvc")


@dataclasses.dataclass(frozen=True)
class MAMLTRPOConfig:
    """Hyperparameters of MAML-TRPO (defaults: the anchors' settings, docs/anchors.md)."""

    tasks_per_batch: int = 40
    episodes_per_task: int = 20
    inner_steps: int = 1
    inner_lr: float = 0.1
    first_order: bool = False
    gamma: float = 0.99
    gae_lambda: float = 1.0
    normalize_advantages: bool = True
    max_kl: float = 0.01
    cg_iters: int = 10
    cg_damping: float = 1e-5
    ls_max_steps: int = 15
    ls_backtrack: float = 0.8
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    init_std: float = 1.0
    init: str = "xavier"            # "xavier" (pytorch-maml-rl) or "orthogonal" (small output layer)
    # Conventions where the anchors differ (metarl/policies.py): "sum" of log-probs and KLs over action
    # dimensions (cbfinn, pytorch-maml-rl, ProMP, garage) or their "mean" (learn2learn); the env sees
    # clip(action_scale * a) (0.1: pytorch-maml-rl's and ProMP's division of the output by 10).
    log_prob_reduction: str = "sum"
    action_scale: float = 1.0
    # KL-bounded inner step (0: off, the plain step of every anchor). With a fixed inner_lr the inner step's KL
    # grows as the policy sharpens (measured 0.003 -> 38 nats on PointNav2D, 0.05 -> 2.7 on HalfCheetahDir);
    # with inner_max_kl > 0 each task's step is shrunk to alpha_i = inner_lr * min(1, sqrt(inner_max_kl / KL_i))
    # where KL_i is the true (summed) KL of the full step on that task's adaptation episodes, so no step
    # moves its policy by much more than inner_max_kl nats; alpha_i is a constant of the meta-gradient.
    inner_max_kl: float = 0.0
    # The inner step's objective, as the meta-gradient differentiates it. "log_prob": -mean(log pi * A), the
    # MAML estimator of every anchor (Finn et al. 2017): its Hessian is E[A grad^2 log pi], with no term for the
    # adaptation episodes having been sampled by theta. "lvc": ProMP's low-variance curvature objective
    # (Rothfuss et al. 2019, Sec. 5), -mean(pi / pi_sampling * A) with pi_sampling the distribution that sampled
    # the episodes (held fixed): at the sampling point the same gradient, so the same adaptation, but its Hessian
    # adds E[A grad log pi grad log pi^T] (per time step), which gives the pre-update policy credit for the
    # episodes it samples; away from it (the line search's candidates) the inner gradient is importance-weighted,
    # so the line search tests the objective the step was computed for.
    inner_objective: str = "log_prob"
    # Curvature from a subsample (1: exact, every anchor's). With k > 1, conjugate gradient's KL Hessian-vector
    # products (the inner-loss Hessians in the adaptation's Jacobian and the Fisher of the adapted policies)
    # use every k-th episode of each task; the meta-gradient, the adapted parameters and the line search's
    # surrogate and KL stay exact. OpenAI baselines' TRPO takes its Fisher-vector products on every 5th sample;
    # these products are ~85% of a MAML-TRPO update (experiments/benchmarks/maml_speed.py).
    fisher_subsample: int = 1

    def __post_init__(self) -> None:
        positive_ints = ("tasks_per_batch", "episodes_per_task", "inner_steps", "cg_iters", "ls_max_steps",
                         "fisher_subsample")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"agent.{name} must be a positive integer, got {value!r}")
        check_ranges(self, {"inner_lr": (0, 100, "(]"), "max_kl": (0, 100, "(]"), "init_std": (0, 100, "(]"),
                            "action_scale": (0, 1000, "(]"), "cg_damping": (0, 1000, "[]"),
                            "inner_max_kl": (0, 100, "[]")})
        if not (isinstance(self.gamma, (int, float)) and 0 < self.gamma <= 1):
            raise ValueError(f"agent.gamma must be in (0, 1], got {self.gamma!r}")
        if not (isinstance(self.gae_lambda, (int, float)) and 0 <= self.gae_lambda <= 1):
            raise ValueError(f"agent.gae_lambda must be in [0, 1], got {self.gae_lambda!r}")
        if not (isinstance(self.ls_backtrack, (int, float)) and 0 < self.ls_backtrack < 1):
            raise ValueError(f"agent.ls_backtrack must be in (0, 1), got {self.ls_backtrack!r}")
        if self.inner_objective not in INNER_OBJECTIVES:
            raise ValueError(f"agent.inner_objective must be one of {', '.join(INNER_OBJECTIVES)}, "
                             f"got {self.inner_objective!r}")
        if self.inner_objective != "log_prob" and self.first_order:
            raise ValueError("agent.inner_objective 'lvc' changes only the inner step's Hessian, which first_order "
                             "drops: set first_order: false or inner_objective: log_prob")
        if self.init not in ("xavier", "orthogonal"):
            raise ValueError(f"agent.init must be 'xavier' or 'orthogonal', got {self.init!r}")
        if self.log_prob_reduction not in ("sum", "mean"):
            raise ValueError(f"agent.log_prob_reduction must be 'sum' or 'mean', got {self.log_prob_reduction!r}")
        if self.activation not in ("tanh", "relu"):
            raise ValueError(f"agent.activation must be 'tanh' or 'relu', got {self.activation!r}")
        if not self.hidden or any((not isinstance(h, int)) or h < 1 for h in self.hidden):
            raise ValueError(f"agent.hidden must be a non-empty list of positive integers, got {self.hidden!r}")


@dataclasses.dataclass
class OuterBatch:
    """What the outer objective needs: inner-loop episodes (with their advantages), the episodes of
    the adapted policies, their advantages and the (detached) distribution that sampled them."""

    train: list[tuple[EpisodeBatch, torch.Tensor]]
    valid: EpisodeBatch
    valid_advantages: torch.Tensor
    old_dist: Any
    inner_lrs: list[torch.Tensor] | None = None  # per inner step, each task's step size [N] (None: inner_lr)
    # with inner_objective "lvc": per inner step, the log-probs [N, E, T] of its episodes' actions under the
    # policy that sampled them (None: taken where `inner_loss` is called, i.e. that point is the sampling one)
    inner_logps: list[torch.Tensor] | None = None

    def episode_slice(self, index: slice) -> OuterBatch:
        """The post-adaptation part restricted to some episodes of every task (``train`` kept whole)."""
        return dataclasses.replace(self, valid=self.valid.episode_slice(index),
                                   valid_advantages=self.valid_advantages[:, index],
                                   old_dist=self.old_dist.episode_slice(index))


class MAMLTRPO(Agent):
    """The MAML-TRPO agent. ``sampler`` collects episodes (see `metarl.sampling`)."""

    name = "maml_trpo"
    config_class = MAMLTRPOConfig
    devices = ("cpu", "cuda")
    #: options added after checkpoints began recording their config (2026-12-01), at the value that keeps the
    #: behaviour runs recorded before them had: their folders and bench cells still resume
    added_options = {"log_prob_reduction": "sum", "action_scale": 1.0, "inner_max_kl": 0.0, "fisher_subsample": 1,
                     "inner_objective": "log_prob"}
    #: options retired after every measured comparison went against them (docs/agents.md, "Retired options"):
    #: a run recorded with one at its neutral value still resumes, at any other value it is refused
    retired_options = {
        "learn_inner_lr": ("off", "meta-learned inner step sizes: 57% against 59% one-step gain on PointNav2D, "
                                  "later steps overshooting"),
        "inner_gae_lambda": (None, "a separate GAE lambda for the inner step: 0.97 declined on HalfCheetahDir "
                                   "(138 against 362 after one step)"),
        "inner_max_kl_grad": (False, "differentiated KL-bounded step sizes: made HalfCheetahDir's decline come "
                                     "sooner"),
    }

    def __init__(self, config: MAMLTRPOConfig, sampler: Any, seed: int = 0):
        keep_freed_memory()  # the update's large tensors would otherwise be page-faulted in afresh (metarl.system)
        self.config = config
        self.sampler = sampler
        obs_dim = int(np.prod(sampler.observation_space.shape))
        act_dim = int(np.prod(sampler.action_space.shape))
        torch.manual_seed(seed)
        self.policy = GaussianMLPPolicy(obs_dim, act_dim, config.hidden, config.activation, config.init_std,
                                        init=config.init, log_prob_reduction=config.log_prob_reduction,
                                        action_scale=config.action_scale)
        self.baseline = LinearFeatureBaseline()
        self.rng = np.random.default_rng(seed)
        self.env_steps = 0
        self.iteration = 0
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> None:
        """The update (policy, inner steps, TRPO) on ``device``; the workers' actors get CPU copies."""
        self.device = torch.device(device)
        self.policy.to(self.device)

    # ---- pieces ------------------------------------------------------------------------------------
    def _seed(self) -> int:
        return int(self.rng.integers(2**31 - 1))

    def meta_params(self) -> Params:
        """What the outer step updates: the policy's parameters."""
        return self.policy.params()

    def _actor(self, params: dict[str, torch.Tensor], deterministic: bool = False) -> GaussianActor:
        return GaussianActor(self.policy.config, params, seed=self._seed(), deterministic=deterministic)

    def advantages(self, batch: EpisodeBatch, inner: bool = False) -> torch.Tensor:
        """``[N, E, T]`` GAE advantages with the per-task linear baseline, normalised per task (``inner``: for an
        adaptation step; the same λ as the outer loss's, as every anchor)."""
        c = self.config
        lam = c.gae_lambda
        returns = discounted_returns(batch.rewards, batch.mask, c.gamma)
        values = self.baseline.fit(batch.observations, returns, batch.mask).predict(batch.observations, batch.mask)
        adv = gae(batch.rewards, values, batch.mask, c.gamma, lam)
        return normalize(adv, batch.mask) if c.normalize_advantages else adv

    def inner_loss(self, params: Params, batch: EpisodeBatch, advantages: torch.Tensor,
                   sampling_logp: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over tasks of each task's policy-gradient loss (so grad w.r.t. batched params is per task):
        ``-mean_t m A`` with m the log-prob (summed, or averaged over the d action dimensions with
        ``log_prob_reduction: mean``). With ``inner_objective: lvc``, ProMP's ``-mean_t (pi / pi_sampling) A / d``,
        written ``-mean_t (m + (exp(y) - 1 - y) / d) A`` with ``y = d (m - m_sampling)``: a constant away from it,
        so the same gradient (exactly: the added term's is ``(exp(y) - 1) grad m``, zero where y is 0) and the LVC
        Hessian ``d grad m grad m^T A`` more. ``sampling_logp``: m_sampling [N, E, T] (default: ``m`` itself,
        detached, for a call at the parameters that sampled ``batch``)."""
        logp = self.policy.log_prob(batch.observations, batch.actions, params)
        if self.config.inner_objective == "lvc":
            d = batch.actions.shape[-1] if self.config.log_prob_reduction == "mean" else 1
            y = d * (logp - (logp.detach() if sampling_logp is None else sampling_logp))
            logp = logp + (torch.exp(y) - 1 - y) / d
        per_task = -(logp * advantages * batch.mask).sum((1, 2)) / batch.mask.sum((1, 2)).clamp_min(1.0)
        return per_task.sum()

    @torch.no_grad()
    def sampling_logps(self, params: Params, batch: EpisodeBatch) -> torch.Tensor | None:
        """What `OuterBatch.inner_logps` records of an inner step's episodes sampled with ``params``: their
        log-probs [N, E, T] with ``inner_objective: lvc``, else None (nothing needs them)."""
        if self.config.inner_objective != "lvc":
            return None
        return self.policy.log_prob(batch.observations, batch.actions, OrderedDict((k, v.detach()) for k, v in params.items()))

    def adapt(self, params: Params, batch: EpisodeBatch, advantages: torch.Tensor, create_graph: bool,
              lr: torch.Tensor | None = None, sampling_logp: torch.Tensor | None = None) -> Params:
        """One inner gradient step per task. ``params`` are task-batched ``[N, ...]``; ``lr``: each task's step
        size ``[N]`` (default: ``inner_lr`` for all); ``sampling_logp``: see `inner_loss`."""
        loss = self.inner_loss(params, batch, advantages, sampling_logp)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        return self._step(params, grads, lr)

    def _step(self, params: Params, grads: Any, lr: torch.Tensor | None = None) -> Params:
        """``theta - alpha * g`` per task: alpha is ``lr`` ``[N]`` (one per task) or ``inner_lr``."""
        return OrderedDict((k, p - self._alpha(p, lr) * g) for (k, p), g in zip(params.items(), grads, strict=True))

    def _alpha(self, like: torch.Tensor, lr: torch.Tensor | None):
        """The step size multiplying the task-batched ``like`` ``[N, ...]`` in `_step`."""
        if lr is None:
            return self.config.inner_lr
        return lr.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))  # one per task

    def adapt_bounded(self, params: Params, batch: EpisodeBatch, advantages: torch.Tensor) -> tuple[Params, torch.Tensor]:
        """The inner step as sampling and evaluation take it (no graph): returns the adapted parameters and
        each task's step size ``[N]``, ``inner_lr`` or, with ``inner_max_kl``, shrunk so that the step's
        KL on the task's own adaptation episodes is at most ``inner_max_kl`` (to second order)."""
        c = self.config
        params = OrderedDict((k, v.detach()) for k, v in params.items())
        leaf = OrderedDict((k, v.detach().requires_grad_()) for k, v in params.items())  # a new view, params untouched
        grads = torch.autograd.grad(self.inner_loss(leaf, batch, advantages), list(leaf.values()))
        full = self._step(params, grads)  # the plain step, exactly as `adapt` takes it
        if c.inner_max_kl <= 0:
            return full, torch.full((batch.num_tasks,), c.inner_lr, dtype=grads[0].dtype, device=grads[0].device)
        # KL grows as the square of the step near zero: scaling the step by sqrt(bound / KL) meets the bound
        with torch.no_grad():
            lr = self.bounded_lr(params, full, batch)
        return self._step(params, grads, lr), lr

    @torch.no_grad()
    def task_kl(self, before: Params, after: Params, batch: EpisodeBatch) -> torch.Tensor:
        """Each task's KL(pi_before || pi_after) ``[N]``, summed over action dimensions (the true KL whatever
        ``log_prob_reduction`` is), averaged over the valid steps of its episodes in ``batch``."""
        return self._task_kl(before, after, batch)

    def _task_kl(self, before: Params, after: Params, batch: EpisodeBatch) -> torch.Tensor:
        """`task_kl`, differentiable."""
        mask = batch.mask
        p = self.policy.distribution(batch.observations, before)
        q = self.policy.distribution(batch.observations, after)
        return (p.kl(q, reduction="sum") * mask).sum((1, 2)) / mask.sum((1, 2)).clamp_min(1.0)

    @torch.no_grad()
    def inner_step_stats(self, before: Params, after: Params, batch: EpisodeBatch) -> dict[str, float]:
        """How far one inner step moved each task's policy, on the observations it adapted on.

        ``meta/inner_kl``: KL(pi_before || pi_after) summed over action dimensions (the true KL whatever
        ``log_prob_reduction`` is), averaged over steps, then over tasks; ``meta/inner_kl_max``: the largest
        task's; ``meta/inner_param_change``: the mean over tasks of ||theta'_i - theta_i||_2.
        """
        kl = self.task_kl(before, after, batch)
        change = torch.sqrt(sum((a - b).pow(2).flatten(1).sum(1) for a, b in zip(after.values(), before.values(),
                                                                                strict=True)))
        return {"meta/inner_kl": kl.mean().item(), "meta/inner_kl_max": kl.max().item(),
                "meta/inner_param_change": change.mean().item()}

    def adapted_params(self, theta: Params, train: list[tuple[EpisodeBatch, torch.Tensor]], create_graph: bool,
                       inner_lrs: list[torch.Tensor] | None = None,
                       inner_logps: list[torch.Tensor] | None = None) -> Params:
        """theta'(theta) after the inner steps on the recorded episodes, differentiable w.r.t. theta
        (``inner_lrs``: the per-task step sizes each step was taken with; default ``inner_lr``; ``inner_logps``:
        with ``inner_objective: lvc``, each step's sampling log-probs, see `OuterBatch`)."""
        n = train[0][0].num_tasks
        params = batch_params(theta, n)
        second_order = create_graph and not self.config.first_order
        for k, (batch, adv) in enumerate(train):
            sampling_logp = None if inner_logps is None else inner_logps[k]
            params = self.adapt(params, batch, adv, create_graph=second_order,
                                lr=None if inner_lrs is None else inner_lrs[k], sampling_logp=sampling_logp)
        return params

    def bounded_lr(self, before: Params, full: Params, batch: EpisodeBatch) -> torch.Tensor:
        """Each task's step size ``[N]``: ``inner_lr * min(1, sqrt(inner_max_kl / KL_i))``, KL_i the KL of the
        full step ``before -> full`` on the task's episodes (differentiable where the inputs carry a graph)."""
        c = self.config
        return c.inner_lr * torch.sqrt(c.inner_max_kl / self._task_kl(before, full, batch).clamp_min(1e-30)).clamp(max=1.0)

    def outer_terms(self, adapted: Params, outer: OuterBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Surrogate loss and mean KL on the post-adaptation episodes, as functions of the adapted
        (task-batched) parameters."""
        valid, mask = outer.valid, outer.valid.mask
        denom = mask.sum((1, 2)).clamp_min(1.0)
        dist = self.policy.distribution(valid.observations, adapted)
        ratio = torch.exp(dist.log_prob(valid.actions) - outer.old_dist.log_prob(valid.actions))
        loss = (-(ratio * outer.valid_advantages * mask).sum((1, 2)) / denom).mean()
        kl = (outer.old_dist.kl(dist) * mask).sum((1, 2)) / denom
        return loss, kl.mean()

    def meta_objective(self, theta: Params, outer: OuterBatch, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Surrogate loss and mean KL of the adapted policies, as functions of the meta-parameters theta.

        ``L = -mean_i mean_t [pi_{theta'_i}(a|s) / pi_old(a|s) * A]``, ``KL = mean_i mean_t KL(pi_old || pi_{theta'_i})``,
        with theta'_i = theta'(theta) recomputed on the recorded inner-loop episodes (``create_graph``:
        differentiable through the adaptation, second order unless ``first_order``).
        """
        return self.outer_terms(self.adapted_params(theta, outer.train, create_graph, outer.inner_lrs,
                                                    outer.inner_logps), outer)

    def trpo_operators(self, theta: Params, outer: OuterBatch
                       ) -> tuple[float, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """The surrogate at theta, its meta-gradient, and ``v -> (H + damping I) v`` for the Hessian H of
        the mean KL w.r.t. theta, by the chain rule through the inner steps.

        With ``theta^(k+1) = theta^(k) - alpha grad L_k(theta^(k))`` the Jacobian of the adaptation is
        ``J = prod_k (I - alpha H_k)`` (``H_k``: Hessian of the inner loss at ``theta^(k)``; ``J = I`` with
        ``first_order``). The meta-gradient is ``J^T grad_{theta'} L`` and, because the KL's gradient
        w.r.t. theta' vanishes where the new policy equals the old one, its Hessian is exactly
        ``J^T F' J`` with F' the Fisher of the adapted policies. Each product is then two inner-loss
        Hessian-vector products per inner step and one Fisher-vector product, all second order, instead
        of differentiating a third-order graph (the KL through the adaptation) ten times. ``theta``
        enters every task as the same copy, so products w.r.t. theta sum over the task axis. With
        ``fisher_subsample`` k > 1 the products' Hessians and Fisher are estimated on every k-th episode of
        each task, at the same points (the meta-gradient stays exact).
        """
        c = self.config
        n = outer.valid.num_tasks
        names = list(theta.keys())
        subsample = c.fisher_subsample > 1
        every_kth = slice(None, None, c.fisher_subsample)  # the episodes the curvature is estimated on
        # Forward through the inner steps with a fresh leaf at each step's starting point.
        points: list[list[torch.Tensor]] = []
        inner_grads: list[tuple[torch.Tensor, ...]] = []
        curvature_grads: list[tuple[torch.Tensor, ...]] = []  # the inner gradients the Hessians come from
        params = [v.detach().unsqueeze(0).expand(n, *v.shape).clone() for v in theta.values()]
        lrs = outer.inner_lrs or [None] * len(outer.train)
        alphas = [[self._alpha(p, lr) for p in params] for lr in lrs]
        for k, ((batch, adv), alpha) in enumerate(zip(outer.train, alphas, strict=True)):
            leaf = [p.requires_grad_() for p in params]
            named = OrderedDict(zip(names, leaf, strict=True))
            sampling_logp = None if outer.inner_logps is None else outer.inner_logps[k]
            grads = torch.autograd.grad(self.inner_loss(named, batch, adv, sampling_logp), leaf,
                                        create_graph=not c.first_order)
            points.append(leaf)
            inner_grads.append(grads)
            if subsample and not c.first_order:
                sub, sub_adv = batch.episode_slice(every_kth), adv[:, every_kth]
                sub_logp = None if sampling_logp is None else sampling_logp[:, every_kth]
                curvature_grads.append(torch.autograd.grad(self.inner_loss(named, sub, sub_adv, sub_logp), leaf,
                                                           create_graph=True))
            else:
                curvature_grads.append(grads)
            params = [(p - a * g).detach() for p, a, g in zip(leaf, alpha, grads, strict=True)]
        adapted = [p.requires_grad_() for p in params]
        named_adapted = OrderedDict(zip(names, adapted, strict=True))
        surrogate, kl = self.outer_terms(named_adapted, outer)
        grad_surrogate = torch.autograd.grad(surrogate, adapted, retain_graph=True)
        if subsample:
            _, kl = self.outer_terms(named_adapted, outer.episode_slice(every_kth))
        grad_kl = torch.autograd.grad(kl, adapted, create_graph=True)
        steps = range(len(outer.train))

        def hessian_times(grads: list, k: int, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
            if c.first_order:
                return [torch.zeros_like(v) for v in vectors]
            return list(torch.autograd.grad(grads[k], points[k], grad_outputs=vectors, retain_graph=True))

        def forward(v: list[torch.Tensor], grads: list) -> list[torch.Tensor]:
            """J d theta: the adapted parameters' tangent, task-batched."""
            for k in steps:
                v = [x - a * h for x, a, h in zip(v, alphas[k], hessian_times(grads, k, v), strict=True)]
            return v

        def adjoint(u: list[torch.Tensor], grads: list) -> torch.Tensor:
            """J^T u, flattened as theta (the policy's tensors summed over tasks)."""
            for k in reversed(steps):
                au = [a * x for a, x in zip(alphas[k], u, strict=True)]
                u = [x - h for x, h in zip(u, hessian_times(grads, k, au), strict=True)]
            return flatten([x.sum(0) for x in u]).detach()

        shapes = list(theta.values())

        def fisher_vector_product(vector: torch.Tensor) -> torch.Tensor:
            v = [t.unsqueeze(0).expand(n, *t.shape) for t in unflatten_like(vector.detach(), shapes)]
            u = forward(v, curvature_grads)  # J v
            fu = torch.autograd.grad(grad_kl, adapted, grad_outputs=u, retain_graph=True)  # F' J v
            return adjoint(list(fu), curvature_grads) + c.cg_damping * vector.detach()

        grad = adjoint(list(grad_surrogate), inner_grads)
        if subsample:  # the exact meta-gradient's graph is no longer needed: free it before CG
            inner_grads.clear()
        return surrogate.item(), grad, fisher_vector_product

    # ---- one meta-iteration --------------------------------------------------------------------------
    def train_step(self, tasks: list[Task]) -> dict[str, float]:
        c = self.config
        t0 = time.perf_counter()
        sample_time = 0.0
        theta = self.meta_params()
        n = len(tasks)

        # Inner loop: collect, adapt (no graph: these parameters only drive sampling), collect again.
        train: list[tuple[EpisodeBatch, torch.Tensor]] = []
        params = OrderedDict((k, v.detach()) for k, v in batch_params(self.policy.params(), n).items())
        stage_returns: list[torch.Tensor] = []  # each stage's episode returns [N, E]
        inner_stats: list[dict[str, float]] = []
        inner_lrs: list[torch.Tensor] = []
        inner_logps: list[torch.Tensor | None] = []
        for _ in range(c.inner_steps):
            ts = time.perf_counter()
            batch = self.sampler.sample(self._actor(params), tasks, c.episodes_per_task, self._seed()).to(self.device)
            sample_time += time.perf_counter() - ts
            adv = self.advantages(batch, inner=True)
            train.append((batch, adv))
            inner_logps.append(self.sampling_logps(params, batch))
            stage_returns.append(batch.returns)
            before = params
            params, lr = self.adapt_bounded(params, batch, adv)
            inner_lrs.append(lr)
            inner_stats.append({**self.inner_step_stats(before, params, batch), "meta/inner_lr": lr.mean().item(),
                                "meta/inner_lr_min": lr.min().item()})
        ts = time.perf_counter()
        valid = self.sampler.sample(self._actor(params), tasks, c.episodes_per_task, self._seed()).to(self.device)
        sample_time += time.perf_counter() - ts
        stage_returns.append(valid.returns)
        valid_adv = self.advantages(valid)
        steps = sum(b.env_steps for b, _ in train) + valid.env_steps
        self.env_steps += steps

        # Outer loop: TRPO on the post-adaptation surrogate.
        with torch.no_grad():
            old_dist = self.policy.distribution(valid.observations, params)
        outer = OuterBatch(train, valid, valid_adv, old_dist, inner_lrs if c.inner_max_kl > 0 else None,
                           inner_logps if c.inner_objective == "lvc" else None)

        def surrogate_and_kl(theta_: Params, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
            return self.meta_objective(theta_, outer, create_graph)

        names = list(theta.keys())
        leaves = list(theta.values())
        loss_before_value, grad, fisher_vector_product = self.trpo_operators(theta, outer)

        direction = conjugate_gradient(fisher_vector_product, -grad, iters=c.cg_iters)
        # Scale so the quadratic model of the KL, 0.5 s^T F s, equals max_kl at the full step.
        shs = 0.5 * torch.dot(direction, fisher_vector_product(direction))
        full_step = direction * torch.sqrt(c.max_kl / shs.clamp_min(1e-12)) if torch.isfinite(shs) else None

        old_flat = flatten(leaves).detach()

        evaluated: list[tuple[float, float]] = []

        def evaluate(step: torch.Tensor) -> tuple[float, float]:
            candidate = OrderedDict(
                (k, v.detach().requires_grad_())
                for k, v in zip(names, unflatten_like(old_flat + step, leaves), strict=True)
            )
            loss, kl = surrogate_and_kl(candidate, create_graph=False)
            evaluated.append((loss_before_value - loss.item(), kl.item()))
            return evaluated[-1]

        scale, tried, accepted = 0.0, 0, False
        if full_step is not None and torch.all(torch.isfinite(full_step)):
            scale, tried, accepted = backtracking_line_search(
                evaluate, full_step, max_steps=c.ls_max_steps, ratio=c.ls_backtrack, max_kl=c.max_kl
            )
        if accepted:
            new_flat = old_flat + scale * full_step
            with torch.no_grad():
                for p, value in zip(leaves, unflatten_like(new_flat, leaves), strict=True):
                    p.copy_(value)
        # The line search stops at the step it accepts, so its last evaluation is the accepted one.
        loss_after, kl_after = evaluated[-1] if accepted else (0.0, 0.0)
        self.iteration += 1
        total = time.perf_counter() - t0
        metrics = {}
        for k, returns in enumerate(stage_returns):  # the mean, and the worst and best task's: one left behind shows
            per_task = returns.mean(1)
            metrics.update({f"meta/return_step{k}": returns.mean().item(),
                            f"meta/return_step{k}_task_min": per_task.min().item(),
                            f"meta/return_step{k}_task_max": per_task.max().item()})
        for k, stats in enumerate(inner_stats):
            suffix = "" if k == 0 else f"_step{k + 1}"  # meta/inner_kl is the first inner step's
            metrics.update({f"{name}{suffix}": value for name, value in stats.items()})
        metrics.update({
            "meta/return_pre_adaptation": metrics["meta/return_step0"],
            "meta/return_post_adaptation": metrics[f"meta/return_step{len(stage_returns) - 1}"],
            "loss/surrogate_before": loss_before_value,
            "loss/surrogate_after": loss_before_value - loss_after,
            "loss/kl": kl_after,
            "loss/line_search_steps": float(tried),
            "loss/line_search_accepted": float(accepted),
            "loss/step_scale": float(scale),
            "loss/policy_std": float(self.policy.log_std.exp().mean().item()),
            "time/sampling_s": sample_time,
            "time/update_s": total - sample_time,
            "time/iteration_s": total,
            "time/env_steps_per_s": steps / max(total, 1e-9),
            "time/sampling_steps_per_s": steps / max(sample_time, 1e-9),
            "env_steps": float(self.env_steps),
        })
        return metrics

    # ---- evaluation protocol -------------------------------------------------------------------------
    def _evaluation_stages(self, tasks: list[Task], steps: int, episodes: int, seed: int,
                           sample: Callable[..., EpisodeBatch] | None = None, sample_last: bool = True):
        """The evaluation protocol's stages in order: yields ``(actor, sample_seed, batch)`` for stage
        k = 0..steps, the policy after k gradient steps per task, the seed its E episodes per task were
        sampled with, and those episodes (stage k+1 adapts on them). ``sample(actor, tasks, episodes, seed)``
        collects them (default: the agent's sampler; `metarl.api` passes a collector on a user's env);
        without ``sample_last`` the last stage's batch is not collected (None): deployment needs only its actor."""
        sample = self.sampler.sample if sample is None else sample
        rng = np.random.default_rng(seed)
        n = len(tasks)
        params = OrderedDict((k, v.detach()) for k, v in batch_params(self.policy.params(), n).items())
        for stage in range(steps + 1):
            actor = GaussianActor(self.policy.config, params, seed=int(rng.integers(2**31 - 1)))
            sample_seed = int(rng.integers(2**31 - 1))
            if stage == steps and not sample_last:
                yield actor, sample_seed, None
                return
            batch = sample(actor, tasks, episodes, sample_seed)
            yield actor, sample_seed, batch
            if stage < steps:
                on_device = batch.to(self.device)
                params, _ = self.adapt_bounded(params, on_device, self.advantages(on_device, inner=True))

    def adaptation(self, tasks: list[Task], steps: int, episodes: int, seed: int, collect: Collect,
                   final: bool = True) -> GaussianActor:
        """The adaptation primitive (`metarl.agent.Agent`): stage 0, E episodes per task with theta; stage k,
        E episodes after k gradient steps, each step on the previous stage's episodes (one ``collect`` call a
        stage). Returns the actor after ``steps`` steps; without ``final`` its episodes are not collected and
        it comes back started on one slot (deployment)."""
        actor = None
        for stage_actor, _, _ in self._evaluation_stages(tasks, steps, episodes, seed, sample=collect, sample_last=final):
            actor = stage_actor  # each stage's batch is freed once the next stage has adapted on it
        if not final:
            actor.start([0], 1)
        return actor

    @classmethod
    def save_actor(cls, actor: GaussianActor) -> dict[str, Any]:
        return {"kind": "gaussian", "policy_config": dict(actor.policy_config), "seed": actor.seed,
                "params": {k: torch.from_numpy(np.asarray(v)[0] if actor.batched else np.asarray(v))
                           for k, v in actor.params.items()}}

    @classmethod
    def load_actor(cls, state: dict[str, Any]) -> GaussianActor:
        actor = GaussianActor(state["policy_config"], state["params"], seed=state["seed"])
        actor.start([0], 1)
        return actor

    # ---- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly (loadable with ``weights_only=True``)."""
        return {**self.policy_state(), "rng": self.rng.bit_generator.state}

    def policy_state(self) -> dict[str, Any]:
        """The policy's parameters (adaptation takes its step sizes from the config) and the counters."""
        return {"policy": self.policy.state_dict(), "iteration": self.iteration, "env_steps": self.env_steps}

    def load_policy_state(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.iteration, self.env_steps = int(state["iteration"]), int(state["env_steps"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        if state.get("inner_log_lr"):  # a checkpoint of the retired learn_inner_lr (its config is refused first)
            raise ValueError("the checkpoint holds learned inner step sizes (agent.learn_inner_lr, retired)")
        self.iteration = int(state["iteration"])
        self.env_steps = int(state["env_steps"])
        self.rng.bit_generator.state = state["rng"]
