"""MAML-TRPO: the meta-gradient, the first-order option, determinism, and a small run that must learn."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import numpy as np
import pytest
import torch

from metarl.agents.maml_trpo import MAMLTRPO, MAMLTRPOConfig, OuterBatch
from metarl.episodes import EpisodeBatch
from metarl.policies import GaussianActor, batch_params
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


def _tiny_problem(sampler, first_order: bool, inner_steps: int = 1, inner_max_kl: float = 0.0, **options):
    """Real PointNav2D episodes (2 tasks x 3 episodes, horizon cut to 12 steps) and a tiny float64 policy
    (with ``inner_max_kl``, the recorded per-task step sizes go into the OuterBatch as sampling used them;
    ``options``: more MAMLTRPOConfig fields)."""
    config = MAMLTRPOConfig(tasks_per_batch=2, episodes_per_task=3, inner_steps=inner_steps, inner_lr=0.5,
                            first_order=first_order, hidden=(5,), init_std=0.5, inner_max_kl=inner_max_kl, **options)
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

    train, lrs, logps = [], [], []
    params = batch_params(agent.policy.params(), 2)
    for k in range(inner_steps):
        b = collect(10 + k)
        train.append((b, agent.advantages(b).double()))
        logps.append(agent.sampling_logps(params, b))
        params, lr = agent.adapt_bounded(params, *train[-1])
        lrs.append(lr)
    if inner_max_kl:
        assert torch.all(torch.cat(lrs) < 0.5)  # the bound is active, so the tests below exercise it
    valid = collect(20)
    logps = logps if config.inner_objective == "lvc" else None
    params = agent.adapted_params(agent.meta_params(), train, create_graph=False,  # needs autograd: no no_grad
                                  inner_lrs=lrs if inner_max_kl else None, inner_logps=logps)
    with torch.no_grad():
        old_dist = agent.policy.distribution(valid.observations, OrderedDict((k, v.detach()) for k, v in params.items()))
    outer = OuterBatch(train, valid, agent.advantages(valid).double(), old_dist, lrs if inner_max_kl else None, logps)
    return agent, outer


def _grad_and_fd(agent, outer, coords, eps=1e-6):
    theta = agent.meta_params()
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


@pytest.mark.parametrize("inner_steps,inner_max_kl,options", [
    (1, 0.0, {}), (2, 0.0, {}), (2, 1e-3, {}), (1, 0.0, {"inner_objective": "lvc"}),
    (2, 1e-3, {"inner_objective": "lvc", "log_prob_reduction": "mean"})])
def test_meta_gradient_matches_finite_differences(sampler, inner_steps, inner_max_kl, options):
    """d/dtheta of the post-adaptation surrogate, through the inner step(s), equals central differences
    (with a KL-bounded inner step: its per-task step sizes held at the values sampling used; with ProMP's "lvc"
    inner objective the surrogate the line search evaluates weighs each inner step's episodes by pi / pi_sampling,
    and its derivative is the LVC meta-gradient)."""
    agent, outer = _tiny_problem(sampler, first_order=False, inner_steps=inner_steps, inner_max_kl=inner_max_kl,
                                 **options)
    n = sum(p.numel() for p in agent.meta_params().values())
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


@pytest.mark.parametrize("inner_steps,first_order,inner_max_kl,inner_objective", [
    (1, False, 0.0, "log_prob"), (2, False, 0.0, "log_prob"), (1, True, 0.0, "log_prob"), (2, True, 0.0, "log_prob"),
    (2, False, 1e-3, "log_prob"), (1, False, 0.0, "lvc"), (2, False, 1e-3, "lvc")])
def test_chain_rule_operators_equal_differentiating_through_the_adaptation(sampler, inner_steps, first_order,
                                                                            inner_max_kl, inner_objective):
    """trpo_operators (J^T grad L and J^T F' J v, second order only) give the same meta-gradient and the
    same KL Hessian-vector products as autograd through the whole adaptation (a third-order graph)
    ("lvc": ProMP's inner objective, whose sampling term autograd finds through the stop-gradient ratio)."""
    from metarl.optim import flat_grad, hessian_vector_product

    agent, outer = _tiny_problem(sampler, first_order=first_order, inner_steps=inner_steps, inner_max_kl=inner_max_kl,
                                 inner_objective=inner_objective)
    theta = agent.meta_params()
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


def test_per_task_return_spread_is_the_worst_and_best_tasks_mean(sampler, monkeypatch):
    """meta/return_step{k}_task_min/_max: the smallest and largest of the tasks' mean episode returns in stage
    k's batch, computed here by hand from the batches the sampler returned (each task's episodes summed step by
    step over the mask); the stage's mean return lies between them."""
    config = MAMLTRPOConfig(tasks_per_batch=3, episodes_per_task=4, hidden=(8,), inner_steps=2)
    agent = MAMLTRPO(config, sampler, seed=0)
    batches = []
    sample = agent.sampler.sample
    monkeypatch.setattr(agent.sampler, "sample", lambda *a, **k: batches.append(sample(*a, **k)) or batches[-1])
    m = agent.train_step(sampler.family.sample_tasks(3, "train", seed=0))
    assert len(batches) == 3
    for k, batch in enumerate(batches):
        per_task = [sum(float((batch.rewards[i, e] * batch.mask[i, e]).sum()) for e in range(4)) / 4 for i in range(3)]
        assert len(set(per_task)) == 3  # distinct goals: min and max are different tasks
        assert m[f"meta/return_step{k}_task_min"] == pytest.approx(min(per_task), rel=1e-5)
        assert m[f"meta/return_step{k}_task_max"] == pytest.approx(max(per_task), rel=1e-5)
        assert m[f"meta/return_step{k}_task_min"] < m[f"meta/return_step{k}"] < m[f"meta/return_step{k}_task_max"]


def test_short_training_run_learns_to_adapt():
    """A small real run on PointNav2D: after a few iterations one gradient step on held-out tasks helps a lot."""
    config = MAMLTRPOConfig(tasks_per_batch=10, episodes_per_task=10, hidden=(32, 32))
    with GymnasiumSampler("metarl/PointNav2D-v0", workers=2) as s:
        agent = MAMLTRPO(config, s, seed=0)
        test = s.family.sample_tasks(10, "test")
        initial = agent.evaluate_adaptation(test, steps=1, episodes=10, seed=0).returns.mean(0)
        for it in range(12):
            agent.train_step(s.family.sample_tasks(10, "train", seed=it))
        result = agent.evaluate_adaptation(test, steps=1, episodes=10, seed=0)
        final = result.returns.mean(0)
    # the within-episode view: 10 tenths of the horizon per task and stage, summing to the returns
    assert result.within_episode.shape == (10, 2, 10)
    np.testing.assert_allclose(result.within_episode.sum(-1), result.returns, rtol=1e-4, atol=1e-3)
    # PointNav2D starts at the origin, away from the goal: the adapted policy's first tenth is its worst
    assert result.within_episode[:, 1, 0].mean() < result.within_episode[:, 1, -1].mean()
    # Random init: ~ -90 per episode and one step barely helps. After meta-training: stage 0 improved and
    # the one-step adaptation gain is large.
    assert final[0] > initial[0] + 20
    assert final[1] - final[0] > 8, (initial, final)


def test_diag_gaussian_matches_torch_distributions():
    from metarl.policies import DiagGaussian

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


# ---- conventions where the anchors differ (issue: reproducing the published curves) --------------------
def test_diag_gaussian_mean_reduction_hand_computed():
    """One action vector in 2-D: p = N((0, 0), diag(1, 2^2)), a = (1, 2), q = N((1, 0), diag(2^2, 2^2))."""
    from metarl.policies import DiagGaussian

    mean = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    log_std = torch.tensor([[0.0, np.log(2.0)]], dtype=torch.float64)
    a = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    # per dimension: log N(1; 0, 1) = -0.5 - 0.5 log 2pi; log N(2; 0, 4) = -0.5 - log 2 - 0.5 log 2pi
    total = -1.0 - np.log(2.0) - np.log(2 * np.pi)
    p_sum, p_mean = DiagGaussian(mean, log_std), DiagGaussian(mean, log_std, "mean")
    assert p_sum.log_prob(a).item() == pytest.approx(total, abs=1e-12)
    assert p_mean.log_prob(a).item() == pytest.approx(total / 2, abs=1e-12)
    # KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2 per dimension:
    # dim 1: log 2 + (1 + 1) / 8 - 0.5 = log 2 - 0.25; dim 2: 0 + 4 / 8 - 0.5 = 0
    q_mean = DiagGaussian(torch.tensor([[1.0, 0.0]], dtype=torch.float64),
                          torch.full((1, 2), np.log(2.0), dtype=torch.float64), "mean")
    kl = np.log(2.0) - 0.25
    assert p_mean.kl(q_mean).item() == pytest.approx(kl / 2, abs=1e-12)
    assert p_mean.kl(q_mean, reduction="sum").item() == pytest.approx(kl, abs=1e-12)
    assert DiagGaussian(mean, log_std).kl(q_mean).item() == pytest.approx(kl, abs=1e-12)  # the caller's convention
    # entropy per dimension: log s + 0.5 + 0.5 log 2pi
    ent = np.log(2.0) + 1.0 + np.log(2 * np.pi)
    assert p_sum.entropy().item() == pytest.approx(ent, abs=1e-12)
    assert p_mean.entropy().item() == pytest.approx(ent / 2, abs=1e-12)
    with pytest.raises(ValueError, match="reduction"):
        DiagGaussian(mean, log_std, "max")


def test_mean_reduction_is_the_sum_step_divided_by_act_dim(sampler):
    """The inner step of a 'mean' policy at lr alpha is exactly the 'sum' policy's at alpha / act_dim (the
    loss is linear in the log-probs), and its surrogate ratios are the 'sum' ratios' act_dim-th root."""
    agents = {}
    for reduction in ("sum", "mean"):
        config = MAMLTRPOConfig(tasks_per_batch=2, episodes_per_task=3, hidden=(5,), log_prob_reduction=reduction,
                                inner_lr=0.1 if reduction == "mean" else 0.05)
        agents[reduction] = MAMLTRPO(config, sampler, seed=3)
        agents[reduction].policy.double()
    assert all(torch.equal(a, b) for a, b in zip(agents["sum"].policy.parameters(), agents["mean"].policy.parameters(), strict=True))
    tasks = sampler.family.sample_tasks(2, "train", seed=1)
    params = batch_params(agents["sum"].policy.params(), 2)
    batch = _double(sampler.sample(GaussianActor(agents["sum"].policy.config, params, seed=0), tasks, 3, seed=0))
    adv = agents["sum"].advantages(batch).double()
    act_dim = batch.actions.shape[-1]
    assert act_dim == 2
    logp = {r: a.policy.log_prob(batch.observations, batch.actions, params) for r, a in agents.items()}
    torch.testing.assert_close(logp["mean"], logp["sum"] / act_dim)
    stepped = {}
    for reduction, agent in agents.items():
        leaf = OrderedDict((k, v.detach().clone().requires_grad_()) for k, v in params.items())
        stepped[reduction] = agent.adapt(leaf, batch, adv, create_graph=False)
    for name in params:  # mean at 0.1 == sum at 0.1 / 2
        torch.testing.assert_close(stepped["mean"][name], stepped["sum"][name], rtol=1e-12, atol=1e-12)
    # and the diagnostics report the same true (summed) KL for the same step
    stats = {r: agents[r].inner_step_stats(params, stepped[r], batch) for r in agents}
    assert stats["mean"]["meta/inner_kl"] == pytest.approx(stats["sum"]["meta/inner_kl"], rel=1e-9)
    assert stats["sum"]["meta/inner_kl"] > 0 and stats["sum"]["meta/inner_param_change"] > 0


def test_inner_step_stats_hand_checked(sampler):
    """meta/inner_kl is the masked mean over steps of the summed KL, averaged over tasks; the parameter
    change is the Euclidean norm per task, averaged. Checked with torch.distributions on a shifted bias."""
    agent = MAMLTRPO(MAMLTRPOConfig(tasks_per_batch=2, episodes_per_task=2, hidden=(4,)), sampler, seed=0)
    tasks = sampler.family.sample_tasks(2, "train", seed=0)
    before = OrderedDict((k, v.detach()) for k, v in batch_params(agent.policy.params(), 2).items())
    batch = sampler.sample(GaussianActor(agent.policy.config, before, seed=0), tasks, 2, seed=0)
    after = OrderedDict((k, v.clone()) for k, v in before.items())
    last = f"layers.{len(agent.policy.layers) - 1}.bias"
    after[last][0] += torch.tensor([0.3, -0.4])  # task 0: mean shifted by (0.3, -0.4), std 1: KL = 0.125
    after["log_std"][1] += np.log(2.0)           # task 1: std doubled in both dims
    stats = agent.inner_step_stats(before, after, batch)
    kl1 = 2 * (np.log(2.0) + 1 / 8 - 0.5)       # per dim: log 2 + 1/(2*4) - 1/2
    assert stats["meta/inner_kl"] == pytest.approx((0.125 + kl1) / 2, rel=1e-5)
    assert stats["meta/inner_kl_max"] == pytest.approx(max(0.125, kl1), rel=1e-5)
    assert stats["meta/inner_param_change"] == pytest.approx((0.5 + np.log(2.0) * np.sqrt(2)) / 2, rel=1e-5)


def test_action_scale_steps_the_env_with_scaled_actions_and_records_the_policys():
    """An actor with action_scale 0.1 drives the env exactly as one that outputs 0.1 * a with scale 1;
    the episode records the policy's own (unscaled) actions."""
    from metarl.policies import GaussianMLPPolicy

    sampler = GymnasiumSampler("metarl/HalfCheetahVel-v0", workers=0, env_kwargs={"max_episode_steps": 20})
    try:
        policy = GaussianMLPPolicy(17, 6, (8,), action_scale=0.1)
        tasks = sampler.family.sample_tasks(2, "train", seed=0)
        scaled = sampler.sample(GaussianActor(policy.config, policy.params(), seed=4), tasks, 2, seed=1)

        class Prescaled(GaussianActor):  # scales inside act, steps the env with what it returns
            def act(self, obs):
                return super().act(obs) * np.float32(0.1)

        plain = Prescaled({**policy.config, "action_scale": 1.0}, policy.params(), seed=4)
        assert plain.action_scale == 1.0
        reference = sampler.sample(plain, tasks, 2, seed=1)
        torch.testing.assert_close(scaled.observations, reference.observations, rtol=0, atol=0)
        torch.testing.assert_close(scaled.rewards, reference.rewards, rtol=0, atol=0)
        torch.testing.assert_close(scaled.actions * 0.1, reference.actions)
        assert scaled.actions.abs().max() > 1.0  # sigma 1 in policy units: many actions beyond the env's bound
    finally:
        sampler.close()


def test_new_options_are_validated():
    from metarl.config import ConfigError, load_config

    base = {"experiment": "x", "env": "PointNav2D", "agent": {"name": "maml_trpo"}}
    for field, value in (("log_prob_reduction", "max"), ("action_scale", 0.0), ("activation", "gelu"),
                         ("fisher_subsample", 0)):
        with pytest.raises(ConfigError, match=f"agent.{field}"):
            load_config(None, data={**base, "agent": {"name": "maml_trpo", field: value}})
    config = load_config(None, ["agent.log_prob_reduction=mean", "agent.action_scale=0.1"], data=base)
    assert (config.agent.log_prob_reduction, config.agent.action_scale) == ("mean", 0.1)


def test_retired_options_load_at_their_neutral_value_and_are_refused_otherwise():
    """learn_inner_lr, inner_gae_lambda and inner_max_kl_grad lost every measured comparison and are gone: a
    config (or a run recorded while they existed) giving one its neutral value loads as if it were absent;
    any other value is one line naming the option, why it went, and the value this version runs."""
    from metarl.config import ConfigError, load_config

    base = {"experiment": "x", "env": "PointNav2D"}
    plain = load_config(None, data={**base, "agent": {"name": "maml_trpo"}})
    for option, neutral, other in (("learn_inner_lr", "off", "per_tensor"), ("inner_gae_lambda", None, 0.97),
                                   ("inner_max_kl_grad", False, True)):
        assert load_config(None, data={**base, "agent": {"name": "maml_trpo", option: neutral}}) == plain
        with pytest.raises(ConfigError) as err:
            load_config(None, data={**base, "agent": {"name": "maml_trpo", option: other}})
        assert str(err.value).startswith(f"agent.{option}: retired (") and "\n" not in str(err.value)
        assert f"runs only its neutral value {neutral!r}, got {other!r}" in str(err.value)


def test_kl_bounded_inner_step_by_hand(sampler):
    """inner_max_kl: a task whose full step (inner_lr) moves its policy by KL_i > bound takes
    alpha_i = inner_lr * sqrt(bound / KL_i) and lands near the bound (KL is quadratic in the step to second
    order); a task already inside keeps inner_lr; off (0), the step is exactly `adapt`'s."""
    agent, outer = _tiny_problem(sampler, first_order=False)
    batch, adv = outer.train[0]
    theta = batch_params(OrderedDict((k, v.detach()) for k, v in agent.policy.params().items()), 2)
    off, lr_off = agent.adapt_bounded(theta, batch, adv)
    leaf = OrderedDict((k, v.clone().requires_grad_()) for k, v in theta.items())
    plain = agent.adapt(leaf, batch, adv, create_graph=False)
    for name in theta:
        assert torch.equal(off[name], plain[name].detach())
    assert torch.all(lr_off == 0.5)
    full_kl = agent.task_kl(theta, off, batch)                    # [2]: each task's KL at the full step
    bound = float(full_kl.min() + full_kl.max()) / 2              # one task above the bound, one below
    agent.config = dataclasses.replace(agent.config, inner_max_kl=bound)
    bounded, lr = agent.adapt_bounded(theta, batch, adv)
    above, below = int(full_kl.argmax()), int(full_kl.argmin())
    assert lr[below] == 0.5
    assert lr[above].item() == pytest.approx(0.5 * (bound / full_kl[above].item()) ** 0.5, rel=1e-12)
    kl = agent.task_kl(theta, bounded, batch)
    assert kl[below].item() == pytest.approx(full_kl[below].item(), rel=1e-12)
    assert kl[above].item() == pytest.approx(bound, rel=0.05)
    for name in theta:  # the step is the same gradient, scaled per task
        torch.testing.assert_close(theta[name][above] - bounded[name][above],
                                   (theta[name][above] - off[name][above]) * lr[above] / 0.5)
    with pytest.raises(ValueError, match="inner_max_kl"):
        MAMLTRPOConfig(inner_max_kl=-1.0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_lvc_inner_objective_adds_exactly_the_sampling_term(sampler, reduction):
    """inner_objective "lvc" (ProMP) adapts exactly as "log_prob" does; its meta-gradient differs by the
    sampling term alone, computed here by hand from per-step score vectors: with one inner step
    theta'_i = theta - alpha g_i and u_i = dL/dtheta'_i, the extra Hessian of task i's inner loss is
    -(1/T_i) sum_t A_t grad s_t grad s_t^T / d (s: the summed log-prob; d: the action dimensions with
    "mean", else 1), so the meta-gradient moves by alpha sum_i (1/T_i) sum_t A_t grad s_t (grad s_t . u_i) / d."""
    agent, outer = _tiny_problem(sampler, first_order=False, log_prob_reduction=reduction, inner_objective="lvc")
    theta = agent.policy.params()
    _, lvc, _ = agent.trpo_operators(theta, outer)
    lvc_adapted = agent.adapted_params(theta, outer.train, create_graph=False, inner_logps=outer.inner_logps)
    sampled, _ = agent.adapt_bounded(batch_params(theta, 2), *outer.train[0])  # as sampling and evaluation adapt
    agent.config = dataclasses.replace(agent.config, inner_objective="log_prob")
    _, plain, _ = agent.trpo_operators(theta, dataclasses.replace(outer, inner_logps=None))
    adapted = agent.adapted_params(theta, outer.train, create_graph=False)
    plain_sampled, _ = agent.adapt_bounded(batch_params(theta, 2), *outer.train[0])
    for name, value in adapted.items():
        torch.testing.assert_close(sampled[name], plain_sampled[name], rtol=0, atol=0)  # the same adaptation, bit for bit
        torch.testing.assert_close(lvc_adapted[name], value, rtol=1e-12, atol=1e-14)  # ratio 1 at the sampling point

    batch, adv = outer.train[0]
    leaves = OrderedDict((k, v.detach().requires_grad_()) for k, v in adapted.items())
    surrogate, _ = agent.outer_terms(leaves, outer)
    u = torch.autograd.grad(surrogate, list(leaves.values()))  # dL/dtheta'_i, task-batched
    d = batch.actions.shape[-1] if reduction == "mean" else 1
    expected = torch.zeros_like(plain)
    names = list(theta.keys())
    for i in range(batch.num_tasks):
        u_i = torch.cat([x[i].reshape(-1) for x in u])
        steps = int(batch.mask[i].sum())
        for e in range(batch.mask.shape[1]):
            for t in range(batch.mask.shape[2]):
                if batch.mask[i, e, t] == 0:
                    continue
                params = OrderedDict((k, theta[k].detach().requires_grad_()) for k in names)
                dist = agent.policy.distribution(batch.observations[i, e, t][None], params)
                s = dist.log_prob(batch.actions[i, e, t][None]).sum() * d  # the summed log-prob
                score = torch.cat([g.reshape(-1) for g in torch.autograd.grad(s, list(params.values()))])
                expected += agent.config.inner_lr * adv[i, e, t] / steps * score * torch.dot(score, u_i) / d
    assert expected.norm() > 1e-3 * plain.norm()  # the term is there to be found
    torch.testing.assert_close(lvc - plain, expected, rtol=1e-8, atol=1e-12)
    # a real iteration records each inner step's sampling log-probs and takes a finite, accepted step
    trainer = MAMLTRPO(MAMLTRPOConfig(tasks_per_batch=2, episodes_per_task=2, inner_steps=2, hidden=(8,),
                                      inner_objective="lvc", log_prob_reduction=reduction), sampler, seed=0)
    metrics = trainer.train_step(sampler.family.sample_tasks(2, "train", seed=0))
    assert metrics["loss/line_search_accepted"] == 1.0 and np.isfinite(metrics["loss/surrogate_after"])
    with pytest.raises(ValueError, match="inner_objective"):
        MAMLTRPOConfig(inner_objective="dice")
    with pytest.raises(ValueError, match="first_order"):
        MAMLTRPOConfig(inner_objective="lvc", first_order=True)


@pytest.mark.parametrize("first_order", [False, True])
def test_fisher_subsample_estimates_the_curvature_on_every_kth_episode(sampler, first_order):
    """fisher_subsample=k: the meta-gradient is the exact one; the KL Hessian-vector products are the exact
    Hessian, at the same point, of the KL on every k-th episode of each task through an adaptation whose
    Jacobian is taken on those episodes: phi(theta) = theta'_full(theta0) + theta'_sub(theta) - theta'_sub(theta0).
    (Its Hessian at theta0 is J_sub^T F'_sub J_sub: the KL's gradient vanishes where phi equals the old policy.)"""
    from metarl.optim import hessian_vector_product

    agent, outer = _tiny_problem(sampler, first_order=first_order)
    theta = agent.policy.params()
    _, exact_grad, exact_fvp = agent.trpo_operators(theta, outer)
    agent.config = dataclasses.replace(agent.config, fisher_subsample=2)
    value, grad, fvp = agent.trpo_operators(theta, outer)
    torch.testing.assert_close(grad, exact_grad, rtol=1e-12, atol=1e-14)

    every_other = slice(None, None, 2)
    sub_train = [(b.episode_slice(every_other), adv[:, every_other]) for b, adv in outer.train]
    assert sub_train[0][0].observations.shape[1] == 2  # episodes 0 and 2 of 3
    full_adapted = OrderedDict((k, v.detach()) for k, v in agent.adapted_params(theta, outer.train, False).items())
    sub_at_theta0 = OrderedDict((k, v.detach()) for k, v in agent.adapted_params(theta, sub_train, False).items())
    sub_outer = outer.episode_slice(every_other)

    def kl_of_phi():
        sub = agent.adapted_params(theta, sub_train, create_graph=True)
        phi = OrderedDict((k, full_adapted[k] + sub[k] - sub_at_theta0[k]) for k in sub)
        return agent.outer_terms(phi, sub_outer)[1]

    reference = hessian_vector_product(kl_of_phi, list(theta.values()), agent.config.cg_damping)
    rng = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(grad.numel(), generator=rng, dtype=torch.float64)
        torch.testing.assert_close(fvp(v), reference(v), rtol=1e-7, atol=1e-10)
        assert not torch.allclose(fvp(v), exact_fvp(v), rtol=1e-3)  # a different (subsampled) estimate


