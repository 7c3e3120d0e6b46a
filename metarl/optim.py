"""The numerical pieces of a TRPO step: flat gradients, Fisher-vector products, conjugate gradient and
the backtracking line search.

A TRPO (and MAML-TRPO outer) update reads, with these helpers::

    g = flat_grad(surrogate_loss, params, retain_graph=True)   # gradient of the loss to decrease
    Fv = hessian_vector_product(kl_fn, params, damping=1e-5)   # v -> (∇²KL + damping·I) v
    x = conjugate_gradient(Fv, g, iters=10)                    # x ≈ F⁻¹ g
    step = -sqrt(2 * max_kl / (x·Fx)) * x                      # largest step on the KL trust region
    scale, tries, ok = backtracking_line_search(evaluate, step, max_kl=max_kl)

Everything works on 1-D "flat" tensors (all parameters concatenated) so that conjugate gradient is plain
vector algebra; `flatten` / `unflatten_like` convert between the two views.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = [
    "backtracking_line_search",
    "conjugate_gradient",
    "flat_grad",
    "flatten",
    "hessian_vector_product",
    "unflatten_like",
]


def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one 1-D tensor (in order)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_like(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a 1-D tensor into views shaped like ``tensors`` (the inverse of `flatten`)."""
    sizes = [t.numel() for t in tensors]
    if flat.dim() != 1 or flat.numel() != sum(sizes):
        raise ValueError(f"expected a 1-D tensor of {sum(sizes)} elements; got shape {tuple(flat.shape)}")
    return [chunk.view_as(t) for chunk, t in zip(flat.split(sizes), tensors, strict=True)]


def flat_grad(output: torch.Tensor, params: Iterable[torch.Tensor], **kwargs) -> torch.Tensor:
    """Gradient of a scalar ``output`` with respect to ``params``, as one 1-D tensor.

    Keyword arguments go to `torch.autograd.grad` (``retain_graph``, ``create_graph``, ``allow_unused``).
    Parameters that ``output`` does not depend on (possible with ``allow_unused=True``) get zeros, so the
    result always has one entry per parameter element and lines up with `flatten(params)`.
    """
    params = list(params)
    grads = torch.autograd.grad(output, params, **kwargs)
    return flatten(torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True))


def hessian_vector_product(
    kl_fn: Callable[[], torch.Tensor], params: Iterable[torch.Tensor], damping: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return ``v -> (∇²KL) v + damping * v`` for the Hessian of ``kl_fn()`` at the current ``params``.

    At the point where the new policy equals the old one, the Hessian of the KL is the Fisher
    information matrix, so this is TRPO's Fisher-vector product. The KL and its gradient are computed
    once, with ``create_graph=True``; each product then differentiates ``∇KL · v`` once more (Pearlmutter's
    trick), so conjugate gradient's ten calls cost ten backward passes and no forward pass. The damping
    term keeps the system positive definite where the Fisher is (nearly) singular.

    Args:
        kl_fn: computes the mean KL(old ‖ new) as a scalar from the current parameters (old
            distribution detached).
        params: the parameters to differentiate with respect to.
        damping: added multiple of the identity (1e-5 in the anchors).

    Returns:
        A callable taking a flat vector of ``flatten(params)``'s size and returning a flat, detached
        vector of the same size.
    """
    params = list(params)
    kl = kl_fn()
    grad_kl = flat_grad(kl, params, create_graph=True, allow_unused=True)

    def hvp(vector: torch.Tensor) -> torch.Tensor:
        # retain_graph: the graph of grad_kl is reused by every call.
        grad_dot_v = (grad_kl * vector.detach()).sum()
        hv = flat_grad(grad_dot_v, params, retain_graph=True, allow_unused=True)
        return hv.detach() + damping * vector.detach()

    return hvp


def conjugate_gradient(
    Avp: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    iters: int = 10,
    residual_tol: float = 1e-10,
) -> torch.Tensor:
    """Approximately solve ``A x = b`` for a symmetric positive-definite ``A`` known only through ``Avp``.

    TRPO never forms the Fisher matrix (its size is the number of parameters squared); a few CG
    iterations from ``x = 0`` give a good enough natural-gradient direction.

    Args:
        Avp: the matrix-vector product ``v -> A v``.
        b: 1-D right-hand side.
        iters: maximum number of iterations (10 in every anchor).
        residual_tol: stop once the squared residual norm ``‖b - A x‖²`` falls below this.

    Returns:
        The 1-D solution estimate ``x`` (zeros if ``b`` is zero).
    """
    if b.dim() != 1:
        raise ValueError(f"b must be a 1-D tensor; got shape {tuple(b.shape)}")
    x = torch.zeros_like(b)
    r = b.clone()  # residual b - A x, with x = 0
    p = b.clone()  # search direction
    r_dot_r = r.dot(r)
    for _ in range(iters):
        if r_dot_r <= residual_tol:
            break
        Ap = Avp(p)
        p_dot_Ap = p.dot(Ap)
        # p·Ap > 0 always holds for an SPD matrix; if round-off (or a not-quite-SPD product) breaks it,
        # the step below would divide by ~0 or go uphill, so keep the last good estimate instead.
        if not torch.isfinite(p_dot_Ap) or p_dot_Ap <= 0:
            break
        alpha = r_dot_r / p_dot_Ap
        x = x + alpha * p
        r = r - alpha * Ap
        new_r_dot_r = r.dot(r)
        p = r + (new_r_dot_r / r_dot_r) * p
        r_dot_r = new_r_dot_r
    return x


def backtracking_line_search(
    evaluate: Callable[[torch.Tensor], tuple[float, float]],
    step: torch.Tensor,
    max_steps: int = 15,
    ratio: float = 0.8,
    max_kl: float = 0.01,
) -> tuple[float, int, bool]:
    """Shrink ``step`` until it both improves the surrogate and stays inside the KL trust region.

    Tries ``scale = ratio**k`` for ``k = 0, ..., max_steps - 1`` and accepts the first candidate
    ``scale * step`` whose KL is finite and ``<= max_kl`` and whose surrogate improvement (decrease of
    the surrogate loss) is finite and ``> 0``. Non-finite values are rejected explicitly: a NaN compares
    false with everything, so a check written as ``not (kl > max_kl)`` would accept it and write NaN
    into the policy.

    ``evaluate`` usually loads ``old_params + candidate`` into the policy to measure it; this function
    does not restore anything, so the caller must afterwards set the parameters to
    ``old_params + scale * step`` (``scale`` is 0.0 when nothing was accepted, i.e. keep the old ones).

    Args:
        evaluate: ``candidate_step -> (surrogate_improvement, kl)`` (floats or 0-d tensors).
        step: the full proposed step (flat tensor).
        max_steps: number of scales tried (15 in the anchors).
        ratio: shrink factor between tries (0.8 in most anchors, 0.5 in learn2learn).
        max_kl: trust-region radius.

    Returns:
        ``(scale, tries, accepted)``: the accepted scale (0.0 if none), how many candidates were
        evaluated, and whether one was accepted.
    """
    for k in range(max_steps):
        scale = ratio**k
        improvement, kl = evaluate(scale * step)
        improvement, kl = float(improvement), float(kl)
        if math.isfinite(kl) and math.isfinite(improvement) and kl <= max_kl and improvement > 0:
            return scale, k + 1, True
    return 0.0, max_steps, False
