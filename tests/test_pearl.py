"""PEARL: the product-of-Gaussians posterior and its KL by hand, the SAC losses on a hand-checked batch, the
per-task replay and context buffers, collection on both sampler backends, determinism, resume, and a probe
family where only an inferred task helps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from probes import HiddenSide  # noqa: F401  (registers tests/HiddenSide-v0)

from metarl.agents.pearl import (
    PEARL,
    ContextEncoder,
    PEARLActor,
    PEARLConfig,
    TaskBuffer,
    kl_to_unit,
    product_of_gaussians,
    task_pool,
    transitions,
)
from metarl.cli import main
from metarl.config import ConfigError, load_config
from metarl.sampling import GymnasiumSampler, make_sampler

TINY = dict(num_train_tasks=2, tasks_per_batch=2, initial_episodes=2, prior_episodes=1, extra_posterior_episodes=1,
            train_steps=3, meta_batch=3, batch_size=5, context_batch=4, latent_dim=2, hidden=(8, 8),
            encoder_hidden=(8,))


@pytest.fixture(scope="module")
def side():
    s = GymnasiumSampler("tests/HiddenSide-v0", workers=0)
    yield s
    s.close()


@pytest.fixture(scope="module")
def point():
    s = GymnasiumSampler("metarl/PointNav2D-v0", env_kwargs={"max_episode_steps": 5}, workers=0)
    yield s
    s.close()


def test_product_of_gaussians_and_kl_by_hand():
    # 1-D factors N(1, 1) and N(3, 2): precision 1 + 1/2 = 3/2, so var 2/3 and mean 2/3 * (1/1 + 3/2) = 5/3
    mean, var = product_of_gaussians(torch.tensor([[1.0], [3.0]]), torch.tensor([[1.0], [2.0]]))
    assert mean.item() == pytest.approx(5 / 3) and var.item() == pytest.approx(2 / 3)
    # KL(N(5/3, 2/3) || N(0, 1)) = (2/3 + 25/9 - 1 - ln(2/3)) / 2
    assert kl_to_unit(mean, var).item() == pytest.approx(0.5 * (2 / 3 + 25 / 9 - 1 - math.log(2 / 3)))
    m, v = torch.randn(4, 3, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64) + 0.1
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m, v.sqrt()), torch.distributions.Normal(0, 1))
    assert torch.allclose(kl_to_unit(m, v), expected)
    # one factor is its own posterior; n equal factors shrink the variance n-fold, the mean stays
    mean, var = product_of_gaussians(torch.tensor([[0.5, -2.0]] * 4), torch.tensor([[0.2, 3.0]] * 4))
    assert torch.allclose(mean, torch.tensor([0.5, -2.0])) and torch.allclose(var, torch.tensor([0.05, 0.75]))


def test_the_actor_infers_the_same_posterior_as_the_encoder():
    torch.manual_seed(0)
    enc = ContextEncoder(4, (16, 16), 3)
    actor = PEARLActor({"net.0.weight": torch.zeros(4, 4), "net.0.bias": torch.zeros(4)}, enc.state_dict(), 2, 3,
                       -np.ones(2), np.ones(2), seed=0, infer=True)
    actor.start([0], 1)
    assert np.allclose(actor.posterior(0)[0], 0) and np.allclose(actor.posterior(0)[1], 1)  # empty: the prior
    context = torch.randn(7, 4)
    actor._context[0] = list(context.numpy())
    mean, var = actor.posterior(0)
    with torch.no_grad():
        want_mean, want_var = enc.posterior(context)
    assert np.allclose(mean, want_mean.numpy(), atol=1e-5) and np.allclose(var, want_var.numpy(), rtol=1e-4)


def _constant(net: torch.nn.Sequential, values: list[float]) -> None:
    """Make an MLP output ``values`` whatever its input (zero weights, the values as the last bias)."""
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
        net[-1].bias.copy_(torch.tensor(values))


@pytest.mark.parametrize("entropy", ["fixed", "auto"])
def test_sac_losses_on_a_hand_checked_batch(side, entropy):
    c = PEARLConfig(**{**TINY, "entropy": entropy, "reward_scale": 5.0, "gamma": 0.9, "kl_lambda": 0.1,
                       "latent_dim": 1, "policy_mean_reg": 1e-3, "policy_std_reg": 1e-3})
    agent = PEARL(c, side, seed=0)
    # constant networks: encoder factor N(0.5, softplus(0) = ln 2) per transition; policy mean 0.2, log-std -1;
    # Q1 = 1.0, Q2 = 1.5, targets 2.0 and 3.0
    _constant(agent.encoder.net, [0.5, 0.0])
    _constant(agent.policy.net, [0.2, -1.0])
    for net, v in ((agent.q1, 1.0), (agent.q2, 1.5), (agent.q1_target, 2.0), (agent.q2_target, 3.0)):
        _constant(net, [v])
    with torch.no_grad():
        agent.log_alpha.fill_(math.log(0.5))
    alpha = 0.5 if entropy == "auto" else 1.0
    C = 4
    context = torch.zeros(1, C, 3)
    batch = {"obs": torch.zeros(1, 2, 1), "actions": torch.zeros(1, 2, 1), "next_obs": torch.zeros(1, 2, 1),
             "rewards": torch.tensor([[-1.0, 0.5]]), "terminals": torch.tensor([[0.0, 1.0]])}
    z_noise, next_noise, new_noise = torch.tensor([[0.3]]), torch.tensor([[[0.5], [-1.0]]]), torch.tensor([[[1.0], [0.0]]])
    losses = agent.losses(context, batch, z_noise, next_noise, new_noise)

    var = math.log(2) / C  # C equal factors
    kl = 0.5 * (var + 0.25 - 1 - math.log(var))
    assert losses["kl"].item() == pytest.approx(0.1 * kl, rel=1e-5)

    def logp(n):  # tanh-Gaussian log-density of u = 0.2 + e^-1 n, by the change of variables
        u = 0.2 + math.exp(-1) * n
        return -0.5 * n * n - (-1.0) - 0.5 * math.log(2 * math.pi) - math.log(1 - math.tanh(u) ** 2)

    targets = [5.0 * r + 0.9 * (1 - d) * (2.0 - alpha * logp(n)) for r, d, n in ((-1.0, 0.0, 0.5), (0.5, 1.0, -1.0))]
    critic = np.mean([(1.0 - t) ** 2 for t in targets]) + np.mean([(1.5 - t) ** 2 for t in targets])
    assert losses["critic"].item() == pytest.approx(critic, rel=1e-5)
    policy = np.mean([alpha * logp(n) - 1.0 for n in (1.0, 0.0)]) + 1e-3 * 0.2**2 + 1e-3 * 1.0
    assert losses["policy"].item() == pytest.approx(policy, rel=1e-5)
    alpha_loss = -math.log(0.5) * np.mean([logp(n) - 1.0 for n in (1.0, 0.0)])  # target entropy -act_dim = -1
    assert losses["alpha"].item() == pytest.approx(alpha_loss, rel=1e-5)


def test_an_update_steps_the_targets_by_polyak_and_the_policy_leaves_the_critic_alone(side):
    agent = PEARL(PEARLConfig(**TINY), side, seed=0)
    agent.train_step([])  # fills the buffers (and takes its own steps)
    q1, target = [p.detach().clone() for p in agent.q1.parameters()], [p.detach().clone() for p in agent.q1_target.parameters()]
    policy_before = [p.detach().clone() for p in agent.policy.parameters()]
    agent.update([0, 1, 0])
    tau = agent.config.tau
    for old_t, new_t, new_q in zip(target, agent.q1_target.parameters(), agent.q1.parameters(), strict=True):
        assert torch.allclose(new_t, (1 - tau) * old_t + tau * new_q)
    assert any(not torch.equal(a, b) for a, b in zip(q1, agent.q1.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(policy_before, agent.policy.parameters(), strict=True))
    # the policy's gradient was taken w.r.t. the policy only: the Q functions' gradients are the critic's
    agent.critic_opt.zero_grad()
    losses = agent.losses(agent._context_batch([0]), agent._rl_batch([0]), torch.zeros(1, 2), torch.zeros(1, 5, 1),
                          torch.zeros(1, 5, 1))
    losses["policy"].backward(inputs=list(agent.policy.parameters()))
    assert all(p.grad is None or not p.grad.any() for p in agent.q1.parameters())


def test_task_buffer_ring_and_round_trip():
    buf = TaskBuffer(1, 1, capacity=4)
    rows = lambda k: {"obs": np.full((k, 1), 1.0), "actions": np.zeros((k, 1)), "rewards": np.arange(k, dtype=np.float32),  # noqa: E731
                      "next_obs": np.zeros((k, 1)), "terminals": np.zeros(k)}
    buf.add(rows(3))
    assert buf.size == 3 and sorted(buf.data["rewards"][:3]) == [0, 1, 2]
    buf.add({**rows(3), "rewards": np.array([10.0, 11.0, 12.0], np.float32)})
    assert buf.size == 4 and sorted(buf.data["rewards"].tolist()) == [2, 10, 11, 12]  # the oldest two overwritten
    copy = TaskBuffer(1, 1, capacity=4)
    copy.load(buf.state())
    assert copy.state()["rewards"].tolist() == buf.state()["rewards"].tolist() == [11, 12, 2, 10]  # the ring as it lies
    buf.add({**rows(1), "rewards": np.array([20.0], np.float32)})
    copy.add({**rows(1), "rewards": np.array([20.0], np.float32)})
    assert copy.data["rewards"].tolist() == buf.data["rewards"].tolist() == [11, 12, 20, 10]  # the oldest (2) went
    assert set(buf.sample(np.random.default_rng(0), 50)["rewards"].tolist()) == {10, 11, 12, 20}
    # a buffer whose rows exactly fill their allocation grows and appends after them (nothing overwritten)
    grow = TaskBuffer(1, 1, capacity=10_000)
    grow.add({**rows(1024), "rewards": np.arange(1024, dtype=np.float32)})
    grow.add({**rows(400), "rewards": np.arange(1024, 1424, dtype=np.float32)})
    assert grow.size == 1424 and np.array_equal(grow.data["rewards"][:1424], np.arange(1424))
    loaded = TaskBuffer(1, 1, capacity=10_000)
    loaded.load(grow.state())
    for b in (grow, loaded):
        b.add({**rows(2), "rewards": np.array([-1.0, -2.0], np.float32)})
    assert np.array_equal(loaded.data["rewards"][:1426], grow.data["rewards"][:1426])
    buf.clear()
    with pytest.raises(RuntimeError, match="empty"):
        buf.sample(np.random.default_rng(0), 1)


def test_transitions_pair_each_step_with_its_successor_in_policy_units(point):
    actor = PEARLActor(PEARL(PEARLConfig(**TINY), point, seed=0).policy.state_dict(), None, 2, 2,
                       point.action_space.low, point.action_space.high, seed=3)
    tasks = point.family.sample_tasks(1, "test")
    batch = point.sample(actor, tasks, 2, seed=1)
    rows = transitions(batch, 0, point.action_space.low, point.action_space.high)
    obs = batch.observations[0].numpy()
    assert len(rows["rewards"]) == 10
    assert np.array_equal(rows["next_obs"][:4], obs[0, 1:5]) and np.array_equal(rows["next_obs"][4], batch.last_observations[0, 0].numpy())
    assert np.allclose(rows["actions"], batch.actions[0].reshape(-1, 2).numpy() / 0.1, atol=1e-5)  # PointNav2D: +-0.1
    assert np.abs(rows["actions"]).max() <= 1 and not rows["terminals"].any()


def test_collection_fills_replay_and_context_buffers_as_the_authors_do(point):
    c = PEARLConfig(**{**TINY, "num_train_tasks": 4, "initial_episodes": 2, "prior_episodes": 1,
                       "extra_posterior_episodes": 3, "posterior_episodes": 1})
    agent = PEARL(c, point, seed=0)
    metrics = agent.train_step([])
    H = 5
    sizes = [b.size for b in agent.replay]
    chosen = [i for i in range(4) if sizes[i] > 2 * H]
    assert len(chosen) == 2 and all(sizes[i] == (2 + 1 + 1 + 3) * H for i in chosen)
    assert all(sizes[i] == 2 * H for i in range(4) if i not in chosen)
    # the encoder buffers of the collected tasks were cleared, then got the prior and posterior episodes only
    assert all(agent.context_buffers[i].size == (1 + 1) * H for i in chosen)
    assert all(agent.context_buffers[i].size == 2 * H for i in range(4) if i not in chosen)
    assert metrics["env_steps"] == (4 * 2 + 2 * 5) * H
    # a context batch comes from the encoder buffer, an RL batch from the replay
    i = chosen[0]
    ctx = agent._context_batch([i, i])
    assert ctx.shape == (2, c.context_batch, 2 + 2 + 1)
    stored = {tuple(r) for r in np.concatenate([agent.context_buffers[i].data[k][:agent.context_buffers[i].size].reshape(10, -1)
                                               for k in ("obs", "actions", "rewards")], 1).round(5)}
    assert all(tuple(r) in stored for r in ctx.reshape(-1, 5).numpy().round(5))
    rl = agent._rl_batch([i, 0, 1])
    assert rl["obs"].shape == (3, c.batch_size, 2) and rl["terminals"].shape == (3, c.batch_size)


def test_the_actor_collects_the_same_on_both_backends():
    tasks = None
    returns = []
    for backend in ("gymnasium", "native"):
        with make_sampler("metarl/HalfCheetahVel-v0", {"max_episode_steps": 8}, backend=backend, workers=0) as s:
            agent = PEARL(PEARLConfig(**TINY), s, seed=0)
            tasks = tasks or s.family.sample_tasks(2, "test")
            batch = s.sample(agent.actor(infer=True, seed=5), tasks, 4, seed=2, episodes_per_trial=2)
            returns.append(batch.rewards.numpy())
    assert np.allclose(returns[0], returns[1], atol=1e-4)


def test_posterior_sampling_in_a_trial(side):
    agent = PEARL(PEARLConfig(**TINY), side, seed=0)
    actor = agent.actor(infer=True, seed=1)
    side.sample(actor, side.family.sample_tasks(2, "test"), 3, seed=0, episodes_per_trial=3)
    # every slot collected its 3 episodes of 4 steps, and its z is a draw from their posterior
    assert [len(c) for c in actor._context] == [12, 12]
    mean, var = actor.posterior(0)
    assert np.all(var < 1) and actor.z.shape == (2, 2)


def test_same_seed_same_numbers(side):
    runs = []
    for _ in range(2):
        agent = PEARL(PEARLConfig(**TINY), side, seed=4)
        metrics = [agent.train_step([]) for _ in range(2)]
        result = agent.evaluate_adaptation(side.family.sample_tasks(2, "test"), 1, 2, seed=3)
        runs.append((metrics, agent.state_dict(), result.returns))
    (m1, s1, r1), (m2, s2, r2) = runs
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith("time/")} for m in ms]  # noqa: E731
    assert strip(m1) == strip(m2) and np.array_equal(r1, r2)
    for key in ("policy", "q1", "encoder"):
        for name, value in s1[key].items():
            assert torch.equal(value, s2[key][name]), (key, name)
    assert torch.equal(s1["replay"][0]["obs"], s2["replay"][0]["obs"])


def test_bad_settings_are_refused_in_one_line(side):
    for bad, field in (({"meta_batch": 0}, "agent.meta_batch"), ({"entropy": "learned"}, "agent.entropy"),
                       ({"tasks_per_batch": 5}, "agent.tasks_per_batch"), ({"gamma": 1.5}, "agent.gamma"),
                       ({"hidden": ()}, "agent.hidden")):
        with pytest.raises(ValueError, match=field):
            PEARLConfig(**{**TINY, **bad})
    with pytest.raises(Exception, match="num_train_tasks <= 2"):
        task_pool(side.family, 3, seed=0)  # HiddenSide has two tasks
    with pytest.raises(ConfigError, match="agent.reward_scale"):
        load_config("experiments/pearl/point_nav_2d.yaml", ["agent.reward_scale=-1"])


def test_resume_equals_the_uninterrupted_run(tmp_path):
    """3 iterations straight, and 2 then a resume to 3: the same networks, buffers and metrics (a checkpoint
    holds every task's replay and encoder buffers, so nothing a resume needs is lost)."""
    args = ["experiments/pearl/point_nav_2d.yaml", "quick=true", "sampler.workers=0", "env_kwargs={max_episode_steps: 10}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *args, "iterations=3", "--run-dir", str(straight), "--quiet"]) == 0
    assert main(["train", *args, "iterations=2", "--run-dir", str(resumed), "--quiet"]) == 0
    assert main(["train", "--resume", str(resumed), "iterations=3", "--quiet"]) == 0
    a = torch.load(straight / "checkpoints" / "latest.pt", weights_only=True)["agent"]
    b = torch.load(resumed / "checkpoints" / "latest.pt", weights_only=True)["agent"]
    for key in ("policy", "q1", "q2_target", "encoder"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    for x, y in zip(a["replay"] + a["context_buffers"], b["replay"] + b["context_buffers"], strict=True):
        assert all(torch.equal(x[k], y[k]) for k in TaskBuffer.FIELDS)

    def metrics(path):
        rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]

    assert metrics(straight) == metrics(resumed)
    summary = json.loads((straight / "eval" / "test" / "summary.json").read_text())
    assert summary["agent"] == "pearl" and [s["adapt_episodes"] for s in summary["stages"]] == [0, 1, 2]
    assert [s["adapt_env_steps"] for s in summary["stages"]] == [0.0, 10.0, 20.0]


def test_adapted_policy_acts_and_round_trips(tmp_path):
    import gymnasium as gym

    import metarl.api as mrl
    from metarl.api import AdaptedPolicy

    learner = mrl.train("experiments/pearl/point_nav_2d.yaml", ["quick=true", "sampler.workers=0", "iterations=1",
                                                                "env_kwargs={max_episode_steps: 10}"],
                        run_dir=tmp_path / "run")
    with learner:
        env = gym.make("metarl/PointNav2D-v0", max_episode_steps=10)
        policy = learner.adapt(env, steps=2)
        assert len(policy._actor._context[0]) == 20  # two context episodes
        obs, _ = env.reset(seed=0)
        action = policy.predict(obs, deterministic=True)
        policy.save(tmp_path / "adapted.pt")
        again = AdaptedPolicy.load(tmp_path / "adapted.pt")
        assert np.array_equal(again.predict(obs, deterministic=True), action)
        assert "pearl" in mrl.load(tmp_path / "run").name


def test_probe_the_inferred_task_is_solved(side):
    """HiddenSide: the goal (+-0.8) is never observed; any policy that does not infer it averages <= -3.2 over
    the two tasks. After a test-sized training, the posterior of two context episodes solves both."""
    c = PEARLConfig(num_train_tasks=2, tasks_per_batch=2, initial_episodes=4, prior_episodes=2,
                    extra_posterior_episodes=1, train_steps=40, meta_batch=4, batch_size=32, context_batch=8,
                    hidden=(32, 32), encoder_hidden=(32, 32), lr=3e-3, reward_scale=10.0, kl_lambda=0.01,
                    gamma=0.5, latent_dim=2)
    agent = PEARL(c, side, seed=0)
    for _ in range(20):  # 20 x 40 gradient steps (these settings solved it by then for seeds 0, 1 and 2)
        agent.train_step([])
    result = agent.evaluate_adaptation(side.family.sample_tasks(2, "test"), 2, 8, seed=1)
    before, after_two = result.returns[:, 0].mean(), result.returns[:, 2].mean()
    assert after_two > -1.6 and after_two > before + 1.0, result.returns
