"""PEARL (Rakelly et al., 2019): off-policy meta-RL by inferring a latent task variable from context.

A *context* is a set of transitions (o, a, r) of one task. An encoder maps each transition to a Gaussian
factor N(mu_n, diag(s_n^2)) over a latent z; the posterior q(z | c) is their product (closed form:
precisions add, means are precision-weighted), with the unit Gaussian as the prior of an empty context.
SAC is conditioned on z: twin Q functions Q_i(o, a, z), a tanh-Gaussian policy pi(a | o, z), target Q
networks averaged by Polyak steps. The encoder learns through the critic's Bellman error (the policy sees
a detached z) and a KL term kl_lambda * KL(q(z | c) || N(0, I)), summed over latent dimensions and tasks
(the authors' information bottleneck).

Data: a fixed pool of training tasks (``num_train_tasks``, drawn once from the family's train split; the
per-task buffers need tasks that recur), each with a replay buffer (RL batches: uniform transitions)
and an encoder buffer (context batches) that holds only the most recent prior/posterior collection of
that task. Each iteration (`PEARL.train_step`): on the first, ``initial_episodes`` episodes of every pool
task with z from the prior; then, for ``tasks_per_batch`` random pool tasks, the encoder buffer is cleared
and refilled by ``prior_episodes`` episodes with z ~ N(0, I) (both buffers), ``posterior_episodes`` with z
from the posterior of a context batch of that buffer (both buffers) and ``extra_posterior_episodes`` the
same way (replay only); then ``train_steps`` gradient steps, each on ``meta_batch`` pool tasks drawn with
replacement, ``batch_size`` RL transitions and ``context_batch`` context transitions per task. The
authors count collection in env steps (num_steps_prior 400 = 2 episodes of 200); the sampler collects
whole episodes, so the settings here are episodes. Each posterior episode draws its z from a fresh
context batch, as the authors' sampler re-infers after every trajectory (their first posterior
trajectory of a call still uses the prior, a quirk not kept).

Entropy: ``entropy: fixed`` is the authors' convention (alpha = 1, rewards multiplied by
``reward_scale``, which sets the entropy's weight); ``entropy: auto`` learns alpha to hold the policy's
entropy at -act_dim (Haarnoja et al., 2018b). The critic's target is SAC's twin-target form
``r * reward_scale + gamma * (1 - terminated) * (min_i Q'_i(o', a', z) - alpha log pi(a' | o', z))``; the
authors' code keeps SAC's first version (a separate V network and its target), which has the same fixed
point. Time-limit endings bootstrap (only ``terminated`` stops it).

Collection goes through `metarl.sampling` with a `PEARLActor` holding one latent per (task, slot), so
both sampler backends serve PEARL unchanged. Evaluation (the shared protocol): a trial of ``steps + 1``
episodes per held-out task, z drawn from the prior for episode 0 and, after each episode, from the
posterior of every transition of the trial so far; stage k is episode k (k context episodes before it).
Actions are the policy's mean at evaluation (the authors' ``eval_deterministic``).

Defaults follow the authors' configs (katerakelly/oyster configs/default.py and cheetah-vel.json): latent
5, 300-unit networks (3 layers), encoder 200x3, lr 3e-4 everywhere, gamma 0.99, tau 0.005, reward scale 5,
kl_lambda 0.1, meta-batch 16, batch 256, context 100, 2000 gradient steps per iteration.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from metarl.agent import Agent, Collect
from metarl.config import check_ranges
from metarl.episodes import EpisodeBatch
from metarl.policies import numpy_task_generators
from metarl.system import keep_freed_memory
from metarl.tasks import Task, TaskError

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # the policy's log-std clamp (rlkit's, which the authors use)


@dataclasses.dataclass(frozen=True)
class PEARLConfig:
    """Hyperparameters of PEARL (defaults: the authors' cheetah-vel settings, in episodes of 200 steps)."""

    num_train_tasks: int = 100        # the fixed pool of training tasks (n_train_tasks)
    tasks_per_batch: int = 5          # pool tasks collected for each iteration (num_tasks_sample)
    initial_episodes: int = 10        # per pool task, at the first iteration (num_initial_steps 2000)
    prior_episodes: int = 2           # z ~ prior, into both buffers (num_steps_prior 400)
    posterior_episodes: int = 0       # z ~ posterior, into both buffers (num_steps_posterior 0)
    extra_posterior_episodes: int = 3  # z ~ posterior, replay only (num_extra_rl_steps_posterior 600)
    train_steps: int = 2000           # gradient steps per iteration (num_train_steps_per_itr)
    meta_batch: int = 16              # tasks per gradient step
    batch_size: int = 256             # RL transitions per task per step
    context_batch: int = 100          # context transitions per task per step (embedding_batch_size)
    latent_dim: int = 5
    hidden: tuple[int, ...] = (300, 300, 300)
    encoder_hidden: tuple[int, ...] = (200, 200, 200)
    lr: float = 3e-4                  # policy, Q functions, encoder (and alpha)
    gamma: float = 0.99
    tau: float = 0.005                # Polyak step of the target networks
    reward_scale: float = 5.0
    kl_lambda: float = 0.1
    entropy: str = "fixed"            # "fixed": alpha 1 (the authors'); "auto": learned alpha, target -act_dim
    policy_mean_reg: float = 1e-3     # the authors' penalties on the policy's pre-tanh mean and log-std
    policy_std_reg: float = 1e-3
    replay_size: int = 1_000_000      # transitions kept per task (oldest overwritten)
    deterministic_eval: bool = True   # act with the policy's mean at evaluation (eval_deterministic)
    # torch threads during the gradient steps (0: torch's default). On the shared 2-core machine the update
    # ran 5-10x faster on one thread than on two (experiments/results/pearl_speed.json).
    update_threads: int = 0

    @property
    def episodes_per_task(self) -> int:
        """Episodes collected per collected task in an iteration (what the run's budget check counts)."""
        return self.prior_episodes + self.posterior_episodes + self.extra_posterior_episodes

    def __post_init__(self) -> None:
        for name in ("num_train_tasks", "tasks_per_batch", "train_steps", "meta_batch", "batch_size",
                     "context_batch", "latent_dim", "replay_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"agent.{name} must be a positive integer, got {value!r}")
        for name in ("initial_episodes", "prior_episodes", "posterior_episodes", "extra_posterior_episodes",
                     "update_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"agent.{name} must be an integer >= 0, got {value!r}")
        if self.initial_episodes + self.prior_episodes + self.posterior_episodes == 0:
            raise ValueError("agent: initial_episodes, prior_episodes and posterior_episodes are all 0, so the "
                             "encoder buffers would stay empty")
        if self.tasks_per_batch > self.num_train_tasks:
            raise ValueError(f"agent.tasks_per_batch ({self.tasks_per_batch}) must be <= agent.num_train_tasks "
                             f"({self.num_train_tasks})")
        check_ranges(self, {"lr": (0, 10, "(]"), "reward_scale": (0, 1e6, "(]"), "kl_lambda": (0, 1e6, "[]"),
                            "policy_mean_reg": (0, 1e6, "[]"), "policy_std_reg": (0, 1e6, "[]")})
        if not 0 < self.gamma <= 1:
            raise ValueError(f"agent.gamma must be in (0, 1], got {self.gamma!r}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"agent.tau must be in (0, 1], got {self.tau!r}")
        if self.entropy not in ("fixed", "auto"):
            raise ValueError(f"agent.entropy must be 'fixed' or 'auto', got {self.entropy!r}")
        for name in ("hidden", "encoder_hidden"):
            sizes = getattr(self, name)
            if not sizes or any((not isinstance(k, int)) or k < 1 for k in sizes):
                raise ValueError(f"agent.{name} must be a non-empty list of positive integers, got {sizes!r}")


# ---- the networks ----------------------------------------------------------------------------------------
def mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int) -> nn.Sequential:
    """ReLU MLP; the output layer starts small (uniform +-3e-3, as in rlkit, which the authors build on)."""
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(in_dim, size), nn.ReLU()]
        in_dim = size
    last = nn.Linear(in_dim, out_dim)
    nn.init.uniform_(last.weight, -3e-3, 3e-3)
    nn.init.uniform_(last.bias, -3e-3, 3e-3)
    return nn.Sequential(*layers, last)


def product_of_gaussians(mu: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised product of Gaussian factors ``N(mu_n, var_n)`` over axis -2 (``[..., n, d]``): precisions
    add, the mean is the precision-weighted mean. Returns ``(mean, var)`` ``[..., d]``."""
    precision = (1.0 / var).sum(-2)
    post_var = 1.0 / precision
    return post_var * (mu / var).sum(-2), post_var


def kl_to_unit(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, diag var) || N(0, I)) per dimension: (var + mean^2 - 1 - log var) / 2."""
    return 0.5 * (var + mean.pow(2) - 1.0 - torch.log(var))


class TwoHeads(nn.Module):
    """An `mlp` whose output is two halves of ``size`` each (a Gaussian's two parameters)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], size: int):
        super().__init__()
        self.size = size
        self.net = mlp(in_dim, hidden, 2 * size)

    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x)
        return out[..., :self.size], out[..., self.size:]


class ContextEncoder(TwoHeads):
    """(o, a, r) -> a Gaussian factor per transition: mean and variance (softplus, floored at 1e-7)."""

    def factors(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, raw = self.halves(context)
        return mu, nn.functional.softplus(raw).clamp_min(1e-7)

    def posterior(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``context [..., n, in]`` -> posterior mean and variance ``[..., latent]``."""
        return product_of_gaussians(*self.factors(context))


def tanh_log_det(u: torch.Tensor) -> torch.Tensor:
    """log(1 - tanh(u)^2), summed over the last axis, in the stable form 2 (log 2 - u - softplus(-2u))."""
    return (2.0 * (math.log(2.0) - u - nn.functional.softplus(-2.0 * u))).sum(-1)


class TanhGaussianPolicy(TwoHeads):
    """a = tanh(u), u ~ N(mean(o, z), std(o, z)^2): actions in [-1, 1]^act_dim (the actor maps them onto
    the env's box)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.halves(x)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reparameterised action for standard-normal ``noise``: (action, log-prob, pre-tanh mean, log-std)."""
        mean, log_std = self(x)
        u = mean + log_std.exp() * noise
        log_prob = (-0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1) - tanh_log_det(u)
        return torch.tanh(u), log_prob, mean, log_std


# ---- the replay ------------------------------------------------------------------------------------------
class TaskBuffer:
    """One task's transitions (o, a in policy units, r, o', terminated) in a ring of ``capacity`` rows that
    grows by doubling as it fills (a pool of 100 tasks does not allocate 100 x 1e6 rows up front). Until it
    reaches ``capacity`` its rows are in insertion order at ``[0, size)``; from then on ``top`` is the next
    row to overwrite."""

    FIELDS = ("obs", "actions", "rewards", "next_obs", "terminals")

    def __init__(self, obs_dim: int, act_dim: int, capacity: int):
        self.capacity, self.size, self.top = int(capacity), 0, 0
        self.dims = {"obs": obs_dim, "actions": act_dim, "rewards": 0, "next_obs": obs_dim, "terminals": 0}
        self.data = {k: np.zeros((0, d) if d else (0,), np.float32) for k, d in self.dims.items()}

    def clear(self) -> None:
        self.size = self.top = 0

    def add(self, rows: dict[str, np.ndarray]) -> None:
        n = len(rows["rewards"])
        if n > self.capacity:  # only the newest `capacity` rows can stay
            rows = {k: v[-self.capacity:] for k, v in rows.items()}
            n = self.capacity
        allocated = len(self.data["rewards"])
        if self.size + n > allocated and allocated < self.capacity:
            grown = min(self.capacity, max(2 * allocated, self.size + n, 1024))
            for k, v in self.data.items():
                new = np.zeros((grown, *v.shape[1:]), np.float32)
                new[:self.size] = v[:self.size]
                self.data[k] = new
            allocated, self.top = grown, self.size  # below capacity the rows are [0, size): append after them
        at = (self.top + np.arange(n)) % allocated
        for k, v in rows.items():
            self.data[k][at] = v
        self.top = int((self.top + n) % allocated)
        self.size = min(self.size + n, allocated)

    def sample(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        if self.size == 0:
            raise RuntimeError("PEARL: sampling from an empty task buffer")
        idx = rng.integers(0, self.size, n)
        return {k: v[idx] for k, v in self.data.items()}

    def state(self) -> dict[str, Any]:
        """The rows ``[0, size)`` as they lie (views, no copy) and ``top``: a loaded buffer samples and
        overwrites the same rows as this one."""
        return {"size": self.size, "top": self.top, **{k: torch.from_numpy(v[:self.size]) for k, v in self.data.items()}}

    def load(self, state: dict[str, Any]) -> None:
        self.size, self.top = int(state["size"]), int(state["top"])
        self.data = {k: state[k].numpy().astype(np.float32, copy=True) for k in self.FIELDS}
        if self.size < self.capacity:
            self.top = self.size  # (equal already, unless the rows filled their allocation exactly)


def transitions(batch: EpisodeBatch, task: int, low: np.ndarray, high: np.ndarray) -> dict[str, np.ndarray]:
    """The valid transitions of one task of a batch, actions mapped back into policy units [-1, 1]."""
    obs = batch.observations[task].numpy()          # [E, T, obs]
    mask = batch.mask[task].numpy() > 0              # [E, T]
    E, T = mask.shape
    lengths = mask.sum(1)
    next_obs = np.concatenate([obs[:, 1:], np.zeros_like(obs[:, :1])], 1)
    next_obs[np.arange(E), lengths - 1] = batch.last_observations[task].numpy()
    terminals = np.zeros((E, T), np.float32)
    terminals[np.arange(E), lengths - 1] = batch.terminated[task].numpy().astype(np.float32)
    actions = batch.actions[task].numpy()
    return {"obs": obs[mask], "actions": ((actions - (high + low) / 2) / ((high - low) / 2))[mask].astype(np.float32),
            "rewards": batch.rewards[task].numpy()[mask], "next_obs": next_obs[mask], "terminals": terminals[mask]}


# ---- the sampling side -----------------------------------------------------------------------------------
class NumpyMLP:
    """The forward pass of an `mlp` in float32 numpy (the sampler's small batches: see RL²'s actor)."""

    def __init__(self, state: dict[str, torch.Tensor], prefix: str):
        keys = sorted({k.rsplit(".", 1)[0] for k in state if k.startswith(prefix)}, key=lambda k: int(k.split(".")[-1]))
        self.layers = [(np.ascontiguousarray(state[f"{k}.weight"].numpy().T, np.float32),
                        state[f"{k}.bias"].numpy().astype(np.float32)) for k in keys]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0)
        return x


class PEARLActor:
    """Picklable sampling-side PEARL policy: one latent z per (task, slot).

    ``latents`` ``[n_tasks, slots, latent]`` (indexed by the sampler's global task indices) fixes z for every
    slot; without it each slot draws z from the prior at the start, and with ``infer`` it collects its own
    transitions (o, a, r) and, at every episode end, draws z from the posterior of all of them: the evaluation
    protocol's trial, and deployment (`adapt_with`). Actions: ``center + half * tanh(u)``, the env's box."""

    def __init__(self, policy: dict[str, torch.Tensor], encoder: dict[str, torch.Tensor] | None, act_dim: int,
                 latent_dim: int, low: np.ndarray, high: np.ndarray, seed: int, latents: np.ndarray | None = None,
                 infer: bool = False, deterministic: bool = False):
        self.policy = {k: v.detach().clone() for k, v in policy.items()}
        self.encoder = None if encoder is None else {k: v.detach().clone() for k, v in encoder.items()}
        if infer and encoder is None:
            raise ValueError("PEARLActor: infer needs the encoder's weights")
        self.act_dim, self.latent_dim = int(act_dim), int(latent_dim)
        self.low, self.high = np.asarray(low, np.float32), np.asarray(high, np.float32)
        self.latents = None if latents is None else np.asarray(latents, np.float32)
        self.seed, self.infer, self.deterministic = int(seed), bool(infer), bool(deterministic)
        self._nets: tuple[NumpyMLP, NumpyMLP | None] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_nets"] = None
        return state

    def start(self, task_indices: list[int], slots: int) -> None:
        if self._nets is None:
            self._nets = (NumpyMLP(self.policy, "net."),
                          None if self.encoder is None else NumpyMLP(self.encoder, "net."))
        n = len(task_indices)
        self._shape = (n, slots)
        self._generators = numpy_task_generators(self.seed, task_indices)
        if self.latents is not None:
            self.z = self.latents[np.asarray(task_indices)].reshape(n * slots, -1).copy()
        else:
            self.z = np.concatenate([g.standard_normal((slots, self.latent_dim), np.float32) for g in self._generators])
        self._context: list[list[np.ndarray]] = [[] for _ in range(n * slots)]
        self._last: np.ndarray | None = None  # [slots, obs + act] of the step being taken

    def act(self, obs: np.ndarray) -> np.ndarray:
        assert self._nets is not None
        n, slots = self._shape
        o = np.ascontiguousarray(obs, np.float32).reshape(n * slots, -1)
        # stacked [tasks, slots, ...]: each task's rows in products of one shape (see NumpyRecurrentPolicy.step)
        out = self._nets[0](np.concatenate([o, self.z], 1).reshape(n, slots, -1)).reshape(n * slots, -1)
        mean, log_std = out[:, :self.act_dim], np.clip(out[:, self.act_dim:], LOG_STD_MIN, LOG_STD_MAX)
        if self.deterministic:
            noise = np.zeros_like(mean)
            u = mean
        else:
            noise = np.concatenate([g.standard_normal((slots, self.act_dim), np.float32) for g in self._generators])
            u = mean + np.exp(log_std) * noise
        a = np.tanh(u)
        self._density = (noise, log_std, u)  # what `last_log_prob` needs
        self._last = np.concatenate([o, a], 1)
        action = (self.high + self.low) / 2 + (self.high - self.low) / 2 * a
        return action.reshape(n, slots, -1)

    def last_log_prob(self) -> np.ndarray:
        """``[n, slots]``: the log-density of the last `act`'s actions in the env's box, summed over the action
        dimensions: the Gaussian's at u, less log(1 - tanh(u)^2) and log(half the box's width) per dimension."""
        noise, log_std, u = (np.asarray(x, np.float64) for x in self._density)
        gaussian = -0.5 * noise**2 - log_std - 0.5 * np.log(2 * np.pi)
        squash = 2 * (np.log(2.0) - u - np.logaddexp(0.0, -2 * u))  # log(1 - tanh(u)^2), stable
        half = np.log((self.high.astype(np.float64) - self.low) / 2)
        return (gaussian - squash - half).sum(-1).reshape(self._shape)

    def widen(self, slots: int) -> None:
        """Continue the state of a one-slot actor (an adapted policy) on ``slots`` slots of the same task, one env
        each, every slot from its context and z (`metarl.api.AdaptedPolicy.sample` on a batch)."""
        assert self._shape == (1, 1), "widen() an actor started on one slot"
        self._shape = (1, slots)
        self.z = np.repeat(self.z, slots, 0)
        self._context = [list(self._context[0]) for _ in range(slots)]
        self._last = None

    def force(self, actions: np.ndarray) -> None:
        """The actions actually taken at the last `act` (``[tasks, slots, act_dim]``, in the env's box, as `act`
        returns them), in place of the actor's own sample: the context records them (`metarl.api.MetaLearner.
        adapt_on` replays episodes collected elsewhere)."""
        assert self._last is not None, "force() after act()"
        a = np.asarray(actions, np.float32).reshape(len(self._last), -1)
        half = (self.high - self.low) / 2
        squashed = np.clip((a - (self.high + self.low) / 2) / np.where(half > 0, half, 1), -1, 1)
        self._last = np.concatenate([self._last[:, :-self.act_dim], squashed.astype(np.float32)], 1)

    def observe(self, rewards: np.ndarray, dones: np.ndarray) -> None:
        if not self.infer or self._last is None:
            return
        r = np.asarray(rewards, np.float32).reshape(-1, 1)
        rows = np.concatenate([self._last, r], 1)
        for s in range(len(rows)):
            self._context[s].append(rows[s])
        slots = self._shape[1]
        for s in np.flatnonzero(np.asarray(dones).reshape(-1)).tolist():  # an episode ended: z from the posterior
            self.z[s] = self._posterior_sample(s, self._generators[s // slots])

    def _posterior_sample(self, s: int, g: np.random.Generator) -> np.ndarray:
        mean, var = self.posterior(s)
        return (mean + np.sqrt(var) * g.standard_normal(self.latent_dim, np.float32)).astype(np.float32)

    def posterior(self, s: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and variance of slot ``s`` from its context so far (the prior if it has none)."""
        if not self._context[s]:
            return np.zeros(self.latent_dim, np.float32), np.ones(self.latent_dim, np.float32)
        assert self._nets is not None and self._nets[1] is not None
        out = self._nets[1](np.stack(self._context[s]))
        d = self.latent_dim
        mu, var = out[:, :d], np.maximum(np.logaddexp(0, out[:, d:]), 1e-7)
        post_var = 1.0 / (1.0 / var).sum(0)
        return (post_var * (mu / var).sum(0)).astype(np.float32), post_var.astype(np.float32)

    def context(self) -> dict[str, torch.Tensor]:
        """The transitions collected so far and the latent (slot 0): what `metarl.api` saves."""
        width = self.policy["net.0.weight"].shape[1] - self.latent_dim + self.act_dim + 1  # (o, a, r)
        rows = np.stack(self._context[0]) if self._context[0] else np.zeros((0, width), np.float32)
        return {"context": torch.from_numpy(rows.astype(np.float32)), "z": torch.from_numpy(self.z[0].copy())}

    def set_context(self, context: dict[str, torch.Tensor]) -> None:
        self._context[0] = list(context["context"].numpy())
        self.z[0] = context["z"].numpy()


# ---- the agent -------------------------------------------------------------------------------------------
def task_pool(family: Any, n: int, seed: int) -> list[Task]:
    """``n`` distinct training tasks of ``family``, the same for a seed (a family with few tasks, such as
    HalfCheetahDir's two, gives each of them once rather than a draw that may repeat one)."""
    pool: list[Task] = []
    for attempt in range(20):
        draw_seed = int(np.random.SeedSequence([seed, 31, attempt]).generate_state(1)[0])
        for task in family.sample_tasks(max(n, 64), "train", seed=draw_seed):
            if task not in pool and len(pool) < n:
                pool.append(task)
        if len(pool) == n:
            return pool
    raise TaskError(f"{family.family}: found only {len(pool)} distinct training tasks; set agent.num_train_tasks "
                    f"<= {len(pool)}")


class PEARL(Agent):
    """The PEARL agent (see the module docstring)."""

    name = "pearl"
    config_class = PEARLConfig
    devices = ("cpu", "cuda")

    def __init__(self, config: PEARLConfig, sampler: Any, seed: int = 0):
        keep_freed_memory()  # see metarl.system
        self.config = c = config
        self.sampler = sampler
        if len(sampler.observation_space.shape) != 1 or len(sampler.action_space.shape) != 1:
            raise TaskError(f"{sampler.family.family}: PEARL needs flat (1-D) Box observations and actions, got "
                            f"{sampler.observation_space.shape} and {sampler.action_space.shape}")
        self.low = sampler.action_space.low.astype(np.float32)
        self.high = sampler.action_space.high.astype(np.float32)
        if not (np.all(np.isfinite(self.low)) and np.all(np.isfinite(self.high))):
            raise TaskError(f"{sampler.family.family}: PEARL's tanh policy needs a bounded action space, got "
                            f"[{self.low}, {self.high}]")
        self.obs_dim, self.act_dim = sampler.observation_space.shape[0], sampler.action_space.shape[0]
        # The fixed pool of training tasks: the same for a seed, disjoint from the held-out lists.
        self.train_tasks = task_pool(sampler.family, c.num_train_tasks, seed)
        torch.manual_seed(seed)
        o, a, d = self.obs_dim, self.act_dim, c.latent_dim
        self.encoder = ContextEncoder(o + a + 1, c.encoder_hidden, d)
        self.policy = TanhGaussianPolicy(o + d, c.hidden, a)
        self.q1, self.q2 = mlp(o + a + d, c.hidden, 1), mlp(o + a + d, c.hidden, 1)
        self.q1_target, self.q2_target = mlp(o + a + d, c.hidden, 1), mlp(o + a + d, c.hidden, 1)
        self.q1_target.load_state_dict(self.q1.state_dict())
        self.q2_target.load_state_dict(self.q2.state_dict())
        self.log_alpha = torch.zeros(1, requires_grad=True)
        self.target_entropy = -float(a)
        # foreach: one multi-tensor kernel per Adam operation instead of one per parameter (on the CPU too)
        self.policy_opt = torch.optim.Adam(self.policy.parameters(), lr=c.lr, foreach=True)
        self.critic_opt = torch.optim.Adam([*self.q1.parameters(), *self.q2.parameters(), *self.encoder.parameters()],
                                           lr=c.lr, foreach=True)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=c.lr)
        self.replay = [TaskBuffer(o, a, c.replay_size) for _ in range(c.num_train_tasks)]
        self.context_buffers = [TaskBuffer(o, a, c.replay_size) for _ in range(c.num_train_tasks)]
        self.rng = np.random.default_rng(seed)
        self.noise = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 37]).generate_state(1)[0]))
        self.env_steps = 0
        self.iteration = 0
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> None:
        """The update (networks, optimisers, alpha) on ``device``. The replay buffers stay numpy on the CPU and
        each gradient step's batch is moved; the noise is drawn on the CPU, so it is the same on any device."""
        self.device = torch.device(device)
        for k in NETWORKS:
            getattr(self, k).to(self.device)  # in place: the optimisers keep their parameters
        self.log_alpha = self.log_alpha.detach().to(self.device).requires_grad_()
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=self.config.lr)  # nothing stepped yet

    # -- collection ----------------------------------------------------------------------------------------
    def _seed(self) -> int:
        return int(self.rng.integers(2**31 - 1))

    def actor(self, latents: np.ndarray | None = None, infer: bool = False, deterministic: bool = False,
              seed: int | None = None) -> PEARLActor:
        cpu = lambda m: {k: v.detach().cpu() for k, v in m.state_dict().items()}  # noqa: E731 (the actors are numpy)
        return PEARLActor(cpu(self.policy), cpu(self.encoder) if infer else None, self.act_dim,
                          self.config.latent_dim, self.low, self.high, self._seed() if seed is None else seed,
                          latents, infer, deterministic)

    def _collect(self, pool_idx: list[int], episodes: int, posterior: bool, to_context: bool) -> EpisodeBatch:
        """``episodes`` episodes of each pool task, z from the prior or (``posterior``) from the posterior of a
        fresh context batch of the task's encoder buffer per episode; stored in the replay (and encoder) buffers."""
        latents = None
        if posterior:
            context = self._context_batch(pool_idx * episodes).reshape(episodes, len(pool_idx), self.config.context_batch, -1)
            with torch.no_grad():
                mean, var = self.encoder.posterior(context.transpose(0, 1))  # [tasks, episodes, latent]
            mean, var = mean.cpu(), var.cpu()
            noise = torch.randn(mean.shape, generator=self.noise)
            latents = (mean + var.sqrt() * noise).numpy()
        tasks = [self.train_tasks[i] for i in pool_idx]
        batch = self.sampler.sample(self.actor(latents), tasks, episodes, self._seed())
        self.env_steps += batch.env_steps
        for j, i in enumerate(pool_idx):
            rows = transitions(batch, j, self.low, self.high)
            self.replay[i].add(rows)
            if to_context:
                self.context_buffers[i].add(rows)
        return batch

    def _context_batch(self, pool_idx: list[int]) -> torch.Tensor:
        """``[len(pool_idx), context_batch, obs + act + 1]`` transitions from the encoder buffers."""
        rows = []
        for i in pool_idx:
            b = self.context_buffers[i].sample(self.rng, self.config.context_batch)
            rows.append(np.concatenate([b["obs"], b["actions"], b["rewards"][:, None]], 1))
        return torch.from_numpy(np.stack(rows)).to(self.device)

    def _rl_batch(self, pool_idx: list[int]) -> dict[str, torch.Tensor]:
        parts = [self.replay[i].sample(self.rng, self.config.batch_size) for i in pool_idx]
        return {k: torch.from_numpy(np.stack([p[k] for p in parts])).to(self.device) for k in TaskBuffer.FIELDS}

    # -- the update ----------------------------------------------------------------------------------------
    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp() if self.config.entropy == "auto" else torch.ones(1, device=self.log_alpha.device)

    def losses(self, context: torch.Tensor, batch: dict[str, torch.Tensor], z_noise: torch.Tensor,
               next_noise: torch.Tensor, new_noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """PEARL's losses for one meta-batch: ``context [M, C, in]``, RL batch fields ``[M, B, ...]``, standard
        normal noise for the latent ``[M, latent]``, the next action ``[M, B, act]`` and the new action."""
        c = self.config
        M, B = batch["rewards"].shape
        mean, var = self.encoder.posterior(context)
        z = mean + var.sqrt() * z_noise                              # reparameterised: the critic trains the encoder
        kl = kl_to_unit(mean, var).sum()                            # summed over tasks and dimensions (the authors')
        z_b = z.unsqueeze(1).expand(M, B, -1)
        obs, act, next_obs = batch["obs"], batch["actions"], batch["next_obs"]
        alpha = self.alpha.detach()
        with torch.no_grad():
            zd = z_b.detach()
            next_a, next_logp, _, _ = self.policy.sample(torch.cat([next_obs, zd], -1), next_noise)
            x = torch.cat([next_obs, next_a, zd], -1)
            next_q = torch.min(self.q1_target(x), self.q2_target(x)).squeeze(-1) - alpha * next_logp
            target = c.reward_scale * batch["rewards"] + c.gamma * (1 - batch["terminals"]) * next_q
        x = torch.cat([obs, act, z_b], -1)
        q1, q2 = self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)
        critic = (q1 - target).pow(2).mean() + (q2 - target).pow(2).mean()
        zd = z_b.detach()                                           # the policy does not train the encoder
        new_a, logp, pre_mean, log_std = self.policy.sample(torch.cat([obs, zd], -1), new_noise)
        x = torch.cat([obs, new_a, zd], -1)
        q_new = torch.min(self.q1(x), self.q2(x)).squeeze(-1)
        policy = (alpha * logp - q_new).mean() + c.policy_mean_reg * pre_mean.pow(2).mean() \
            + c.policy_std_reg * log_std.pow(2).mean()
        alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        return {"critic": critic, "kl": c.kl_lambda * kl, "policy": policy, "alpha": alpha_loss,
                "entropy": -logp.detach().mean(), "q": q1.detach().mean(), "z_var": var.detach().mean()}

    def update(self, pool_idx: list[int]) -> dict[str, float]:
        """One gradient step on the meta-batch ``pool_idx``: critic + encoder, policy, alpha, target networks."""
        c = self.config
        M = len(pool_idx)
        context = self._context_batch(pool_idx)
        batch = self._rl_batch(pool_idx)
        g = self.noise
        z_noise = torch.randn((M, c.latent_dim), generator=g).to(self.device)  # drawn on the CPU: any device, same noise
        next_noise = torch.randn((M, c.batch_size, self.act_dim), generator=g).to(self.device)
        new_noise = torch.randn((M, c.batch_size, self.act_dim), generator=g).to(self.device)
        losses = self.losses(context, batch, z_noise, next_noise, new_noise)
        # All gradients from the same parameters (SAC's simultaneous form): the policy's loss, differentiated
        # w.r.t. the policy only, then the critic's and the KL w.r.t. the Q functions and the encoder.
        self.policy_opt.zero_grad()
        losses["policy"].backward(inputs=list(self.policy.parameters()))
        self.critic_opt.zero_grad()
        (losses["critic"] + losses["kl"]).backward()
        self.critic_opt.step()
        self.policy_opt.step()
        if c.entropy == "auto":
            self.alpha_opt.zero_grad()
            losses["alpha"].backward()
            self.alpha_opt.step()
        with torch.no_grad():  # Polyak averaging of the target networks: target += tau (online - target)
            targets = [*self.q1_target.parameters(), *self.q2_target.parameters()]
            torch._foreach_lerp_(targets, [*self.q1.parameters(), *self.q2.parameters()], c.tau)
        return {k: float(v.detach()) for k, v in losses.items()}

    # -- the protocol ------------------------------------------------------------------------------------
    def train_step(self, tasks: list[Task]) -> dict[str, float]:
        """One PEARL iteration: collection (see the module docstring), then ``train_steps`` gradient steps.
        ``tasks`` (the training loop's fresh draw) is not used: PEARL trains on its fixed pool, whose tasks
        recur so that their buffers fill (``tasks_per_batch`` of them are collected for each iteration)."""
        c = self.config
        t0 = time.perf_counter()
        steps_before = self.env_steps
        metrics: dict[str, float] = {}
        if self.iteration == 0 and c.initial_episodes:
            self._collect(list(range(c.num_train_tasks)), c.initial_episodes, posterior=False, to_context=True)
        chosen = self.rng.choice(c.num_train_tasks, c.tasks_per_batch, replace=False).tolist()
        if c.prior_episodes:
            for i in chosen:  # the encoder buffer holds only this iteration's context of the task
                self.context_buffers[i].clear()
            batch = self._collect(chosen, c.prior_episodes, posterior=False, to_context=True)
            metrics["meta/return_prior"] = float(batch.returns.mean())
        posterior_returns = []
        for episodes, to_context in ((c.posterior_episodes, True), (c.extra_posterior_episodes, False)):
            if episodes:
                posterior_returns.append(self._collect(chosen, episodes, posterior=True, to_context=to_context).returns)
        if posterior_returns:
            metrics["meta/return_posterior"] = float(torch.cat(posterior_returns, 1).mean())
        # pre/post adaptation in the loop's terms: z from the prior, z from the task's context
        pre = metrics.get("meta/return_prior", metrics.get("meta/return_posterior"))
        metrics["meta/return_pre_adaptation"] = pre
        metrics["meta/return_post_adaptation"] = metrics.get("meta/return_posterior", pre)
        sample_time = time.perf_counter() - t0

        ready = [i for i in range(c.num_train_tasks) if self.replay[i].size and self.context_buffers[i].size]
        stats: dict[str, list[float]] = {}
        t1 = time.perf_counter()
        threads = torch.get_num_threads()
        if c.update_threads:
            torch.set_num_threads(c.update_threads)
        try:
            for _ in range(c.train_steps):
                pool_idx = [ready[k] for k in self.rng.integers(0, len(ready), c.meta_batch)]  # with replacement
                for key, value in self.update(pool_idx).items():
                    stats.setdefault(key, []).append(value)
        finally:
            torch.set_num_threads(threads)
        update_time = time.perf_counter() - t1
        self.iteration += 1
        total = time.perf_counter() - t0
        collected = self.env_steps - steps_before
        metrics.update({f"loss/{k}": float(np.mean(v)) for k, v in stats.items()})
        metrics.update({
            "loss/alpha_value": float(self.alpha.detach()),
            "meta/replay_transitions": float(sum(b.size for b in self.replay)),
            "time/sampling_s": sample_time,
            "time/update_s": update_time,
            "time/iteration_s": total,
            "time/env_steps_per_s": collected / max(total, 1e-9),
            "time/sampling_steps_per_s": collected / max(sample_time, 1e-9),
            "time/gradient_steps_per_s": c.train_steps / max(update_time, 1e-9),
            "env_steps": float(self.env_steps),
        })
        return metrics

    def adaptation(self, tasks: list[Task], steps: int, episodes: int, seed: int, collect: Collect,
                   final: bool = True) -> PEARLActor:
        """The adaptation primitive (`metarl.agent.Agent`): one ``collect`` call of ``episodes`` trials of
        ``steps + 1`` episodes per task, z from the prior in episode 0, then from the posterior of the trial's
        transitions so far; stage k is episode k. Without ``final`` (deployment on one env): ``steps`` context
        episodes in one trial, the returned actor carrying its context and posterior z on (``episodes`` unused);
        ``steps=0``: z from the prior, started on one slot."""
        rng = np.random.default_rng(seed)
        actor = self.actor(infer=True, deterministic=self.config.deterministic_eval, seed=int(rng.integers(2**31 - 1)))
        K, trials = (steps + 1, episodes) if final else (steps, 1)
        if K > 0:
            collect(actor, tasks, trials * K, int(rng.integers(2**31 - 1)), episodes_per_trial=K)
        else:
            actor.start([0], 1)
        return actor

    @classmethod
    def save_actor(cls, actor: PEARLActor) -> dict[str, Any]:
        return {"kind": "pearl", "policy": dict(actor.policy), "encoder": dict(actor.encoder or {}),
                "act_dim": actor.act_dim, "latent_dim": actor.latent_dim, "low": torch.from_numpy(actor.low),
                "high": torch.from_numpy(actor.high), "seed": actor.seed, **actor.context()}

    @classmethod
    def load_actor(cls, state: dict[str, Any]) -> PEARLActor:
        actor = PEARLActor(state["policy"], state["encoder"], state["act_dim"], state["latent_dim"],
                           state["low"].numpy(), state["high"].numpy(), seed=state["seed"], infer=True)
        actor.start([0], 1)
        actor.set_context(state)
        return actor

    def state_dict(self) -> dict[str, Any]:
        """Networks, optimisers, alpha, both buffers of every pool task (a resume continues exactly), the
        random generators and the counters."""
        nets = {k: getattr(self, k).state_dict() for k in NETWORKS}
        opts = {k: getattr(self, k).state_dict() for k in OPTIMIZERS}
        return {**nets, **opts, "log_alpha": self.log_alpha.detach().clone(),
                "replay": [b.state() for b in self.replay], "context_buffers": [b.state() for b in self.context_buffers],
                "rng": self.rng.bit_generator.state, "noise": self.noise.get_state(),
                "iteration": self.iteration, "env_steps": self.env_steps}

    def policy_state(self) -> dict[str, Any]:
        """The context encoder and the policy (what inferring z and acting need) and the counters: no critics,
        optimisers or buffers."""
        return {"encoder": self.encoder.state_dict(), "policy": self.policy.state_dict(),
                "iteration": self.iteration, "env_steps": self.env_steps}

    def load_policy_state(self, state: dict[str, Any]) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self.policy.load_state_dict(state["policy"])
        self.iteration, self.env_steps = int(state["iteration"]), int(state["env_steps"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["replay"]) != self.config.num_train_tasks:
            raise ValueError(f"checkpoint holds buffers of {len(state['replay'])} tasks, the config "
                             f"{self.config.num_train_tasks}")
        for k in (*NETWORKS, *OPTIMIZERS):
            getattr(self, k).load_state_dict(state[k])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        for buffers, key in ((self.replay, "replay"), (self.context_buffers, "context_buffers")):
            for b, s in zip(buffers, state[key], strict=True):
                b.load(s)
        self.rng.bit_generator.state = state["rng"]
        self.noise.set_state(state["noise"])
        self.iteration, self.env_steps = int(state["iteration"]), int(state["env_steps"])


NETWORKS = ("encoder", "policy", "q1", "q2", "q1_target", "q2_target")
OPTIMIZERS = ("policy_opt", "critic_opt", "alpha_opt")
