"""RL²: trial sampling (state carried within a trial, reset between trials), input alignment, trial GAE,
determinism, and a probe task where only in-context memory helps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from probes import HiddenSide  # noqa: F401  (registers tests/HiddenSide-v0)

from metarl.agents import rl2 as rl2_module
from metarl.agents.rl2 import (
    RL2,
    NumpyRecurrentPolicy,
    RecurrentActorCritic,
    RL2Config,
    gru_sequence,
    make_inputs,
    to_trials,
)
from metarl.sampling import GymnasiumSampler


@pytest.fixture(scope="module")
def cheetah():
    s = GymnasiumSampler("metarl/HalfCheetahVel-v0", env_kwargs={"max_episode_steps": 6}, workers=0)
    yield s
    s.close()


def _small(**kw):
    base = dict(tasks_per_batch=2, trials_per_task=2, episodes_per_trial=3, hidden_size=16, epochs=1, minibatches=2)
    base.update(kw)
    return RL2Config(**base)


VARIBAD = dict(embedding="separate", reward_input="raw", head_hidden=(12,), gru_init="orthogonal",
               value_loss="huber", value_clip=True)


@pytest.mark.parametrize("options", [{}, VARIBAD], ids=["default", "varibad"])
def test_hidden_state_is_carried_within_a_trial_and_reset_between_trials(cheetah, options):
    """The sampler's GRU states, recorded step by step, equal an unroll of the whole trial from zero —
    including across the episode boundaries inside the trial — and every sample() starts from zero."""
    agent = RL2(_small(normalize_obs=False, **options), cheetah, seed=0)
    if options:  # a reward scale that is not 1, so a raw reward input differs from the scaled one
        agent.ret_rms.var = np.array(9.0)
        assert agent.reward_scale == pytest.approx(3.0) and agent.input_reward_scale == 1.0
    tasks = cheetah.family.sample_tasks(2, "train", seed=0)
    actor = agent.actor(record_hidden=True)
    assert actor.reward_scale == agent.input_reward_scale
    batch = cheetah.sample(actor, tasks, 6, seed=1, episodes_per_trial=3)
    assert batch.lengths.eq(6).all()  # 2 tasks x 2 trials x 3 episodes of 6 steps
    recorded = torch.from_numpy(np.stack(actor.hidden_log, 1))  # [slots, steps, H]: state before each step
    trials = to_trials(batch, 3)
    inputs = make_inputs(trials.obs, trials.prev_action, trials.prev_reward, trials.ended, None,
                         agent.input_reward_scale)
    with torch.no_grad():
        _, _, hiddens = agent.model.unroll(inputs, torch.zeros(4, 16))
    before = torch.cat([torch.zeros(4, 1, 16), hiddens[:, :-2]], 1)  # state before each of the 18 steps
    torch.testing.assert_close(recorded, before, rtol=1e-5, atol=1e-6)
    assert torch.all(recorded[:, 0] == 0)                    # a trial starts from a zero state
    assert recorded[:, 6].abs().sum() > 0                    # episode 2 starts with what episode 1 left
    torch.testing.assert_close(recorded[:, 6], hiddens[:, 5], rtol=1e-5, atol=1e-6)
    # A new call is a new trial: the state is zero again.
    actor2 = agent.actor(record_hidden=True)
    cheetah.sample(actor2, tasks, 6, seed=2, episodes_per_trial=3)
    assert np.all(actor2.hidden_log[0] == 0)


def test_inputs_line_up_with_previous_step_and_episode_ends(cheetah):
    """At step t the input holds action/reward of step t-1 and flags an episode end at t-1; at a trial's
    first step everything is zero."""
    agent = RL2(_small(), cheetah, seed=0)
    tasks = cheetah.family.sample_tasks(2, "train", seed=0)
    batch = cheetah.sample(agent.actor(), tasks, 6, seed=1, episodes_per_trial=3)
    tr = to_trials(batch, 3)
    assert tr.lengths.eq(18).all()
    b = 1  # task 0, trial 1 = episodes 3, 4, 5 of task 0
    assert torch.all(tr.prev_action[b, 0] == 0) and tr.prev_reward[b, 0] == 0 and tr.ended[b, 0] == 0
    torch.testing.assert_close(tr.obs[b, 6], batch.observations[0, 4, 0])       # episode 2 of the trial
    torch.testing.assert_close(tr.prev_action[b, 6], batch.actions[0, 3, 5])   # last action of episode 1
    assert tr.prev_reward[b, 6] == batch.rewards[0, 3, 5]                       # last reward of episode 1
    assert tr.ended.sum(1).eq(3).all() and tr.ended[b, 6] == 1 and tr.ended[b, 12] == 1 and tr.ended[b, 18] == 1
    assert tr.ended[b, 5] == 0 and tr.ended[b, 7] == 0
    torch.testing.assert_close(tr.obs[b, 18], batch.last_observations[0, 5])    # after the trial: bootstrap input
    assert bool(tr.last_truncated[b])


def test_trial_advantages_cross_episode_boundaries_by_hand(cheetah):
    """One trial of two 2-step episodes: rewards [1, 2 | 3, 4], values [1, 1, 1, 1] and bootstrap value 2
    after the trial (last episode truncated). gamma 0.5, lambda 1:
    returns-to-go with bootstrap: G3 = 4 + 0.5*2 = 5; G2 = 3 + 0.5*5 = 5.5; G1 = 2 + 0.5*5.5 = 4.75;
    G0 = 1 + 0.5*4.75 = 3.375 -> advantages = G - V = [2.375, 3.75, 4.5, 4]. The episode boundary between
    steps 1 and 2 does not cut the return."""
    agent = RL2(_small(gamma=0.5, gae_lambda=1.0), cheetah, seed=0)

    class T:  # the fields trial_advantages reads
        mask = torch.ones(1, 4)
        lengths = torch.tensor([4])
        last_truncated = torch.tensor([True])

    values = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0]])
    adv = agent.trial_advantages(T, values, torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    torch.testing.assert_close(adv, torch.tensor([[2.375, 3.75, 4.5, 4.0]]))
    # Without the bootstrap (or when the trial ended in a termination): G3 = 4, G2 = 5, G1 = 4.5, G0 = 3.25.
    agent.config = _small(gamma=0.5, gae_lambda=1.0, bootstrap_trial_end=False)
    adv = agent.trial_advantages(T, values, torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    torch.testing.assert_close(adv, torch.tensor([[2.25, 3.5, 4.0, 3.0]]))


def test_same_seed_same_numbers(cheetah):
    def run(seed):
        agent = RL2(_small(), cheetah, seed=seed)
        metrics = [agent.train_step(cheetah.family.sample_tasks(2, "train", seed=i)) for i in range(2)]
        flat = torch.cat([p.detach().reshape(-1) for p in agent.model.parameters()])
        return flat, [{k: v for k, v in m.items() if not k.startswith("time/")} for m in metrics]

    a, ma = run(0)
    b, mb = run(0)
    c, _ = run(1)
    assert torch.equal(a, b) and ma == mb
    assert not torch.equal(a, c)


def test_truncated_bptt_runs_and_updates(cheetah):
    agent = RL2(_small(bptt_chunk=5), cheetah, seed=0)
    before = torch.cat([p.detach().reshape(-1).clone() for p in agent.model.parameters()])
    m = agent.train_step(cheetah.family.sample_tasks(2, "train", seed=0))
    after = torch.cat([p.detach().reshape(-1) for p in agent.model.parameters()])
    assert np.isfinite(m["loss/policy"]) and not torch.equal(before, after)


def test_bad_input():
    with pytest.raises(ValueError, match="episodes_per_trial"):
        RL2Config(episodes_per_trial=0)
    with pytest.raises(ValueError, match="clip"):
        RL2Config(clip=-0.2)
    with pytest.raises(ValueError, match="lr_schedule"):
        RL2Config(lr_schedule="cosine")


def test_mismatched_checkpoint_is_refused(cheetah):
    agent = RL2(_small(), cheetah, seed=0)
    other = RL2(_small(hidden_size=8), cheetah, seed=0)
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(agent.state_dict())


@pytest.mark.parametrize("options", [{}, dict(embedding="separate", head_hidden=(6, 5), gru_init="orthogonal")],
                         ids=["default", "varibad"])
def test_recurrent_step_and_unroll_agree(options):
    model = RecurrentActorCritic(3, 2, 8, **options)
    x, h = torch.randn(4, 5, 3 + 2 + 2), torch.zeros(4, 8)
    means, values, hiddens = model.unroll(x, h)
    for t in range(5):
        mean, value, h = model.step(x[:, t], h)
        torch.testing.assert_close(mean, means[:, t])
        torch.testing.assert_close(h, hiddens[:, t])


@pytest.mark.parametrize("options", [{}, {**VARIBAD, "head_hidden": (32,)}], ids=["default", "varibad"])
def test_probe_episode_two_beats_episode_one_after_training(options):
    """Where only memory helps (HiddenSide), a trained RL² agent does clearly better in the second episode
    of a held-out trial than in the first (with either input path)."""
    with GymnasiumSampler("tests/HiddenSide-v0", workers=0) as s:
        config = RL2Config(tasks_per_batch=32, trials_per_task=2, episodes_per_trial=2, hidden_size=32, lr=3e-3,
                           epochs=4, minibatches=2, gamma=0.9, gae_lambda=0.95, normalize_obs=False, init_std=0.5,
                           **options)
        agent = RL2(config, s, seed=0)
        for it in range(110):
            agent.train_step(s.family.sample_tasks(32, "train", seed=it))
        result = agent.evaluate_adaptation(s.family.sample_tasks(2, "test"), steps=1, episodes=16, seed=0)
    episode1, episode2 = result.returns.mean(0)
    # Knowing the side, the best return is 0; guessing costs about -0.8 per step in the first episode.
    assert episode2 > episode1 + 0.3, result.returns
    assert episode2 > -0.6
    assert result.adapt_episodes == [0, 1] and result.adapt_env_steps == [0.0, 4.0]
    # within each episode: horizon 4 in 10 bins puts steps 0..3 in bins 0, 2, 5, 7; they sum to the returns
    assert result.within_episode.shape == (2, 2, 10)
    np.testing.assert_allclose(result.within_episode.sum(-1), result.returns, rtol=1e-5, atol=1e-5)
    assert np.all(result.within_episode[:, :, [1, 3, 4, 6, 8, 9]] == 0)


def test_gradient_norms_per_part(cheetah):
    """A loss on the value alone reaches encoder, GRU and critic but not the actor; the parts' squares add up
    to the total; a training step logs every part."""
    agent = RL2(_small(), cheetah, seed=0)
    model = agent.model
    inputs = torch.randn(3, 5, model.encoder.in_features)
    _, value, _ = model.unroll(inputs, torch.zeros(3, model.config["hidden_size"]))
    model.zero_grad()
    value.sum().backward()
    norms = agent.grad_norms()
    assert norms["actor"] == 0.0 and min(norms["critic"], norms["gru"], norms["encoder"]) > 0
    assert norms["total"] ** 2 == pytest.approx(sum(norms[k] ** 2 for k in ("encoder", "gru", "actor", "critic")))
    assert norms["critic"] == pytest.approx(float(torch.cat([model.value_head.weight.grad.reshape(-1),
                                                             model.value_head.bias.grad]).norm()))
    metrics = agent.train_step(cheetah.family.sample_tasks(2, "train", seed=0))
    for part in ("encoder", "gru", "actor", "critic", "total"):
        assert np.isfinite(metrics[f"loss/grad_norm_{part}"]) and metrics[f"loss/grad_norm_{part}"] > 0


def test_separate_embeddings_by_hand():
    """'separate': ReLU(W_s [obs, flag] + b), ReLU(W_a a + b), ReLU(W_r r + b), concatenated, into the GRU."""
    model = RecurrentActorCritic(3, 2, 8, embedding="separate", embed_sizes=(4, 3, 2))
    x = torch.tensor([[0.5, -1.0, 2.0, 0.3, -0.7, 1.5, 1.0]])  # obs (3), action (2), reward, flag
    e = model.encoder
    expected = torch.cat([torch.relu(e["obs"](torch.tensor([[0.5, -1.0, 2.0, 1.0]]))),
                          torch.relu(e["action"](torch.tensor([[0.3, -0.7]]))),
                          torch.relu(e["reward"](torch.tensor([[1.5]])))], -1)
    torch.testing.assert_close(model.embed(x), expected)
    assert model.gru.input_size == 9
    assert all(torch.all(b == 0) for name, b in RecurrentActorCritic(3, 2, 8, gru_init="orthogonal").gru.named_parameters()
               if "bias" in name)


def test_value_losses_by_hand():
    from metarl.agents.rl2 import value_loss

    v, old, target = torch.tensor([0.0, 3.0, 1.2]), torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.5, 0.0, 2.0])
    # squared error: 0.25, 9, 0.64; Huber (delta 1): 0.5 * 0.25, |3| - 0.5, 0.5 * 0.64
    torch.testing.assert_close(value_loss(v, old, target, "mse"), torch.tensor([0.25, 9.0, 0.64]))
    torch.testing.assert_close(value_loss(v, old, target, "huber"), torch.tensor([0.125, 2.5, 0.32]))
    # clipped at 0.1 around the old value: v_clip = 0, 1.1, 1.1 -> mse 0.25, 1.21, 0.81; the max of both
    torch.testing.assert_close(value_loss(v, old, target, "mse", clip=0.1), torch.tensor([0.25, 9.0, 0.81]))


def test_new_options_validated_and_train(cheetah):
    from metarl.config import ConfigError, load_config

    base = {"experiment": "x", "env": "PointNav2D", "agent": {"name": "rl2"}}
    for field, value in (("embedding", "mlp"), ("reward_input", "log"), ("gru_init", "xavier"),
                         ("value_loss", "l1"), ("embed_sizes", [32, 16]), ("head_hidden", [0])):
        with pytest.raises(ConfigError, match=f"agent.{field}"):
            load_config(None, data={**base, "agent": {"name": "rl2", field: value}})
    agent = RL2(_small(**VARIBAD), cheetah, seed=0)
    before = [p.detach().clone() for p in agent.model.parameters()]
    for it in range(2):
        metrics = agent.train_step(cheetah.family.sample_tasks(2, "train", seed=it))
    assert all(np.isfinite(v) for v in metrics.values())
    assert all(not torch.equal(a, b) for a, b in zip(before, agent.model.parameters(), strict=True))


def test_gru_sequence_matches_nn_gru_and_its_gradient_by_finite_differences():
    """The numpy GRU (forward and hand-written backward) is PyTorch's GRU: gradcheck in float64 against
    finite differences, and the same outputs and gradients as autograd through ``nn.GRU`` in float32."""
    torch.manual_seed(0)
    gru = torch.nn.GRU(5, 4, batch_first=True).double()
    x = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    weights = (gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)
    assert torch.autograd.gradcheck(gru_sequence, (x, h0, *weights))

    gru = torch.nn.GRU(6, 8, batch_first=True)
    x, h0 = torch.randn(5, 40, 6, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    weights = (gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)
    g_out = torch.randn(5, 40, 8)
    ref, _ = gru(x, h0.unsqueeze(0))
    ref_grads = torch.autograd.grad(ref, (x, h0, *weights), g_out)
    out = gru_sequence(x, h0, *weights)
    grads = torch.autograd.grad(out, (x, h0, *weights), g_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [{}, dict(embedding="separate", head_hidden=(6, 5), gru_init="orthogonal")],
                         ids=["default", "varibad"])
def test_unroll_is_the_same_function_on_either_gru_path(options, monkeypatch):
    """Up to NUMPY_GRU_MAX_BATCH sequences the update's unroll runs `gru_sequence`, above it ``nn.GRU``:
    same outputs and parameter gradients; and the sampler's numpy step equals the model's step."""
    model = RecurrentActorCritic(3, 2, 8, **options)
    x, h = torch.randn(4, 9, 3 + 2 + 2), torch.randn(4, 8)
    results = []
    for limit in (64, 0):  # numpy path, then nn.GRU
        monkeypatch.setattr(rl2_module, "NUMPY_GRU_MAX_BATCH", limit)
        model.zero_grad()
        means, values, hiddens = model.unroll(x, h)
        (means.square().sum() + values.sum() + hiddens.sum()).backward()
        results.append((means, values, hiddens, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (m1, v1, h1, g1), (m2, v2, h2, g2) = results
    torch.testing.assert_close(m1, m2)
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(h1, h2)
    assert len(g1) == len(g2) == len(list(model.parameters())) - 1  # all but log_std, which the loss skips
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    policy = NumpyRecurrentPolicy(model)
    with torch.no_grad():
        mean, _, h_next = model.step(x[:, 0], h)
    np_mean, np_h = policy.step(x[:, 0].numpy(), h.numpy())
    np.testing.assert_allclose(np_mean, mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np_h, h_next.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(policy.std, model.log_std.exp().detach().numpy(), rtol=1e-6)
