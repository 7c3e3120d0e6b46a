"""Value baselines for policy-gradient agents.

`LinearFeatureBaseline` is the baseline of the MAML lineage (rllab, cbfinn's MAML, pytorch-maml-rl,
ProMP, learn2learn): a linear function of hand-made features of the observation and the time step,
refitted from scratch by ridge-regularised least squares to the discounted returns of every task (and
every adaptation step). It has no state worth learning across tasks, which is why meta-RL code favours
it: it is cheap, deterministic and never lags behind the policy it is paired with.

Its least-squares solve going singular or NaN is the most reported numerical failure of these codebases,
so this implementation is defensive by construction: padded steps are selected away (never multiplied by
a mask, since ``0 * NaN`` is NaN), the solve runs in float64, the ridge term escalates when a solution
comes out non-finite, and a task that still cannot be fitted predicts zero (with a warning) rather than
returning NaN.

Shapes: observations ``[..., E, T, D]``, returns and mask ``[..., E, T]``; every leading index (usually
the task) gets its own weights ``[..., F]`` with ``F = 2 * D + 4``, all fitted in one batched solve.

Example:
    >>> import torch
    >>> obs = torch.randn(3, 5, 10, 2)  # 3 tasks, 5 episodes, 10 steps, 2-D observations
    >>> returns = torch.randn(3, 5, 10)
    >>> mask = torch.ones(3, 5, 10)
    >>> baseline = LinearFeatureBaseline().fit(obs, returns, mask)
    >>> baseline.weights.shape
    torch.Size([3, 8])
    >>> baseline.predict(obs, mask).shape
    torch.Size([3, 5, 10])
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["LinearFeatureBaseline", "fit_linear_baseline", "linear_features", "predict_linear_baseline"]

#: Observations are clipped to this range before computing features, as rllab's LinearFeatureBaseline
#: (the anchors' ancestor) does: one exploding observation should not dominate the squared features and
#: the fit of a whole task. ``None`` turns clipping off.
OBS_CLIP = 10.0


def linear_features(
    observations: torch.Tensor, mask: torch.Tensor, clip: float | None = OBS_CLIP
) -> torch.Tensor:
    """Features ``[o, o**2, t/100, (t/100)**2, (t/100)**3, 1]`` of every step, zero on padded steps.

    ``t`` is the step index within the episode (valid steps are a prefix, so it is the position in
    the row). Dividing by 100 keeps the cubic term of a 100-1000-step episode within a few orders of
    magnitude of the others.

    Args:
        observations: ``[..., E, T, D]``.
        mask: ``[..., E, T]`` 1/True on valid steps.
        clip: clip observations to ``[-clip, clip]`` first (``None``: don't).

    Returns:
        ``[..., E, T, 2 * D + 4]`` features in the dtype of ``observations``.
    """
    if observations.dim() < 3 or observations.shape[:-1] != mask.shape:
        raise ValueError(
            f"observations must have shape [..., E, T, D] matching mask [..., E, T]; got observations "
            f"{tuple(observations.shape)} and mask {tuple(mask.shape)}"
        )
    valid = mask if mask.dtype == torch.bool else mask > 0
    obs = observations if clip is None else observations.clamp(-clip, clip)
    t = torch.arange(obs.shape[-2], dtype=obs.dtype, device=obs.device) / 100.0
    t = t.unsqueeze(-1).expand(obs.shape[:-1] + (1,))
    feats = torch.cat([obs, obs.square(), t, t**2, t**3, torch.ones_like(t)], dim=-1)
    # Select, don't multiply: padded observations may be NaN or 1e30 garbage.
    return torch.where(valid.unsqueeze(-1), feats, feats.new_zeros(()))


def _solve(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched solve of ``lhs @ x = rhs`` (``[B, F, F]``, ``[B, F]`` -> ``[B, F]``).

    `torch.linalg.lstsq` with the QR driver ``gels`` on every device: it is the one driver CUDA offers,
    it is bitwise reproducible from call to call (the CPU default ``gelsy`` is not under MKL, which would
    break same-seed-same-numbers), and it is the fastest. It assumes ``lhs`` has full rank, which the
    ridge term provides; if round-off defeats it, the answer comes out non-finite and the caller retries
    with a larger ridge.
    """
    try:
        return torch.linalg.lstsq(lhs, rhs.unsqueeze(-1), driver="gels").solution.squeeze(-1)
    except torch.linalg.LinAlgError:
        # On CPU a matrix whose QR meets an exactly zero pivot raises (one that is singular only up to
        # round-off gets a finite answer, CPU-dependent), and takes the whole batch down with it. Solve the
        # tasks one by one so that only the singular ones are marked failed (NaN) and retried.
        out = torch.full_like(rhs, float("nan"))
        for i in range(len(lhs)):
            try:
                out[i] = torch.linalg.lstsq(lhs[i], rhs[i].unsqueeze(-1), driver="gels").solution.squeeze(-1)
            except torch.linalg.LinAlgError:
                pass
        return out


def fit_linear_baseline(
    observations: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    reg_coeff: float = 1e-5,
    max_tries: int = 5,
    clip: float | None = OBS_CLIP,
) -> torch.Tensor:
    """Fit the linear feature baseline separately for every leading index, in one batched solve.

    Solves the ridge normal equations ``(FᵀF + reg·I) w = Fᵀy`` over the valid steps of each task. If a
    task's solution is non-finite, that task is solved again with ``reg`` ×10, up to ``max_tries`` times
    in all (the rllab recipe); a task that still fails, or whose valid data are themselves non-finite,
    gets zero weights (i.e. predicts 0, a harmless baseline) and a `RuntimeWarning` is issued.

    Args:
        observations: ``[..., E, T, D]``; padded steps may hold anything.
        returns: ``[..., E, T]`` regression targets (discounted returns); padded steps may hold anything.
        mask: ``[..., E, T]`` 1/True on valid steps.
        reg_coeff: initial ridge coefficient.
        max_tries: number of ridge coefficients tried (``reg_coeff * 10**k``, ``k < max_tries``).
        clip: observation clipping range, see `OBS_CLIP`.

    Returns:
        ``[..., 2 * D + 4]`` float64 weights without autograd history; always finite. A task with no
        valid step gets zero weights.
    """
    if returns.shape != mask.shape:
        raise ValueError(
            f"returns must have the shape of mask {tuple(mask.shape)}; got {tuple(returns.shape)}"
        )
    # The baseline is a fixed function of the data, never something the policy loss differentiates
    # through; detaching also keeps a float64 copy of the batch from holding on to the policy's graph.
    valid = mask.detach() if mask.dtype == torch.bool else mask.detach() > 0
    feats = linear_features(observations.detach().to(torch.float64), valid, clip)
    targets = torch.where(valid, returns.detach().to(torch.float64), 0.0)

    lead = feats.shape[:-3]
    n_feat = feats.shape[-1]
    feats = feats.reshape(-1, feats.shape[-3] * feats.shape[-2], n_feat)  # [B, E*T, F]
    targets = targets.reshape(feats.shape[0], -1, 1)  # [B, E*T, 1]
    # Padded rows are all-zero features and zero targets, so they add nothing to FᵀF or Fᵀy.
    gram = feats.transpose(-1, -2) @ feats  # [B, F, F]
    moment = (feats.transpose(-1, -2) @ targets).squeeze(-1)  # [B, F]
    eye = torch.eye(n_feat, dtype=gram.dtype, device=gram.device)

    weights = torch.zeros_like(moment)
    # Non-finite data (NaN/inf returns on valid steps, or unclipped huge observations) cannot be helped
    # by more ridge; don't hand them to LAPACK at all.
    todo = torch.isfinite(gram).all(dim=(-2, -1)) & torch.isfinite(moment).all(dim=-1)
    bad_data = int((~todo).sum())
    reg = reg_coeff
    for _ in range(max_tries):
        if not todo.any():
            break
        idx = todo.nonzero().squeeze(-1)
        sol = _solve(gram[idx] + reg * eye, moment[idx])
        ok = torch.isfinite(sol).all(dim=-1)
        weights[idx[ok]] = sol[ok]
        todo[idx[ok]] = False
        reg *= 10.0

    unsolved = int(todo.sum())
    if bad_data or unsolved:
        warnings.warn(
            f"LinearFeatureBaseline: {bad_data + unsolved} of {len(weights)} task(s) could not be fitted "
            f"({bad_data} with non-finite returns/observations, {unsolved} still non-finite at ridge "
            f"{reg_coeff * 10 ** (max_tries - 1):g}); they predict 0",
            RuntimeWarning,
            stacklevel=2,
        )
    return weights.reshape(lead + (n_feat,))


def predict_linear_baseline(
    weights: torch.Tensor, observations: torch.Tensor, mask: torch.Tensor, clip: float | None = OBS_CLIP
) -> torch.Tensor:
    """Values predicted by fitted weights.

    Args:
        weights: ``[..., F]`` from `fit_linear_baseline`, one row per leading index of ``observations``.
        observations: ``[..., E, T, D]``.
        mask: ``[..., E, T]`` 1/True on valid steps.
        clip: observation clipping range; must match the one used to fit.

    Returns:
        ``[..., E, T]`` values in the dtype of ``observations``, exactly zero on padded steps.
    """
    valid = mask if mask.dtype == torch.bool else mask > 0
    feats = linear_features(observations.to(torch.float64), valid, clip)
    if weights.shape[-1] != feats.shape[-1]:
        raise ValueError(
            f"weights have {weights.shape[-1]} features but observations of size {observations.shape[-1]} "
            f"need {feats.shape[-1]}"
        )
    values = (feats @ weights.to(feats)[..., None, :, None]).squeeze(-1)  # [..., E, T, F] @ [..., 1, F, 1]
    return torch.where(valid, values, 0.0).to(observations.dtype)


class LinearFeatureBaseline:
    """Linear feature value baseline, refitted per task; see the module docstring.

    Args:
        reg_coeff: initial ridge coefficient (1e-5 in every anchor).
        max_tries: how many ridge coefficients (×10 each) to try before giving a task zero weights.
        clip: observation clipping range (``None``: no clipping).

    Attributes:
        weights: ``[..., F]`` float64 weights of the last `fit`, or ``None`` before the first.
    """

    def __init__(self, reg_coeff: float = 1e-5, max_tries: int = 5, clip: float | None = OBS_CLIP):
        self.reg_coeff = reg_coeff
        self.max_tries = max_tries
        self.clip = clip
        self.weights: torch.Tensor | None = None

    def fit(
        self, observations: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
    ) -> LinearFeatureBaseline:
        """Fit to ``returns`` (``[..., E, T]``) of ``observations`` (``[..., E, T, D]``); returns self."""
        self.weights = fit_linear_baseline(
            observations, returns, mask, reg_coeff=self.reg_coeff, max_tries=self.max_tries, clip=self.clip
        )
        return self

    def predict(self, observations: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Values ``[..., E, T]`` of ``observations``, zero on padded steps."""
        if self.weights is None:
            raise RuntimeError("LinearFeatureBaseline.predict called before fit")
        return predict_linear_baseline(self.weights, observations, mask, clip=self.clip)
