"""Unit tests of the numerical core against hand-computed numbers.

Covers returns/GAE/normalisation (`metarl.returns`), the linear feature baseline
(`metarl.agents.baselines`) and the TRPO pieces (`metarl.optim`). The arithmetic behind every expected
value is written out in the comments so that a failure can be checked by hand.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from metarl.agents import baselines
from metarl.agents.baselines import (
    LinearFeatureBaseline,
    fit_linear_baseline,
    linear_features,
    predict_linear_baseline,
)
from metarl.optim import (
    backtracking_line_search,
    conjugate_gradient,
    flat_grad,
    flatten,
    hessian_vector_product,
    unflatten_like,
)
from metarl.returns import discounted_returns, gae, normalize

NAN = float("nan")


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def random_batch(n=3, e=4, t=7, seed=0, dtype=torch.float64):
    """Random rewards/values/bootstrap with episodes of random lengths (0..t) and NaN in the padding."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(n, e, t, generator=g, dtype=dtype)
    values = torch.randn(n, e, t, generator=g, dtype=dtype)
    boot = torch.randn(n, e, generator=g, dtype=dtype)
    lengths = torch.randint(0, t + 1, (n, e), generator=g)
    mask = (torch.arange(t) < lengths.unsqueeze(-1)).to(dtype)
    rewards = rewards.masked_fill(mask == 0, NAN)
    values = values.masked_fill(mask == 0, NAN)
    return rewards, values, mask, boot


# --------------------------------------------------------------------------------------------------
# discounted_returns
# --------------------------------------------------------------------------------------------------


def test_discounted_returns_hand_computed():
    # Episode 0: rewards [1, 2, 3], gamma 0.5, full length.
    #   R2 = 3;  R1 = 2 + 0.5*3 = 3.5;  R0 = 1 + 0.5*3.5 = 2.75
    # Episode 1: rewards [1, 2, pad=100], length 2.
    #   R1 = 2;  R0 = 1 + 0.5*2 = 2;  padded step 0 (its 100 must not leak into R1)
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    close(discounted_returns(rewards, mask, gamma=0.5), [[2.75, 3.5, 3.0], [2.0, 2.0, 0.0]])


def test_discounted_returns_bootstrap_after_last_valid_step():
    # Same episodes, bootstrap [4, 10] (both treated as truncated).
    # Episode 0: R2 = 3 + 0.5*4 = 5;  R1 = 2 + 0.5*5 = 4.5;  R0 = 1 + 0.5*4.5 = 3.25
    # Episode 1 (length 2): R1 = 2 + 0.5*10 = 7;  R0 = 1 + 0.5*7 = 4.5;  padded 0
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = discounted_returns(rewards, mask, gamma=0.5, bootstrap=torch.tensor([4.0, 10.0]))
    close(out, [[3.25, 4.5, 5.0], [4.5, 7.0, 0.0]])


def test_discounted_returns_leading_dims_nan_padding_and_empty_episode():
    rewards, _, mask, boot = random_batch()
    mask[0, 0] = 0.0  # an episode with no valid step at all
    rewards = torch.where(mask > 0, rewards, NAN)
    out = discounted_returns(rewards, mask, gamma=0.9, bootstrap=boot)
    assert out.shape == rewards.shape and out.dtype == torch.float64
    assert torch.isfinite(out).all()
    assert (out[mask == 0] == 0).all()
    # Batched result equals a plain Python loop, episode by episode.
    for n, e in [(0, 1), (1, 2), (2, 3)]:
        length = int(mask[n, e].sum())
        ret, expected = float(boot[n, e]), [0.0] * rewards.shape[-1]
        for t in reversed(range(length)):
            ret = float(rewards[n, e, t]) + 0.9 * ret
            expected[t] = ret
        close(out[n, e], expected, atol=1e-12)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="mask must have the shape"):
        discounted_returns(torch.zeros(2, 3), torch.ones(3, 2), 0.9)
    with pytest.raises(ValueError, match="bootstrap"):
        gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), 0.9, 0.95, bootstrap=torch.zeros(3))


# --------------------------------------------------------------------------------------------------
# gae
# --------------------------------------------------------------------------------------------------

# One 3-step episode: rewards [1, 2, 3], values [0.5, 1.0, 1.5], gamma 0.5, lambda 0.5 (gamma*lambda 0.25).
R3, V3 = [1.0, 2.0, 3.0], [0.5, 1.0, 1.5]


def test_gae_hand_computed_without_bootstrap():
    # delta2 = 3 + 0.5*0   - 1.5 = 1.5
    # delta1 = 2 + 0.5*1.5 - 1.0 = 1.75
    # delta0 = 1 + 0.5*1.0 - 0.5 = 1.0
    # A2 = 1.5;  A1 = 1.75 + 0.25*1.5 = 2.125;  A0 = 1.0 + 0.25*2.125 = 1.53125
    adv = gae(torch.tensor([R3]), torch.tensor([V3]), torch.ones(1, 3), gamma=0.5, lam=0.5)
    close(adv, [[1.53125, 2.125, 1.5]])


def test_gae_hand_computed_with_bootstrap():
    # Bootstrap 2.0 changes only the last delta: delta2 = 3 + 0.5*2 - 1.5 = 2.5
    # A2 = 2.5;  A1 = 1.75 + 0.25*2.5 = 2.375;  A0 = 1.0 + 0.25*2.375 = 1.59375
    boot = torch.tensor([2.0])
    adv = gae(torch.tensor([R3]), torch.tensor([V3]), torch.ones(1, 3), 0.5, 0.5, bootstrap=boot)
    close(adv, [[1.59375, 2.375, 2.5]])


def test_gae_two_episodes_of_different_lengths():
    # Episode 0 as above (length 3). Episode 1 has length 2 with garbage (NaN) in its padded step:
    #   delta1 = 2 + 0.5*0 - 1.0 = 1.0 (the padded NaN value must not be used as V(s_2))
    #   delta0 = 1 + 0.5*1.0 - 0.5 = 1.0
    #   A1 = 1.0;  A0 = 1.0 + 0.25*1.0 = 1.25;  A2 = 0 (padding)
    rewards = torch.tensor([R3, [1.0, 2.0, NAN]])
    values = torch.tensor([V3, [0.5, 1.0, NAN]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    close(adv, [[1.53125, 2.125, 1.5], [1.25, 1.0, 0.0]])
    # A bootstrap of 4 for episode 1 reaches its last valid step, not the padded one:
    #   delta1 = 2 + 0.5*4 - 1.0 = 3.0;  A1 = 3.0;  A0 = 1.0 + 0.25*3.0 = 1.75
    adv = gae(rewards, values, mask, 0.5, 0.5, bootstrap=torch.tensor([0.0, 4.0]))
    close(adv[1], [1.75, 3.0, 0.0])


def test_gae_lambda_one_is_returns_minus_values_and_lambda_zero_is_td_error():
    rewards, values, mask, boot = random_batch(seed=1)
    adv = gae(rewards, values, mask, gamma=0.9, lam=1.0, bootstrap=boot)
    expected = discounted_returns(rewards, mask, 0.9, bootstrap=boot) - values
    expected = torch.where(mask > 0, expected, 0.0)
    torch.testing.assert_close(adv, expected)
    assert adv.dtype == torch.float64

    # lam = 0: A_t = r_t + gamma*V(s_{t+1}) - V(s_t), with V after the last valid step = bootstrap.
    adv0 = gae(rewards, values, mask, gamma=0.9, lam=0.0, bootstrap=boot)
    next_values = torch.cat([values[..., 1:], boot.unsqueeze(-1)], dim=-1)
    last = (torch.arange(mask.shape[-1]) == mask.sum(-1, keepdim=True) - 1)  # last valid step
    next_values = torch.where(last, boot.unsqueeze(-1), next_values)
    td = torch.where(mask > 0, rewards + 0.9 * next_values - values, 0.0)
    torch.testing.assert_close(adv0, td)


# --------------------------------------------------------------------------------------------------
# normalize
# --------------------------------------------------------------------------------------------------


def test_normalize_per_task_hand_computed():
    # Task 0: valid [1, 3] (+ padding 100, NaN): mean 2, population std 1 -> [-1, 1]
    # Task 1: valid [2, 4, 6, 8]: mean 5, var (9+1+1+9)/4 = 5 -> [-3, -1, 1, 3] / sqrt(5)
    x = torch.tensor([[[1.0, 100.0], [3.0, NAN]], [[2.0, 4.0], [6.0, 8.0]]])
    mask = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    s5 = math.sqrt(5.0)
    close(normalize(x, mask), [[[-1.0, 0.0], [1.0, 0.0]], [[-3 / s5, -1 / s5], [1 / s5, 3 / s5]]])


def test_normalize_random_zero_mean_unit_std_over_valid_entries_only():
    x, _, mask, _ = random_batch(n=3, e=5, t=9, seed=2)
    mask[:, 0, 0] = 1.0  # every task has at least one valid entry
    x = torch.where(mask > 0, 3.0 + 7.0 * torch.nan_to_num(x), NAN)
    out = normalize(x, mask)
    valid = mask > 0
    assert (out[~valid] == 0).all()
    for n in range(3):
        v = out[n][valid[n]]
        if v.numel() > 1:
            close(v.mean(), 0.0, atol=1e-9)
            close(v.std(unbiased=False), 1.0, atol=1e-6)


def test_normalize_degenerate_tasks_give_zeros_not_nan():
    x = torch.tensor([[[5.0, 5.0]], [[7.0, 1.0]]])
    mask = torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]])  # task 0 constant, task 1 all padding
    close(normalize(x, mask), [[[0.0, 0.0]], [[0.0, 0.0]]])


# --------------------------------------------------------------------------------------------------
# LinearFeatureBaseline
# --------------------------------------------------------------------------------------------------


def test_linear_features_hand_computed():
    # Features [o, o^2, t/100, (t/100)^2, (t/100)^3, 1]; o = 20 is clipped to 10; padding is zero.
    obs = torch.tensor([[[2.0], [-3.0], [20.0]], [[1.0], [NAN], [1e9]]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    expected = [
        [[2, 4, 0, 0, 0, 1], [-3, 9, 0.01, 1e-4, 1e-6, 1], [10, 100, 0.02, 4e-4, 8e-6, 1]],
        [[1, 1, 0, 0, 0, 1], [0] * 6, [0] * 6],
    ]
    close(linear_features(obs, mask), expected, atol=1e-15)


def test_baseline_with_only_the_bias_feature_fits_the_ridge_mean():
    # Observations 0 and T = 1: every feature but the constant is 0, so FᵀF = diag(0,0,0,0,0,2) and
    # Fᵀy = (0,0,0,0,0, 1+3). Ridge: w = (FᵀF + 1e-5 I)⁻¹ Fᵀy = (0,0,0,0,0, 4/2.00001).
    obs = torch.zeros(2, 1, 1)
    returns = torch.tensor([[1.0], [3.0]])
    w = fit_linear_baseline(obs, returns, torch.ones(2, 1))
    close(w, [0, 0, 0, 0, 0, 4 / 2.00001], atol=1e-12)
    assert w.dtype == torch.float64
    close(LinearFeatureBaseline().fit(obs, returns, torch.ones(2, 1)).predict(obs, torch.ones(2, 1)),
          [[4 / 2.00001], [4 / 2.00001]])


def linear_data(w_true, n_tasks=1, e=2, t=101, seed=0):
    """Observations (D = 1) and targets that are an exact linear function of the features."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.rand(n_tasks, e, t, 1, generator=g, dtype=torch.float64) * 4 - 2
    mask = torch.ones(n_tasks, e, t, dtype=torch.float64)
    feats = linear_features(obs, mask)
    targets = (feats * torch.as_tensor(w_true, dtype=torch.float64).unsqueeze(-2).unsqueeze(-2)).sum(-1)
    return obs, targets, mask


# order: o, o^2, t, t^2, t^3, 1
W_A = [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]
W_B = [-1.0, 0.25, -4.0, 1.0, 0.5, -3.0]


def test_baseline_recovers_exact_weights():
    obs, targets, mask = linear_data([W_A])
    # A tiny ridge: the exact answer is recovered up to the conditioning of the cubic time features.
    close(fit_linear_baseline(obs, targets, mask, reg_coeff=1e-12)[0], W_A, atol=1e-5)
    # The default ridge biases the weights slightly but the fitted values stay on the targets.
    baseline = LinearFeatureBaseline().fit(obs, targets, mask)
    close(baseline.predict(obs, mask), targets, atol=1e-3)


def test_baseline_fits_each_task_separately_in_one_call():
    obs, targets, mask = linear_data([W_A, W_B], n_tasks=2)
    w = fit_linear_baseline(obs, targets, mask, reg_coeff=1e-12)
    close(w, [W_A, W_B], atol=1e-5)
    # Identical to fitting every task on its own.
    for n in range(2):
        torch.testing.assert_close(w[n], fit_linear_baseline(obs[n], targets[n], mask[n], reg_coeff=1e-12))


def test_baseline_ignores_padded_garbage_and_predicts_zero_there():
    obs, targets, mask = linear_data([W_A, W_B], n_tasks=2, e=3, t=60)
    mask[0, 1, 40:] = 0.0
    mask[1, 2, 7:] = 0.0
    mask[1, 0, :] = 0.0
    clean = fit_linear_baseline(obs, targets, mask)
    pad = mask == 0
    dirty_obs = obs.clone()
    dirty_obs[pad] = 1e9
    dirty_obs[1, 2, 30:] = NAN
    dirty_targets = targets.masked_fill(pad, NAN)
    dirty_targets[0, 1, 50:] = 1e9
    dirty = fit_linear_baseline(dirty_obs, dirty_targets, mask)
    assert torch.equal(clean, dirty)
    pred = predict_linear_baseline(dirty, dirty_obs, mask)
    assert (pred[pad] == 0).all() and torch.isfinite(pred).all()


def test_baseline_never_nan_on_degenerate_inputs():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these is a failure worth warning about
        # Task 0 all padding, task 1 constant observations, task 2 rank-deficient (duplicated observation
        # columns, fewer valid steps than features), task 3 huge observations (clipped to ±10).
        obs = torch.randn(4, 2, 5, 3)
        obs[1] = 3.0
        obs[2, ..., 1] = obs[2, ..., 0]
        obs[3] = 1e30
        returns = torch.full((4, 2, 5), 5.0)
        mask = torch.ones(4, 2, 5)
        mask[0] = 0.0
        mask[2, :, 1:] = 0.0
        baseline = LinearFeatureBaseline().fit(obs, returns, mask)
        pred = baseline.predict(obs, mask)
    assert torch.isfinite(baseline.weights).all() and torch.isfinite(pred).all()
    assert (baseline.weights[0] == 0).all()
    close(pred[1:][mask[1:] > 0], torch.full(((mask[1:] > 0).sum(),), 5.0), atol=1e-3)
    assert pred.dtype == torch.float32


def test_baseline_non_finite_data_falls_back_to_zero_with_warning():
    obs, targets, mask = linear_data([W_A, W_B], n_tasks=2)
    targets[0, 0, 3] = NAN  # a NaN return on a valid step of task 0
    with pytest.warns(RuntimeWarning, match="1 of 2 task"):
        w = fit_linear_baseline(obs, targets, mask, reg_coeff=1e-12)
    assert (w[0] == 0).all()
    close(w[1], W_B, atol=1e-5)
    # Without clipping, 1e200 squared overflows to inf: same fallback.
    with pytest.warns(RuntimeWarning):
        w = fit_linear_baseline(torch.full((2, 3, 1), 1e200, dtype=torch.float64), torch.ones(2, 3),
                                torch.ones(2, 3), clip=None)
    assert (w == 0).all()


def test_baseline_ridge_escalates_per_task(monkeypatch):
    obs, targets, mask = linear_data([W_A, W_B], n_tasks=2)
    real_solve = baselines._solve
    calls = []

    def flaky_solve(lhs, rhs):  # the first solve of task 0 comes out NaN
        sol = real_solve(lhs, rhs)
        if not calls:
            sol[0] = NAN
        calls.append(len(lhs))
        return sol

    monkeypatch.setattr(baselines, "_solve", flaky_solve)
    w = fit_linear_baseline(obs, targets, mask)
    assert calls == [2, 1]  # both tasks, then task 0 alone with ridge 1e-4
    monkeypatch.setattr(baselines, "_solve", real_solve)
    torch.testing.assert_close(w[0], fit_linear_baseline(obs[0], targets[0], mask[0], reg_coeff=1e-4))
    torch.testing.assert_close(w[1], fit_linear_baseline(obs[1], targets[1], mask[1], reg_coeff=1e-5))

    # A solver that never succeeds: max_tries attempts, then zeros and a warning.
    calls.clear()
    monkeypatch.setattr(baselines, "_solve", lambda lhs, rhs: calls.append(1) or torch.full_like(rhs, NAN))
    with pytest.warns(RuntimeWarning, match="still non-finite"):
        w = fit_linear_baseline(obs, targets, mask, max_tries=5)
    assert len(calls) == 5 and (w == 0).all()


def test_baseline_solver_isolates_an_exactly_singular_task():
    # LAPACK raises for a whole batch if one matrix's QR has an exactly zero pivot ([[1,0],[0,0]]: exact on
    # every CPU; [[1,1],[1,1]], used before, leaves a pivot of round-off size (-4.7e-17 on some CPUs) and
    # then gets a finite solution instead). The solver must mark only that task as failed (NaN, so the fit
    # retries it with more ridge) and still solve the other one: [[2,0],[0,4]] x = [2, 2] -> x = [1, 0.5].
    lhs = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[2.0, 0.0], [0.0, 4.0]]], dtype=torch.float64)
    rhs = torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    sol = baselines._solve(lhs, rhs)
    assert torch.isnan(sol[0]).all()
    close(sol[1], [1.0, 0.5], atol=1e-12)


def test_baseline_fit_is_bitwise_reproducible():
    obs, targets, mask = linear_data([W_A, W_B], n_tasks=2, t=60)
    first = fit_linear_baseline(obs, targets, mask)
    assert all(torch.equal(first, fit_linear_baseline(obs, targets, mask)) for _ in range(20))


def test_baseline_fit_carries_no_autograd_history():
    obs = torch.randn(2, 3, 4, 2, requires_grad=True)
    returns = (obs**2).sum(-1)  # has a graph
    baseline = LinearFeatureBaseline().fit(obs, returns, torch.ones(2, 3, 4))
    assert not baseline.weights.requires_grad and baseline.weights.grad_fn is None
    with pytest.raises(RuntimeError, match="before fit"):
        LinearFeatureBaseline().predict(obs, torch.ones(2, 3, 4))


# --------------------------------------------------------------------------------------------------
# conjugate gradient, flat helpers, Hessian-vector product
# --------------------------------------------------------------------------------------------------


def test_conjugate_gradient_hand_computed_3x3():
    # A = [[4,1,0],[1,3,1],[0,1,2]], b = [1,2,3]; det A = 4*(6-1) - 1*(2-0) = 18. Cramer's rule:
    #   x1 = det[[1,1,0],[2,3,1],[3,1,2]] / 18 = (1*5 - 1*1) / 18 = 4/18 = 2/9
    #   x2 = det[[4,1,0],[1,2,1],[0,3,2]] / 18 = (4*1 - 1*2) / 18 = 2/18 = 1/9
    #   x3 = det[[4,1,1],[1,3,2],[0,1,3]] / 18 = (4*7 - 1*3 + 1*1) / 18 = 26/18 = 13/9
    # Check row 2: 2/9 + 3/9 + 13/9 = 2. CG is exact on a 3x3 system after 3 iterations.
    A = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    x = conjugate_gradient(lambda v: A @ v, b, iters=10)
    close(x, [2 / 9, 1 / 9, 13 / 9], atol=1e-6)


def test_conjugate_gradient_matches_linalg_solve_on_random_spd():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(20, 20, generator=g, dtype=torch.float64)
    A = M @ M.T + 20 * torch.eye(20, dtype=torch.float64)  # SPD, condition number ~ 4
    b = torch.randn(20, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: A @ v, b, iters=20)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), atol=1e-6, rtol=0)


def test_conjugate_gradient_degenerate_cases_stay_finite():
    calls = []
    x = conjugate_gradient(lambda v: calls.append(1) or v, torch.zeros(4))
    assert (x == 0).all() and not calls  # b = 0: answer 0 without a single product
    x = conjugate_gradient(lambda v: -v, torch.ones(4))  # not positive definite: stop, don't blow up
    assert torch.isfinite(x).all()


def test_flatten_unflatten_and_flat_grad():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    b = torch.tensor([5.0], requires_grad=True)
    unused = torch.zeros(3, requires_grad=True)
    flat = flatten([a, b])
    close(flat, [1, 2, 3, 4, 5])
    parts = unflatten_like(torch.arange(5.0), [a, b])
    close(parts[0], [[0, 1], [2, 3]])
    close(parts[1], [4])
    with pytest.raises(ValueError):
        unflatten_like(torch.arange(4.0), [a, b])
    # d/da sum(a^2) = 2a, d/db 3b = 3, unused parameter -> zeros.
    g = flat_grad((a**2).sum() + 3 * b.sum(), [a, b, unused], allow_unused=True)
    close(g, [2, 4, 6, 8, 3, 0, 0, 0])


class TinyGaussianPolicy:
    """mean = W x (1-D action), std = exp(log_std): small enough to derive its Fisher by hand."""

    def __init__(self):
        self.W = torch.tensor([[0.3, -0.2]], dtype=torch.float64, requires_grad=True)
        self.log_std = torch.tensor([math.log(2.0)], dtype=torch.float64, requires_grad=True)
        self.states = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)

    def dist(self, W, log_std):
        return torch.distributions.Normal(self.states @ W.T, log_std.exp().expand(2, 1))

    def kl_fn(self, W=None, log_std=None):
        """Mean over states of KL(old ‖ new), old = the current parameters, detached."""
        old = self.dist(self.W.detach(), self.log_std.detach())
        new = self.dist(self.W if W is None else W, self.log_std if log_std is None else log_std)
        return torch.distributions.kl_divergence(old, new).sum(-1).mean()


def test_hvp_of_kl_at_equal_params_is_the_fisher():
    # For N(mu, sigma^2) parameterised by (mu, log sigma) the Fisher is diag(1/sigma^2, 2). With mu = W x,
    # the W block is E_x[x xᵀ] / sigma^2. States x = (1,0) and (1,2): x xᵀ = [[1,0],[0,0]] and
    # [[1,2],[2,4]], mean [[1,1],[1,2]]; sigma = 2 so divide by 4. Parameters flattened as
    # (W11, W12, log_std):
    #   F = [[0.25, 0.25, 0], [0.25, 0.5, 0], [0, 0, 2]]
    policy = TinyGaussianPolicy()
    params = [policy.W, policy.log_std]
    close(policy.kl_fn(), 0.0, atol=1e-12)  # KL at a zero step is zero

    kl_calls = []

    def kl_fn():
        kl_calls.append(1)
        return policy.kl_fn()

    damping = 0.1
    hvp = hessian_vector_product(kl_fn, params, damping=damping)
    columns = torch.stack([hvp(e) for e in torch.eye(3, dtype=torch.float64)], dim=1)
    fisher = torch.tensor([[0.25, 0.25, 0.0], [0.25, 0.5, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    close(columns, fisher + damping * torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert len(kl_calls) == 1  # the KL gradient is built once and reused by every product
    assert not columns.requires_grad

    # Same answer from autograd's full Hessian of the KL in the flat parameters.
    def kl_of_flat(theta):
        W, log_std = unflatten_like(theta, params)
        return policy.kl_fn(W, log_std)

    hessian = torch.autograd.functional.hessian(kl_of_flat, flatten(params).detach())
    close(columns - damping * torch.eye(3, dtype=torch.float64), hessian, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# backtracking line search
# --------------------------------------------------------------------------------------------------


def scripted(results):
    """An `evaluate` that returns the given (improvement, kl) pairs in turn and records its inputs."""
    seen = []

    def evaluate(candidate):
        seen.append(candidate.clone())
        return results[len(seen) - 1]

    return evaluate, seen


def test_line_search_accepts_full_step_when_good():
    evaluate, seen = scripted([(1.0, 0.005)])
    step = torch.tensor([2.0, -1.0])
    assert backtracking_line_search(evaluate, step) == (1.0, 1, True)
    close(seen[0], step)


def test_line_search_backtracks_until_kl_fits():
    # KL grows as the square of the step: kl(s) = 0.02 s^2. With ratio 0.8:
    #   s = 1 -> 0.02 > 0.01;  s = 0.8 -> 0.0128 > 0.01;  s = 0.64 -> 0.008192 <= 0.01: accepted, 3 tries.
    step = torch.ones(2)

    def evaluate(candidate):
        s = float(candidate[0])
        return 1.0, 0.02 * s**2

    scale, tries, ok = backtracking_line_search(evaluate, step, max_steps=15, ratio=0.8, max_kl=0.01)
    assert ok and tries == 3
    assert scale == pytest.approx(0.64)


def test_line_search_rejects_non_finite_and_non_improving_candidates():
    inf = float("inf")
    evaluate, seen = scripted([(NAN, 0.0), (1.0, NAN), (inf, 0.0), (1.0, inf), (0.0, 0.0), (-1.0, 0.0),
                               (0.5, 0.001)])
    scale, tries, ok = backtracking_line_search(evaluate, torch.ones(1), ratio=0.5)
    assert ok and tries == 7 and scale == 0.5**6
    close(seen[-1], [0.5**6])
    # 0-d tensors are accepted as well as floats.
    evaluate, _ = scripted([(torch.tensor(NAN), torch.tensor(0.0)), (torch.tensor(2.0), torch.tensor(0.0))])
    assert backtracking_line_search(evaluate, torch.ones(1), ratio=0.5) == (0.5, 2, True)


def test_line_search_returns_zero_when_nothing_works():
    evaluate, seen = scripted([(-1.0, 0.001)] * 15)
    assert backtracking_line_search(evaluate, torch.ones(3)) == (0.0, 15, False)
    assert len(seen) == 15
    close(seen[-1], torch.full((3,), 0.8**14))


def test_binned_returns_hand_computed():
    """Step t of a T-step horizon goes to bin floor(t * bins / T); padding (mask 0) adds nothing."""
    import numpy as np

    from metarl.episodes import EpisodeBatch

    rewards = np.array([[[1.0, 2.0, 3.0, 4.0, 5.0], [10.0, 20.0, 30.0, 40.0, 50.0]]], np.float32)
    mask = np.array([[[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]], np.float32)  # the second episode ended after 3 steps
    batch = EpisodeBatch.from_numpy([None], {
        "observations": np.zeros((1, 2, 5, 1)), "actions": np.zeros((1, 2, 5, 1)), "rewards": rewards,
        "mask": mask, "terminated": np.zeros((1, 2), bool), "truncated": np.zeros((1, 2), bool),
        "last_observations": np.zeros((1, 2, 1))})
    # T = 5, 2 bins: t * 2 // 5 = 0, 0, 0, 1, 1
    assert batch.binned_returns(2).tolist() == [[[6.0, 9.0], [60.0, 0.0]]]
    # 10 bins over 5 steps: t * 10 // 5 = 0, 2, 4, 6, 8
    assert batch.binned_returns(10)[0, 0].tolist() == [1.0, 0, 2.0, 0, 3.0, 0, 4.0, 0, 5.0, 0]
    torch.testing.assert_close(batch.binned_returns().sum(-1), batch.returns)
