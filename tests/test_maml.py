"""MAML-TRPO: the meta-gradient, the first-order option, determinism, and a small run that must learn."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import numpy as np
import pytest
import torch

from metarl.agents.maml_trpo import MAMLTRPO, MAMLTRPOConfig, OuterBatch
from metarl.agents.policies import GaussianActor, batch_params
from metarl.episodes import EpisodeBatch
from metarl.sampling import GymnasiumSampler


@pytest.fixture(scope="module")
def sampler():
    s = GymnasiumSampler("metarl/PointNav2D-v0", workers=0)
    yield s
    s.close()


def _double(batch: EpisodeBatch) -> EpisodeBatch:
    return dataclasses.replace(
        batch, observations=batch.observations.double(), actions=batch.actions.double(),
        rewards=batch.rewards.double(), mask=batch.mask.double(), last_observations=batch.last_observations.double(),
    )


def _tiny_problem(sampler, first_order: bool, inner_steps: int = 1):
    """Real PointNav2D episodes (2 tasks x 3 episodes, horizon cut to 12 steps) and a tiny float64 policy."""
    config = MAMLTRPOConfig(tasks_per_batch=2, episodes_per_task=3, inner_steps=inner_steps, inner_lr=0.5,
                            first_order=first_order, hidden=(5,), init_std=0.5)
    agent = MAMLTRPO(config, sampler, seed=3)
    agent.policy.double()
    tasks = sampler.family.sample_tasks(2, "train", seed=1)

    def collect(seed):
        params = batch_params(agent.policy.params(), 2)
        batch = sampler.sample(GaussianActor(agent.policy.config, params, seed=seed), tasks, 3, seed=seed)
        cut = 12  # a short horizon keeps finite differences cheap and well conditioned
        batch = dataclasses.replace(batch, observations=batch.observations[:, :, :cut], actions=batch.actions[:, :, :cut],
                                    rewards=batch.rewards[:, :, :cut], mask=batch.mask[:, :, :cut])
        return _double(batch)

    train = []
    for k in range(inner_steps):
        b = collect(10 + k)
        train.append((b, agent.advantages(b).double()))
    valid = collect(20)
    params = agent.adapted_params(agent.policy.params(), train, create_graph=False)  # needs autograd: no no_grad
    with torch.no_grad():
        old_dist = agent.policy.distribution(valid.observations, OrderedDict((k, v.detach()) for k, v in params.items()))
    outer = OuterBatch(train, valid, agent.advantages(valid).double(), old_dist)
    return agent, outer


def _grad_and_fd(agent, outer, coords, eps=1e-6):
    theta = agent.policy.params()
    loss, _ = agent.meta_objective(theta, outer, create_graph=True)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(theta.values()))])
    flat = torch.cat([p.detach().reshape(-1) for p in theta.values()])
    fd = []
    for i in coords:
        values = []
        for sign in (1, -1):
            x = flat.clone()
            x[i] += sign * eps
            pieces, offset = OrderedDict(), 0
            for name, p in theta.items():
                pieces[name] = x[offset: offset + p.numel()].reshape(p.shape).requires_grad_()
                offset += p.numel()
            values.append(agent.meta_objective(pieces, outer, create_graph=False)[0].item())
        fd.append((values[0] - values[1]) / (2 * eps))
    return grad, np.array(fd)


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_meta_gradient_matches_finite_differences(sampler, inner_steps):
    """d/dtheta of the post-adaptation surrogate, through the inner step(s), equals central differences."""
    agent, outer = _tiny_problem(sampler, first_order=False, inner_steps=inner_steps)
    n = sum(p.numel() for p in agent.policy.parameters())
    coords = np.random.default_rng(0).choice(n, size=8, replace=False)
    grad, fd = _grad_and_fd(agent, outer, coords)
    np.testing.assert_allclose(grad[coords].numpy(), fd, rtol=1e-4, atol=1e-7)


def test_first_order_drops_the_second_order_terms(sampler):
    """first_order=True gives grad L(theta') (the Jacobian d theta'/d theta taken as I): it differs from the
    exact meta-gradient, and equals the plain gradient of the outer loss at the adapted parameters."""
    agent, outer = _tiny_problem(sampler, first_order=False)
    exact, _ = _grad_and_fd(agent, outer, [])
    agent_fo = dataclasses.replace(agent.config, first_order=True)
    agent.config = agent_fo
    first, _ = _grad_and_fd(agent, outer, [])
    assert not torch.allclose(exact, first, rtol=1e-3, atol=1e-8)

    # grad of L at theta' = theta - alpha * g (g held constant), summed over the tasks' copies of theta.
    theta = agent.policy.params()
    adapted = agent.adapted_params(theta, outer.train, create_graph=False)
    leaves = OrderedDict((k, v.detach().requires_grad_()) for k, v in adapted.items())
    dist = agent.policy.distribution(outer.valid.observations, leaves)
    ratio = torch.exp(dist.log_prob(outer.valid.actions) - outer.old_dist.log_prob(outer.valid.actions))
    mask = outer.valid.mask
    loss = (-(ratio * outer.valid_advantages * mask).sum((1, 2)) / mask.sum((1, 2))).mean()
    per_task = torch.autograd.grad(loss, list(leaves.values()))
    expected = torch.cat([g.sum(0).reshape(-1) for g in per_task])
    torch.testing.assert_close(first, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("inner_steps,first_order", [(1, False), (2, False), (1, True)])
def test_chain_rule_operators_equal_differentiating_through_the_adaptation(sampler, inner_steps, first_order):
    """trpo_operators (J^T grad L and J^T F' J v, second order only) give the same meta-gradient and the
    same KL Hessian-vector products as autograd through the whole adaptation (a third-order graph)."""
    from metarl.optim import flat_grad, hessian_vector_product

    agent, outer = _tiny_problem(sampler, first_order=first_order, inner_steps=inner_steps)
    theta = agent.policy.params()
    loss, _ = agent.meta_objective(theta, outer, create_graph=True)
    expected_grad = flat_grad(loss, list(theta.values()))
    value, grad, fvp = agent.trpo_operators(theta, outer)
    assert value == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)

    reference = hessian_vector_product(lambda: agent.meta_objective(theta, outer, create_graph=True)[1],
                                       list(theta.values()), agent.config.cg_damping)
    rng = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(grad.numel(), generator=rng, dtype=torch.float64)
        torch.testing.assert_close(fvp(v), reference(v), rtol=1e-7, atol=1e-10)
        assert torch.dot(v, fvp(v)) > 0  # positive definite, as conjugate gradient needs


def test_inner_step_is_a_per_task_policy_gradient_step(sampler):
    """The batched inner step equals, task by task, theta - lr * grad of that task's own loss."""
    agent, outer = _tiny_problem(sampler, first_order=False)
    batch, adv = outer.train[0]
    theta = agent.policy.params()
    adapted = agent.adapted_params(theta, outer.train, create_graph=False)
    for i in range(batch.num_tasks):
        one = batch.task_slice(i)
        params = OrderedDict((k, v.detach().requires_grad_()) for k, v in theta.items())
        logp = agent.policy.log_prob(one.observations[0], one.actions[0], params)
        loss = -(logp * adv[i] * one.mask[0]).sum() / one.mask[0].sum()
        grads = torch.autograd.grad(loss, list(params.values()))
        for (name, p), g in zip(params.items(), grads, strict=True):
            torch.testing.assert_close(adapted[name][i], p - agent.config.inner_lr * g, rtol=1e-10, atol=1e-12)


def _train(workers: int, iterations: int = 2, seed: int = 0):
    config = MAMLTRPOConfig(tasks_per_batch=4, episodes_per_task=4, hidden=(16, 16))
    with GymnasiumSampler("metarl/PointNav2D-v0", workers=workers) as s:
        agent = MAMLTRPO(config, s, seed=seed)
        history = []
        for it in range(iterations):
            history.append(agent.train_step(s.family.sample_tasks(4, "train", seed=it)))
        flat = torch.cat([p.detach().reshape(-1) for p in agent.policy.parameters()])
    return flat, [{k: v for k, v in m.items() if not k.startswith("time/")} for m in history]


def test_same_seed_same_numbers_and_worker_count_does_not_matter():
    """Training twice with one seed gives identical parameters and metrics, in-process or on 2 workers."""
    a, ma = _train(workers=0)
    b, mb = _train(workers=0)
    c, mc = _train(workers=2)
    assert torch.equal(a, b) and ma == mb
    assert torch.equal(a, c) and ma == mc
    d, _ = _train(workers=0, seed=1)
    assert not torch.equal(a, d)


def test_trpo_step_respects_the_kl_bound_and_improves_the_surrogate(sampler):
    config = MAMLTRPOConfig(tasks_per_batch=4, episodes_per_task=5, hidden=(16, 16), max_kl=0.005)
    agent = MAMLTRPO(config, sampler, seed=0)
    before = torch.cat([p.detach().reshape(-1).clone() for p in agent.policy.parameters()])
    m = agent.train_step(sampler.family.sample_tasks(4, "train", seed=0))
    after = torch.cat([p.detach().reshape(-1) for p in agent.policy.parameters()])
    assert m["loss/line_search_accepted"] == 1.0
    assert 0.0 < m["loss/kl"] <= 0.005 + 1e-9
    assert m["loss/surrogate_after"] < m["loss/surrogate_before"]
    assert not torch.equal(before, after)


def test_short_training_run_learns_to_adapt():
    """A small real run on PointNav2D: after a few iterations one gradient step on held-out tasks helps a lot."""
    config = MAMLTRPOConfig(tasks_per_batch=10, episodes_per_task=10, hidden=(32, 32))
    with GymnasiumSampler("metarl/PointNav2D-v0", workers=2) as s:
        agent = MAMLTRPO(config, s, seed=0)
        test = s.family.sample_tasks(10, "test")
        initial = agent.evaluate_adaptation(test, steps=1, episodes=10, seed=0).returns.mean(0)
        for it in range(12):
            agent.train_step(s.family.sample_tasks(10, "train", seed=it))
        final = agent.evaluate_adaptation(test, steps=1, episodes=10, seed=0).returns.mean(0)
    # Random init: ~ -90 per episode and one step barely helps. After meta-training: stage 0 improved and
    # the one-step adaptation gain is large.
    assert final[0] > initial[0] + 20
    assert final[1] - final[0] > 8, (initial, final)


def test_diag_gaussian_matches_torch_distributions():
    from metarl.agents.policies import DiagGaussian

    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    s1, s2 = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    a = torch.randn(4, 3, generator=g, dtype=torch.float64)
    p = torch.distributions.Independent(torch.distributions.Normal(m1, s1.exp()), 1)
    q = torch.distributions.Independent(torch.distributions.Normal(m2, s2.exp()), 1)
    mine_p, mine_q = DiagGaussian(m1, s1), DiagGaussian(m2, s2)
    torch.testing.assert_close(mine_p.log_prob(a), p.log_prob(a))
    torch.testing.assert_close(mine_p.kl(mine_q), torch.distributions.kl_divergence(p, q))
    torch.testing.assert_close(mine_p.entropy(), p.entropy())
    assert torch.all(mine_p.kl(mine_p) == 0)  # KL at a zero step is exactly zero
