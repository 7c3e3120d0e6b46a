"""Returns, advantages and advantage normalisation over padded episode batches.

Every function here takes padded tensors with arbitrary leading batch dimensions (typically ``N`` tasks):

* ``rewards``, ``values``, ``mask``: ``[..., E, T]`` (``E`` episodes of at most ``T`` steps);
* ``mask`` is 1 (or ``True``) on real steps and 0 on the padding after an episode ended; the valid steps
  of an episode are a prefix of its row;
* ``bootstrap``: ``[..., E]``, the value of the state reached after an episode's last valid step. Pass it
  for episodes cut off by the time limit (*truncated*); leave it ``None``/zero for episodes that
  *terminated*, whose future is worth nothing (Gymnasium's terminated-vs-truncated convention).

Padded steps may hold anything, including NaN: they are selected away with ``torch.where`` rather than
multiplied by the mask, because ``0 * NaN`` is NaN and a single garbage value would poison a whole batch.

Example:
    >>> import torch
    >>> rewards = torch.tensor([[1.0, 2.0, 3.0]])
    >>> mask = torch.ones(1, 3)
    >>> discounted_returns(rewards, mask, gamma=0.5)
    tensor([[2.7500, 3.5000, 3.0000]])
"""

from __future__ import annotations

import torch

__all__ = ["discounted_returns", "gae", "normalize"]


def _valid(mask: torch.Tensor) -> torch.Tensor:
    """Boolean view of a float or bool mask."""
    return mask if mask.dtype == torch.bool else mask > 0


def _check(rewards: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None = None) -> None:
    # Shape mistakes here (e.g. [T, E] instead of [E, T]) silently broadcast into wrong numbers, so fail
    # early with one line that names what was expected.
    if rewards.dim() < 2:
        raise ValueError(f"rewards must have shape [..., E, T]; got {tuple(rewards.shape)}")
    if mask.shape != rewards.shape:
        raise ValueError(
            f"mask must have the shape of rewards {tuple(rewards.shape)}; got {tuple(mask.shape)}"
        )
    if values is not None and values.shape != rewards.shape:
        raise ValueError(
            f"values must have the shape of rewards {tuple(rewards.shape)}; got {tuple(values.shape)}"
        )


def _bootstrap(bootstrap, rewards: torch.Tensor) -> torch.Tensor:
    """The per-episode bootstrap value as a tensor of shape ``rewards.shape[:-1]`` (zeros if None)."""
    lead = rewards.shape[:-1]
    if bootstrap is None:
        return rewards.new_zeros(lead)
    bootstrap = torch.as_tensor(bootstrap, dtype=rewards.dtype, device=rewards.device)
    try:
        if torch.broadcast_shapes(bootstrap.shape, lead) != lead:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"bootstrap must have shape [..., E] = {tuple(lead)}; got {tuple(bootstrap.shape)}"
        ) from None
    return bootstrap.expand(lead)


def discounted_returns(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    bootstrap: torch.Tensor | None = None,
) -> torch.Tensor:
    """Discounted reward-to-go ``R_t = r_t + gamma * R_{t+1}`` of every valid step.

    After an episode's last valid step the "next return" is ``bootstrap`` (zero by default), so a
    truncated episode is credited with the value of where it was cut off.

    Args:
        rewards: ``[..., E, T]`` rewards; padded entries are ignored.
        mask: ``[..., E, T]`` 1/True on valid steps (a prefix of each row), 0/False on padding.
        gamma: discount factor.
        bootstrap: optional ``[..., E]`` value of the state after each episode's last valid step.

    Returns:
        ``[..., E, T]`` returns in the dtype of ``rewards``, exactly zero on padded steps.
    """
    _check(rewards, mask)
    valid = _valid(mask)
    boot = _bootstrap(bootstrap, rewards)
    zero = rewards.new_zeros(())

    # Walk backwards. `carry` is the return that follows step t: the next step's return while the
    # episode runs, and the bootstrap value at (and past) its end. Because valid steps form a prefix,
    # resetting `carry` to the bootstrap on every padded step makes the last valid step see it.
    carry = boot
    out = []
    for t in reversed(range(rewards.shape[-1])):
        ret = torch.where(valid[..., t], rewards[..., t] + gamma * carry, zero)
        carry = torch.where(valid[..., t], ret, boot)
        out.append(ret)
    return torch.stack(out[::-1], dim=-1)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    bootstrap: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalised advantage estimates (Schulman et al. 2016).

    ``delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where
    ``V(s_{t+1})`` after the last valid step is ``bootstrap`` (zero by default) and the advantage after it
    is zero. ``lam=1`` gives discounted returns minus values; ``lam=0`` gives the one-step TD errors.

    Args:
        rewards: ``[..., E, T]`` rewards.
        values: ``[..., E, T]`` baseline values ``V(s_t)`` of the valid steps.
        mask: ``[..., E, T]`` 1/True on valid steps (a prefix of each row), 0/False on padding.
        gamma: discount factor.
        lam: GAE lambda.
        bootstrap: optional ``[..., E]`` value of the state after each episode's last valid step.

    Returns:
        ``[..., E, T]`` advantages, exactly zero on padded steps.
    """
    _check(rewards, mask, values)
    valid = _valid(mask)
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    rewards, values = rewards.to(dtype), values.to(dtype)
    boot = _bootstrap(bootstrap, rewards)
    zero = rewards.new_zeros(())

    # Same backward walk as `discounted_returns`, carrying two things: the value of the next state (the
    # bootstrap at an episode's end) and the next advantage (zero at an episode's end).
    next_value, next_adv = boot, rewards.new_zeros(boot.shape)
    out = []
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        adv = torch.where(valid[..., t], delta + gamma * lam * next_adv, zero)
        next_value = torch.where(valid[..., t], values[..., t], boot)
        next_adv = adv
        out.append(adv)
    return torch.stack(out[::-1], dim=-1)


def normalize(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Standardise ``x`` to zero mean and unit standard deviation over its valid entries, per task.

    Statistics are taken over the last two dims ``[E, T]`` separately for every leading index, i.e.
    advantages are normalised per task batch (as the MAML-TRPO anchors do), so that one task with large
    returns does not set the scale of every other task's update. The standard deviation is the
    population one (divide by the number of valid entries), and ``eps`` is added to it so that a task
    whose valid advantages are all equal comes out as zeros instead of NaN.

    Args:
        x: ``[..., E, T]`` values to normalise (usually advantages).
        mask: ``[..., E, T]`` 1/True on valid entries.
        eps: added to the standard deviation.

    Returns:
        ``[..., E, T]`` normalised values, exactly zero on padded entries (and for tasks with no valid
        entries at all).
    """
    _check(x, mask)
    valid = _valid(mask)
    zero = x.new_zeros(())
    xv = torch.where(valid, x, zero)
    # clamp(min=1): a task with no valid entries gets mean 0 / std 0 rather than 0/0 = NaN.
    count = valid.sum(dim=(-2, -1), keepdim=True).clamp(min=1).to(x.dtype)
    mean = xv.sum(dim=(-2, -1), keepdim=True) / count
    centred = torch.where(valid, x - mean, zero)
    std = (centred.square().sum(dim=(-2, -1), keepdim=True) / count).sqrt()
    return centred / (std + eps)
