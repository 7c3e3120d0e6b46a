"""RL² (Duan et al., 2016; Wang et al., 2016): a recurrent policy that adapts in context, trained by PPO.

A *trial* is K consecutive episodes of one task. Every step the GRU sees the observation, the previous
action, the previous reward and a flag that an episode just ended (time-limit endings included); its
hidden state is kept across the episodes of a trial and reset only between trials, so whatever it learns
about the task in episode 1 it can use in episode 2. Nothing is adapted by gradient at test time.

Training is PPO over whole trials treated as one sequence each (the meta-episode): GAE runs across the
episode boundaries inside a trial (the next value after an episode's last step is the value of the next
episode's first state, with the hidden state carried), and the value after the trial's last step is
bootstrapped when that episode was cut by the time limit (``bootstrap_trial_end``). Minibatches are
groups of whole trials, re-run from a zero hidden state (or, with ``bptt_chunk``, chunks of that length
started from the hidden states of a no-grad pass: truncated BPTT). The same fused GRU runs in the sampler
(one step at a time) and in the update (whole sequences), so the update's no-grad pass reproduces the
sampling policy's hidden states and log-probabilities (tested to float tolerance).

Defaults follow VariBAD's RL² (docs/anchors.md): GRU 128, 2 episodes per trial, lr 7e-4, clip 0.1, 2 epochs,
4 minibatches, 16 parallel trials, gamma 0.97, GAE lambda 0.9, entropy 0.01.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from metarl.agent import Agent, Collect
from metarl.config import check_ranges
from metarl.episodes import EpisodeBatch
from metarl.policies import DiagGaussian, numpy_task_generators
from metarl.returns import discounted_returns, gae
from metarl.system import keep_freed_memory
from metarl.tasks import Task, TaskError


@dataclasses.dataclass(frozen=True)
class RL2Config:
    """Hyperparameters of RL²-PPO (defaults: VariBAD's RL², docs/anchors.md)."""

    tasks_per_batch: int = 16
    trials_per_task: int = 1
    episodes_per_trial: int = 2
    hidden_size: int = 128
    lr: float = 7e-4
    lr_schedule: str = "constant"   # or "linear" (to 0 at the last iteration)
    clip: float = 0.1
    epochs: int = 2
    minibatches: int = 4
    gamma: float = 0.97
    gae_lambda: float = 0.9
    entropy_coef: float = 0.01
    value_coef: float = 0.5
    max_grad_norm: float = 0.5
    normalize_obs: bool = True
    normalize_rewards: bool = True
    bptt_chunk: int = 0             # 0: back-propagate through whole trials
    bootstrap_trial_end: bool = True
    init_std: float = 1.0
    # The input path and losses (VariBAD's RL², docs/anchors.md, is embedding "separate", reward_input "raw",
    # head_hidden [128], gru_init "orthogonal", value_loss "huber", value_clip true; the defaults keep the
    # original model: one tanh layer over all inputs, linear heads, squared value error).
    embedding: str = "tanh"         # "tanh": one tanh layer over [obs, action, reward, flag]; "separate": a ReLU
    embed_sizes: tuple[int, ...] = (32, 16, 16)  # embedding each of [obs + flag], action, reward (sizes here)
    reward_input: str = "scaled"    # "scaled": previous reward / return std (as PPO sees it); "raw": as the env gave it
    head_hidden: tuple[int, ...] = ()  # tanh MLP layers of the actor and of the critic after the GRU
    gru_init: str = "default"       # "default": PyTorch's; "orthogonal": orthogonal weights, zero biases
    value_loss: str = "mse"         # "mse" or "huber" (smooth L1, delta 1) against the GAE returns
    value_clip: bool = False        # PPO's clipped value loss: max(l(v), l(v_old + clip(v - v_old, +-clip)))

    def __post_init__(self) -> None:
        for name in ("tasks_per_batch", "trials_per_task", "episodes_per_trial", "hidden_size", "epochs", "minibatches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"agent.{name} must be a positive integer, got {value!r}")
        check_ranges(self, {"lr": (0, 10, "(]"), "clip": (0, 10, "(]"), "init_std": (0, 100, "(]"),
                            "max_grad_norm": (0, 1e6, "(]"), "entropy_coef": (0, 1000, "[]"),
                            "value_coef": (0, 1000, "[]")})
        if not 0 < self.gamma <= 1:
            raise ValueError(f"agent.gamma must be in (0, 1], got {self.gamma!r}")
        if not 0 <= self.gae_lambda <= 1:
            raise ValueError(f"agent.gae_lambda must be in [0, 1], got {self.gae_lambda!r}")
        if self.lr_schedule not in ("constant", "linear"):
            raise ValueError(f"agent.lr_schedule must be 'constant' or 'linear', got {self.lr_schedule!r}")
        if self.bptt_chunk < 0:
            raise ValueError(f"agent.bptt_chunk must be >= 0 (0: whole trials), got {self.bptt_chunk}")
        choices = {"embedding": ("tanh", "separate"), "reward_input": ("scaled", "raw"),
                   "gru_init": ("default", "orthogonal"), "value_loss": ("mse", "huber")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"agent.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if len(self.embed_sizes) != 3 or any((not isinstance(k, int)) or k < 1 for k in self.embed_sizes):
            raise ValueError(f"agent.embed_sizes must be three positive integers (obs, action, reward), "
                             f"got {self.embed_sizes!r}")
        if any((not isinstance(k, int)) or k < 1 for k in self.head_hidden):
            raise ValueError(f"agent.head_hidden must be positive integers, got {self.head_hidden!r}")


class RunningMeanStd:
    """Running mean and variance over a stream of batches (parallel Welford/Chan update).

    ``limit`` (the observation normaliser's: 1e6) refuses inputs of larger magnitude: one absurd value
    would blow the variance up for the rest of training (a 1e30 observation: 1e57) and every later input
    would normalise to about 0. Non-finite inputs are always refused."""

    def __init__(self, shape: tuple[int, ...] = (), limit: float | None = None, name: str = "normaliser"):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4
        self.limit, self.name = limit, name

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1, *self.mean.shape)
        if len(x) == 0:
            return
        biggest = float(np.max(np.abs(x)))  # nan propagates, so one reduction checks both
        if not np.isfinite(biggest) or (self.limit is not None and biggest > self.limit):
            raise FloatingPointError(
                f"RL² {self.name}: refusing an input of magnitude {biggest:.3g}"
                + (f" (limit {self.limit:.0e}); an env whose values are this large needs rescaling, or "
                   "agent.normalize_obs: false" if np.isfinite(biggest) else "") + "; stopping before it is used")
        b_mean, b_var, b_count = x.mean(0), x.var(0), len(x)
        delta, total = b_mean - self.mean, self.count + b_count
        self.mean = self.mean + delta * b_count / total
        self.var = (self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total) / total
        self.count = total

    def state(self) -> dict[str, Any]:
        return {"mean": torch.from_numpy(np.array(self.mean, np.float64)),
                "var": torch.from_numpy(np.array(self.var, np.float64)), "count": float(self.count)}

    def load(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.count = state["mean"].numpy().copy(), state["var"].numpy().copy(), float(state["count"])


class RecurrentActorCritic(nn.Module):
    """Input [obs, prev action, prev reward, episode-ended flag] -> embedding -> GRU cell -> Gaussian action
    head and value head. ``step`` is the single-step form used both by the sampler and the update.

    ``embedding="tanh"``: one tanh layer over the whole input. ``"separate"`` (VariBAD's RL²): ReLU layers
    embed [obs, flag], the action and the reward separately (``embed_sizes``) and their concatenation
    enters the GRU, so the one-number reward channel is not drowned by the observation's. ``head_hidden``
    puts tanh MLPs between the GRU and each head; ``gru_init="orthogonal"``: orthogonal GRU weights, zero
    biases."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_size: int = 128, init_std: float = 1.0,
                 embedding: str = "tanh", embed_sizes: tuple[int, ...] = (32, 16, 16),
                 head_hidden: tuple[int, ...] = (), gru_init: str = "default"):
        super().__init__()
        embed_sizes, head_hidden = tuple(int(k) for k in embed_sizes), tuple(int(k) for k in head_hidden)
        self.config = {"obs_dim": obs_dim, "act_dim": act_dim, "hidden_size": hidden_size, "init_std": init_std,
                       "embedding": embedding, "embed_sizes": embed_sizes, "head_hidden": head_hidden,
                       "gru_init": gru_init}
        self.obs_dim, self.act_dim = obs_dim, act_dim
        in_dim = obs_dim + act_dim + 2
        if embedding == "separate":
            self.encoder = nn.ModuleDict({"obs": nn.Linear(obs_dim + 1, embed_sizes[0]),
                                          "action": nn.Linear(act_dim, embed_sizes[1]),
                                          "reward": nn.Linear(1, embed_sizes[2])})
            gru_in = sum(embed_sizes)
        else:
            self.encoder = nn.Linear(in_dim, hidden_size)
            gru_in = hidden_size
        self.embedding = embedding
        self.gru = nn.GRU(gru_in, hidden_size, batch_first=True)
        if gru_init == "orthogonal":
            for name, param in self.gru.named_parameters():
                (nn.init.orthogonal_ if "weight" in name else nn.init.zeros_)(param)
        self.mean_head = _head(hidden_size, head_hidden, act_dim)
        self.value_head = _head(hidden_size, head_hidden, 1)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(np.log(init_std))))
        last = self.mean_head if isinstance(self.mean_head, nn.Linear) else self.mean_head[-1]
        nn.init.orthogonal_(last.weight, gain=0.01)
        nn.init.zeros_(last.bias)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.embedding == "tanh":
            return torch.tanh(self.encoder(inputs))
        o, a = self.obs_dim, self.act_dim
        state = torch.cat([inputs[..., :o], inputs[..., o + a + 1:]], -1)  # the flag travels with the state
        return torch.cat([torch.relu(self.encoder["obs"](state)),
                          torch.relu(self.encoder["action"](inputs[..., o:o + a])),
                          torch.relu(self.encoder["reward"](inputs[..., o + a:o + a + 1]))], -1)

    def step(self, inputs: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step for a batch: ``inputs [B, in]``, ``hidden [B, H]`` -> mean, value, new hidden."""
        mean, value, hiddens = self.unroll(inputs.unsqueeze(1), hidden)
        return mean[:, 0], value[:, 0], hiddens[:, 0]

    def unroll(self, inputs: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``inputs [B, L, in]`` from ``hidden [B, H]``: means ``[B, L, act]``, values ``[B, L]``, hiddens ``[B, L, H]``
        (the state *after* each step). On the CPU, for at most `NUMPY_GRU_MAX_BATCH` sequences, the GRU runs
        as `gru_sequence` (numpy time loops with the backward written out); otherwise (more sequences, CUDA)
        as PyTorch's fused ``nn.GRU``. Both compute the same function."""
        embedded = self.embed(inputs)
        if (embedded.device.type == "cpu" and embedded.dtype in (torch.float32, torch.float64)
                and embedded.shape[0] <= NUMPY_GRU_MAX_BATCH):
            g = self.gru
            out = gru_sequence(embedded, hidden, g.weight_ih_l0, g.weight_hh_l0, g.bias_ih_l0, g.bias_hh_l0)
        else:
            out, _ = self.gru(embedded, hidden.unsqueeze(0).contiguous())
        return self.mean_head(out), self.value_head(out).squeeze(-1), out


# Up to this many sequences per call `gru_sequence` beats autograd through ``nn.GRU`` on the CPU; beyond it
# the arithmetic dominates and torch's fused, two-thread kernel wins. Forward + backward over 400 steps
# (GRU 64 -> 128) measured here: 8 sequences 51 ms against 83 ms, 16: 77 against 84, 32: 162 against 125.
NUMPY_GRU_MAX_BATCH = 16


def _gru_gates(gi: np.ndarray, gh: np.ndarray, h: np.ndarray, H: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One GRU step from the input and recurrent pre-activations ``gi``, ``gh`` ``[..., 3H]`` (PyTorch's gate
    order r, z, n): returns (r and z ``[..., 2H]``, n ``[..., H]``, the new state ``[..., H]``)."""
    rz = 0.5 + 0.5 * np.tanh(0.5 * (gi[..., :2 * H] + gh[..., :2 * H]))  # σ(u) = (1 + tanh(u/2)) / 2: no overflow
    n = np.tanh(gi[..., 2 * H:] + rz[..., :H] * gh[..., 2 * H:])
    return rz, n, n + rz[..., H:] * (h - n)  # h' = (1 - z) n + z h


class _GRUSequence(torch.autograd.Function):
    """PyTorch's one-layer GRU over a whole sequence, forward and backward as numpy loops over time.

    Autograd through ``nn.GRU`` on the CPU records ~10 ops per time step and replays them one by one; on
    RL²'s trials (hundreds of steps, a few to a few dozen sequences) that dispatch, not arithmetic, is the
    update's cost. Here the input projections of all steps are one matmul, each step is one small matmul
    plus a few in-place element-wise numpy ops, and the backward is the GRU's derivative written out:
    with a = pre-activations, r = σ(a_r), z = σ(a_z), n = tanh(gi_n + r gh_n), h' = (1 - z) n + z h,
    dn = dh' (1 - z), dz = dh' (h - n), d(gi_n) = dn (1 - n²), d(gh_n) = d(gi_n) r, dr = d(gi_n) gh_n,
    d(a_r) = dr r (1 - r), d(a_z) = dz z (1 - z), dh = dh' z + d(gh) W_hh. Weight gradients are single
    matmuls over all steps at the end. Checked against ``nn.GRU`` and by ``torch.autograd.gradcheck``."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh):  # noqa: D102
        # the weights are copied: an optimizer step before this backward must not change what it differentiates
        X, W_ih, W_hh = x.detach().numpy(), w_ih.detach().numpy().copy(), w_hh.detach().numpy().copy()
        B, L, _ = X.shape
        H = W_hh.shape[1]
        gi = (X.reshape(B * L, -1) @ W_ih.T + b_ih.detach().numpy()).reshape(B, L, 3 * H).transpose(1, 0, 2)
        gi = np.ascontiguousarray(gi)  # time-major: step t is one contiguous [B, 3H] block
        w_hh_t, b = np.ascontiguousarray(W_hh.T), b_hh.detach().numpy()
        hs = np.empty((L + 1, B, H), X.dtype)
        hs[0] = h0.detach().numpy()
        rz, ns, ghn = np.empty((L, B, 2 * H), X.dtype), np.empty((L, B, H), X.dtype), np.empty((L, B, H), X.dtype)
        for t in range(L):
            gh = hs[t] @ w_hh_t + b
            rz[t], ns[t], hs[t + 1] = _gru_gates(gi[t], gh, hs[t], H)
            ghn[t] = gh[:, 2 * H:]
        ctx.arrays = (X, W_ih, W_hh, hs, rz, ns, ghn)
        return torch.from_numpy(np.ascontiguousarray(hs[1:].transpose(1, 0, 2)))

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        X, W_ih, W_hh, hs, rz, ns, ghn = ctx.arrays
        L, B, H = ns.shape
        G = np.ascontiguousarray(grad_out.detach().numpy().transpose(1, 0, 2), X.dtype)
        dgi, dgh = np.empty((L, B, 3 * H), X.dtype), np.empty((L, B, 3 * H), X.dtype)
        r, z = rz[..., :H], rz[..., H:]
        # The per-step factors of the chain rule, for all steps at once, so the loop is a few ops per step.
        a_n = (1 - z) * (1 - ns * ns)           # d(gi_n) / dh'
        a_r = ghn * r * (1 - r)                 # d(a_r) / d(gi_n)
        a_z = (hs[:-1] - ns) * z * (1 - z)      # d(a_z) / dh'
        dh = np.zeros((B, H), X.dtype)
        for t in range(L - 1, -1, -1):
            dh += G[t]
            dan = np.multiply(dh, a_n[t], out=dgi[t, :, 2 * H:])
            np.multiply(dan, r[t], out=dgh[t, :, 2 * H:])
            np.multiply(dan, a_r[t], out=dgi[t, :, :H])
            np.multiply(dh, a_z[t], out=dgi[t, :, H:2 * H])
            dgh[t, :, :2 * H] = dgi[t, :, :2 * H]
            recurrent = dgh[t] @ W_hh
            dh *= z[t]
            dh += recurrent
        flat_gi = np.ascontiguousarray(dgi.transpose(1, 0, 2)).reshape(B * L, 3 * H)  # batch-major, as X
        flat_gh = dgh.reshape(L * B, 3 * H)
        grads = (torch.from_numpy((flat_gi @ W_ih).reshape(X.shape)) if ctx.needs_input_grad[0] else None,
                 torch.from_numpy(dh),
                 torch.from_numpy(flat_gi.T @ X.reshape(B * L, -1)),
                 torch.from_numpy(flat_gh.T @ hs[:-1].reshape(L * B, H)),
                 torch.from_numpy(flat_gi.sum(0)),
                 torch.from_numpy(flat_gh.sum(0)))
        return grads


def gru_sequence(x: torch.Tensor, h0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
                 b_hh: torch.Tensor) -> torch.Tensor:
    """``nn.GRU``'s output for ``x [B, L, in]`` from ``h0 [B, H]`` (CPU tensors), computed by `_GRUSequence`."""
    return _GRUSequence.apply(x.contiguous(), h0.contiguous(), w_ih, w_hh, b_ih, b_hh)


def _head(in_dim: int, hidden: tuple[int, ...], out_dim: int) -> nn.Module:
    """A linear head, or a tanh MLP ending in one."""
    if not hidden:
        return nn.Linear(in_dim, out_dim)
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(in_dim, size), nn.Tanh()]
        in_dim = size
    return nn.Sequential(*layers, nn.Linear(in_dim, out_dim))


def value_loss(value: torch.Tensor, old_value: torch.Tensor, target: torch.Tensor, kind: str = "mse",
               clip: float | None = None) -> torch.Tensor:
    """Per-step value loss: squared error, or Huber (smooth L1 with delta 1: 0.5 e^2 for |e| <= 1, |e| - 0.5
    beyond); with ``clip``, PPO's pessimistic clipped form max(l(v), l(v_old + clip(v - v_old, -clip, clip)))."""
    def one(v: torch.Tensor) -> torch.Tensor:
        err = v - target
        return err.pow(2) if kind == "mse" else nn.functional.smooth_l1_loss(v, target, reduction="none")

    loss = one(value)
    if clip is not None:
        loss = torch.max(loss, one(old_value + (value - old_value).clamp(-clip, clip)))
    return loss


def make_inputs(obs: torch.Tensor, prev_action: torch.Tensor, prev_reward: torch.Tensor, ended: torch.Tensor,
                obs_rms: RunningMeanStd | None, reward_scale: float) -> torch.Tensor:
    """The policy input: normalised observation, previous action, previous reward / ``reward_scale``, flag."""
    if obs_rms is not None:
        mean = torch.as_tensor(obs_rms.mean, dtype=obs.dtype)
        std = torch.as_tensor(np.sqrt(obs_rms.var + 1e-8), dtype=obs.dtype)
        obs = ((obs - mean) / std).clamp(-10, 10)
    return torch.cat([obs, prev_action, (prev_reward / reward_scale).unsqueeze(-1), ended.unsqueeze(-1)], -1)


# The parts of the model whose gradient norms are logged (loss/grad_norm_<part>): the input encoder, the
# GRU, the actor (mean head and log-std) and the critic (value head).
GRAD_PARTS = {"encoder": ("encoder.",), "gru": ("gru.",), "actor": ("mean_head.", "log_std"),
              "critic": ("value_head.",)}


class RL2Actor:
    """Picklable sampling-side RL² policy: steps the GRU for every slot, carrying the state within a trial."""

    def __init__(self, model_config: dict[str, Any], state_dict: dict[str, torch.Tensor], obs_rms: RunningMeanStd | None,
                 reward_scale: float, seed: int, deterministic: bool = False, record_hidden: bool = False):
        self.model_config = dict(model_config)
        self.state_dict = {k: v.detach().clone() for k, v in state_dict.items()}
        self.obs_rms, self.reward_scale = obs_rms, float(reward_scale)
        self.seed, self.deterministic, self.record_hidden = int(seed), bool(deterministic), bool(record_hidden)
        self._model: NumpyRecurrentPolicy | None = None
        self.hidden_log: list[np.ndarray] = []

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_model"] = None
        return state

    def start(self, task_indices: list[int], slots: int) -> None:
        if self._model is None:
            model = RecurrentActorCritic(**self.model_config)
            model.load_state_dict(self.state_dict)
            self._model = NumpyRecurrentPolicy(model)
        n = len(task_indices)
        act_dim, hidden_size = self.model_config["act_dim"], self.model_config["hidden_size"]
        self._shape = (n, slots)
        self._hidden = np.zeros((n * slots, hidden_size), np.float32)  # a new trial: a fresh state
        self._prev_action = torch.zeros(n * slots, act_dim)
        self._prev_reward = torch.zeros(n * slots)
        self._ended = torch.zeros(n * slots)
        self._generators = numpy_task_generators(self.seed, task_indices)
        self._noise = np.zeros((n, slots, act_dim), np.float32)
        self.hidden_log = []

    def act(self, obs: np.ndarray) -> np.ndarray:
        assert self._model is not None
        n, slots = self._shape
        o = torch.from_numpy(np.ascontiguousarray(obs, dtype=np.float32)).reshape(n * slots, -1)
        inputs = make_inputs(o, self._prev_action, self._prev_reward, self._ended, self.obs_rms, self.reward_scale)
        if self.record_hidden:
            self.hidden_log.append(self._hidden.copy())
        mean, hidden = self._model.step(inputs.numpy().reshape(n, slots, -1), self._hidden.reshape(n, slots, -1))
        mean, self._hidden = mean.reshape(n * slots, -1), hidden.reshape(n * slots, -1)
        self._sampled = not self.deterministic
        if self.deterministic:
            action = mean
        else:
            for row, g in zip(self._noise, self._generators, strict=True):
                g.standard_normal(out=row, dtype=np.float32)
            action = mean + self._model.std * self._noise.reshape(n * slots, -1)
        self._prev_action = torch.from_numpy(action)
        return action.reshape(n, slots, -1)

    def last_log_prob(self) -> np.ndarray:
        """``[n, slots]``: the log-density of the last `act`'s actions, summed over the action dimensions (at the
        mean for a deterministic act)."""
        noise = self._noise.astype(np.float64) if self._sampled else np.zeros(self._noise.shape)
        log_std = np.log(self._model.std.astype(np.float64))
        return (-0.5 * noise**2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)

    def widen(self, slots: int) -> None:
        """Continue the state of a one-slot actor (an adapted policy) on ``slots`` slots of the same task, one env
        each, every slot from that state (`metarl.api.AdaptedPolicy.sample` on a batch)."""
        assert self._shape == (1, 1), "widen() an actor started on one slot"
        self._shape = (1, slots)
        self._hidden = np.repeat(self._hidden, slots, 0)
        self._prev_action, self._prev_reward, self._ended = (
            x.repeat_interleave(slots, 0) for x in (self._prev_action, self._prev_reward, self._ended))
        self._noise = np.zeros((1, slots, self._noise.shape[-1]), np.float32)

    def force(self, actions: np.ndarray) -> None:
        """The actions actually taken at the last `act` (``[tasks, slots, act_dim]``, as `act` returns them), in
        place of the actor's own sample: the next step's input carries them (`metarl.api.MetaLearner.adapt_on`
        replays episodes collected elsewhere)."""
        self._prev_action = torch.from_numpy(np.asarray(actions, np.float32).reshape(self._prev_action.shape).copy())

    def observe(self, rewards: np.ndarray, dones: np.ndarray) -> None:
        self._prev_reward = torch.from_numpy(np.asarray(rewards, np.float32).reshape(-1))
        self._ended = torch.from_numpy(np.asarray(dones, np.float32).reshape(-1))

    def context(self) -> dict[str, torch.Tensor]:
        """What the trial so far left in the actor (hidden state, previous action, reward and end flag), as
        tensors: `set_context` on a started actor continues the trial from there (`metarl.api` saves it)."""
        return {"hidden": torch.from_numpy(self._hidden.copy()), "prev_action": self._prev_action.clone(),
                "prev_reward": self._prev_reward.clone(), "ended": self._ended.clone()}

    def set_context(self, context: dict[str, torch.Tensor]) -> None:
        self._hidden = context["hidden"].numpy().copy()
        self._prev_action, self._prev_reward = context["prev_action"].clone(), context["prev_reward"].clone()
        self._ended = context["ended"].clone()


class NumpyRecurrentPolicy:
    """The sampling half of a `RecurrentActorCritic` (embedding, one GRU step, mean head) in float32 numpy.

    It is the same function as ``RecurrentActorCritic.step`` (to float rounding; tested against the
    update's unroll), without the value head the sampler never uses. On the sampler's small batches
    (16-64 slots per worker) torch spends ~8 µs of dispatch per op and one step costs ~350 µs; the same
    matmuls and element-wise ops in numpy take a fraction of that, which is most of the actor's share of
    collection time. The GRU step is `_gru_gates`, the same code as the update's `gru_sequence`."""

    def __init__(self, model: RecurrentActorCritic):
        def linear(layer: nn.Linear) -> tuple[np.ndarray, np.ndarray]:
            return (np.ascontiguousarray(layer.weight.detach().numpy().T, np.float32),
                    layer.bias.detach().numpy().astype(np.float32))

        self.obs_dim, self.act_dim, self.embedding = model.obs_dim, model.act_dim, model.embedding
        if model.embedding == "tanh":
            self.encoder = [linear(model.encoder)]
        else:
            self.encoder = [linear(model.encoder[k]) for k in ("obs", "action", "reward")]
        self.w_ih, self.w_hh = (np.ascontiguousarray(getattr(model.gru, f"weight_{k}_l0").detach().numpy().T, np.float32)
                                for k in ("ih", "hh"))
        self.b_ih, self.b_hh = (getattr(model.gru, f"bias_{k}_l0").detach().numpy().astype(np.float32) for k in ("ih", "hh"))
        head = [model.mean_head] if isinstance(model.mean_head, nn.Linear) else list(model.mean_head)
        self.head = [linear(layer) for layer in head if isinstance(layer, nn.Linear)]
        self.hidden_size = model.gru.hidden_size
        self.std = np.exp(model.log_std.detach().numpy()).astype(np.float32)

    def embed(self, x: np.ndarray) -> np.ndarray:
        if self.embedding == "tanh":
            (w, b), = self.encoder
            return np.tanh(x @ w + b)
        o, a = self.obs_dim, self.act_dim
        (ws, bs), (wa, ba), (wr, br) = self.encoder
        state = np.concatenate([x[..., :o], x[..., o + a + 1:]], -1)
        return np.maximum(np.concatenate([state @ ws + bs, x[..., o:o + a] @ wa + ba, x[..., o + a:o + a + 1] @ wr + br],
                                         -1), 0)

    def step(self, x: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x [..., in]``, ``h [..., H]`` -> action means ``[..., act]``, new hidden ``[..., H]``. The actor passes
        ``[tasks, slots, ...]``: numpy multiplies a stacked array slice by slice, so each task's rows go through
        matrix products of one shape whichever tasks share the call (a flat ``[tasks * slots, in]`` product did
        not: OpenBLAS's small-matrix kernels rounded a row differently for 15 rows and for 6)."""
        H = self.hidden_size
        gi = self.embed(x) @ self.w_ih + self.b_ih
        _, _, h = _gru_gates(gi, h @ self.w_hh + self.b_hh, h, H)
        out = h
        for k, (w, b) in enumerate(self.head):
            out = out @ w + b
            if k < len(self.head) - 1:
                out = np.tanh(out)
        return out, h


@dataclasses.dataclass
class Trials:
    """Episodes regrouped into trial sequences ``[B, L]`` (valid steps first, in order), plus one extra
    position per trial holding the input after its last step (for the bootstrap value)."""

    obs: torch.Tensor          # [B, L+1, obs]
    actions: torch.Tensor      # [B, L, act]  (sampled, unclipped)
    rewards: torch.Tensor      # [B, L]
    mask: torch.Tensor         # [B, L]
    prev_action: torch.Tensor  # [B, L+1, act]
    prev_reward: torch.Tensor  # [B, L+1]
    ended: torch.Tensor        # [B, L+1]  an episode ended at the previous step
    lengths: torch.Tensor      # [B]
    last_truncated: torch.Tensor  # [B] the trial's last episode was cut by the time limit

    def to(self, device: torch.device) -> Trials:
        return Trials(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def to_trials(batch: EpisodeBatch, episodes_per_trial: int) -> Trials:
    """Regroup an ``[N, E, T]`` batch (episode ``m*K + k`` = episode k of trial m) into trial sequences."""
    N, E, T = batch.rewards.shape
    K = episodes_per_trial
    M = E // K
    B = N * M
    mask = batch.mask.reshape(B, K * T)
    order = torch.sort(mask, dim=1, descending=True, stable=True).indices  # valid steps first, order kept
    take = lambda x: torch.gather(x, 1, order if x.dim() == 2 else order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
    obs = take(batch.observations.reshape(B, K * T, -1))
    actions = take(batch.actions.reshape(B, K * T, -1))
    rewards = take(batch.rewards.reshape(B, K * T))
    m = take(mask)
    lengths = m.sum(1).long()
    # episode ends inside the compacted sequence: the last valid step of each episode
    ep_len = batch.lengths.reshape(B, K).long()
    ends = torch.cumsum(ep_len, 1) - 1                                  # [B, K] positions of episode ends
    done = torch.zeros(B, K * T + 1)
    done.scatter_(1, ends, 1.0)
    L = K * T
    # position t's inputs come from step t-1; the extra position L_b = lengths[b] is "after the trial"
    obs_ext = torch.cat([obs, torch.zeros(B, 1, obs.shape[-1])], 1)
    idx = torch.arange(B)
    obs_ext[idx, lengths] = batch.last_observations.reshape(B, K, -1)[:, -1]
    prev_action = torch.cat([torch.zeros(B, 1, actions.shape[-1]), actions], 1)
    prev_reward = torch.cat([torch.zeros(B, 1), rewards], 1)
    ended = torch.cat([torch.zeros(B, 1), done[:, :L]], 1)
    last_truncated = batch.truncated.reshape(B, K)[:, -1]
    return Trials(obs_ext, actions, rewards, m, prev_action, prev_reward, ended, lengths, last_truncated)


class RL2(Agent):
    """The RL²-PPO agent (see the module docstring)."""

    name = "rl2"
    config_class = RL2Config
    devices = ("cpu", "cuda")

    def __init__(self, config: RL2Config, sampler: Any, seed: int = 0):
        keep_freed_memory()  # see metarl.system
        self.config = config
        self.sampler = sampler
        if len(sampler.observation_space.shape) != 1 or len(sampler.action_space.shape) != 1:
            raise TaskError(f"{sampler.family.family}: RL² needs flat (1-D) Box observations and actions, got "
                            f"{sampler.observation_space.shape} and {sampler.action_space.shape}")
        obs_dim, act_dim = sampler.observation_space.shape[0], sampler.action_space.shape[0]
        torch.manual_seed(seed)
        self.model = RecurrentActorCritic(obs_dim, act_dim, config.hidden_size, config.init_std, config.embedding,
                                          config.embed_sizes, config.head_hidden, config.gru_init)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, eps=1e-5)
        self.obs_rms = RunningMeanStd((obs_dim,), limit=1e6, name="observation normaliser") if config.normalize_obs else None
        self.ret_rms = RunningMeanStd((), name="return normaliser")
        self.rng = np.random.default_rng(seed)
        self.env_steps = 0
        self.iteration = 0
        self.total_iterations: int | None = None
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> None:
        """The update (PPO over trials) on ``device``; the sampler's actors get CPU copies of the weights."""
        self.device = torch.device(device)
        self.model.to(self.device)

    def _cpu_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def set_total_iterations(self, n: int) -> None:
        self.total_iterations = int(n)

    @property
    def reward_scale(self) -> float:
        return float(np.sqrt(self.ret_rms.var + 1e-8)) if self.config.normalize_rewards else 1.0

    @property
    def input_reward_scale(self) -> float:
        """What the previous reward is divided by in the policy's input (1: ``reward_input: raw``)."""
        return 1.0 if self.config.reward_input == "raw" else self.reward_scale

    def _seed(self) -> int:
        return int(self.rng.integers(2**31 - 1))

    def actor(self, deterministic: bool = False, record_hidden: bool = False) -> RL2Actor:
        return RL2Actor(self.model.config, self._cpu_weights(), self._frozen_obs_rms(), self.input_reward_scale,
                        seed=self._seed(), deterministic=deterministic, record_hidden=record_hidden)

    def _frozen_obs_rms(self) -> RunningMeanStd | None:
        if self.obs_rms is None:
            return None
        frozen = RunningMeanStd(self.obs_rms.mean.shape)
        frozen.mean, frozen.var, frozen.count = self.obs_rms.mean.copy(), self.obs_rms.var.copy(), self.obs_rms.count
        return frozen

    def inputs(self, trials: Trials, obs_rms: RunningMeanStd | None, reward_scale: float) -> torch.Tensor:
        return make_inputs(trials.obs, trials.prev_action, trials.prev_reward, trials.ended, obs_rms, reward_scale)

    def trial_advantages(self, trials: Trials, values: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        """GAE over whole trials; ``values [B, L+1]`` (the last valid position + 1 is the bootstrap)."""
        c = self.config
        idx = torch.arange(values.shape[0], device=values.device)
        bootstrap = values[idx, trials.lengths] * (trials.last_truncated.float() if c.bootstrap_trial_end else 0.0)
        return gae(rewards.unsqueeze(0), values[:, :-1].unsqueeze(0), trials.mask.unsqueeze(0), c.gamma,
                   c.gae_lambda, bootstrap=bootstrap.unsqueeze(0)).squeeze(0)

    def train_step(self, tasks: list[Task]) -> dict[str, float]:
        c = self.config
        t0 = time.perf_counter()
        episodes = c.trials_per_task * c.episodes_per_trial
        batch = self.sampler.sample(self.actor(), tasks, episodes, self._seed(), episodes_per_trial=c.episodes_per_trial)
        sample_time = time.perf_counter() - t0
        self.env_steps += batch.env_steps
        trials = to_trials(batch, c.episodes_per_trial)  # regrouped on the CPU, then moved to the update's device
        obs_rms, scale = self._frozen_obs_rms(), self.reward_scale  # what the sampler used
        dev = self.device
        inputs = self.inputs(trials, obs_rms, self.input_reward_scale).to(dev)
        trials = trials.to(dev)
        rewards = trials.rewards / scale  # PPO learns from normalised rewards whatever the input sees
        B, L = trials.rewards.shape
        with torch.no_grad():
            means, values, hiddens = self.model.unroll(inputs, torch.zeros(B, c.hidden_size, device=dev))
            old_logp = DiagGaussian(means[:, :-1], self.model.log_std.expand_as(means[:, :-1])).log_prob(trials.actions)
            advantages = self.trial_advantages(trials, values, rewards)
            returns = advantages + values[:, :-1]
        valid = trials.mask > 0
        adv_norm = (advantages - advantages[valid].mean()) / (advantages[valid].std() + 1e-8)

        # Sequences to train on: whole trials, or chunks started from the no-grad pass's hidden states.
        h_start = torch.cat([torch.zeros(B, 1, c.hidden_size, device=dev), hiddens[:, :-1]], 1)  # state before each step
        chunk = c.bptt_chunk if c.bptt_chunk and c.bptt_chunk < L else L
        starts = list(range(0, L, chunk))
        lengths = trials.lengths.tolist()
        pieces = [(b, s) for b in range(B) for s in starts if s < lengths[b]]  # chunks with real steps only
        if self.total_iterations and c.lr_schedule == "linear":
            for group in self.optimizer.param_groups:
                group["lr"] = c.lr * max(0.0, 1 - self.iteration / self.total_iterations)
        stats: dict[str, list[float]] = {k: [] for k in ("policy", "value", "entropy", "approx_kl", "clip_frac",
                                                         *GRAD_PARTS, "total")}
        for _ in range(c.epochs):
            perm = self.rng.permutation(len(pieces))
            for mb in np.array_split(perm, min(c.minibatches, len(pieces))):
                b_idx = torch.as_tensor([pieces[i][0] for i in mb], device=dev)
                s_idx = torch.as_tensor([pieces[i][1] for i in mb], device=dev)
                cols = (s_idx.unsqueeze(1) + torch.arange(chunk, device=dev)).clamp_max(L - 1)
                rows = b_idx.unsqueeze(1)
                x = inputs[rows, cols]
                m = trials.mask[rows, cols] * (torch.arange(chunk, device=dev) + s_idx.unsqueeze(1) < L)
                h0 = h_start[b_idx, s_idx]
                mean, value, _ = self.model.unroll(x, h0)
                dist = DiagGaussian(mean, self.model.log_std.expand_as(mean))
                logp = dist.log_prob(trials.actions[rows, cols])
                ratio = torch.exp(logp - old_logp[rows, cols])
                adv = adv_norm[rows, cols]
                policy_loss = -torch.min(ratio * adv, ratio.clamp(1 - c.clip, 1 + c.clip) * adv)
                value_loss = self._value_loss(value, values[rows, cols], returns[rows, cols])
                entropy = dist.entropy()
                denom = m.sum().clamp_min(1.0)
                loss = ((policy_loss + c.value_coef * value_loss - c.entropy_coef * entropy) * m).sum() / denom
                self.optimizer.zero_grad()
                loss.backward()
                for part, norm in self.grad_norms().items():  # before clipping: which part the loss pulls on
                    stats[part].append(norm)
                nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    log_ratio = logp - old_logp[rows, cols]
                    stats["policy"].append(((policy_loss * m).sum() / denom).item())
                    stats["value"].append(((value_loss * m).sum() / denom).item())
                    stats["entropy"].append(((entropy * m).sum() / denom).item())
                    stats["approx_kl"].append((((ratio - 1) - log_ratio) * m).sum().item() / denom.item())
                    stats["clip_frac"].append((((ratio - 1).abs() > c.clip).float() * m).sum().item() / denom.item())

        # Normalisers learn from this batch for the *next* iteration (the sampler and update used the same).
        if self.obs_rms is not None:
            self.obs_rms.update(batch.observations[batch.mask > 0].numpy())
        if c.normalize_rewards:
            self.ret_rms.update(_discounted_trial_returns(trials, c.gamma)[valid].cpu().numpy())
        self.iteration += 1
        total = time.perf_counter() - t0
        y, v = returns[valid], values[:, :-1][valid]
        explained = float(1 - (y - v).var() / y.var().clamp_min(1e-8))
        per_episode = batch.returns.reshape(len(tasks), c.trials_per_task, c.episodes_per_trial).mean((0, 1))
        metrics = {f"meta/return_episode{k}": float(r) for k, r in enumerate(per_episode)}
        metrics.update({
            "meta/return_pre_adaptation": float(per_episode[0]),
            "meta/return_post_adaptation": float(per_episode[-1]),
            "loss/policy": float(np.mean(stats["policy"])),
            "loss/value": float(np.mean(stats["value"])),
            "loss/entropy": float(np.mean(stats["entropy"])),
            "loss/approx_kl": float(np.mean(stats["approx_kl"])),
            "loss/clip_fraction": float(np.mean(stats["clip_frac"])),
            "loss/explained_variance": explained,
            "loss/learning_rate": float(self.optimizer.param_groups[0]["lr"]),
            **{f"loss/grad_norm_{part}": float(np.mean(stats[part])) for part in (*GRAD_PARTS, "total")},
            "time/sampling_s": sample_time,
            "time/update_s": total - sample_time,
            "time/iteration_s": total,
            "time/env_steps_per_s": batch.env_steps / max(total, 1e-9),
            "time/sampling_steps_per_s": batch.env_steps / max(sample_time, 1e-9),
            "env_steps": float(self.env_steps),
        })
        return metrics

    def adaptation(self, tasks: list[Task], steps: int, episodes: int, seed: int, collect: Collect,
                   final: bool = True) -> RL2Actor:
        """The adaptation primitive (`metarl.agent.Agent`): one ``collect`` call of ``episodes`` trials of
        ``steps + 1`` episodes per task, episode k of a trial being stage k (it has seen k episodes of the task
        before). Without ``final`` (deployment on one env): one trial of ``steps`` episodes, the returned actor
        carrying its hidden state on from the trial's end (``episodes`` unused); ``steps=0``: a fresh trial,
        started on one slot."""
        rng = np.random.default_rng(seed)
        actor = RL2Actor(self.model.config, self._cpu_weights(), self._frozen_obs_rms(), self.input_reward_scale,
                         seed=int(rng.integers(2**31 - 1)))
        K, trials = (steps + 1, episodes) if final else (steps, 1)
        if K > 0:
            collect(actor, tasks, trials * K, int(rng.integers(2**31 - 1)), episodes_per_trial=K)
        else:
            actor.start([0], 1)
        return actor

    @classmethod
    def save_actor(cls, actor: RL2Actor) -> dict[str, Any]:
        rms = None if actor.obs_rms is None else actor.obs_rms.state()
        return {"kind": "rl2", "model_config": dict(actor.model_config), "state_dict": dict(actor.state_dict),
                "obs_rms": rms, "reward_scale": actor.reward_scale, "seed": actor.seed, **actor.context()}

    @classmethod
    def load_actor(cls, state: dict[str, Any]) -> RL2Actor:
        rms = None
        if state["obs_rms"] is not None:
            rms = RunningMeanStd(tuple(state["obs_rms"]["mean"].shape))
            rms.load(state["obs_rms"])
        actor = RL2Actor(state["model_config"], state["state_dict"], rms, state["reward_scale"], seed=state["seed"])
        actor.start([0], 1)
        actor.set_context(state)
        return actor

    def _value_loss(self, value: torch.Tensor, old_value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        c = self.config
        return value_loss(value, old_value, target, c.value_loss, c.clip if c.value_clip else None)

    def grad_norms(self) -> dict[str, float]:
        """L2 norm of the current gradient of each part of the model (`GRAD_PARTS`) and of all of it."""
        sq = dict.fromkeys(GRAD_PARTS, 0.0)
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                part = next(k for k, prefixes in GRAD_PARTS.items() if name.startswith(prefixes))
                sq[part] += float(p.grad.pow(2).sum())
        return {**{k: v ** 0.5 for k, v in sq.items()}, "total": sum(sq.values()) ** 0.5}

    def state_dict(self) -> dict[str, Any]:
        return {**self.policy_state(), "optimizer": self.optimizer.state_dict(), "rng": self.rng.bit_generator.state}

    def policy_state(self) -> dict[str, Any]:
        """The recurrent model, the normalisers its input reads (observations; rewards, where ``reward_input``
        is normalised) and the counters: no optimiser."""
        state = {"model": self.model.state_dict(), "ret_rms": self.ret_rms.state(), "iteration": self.iteration,
                 "env_steps": self.env_steps}
        if self.obs_rms is not None:
            state["obs_rms"] = self.obs_rms.state()
        return state

    def load_policy_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ret_rms.load(state["ret_rms"])
        if self.obs_rms is not None:
            if "obs_rms" not in state:
                raise KeyError("the state has no observation normaliser but the config asks for one")
            self.obs_rms.load(state["obs_rms"])
        self.iteration, self.env_steps = int(state["iteration"]), int(state["env_steps"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_policy_state(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]


def _discounted_trial_returns(trials: Trials, gamma: float) -> torch.Tensor:
    return discounted_returns(trials.rewards.unsqueeze(0), trials.mask.unsqueeze(0), gamma).squeeze(0)
