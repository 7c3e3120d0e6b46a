"""Gaussian MLP policy evaluated functionally, with optional per-task parameters.

MAML needs the same network evaluated at many parameter sets at once: the meta-parameters theta and,
for every task i, the adapted theta'_i. `GaussianMLPPolicy.distribution(obs, params)` accepts either
unbatched parameters (the module's own shapes) or *task-batched* ones with a leading axis ``N`` that
lines up with the leading axis of ``obs``; then all tasks run in one batched matmul per layer.

`GaussianActor` is the picklable object the sampler ships to its workers: detached per-task parameters
plus the noise seeds, no autograd.

Two conventions differ between the MAML anchors and are options here (docs/anchors.md, "MAML-TRPO settings"):

* ``log_prob_reduction``: how a log-probability (and a KL, and an entropy) is reduced over the action
  dimensions. ``"sum"`` is the density of the action vector (cbfinn, pytorch-maml-rl, ProMP, garage);
  ``"mean"`` divides it by ``act_dim`` (learn2learn's ``.mean(dim=1)``). At the same nominal inner
  learning rate a ``"mean"`` inner step is ``1/act_dim`` the size, and at the same nominal ``max_kl`` its
  trust region holds ``act_dim`` times the KL of a ``"sum"`` policy.
* ``action_scale``: the env is stepped with ``clip(action_scale * a, low, high)`` while the policy's own
  action ``a`` (the one its log-probabilities are of) is what the episode records. ``0.1`` is
  pytorch-maml-rl's and ProMP's division of the policy output by 10: a standard deviation of 1 in policy
  units is 0.1 in the env's, and far fewer components are clipped at the start.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}
REDUCTIONS = ("sum", "mean")

Params = "OrderedDict[str, torch.Tensor]"


class GaussianMLPPolicy(nn.Module):
    """``a ~ N(mlp(o), diag(exp(log_std))^2)``: a state-independent learned standard deviation.

    Args:
        obs_dim, act_dim: sizes of observation and action vectors.
        hidden: hidden layer sizes, e.g. ``(64, 64)``.
        activation: ``tanh`` or ``relu``.
        init_std: initial standard deviation of every action dimension.
        min_std: floor on the standard deviation (keeps log-probabilities finite).
        init: ``xavier`` (every layer at full scale) or ``orthogonal`` (small output layer).
        log_prob_reduction: ``sum`` or ``mean`` over action dimensions (see the module docstring).
        action_scale: the env sees ``clip(action_scale * a, low, high)`` (see the module docstring).
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (64, 64),
                 activation: str = "tanh", init_std: float = 1.0, min_std: float = 1e-6, init: str = "xavier",
                 log_prob_reduction: str = "sum", action_scale: float = 1.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if init not in ("xavier", "orthogonal"):
            raise ValueError(f"init must be 'xavier' or 'orthogonal', got {init!r}")
        if log_prob_reduction not in REDUCTIONS:
            raise ValueError(f"log_prob_reduction must be one of {REDUCTIONS}, got {log_prob_reduction!r}")
        if not (np.isfinite(action_scale) and action_scale > 0):
            raise ValueError(f"action_scale must be a positive number, got {action_scale!r}")
        self.config = {"obs_dim": int(obs_dim), "act_dim": int(act_dim), "hidden": tuple(int(h) for h in hidden),
                       "activation": activation, "init_std": float(init_std), "min_std": float(min_std), "init": init,
                       "log_prob_reduction": log_prob_reduction, "action_scale": float(action_scale)}
        sizes = (obs_dim, *hidden, act_dim)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        for i, layer in enumerate(self.layers):
            if init == "xavier":
                # MAML lineage (pytorch-maml-rl): every layer, output included, at full scale, so the
                # inner gradient reaches the hidden layers from the first iteration.
                nn.init.xavier_uniform_(layer.weight)
            else:  # PPO practice: small output layer, the initial mean is near zero
                nn.init.orthogonal_(layer.weight, gain=0.01 if i == len(self.layers) - 1 else np.sqrt(2))
            nn.init.zeros_(layer.bias)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(np.log(init_std))))
        self._act = ACTIVATIONS[activation]
        self._log_min_std = float(np.log(min_std))

    def params(self) -> OrderedDict[str, torch.Tensor]:
        """The module's parameters as an ordered name -> tensor dict (the functional form)."""
        return OrderedDict(self.named_parameters())

    def forward_mean(self, obs: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        params = self.params() if params is None else params
        batched = params["layers.0.weight"].dim() == 3
        h = obs
        if batched:
            n = params["layers.0.weight"].shape[0]
            if obs.shape[0] != n:
                raise ValueError(f"task-batched params for {n} tasks but obs has leading size {obs.shape[0]}")
            lead = obs.shape[:-1]
            h = obs.reshape(n, -1, obs.shape[-1])
        for i in range(len(self.layers)):
            w, b = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2)) if batched else nn.functional.linear(h, w, b)
            if i < len(self.layers) - 1:
                h = self._act(h)
        return h.reshape(*lead, h.shape[-1]) if batched else h

    def log_std_of(self, params: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        log_std = params["log_std"].clamp_min(self._log_min_std)
        if log_std.dim() == 2:  # [N, act_dim] -> broadcast over the middle axes of `like`
            log_std = log_std.reshape(log_std.shape[0], *([1] * (like.dim() - 2)), log_std.shape[1])
        return log_std.expand_as(like)

    def distribution(self, obs: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> DiagGaussian:
        """The action distribution for ``obs`` ``[..., obs_dim]``."""
        params = self.params() if params is None else params
        mean = self.forward_mean(obs, params)
        return DiagGaussian(mean, self.log_std_of(params, mean), self.config["log_prob_reduction"])

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor, params: dict[str, torch.Tensor] | None = None):
        return self.distribution(obs, params).log_prob(actions)


class DiagGaussian:
    """A diagonal Gaussian over the last axis, written out by hand.

    With ``reduction="sum"`` (the default) the same numbers as ``Independent(Normal(mean, exp(log_std)), 1)``
    with fewer tensor operations, which matters in MAML's third-order graphs (Hessian-vector products
    through the adaptation). ``reduction="mean"`` divides log-probabilities, KLs and entropies by the
    number of action dimensions (learn2learn's convention); ``kl(..., reduction="sum")`` always gives the
    true KL between the two distributions.
    """

    _HALF_LOG_2PI = 0.5 * float(np.log(2 * np.pi))

    def __init__(self, mean: torch.Tensor, log_std: torch.Tensor, reduction: str = "sum"):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.mean, self.log_std, self.reduction = mean, log_std, reduction

    def _reduce(self, x: torch.Tensor, reduction: str | None = None) -> torch.Tensor:
        return x.mean(-1) if (reduction or self.reduction) == "mean" else x.sum(-1)

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        z = (actions - self.mean) * torch.exp(-self.log_std)
        return self._reduce(-0.5 * z.pow(2) - self.log_std) - self._HALF_LOG_2PI * (
            1.0 if self.reduction == "mean" else self.mean.shape[-1])

    def kl(self, other: DiagGaussian, reduction: str | None = None) -> torch.Tensor:
        """KL(self || other), reduced over action dimensions by ``reduction`` (default: this distribution's)."""
        var_ratio = torch.exp(2 * (self.log_std - other.log_std))
        diff = (self.mean - other.mean) * torch.exp(-other.log_std)
        return (self._reduce(0.5 * (var_ratio + diff.pow(2) - 1), reduction)
                + self._reduce(other.log_std - self.log_std, reduction))

    def entropy(self) -> torch.Tensor:
        return self._reduce(self.log_std + 0.5 + self._HALF_LOG_2PI)

    def detach(self) -> DiagGaussian:
        return DiagGaussian(self.mean.detach(), self.log_std.detach(), self.reduction)

    def episode_slice(self, index: slice) -> DiagGaussian:
        """The distributions of some episodes (axis 1 of ``[N, E, T, act_dim]``)."""
        return DiagGaussian(self.mean[:, index], self.log_std[:, index], self.reduction)


def batch_params(params: dict[str, torch.Tensor], n: int) -> OrderedDict[str, torch.Tensor]:
    """Repeat unbatched parameters along a new leading task axis (a view: gradients flow back)."""
    return OrderedDict((k, v.unsqueeze(0).expand(n, *v.shape)) for k, v in params.items())


def _task_seed(seed: int, task_index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, int(task_index), 7])


def task_generators(seed: int, task_indices: list[int]) -> list[torch.Generator]:
    """One noise generator per task, seeded from (seed, global task index): an actor's noise for a task is
    the same whichever worker, and alongside whichever other tasks, it runs."""
    generators = []
    for i in task_indices:
        g = torch.Generator()
        g.manual_seed(int(_task_seed(seed, i).generate_state(1)[0]))
        generators.append(g)
    return generators


def numpy_task_generators(seed: int, task_indices: list[int]) -> list[np.random.Generator]:
    """`task_generators` for numpy actors (RL²'s): one generator per task from the same (seed, task index)."""
    return [np.random.default_rng(_task_seed(seed, i)) for i in task_indices]


class GaussianActor:
    """Picklable sampling-side twin of a `GaussianMLPPolicy` with per-task parameters.

    The mean is computed in float32 numpy, task by task: each layer is one stacked matmul whose slices are
    the tasks (``[n, slots, in] @ [n, in, out]``), so each task's rows go through a matrix product of the same
    shape whichever other tasks share the call. A task's actions therefore do not depend on how the sampler
    splits the meta-batch (this process, worker processes, Ray actors). One matmul over all tasks at once
    (torch's ``baddbmm``) did: on an AMD EPYC with MKL its rows came out up to an ulp apart for 5 tasks and
    for 2, enough for HalfCheetah's trajectories to part.

    Args:
        policy_config: ``GaussianMLPPolicy.config``.
        params: ``{name: [N, ...]}`` per-task parameters, or unbatched (shared by every task).
        seed: seeds the action noise, per task (so results do not depend on the worker split).
        deterministic: act with the mean.
    """

    def __init__(self, policy_config: dict[str, Any], params: dict[str, torch.Tensor], seed: int,
                 deterministic: bool = False):
        self.policy_config = dict(policy_config)
        self.params = {k: v.detach().cpu().float().numpy().copy() for k, v in params.items()}
        self.batched = self.params["layers.0.weight"].ndim == 3
        self.seed, self.deterministic = int(seed), bool(deterministic)
        self.action_scale = float(self.policy_config.get("action_scale", 1.0))  # the rollout scales, then clips
        activation = self.policy_config.get("activation", "tanh")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self._layers: list[tuple[np.ndarray, np.ndarray]] = []

    def __getstate__(self) -> dict[str, Any]:  # what `start` builds is made again where the actor lands
        state = dict(self.__dict__)
        for key in ("_layers", "_std", "_generators", "_noise"):
            state.pop(key, None)
        state["_layers"] = []
        return state

    def start(self, task_indices: list[int], episodes_per_task: int) -> None:
        idx = np.asarray(task_indices)
        n_layers = len(self.policy_config["hidden"]) + 1
        self._layers = []
        for i in range(n_layers):
            w, b = self.params[f"layers.{i}.weight"], self.params[f"layers.{i}.bias"]
            if self.batched:  # [n, in, out] and [n, 1, out]: one matmul slice per task
                self._layers.append((np.ascontiguousarray(np.swapaxes(w[idx], 1, 2)), b[idx][:, None, :]))
            else:  # shared: broadcast over the task slices, which numpy still multiplies one by one
                self._layers.append((np.ascontiguousarray(w.T), b))
        log_std = np.maximum(self.params["log_std"], np.float32(np.log(self.policy_config.get("min_std", 1e-6))))
        std = np.exp(log_std).astype(np.float32)
        self._std = std[idx][:, None, :] if std.ndim == 2 else std
        self._generators = task_generators(self.seed, task_indices)
        self._noise: torch.Tensor | None = None  # the noise buffer, made at the first act

    def mean(self, obs: np.ndarray) -> np.ndarray:
        """The policy's mean for ``obs`` ``[n, slots, obs_dim]`` (n: the tasks given to `start`)."""
        h = np.asarray(obs, dtype=np.float32)
        relu = self.policy_config.get("activation", "tanh") == "relu"
        for i, (w, b) in enumerate(self._layers):
            h = h @ w + b
            if i < len(self._layers) - 1:
                h = np.maximum(h, np.float32(0)) if relu else np.tanh(h)
        return h

    def act(self, obs: np.ndarray) -> np.ndarray:
        assert self._layers, "start() first"
        mean = self.mean(obs)
        self._sampled = not self.deterministic
        if self.deterministic:
            self._last_shape = mean.shape
            return mean
        if self._noise is None or tuple(self._noise.shape) != mean.shape:
            self._noise = torch.empty(mean.shape)
        for row, g in zip(self._noise, self._generators, strict=True):
            torch.randn(row.shape, generator=g, out=row)
        return mean + self._std * self._noise.numpy()

    def last_log_prob(self) -> np.ndarray:
        """``[n, slots]``: the log-density of the last `act`'s actions under the policy, summed over the action
        dimensions (the density of the action vector; at the mean for a deterministic act)."""
        if self._sampled:
            noise = self._noise.numpy().astype(np.float64)
        else:
            noise = np.zeros(self._last_shape)
        log_std = np.log(np.broadcast_to(self._std, noise.shape).astype(np.float64))
        return (-0.5 * noise**2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
