"""The Python API: train and load runs, adapt a trained MAML-TRPO and a trained RL² to env instances built
by hand (tasks of our own choosing, not drawn from the family's lists), act, save and load the result."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from probes import HiddenSide  # noqa: F401  (registers tests/HiddenSide-v0)

import metarl
import metarl.api as mrl
from metarl.config import ConfigError, load_config
from metarl.tasks import DirectionTask, GoalTask

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def maml_run(tmp_path_factory):
    """A short real MAML-TRPO run on PointNav2D (the shipped config, smaller batches, in-process sampler)."""
    folder = tmp_path_factory.mktemp("maml") / "run"
    config = load_config(ROOT / "experiments/maml_trpo/point_nav_2d.yaml",
                         ["iterations=15", "agent.tasks_per_batch=10", "agent.episodes_per_task=10",
                          "agent.hidden=[32, 32]", "eval.every=0", "eval.tasks=4", "eval.steps=1",
                          "eval.episodes=4", "sampler.workers=0"])
    with mrl.train(config, run_dir=folder) as learner:
        assert learner.agent.iteration == 15
    return folder


@pytest.fixture(scope="module")
def rl2_run(tmp_path_factory):
    """A short real RL² run on the HiddenSide probe (only memory of the first episode helps in the second)."""
    folder = tmp_path_factory.mktemp("rl2") / "run"
    data = {"experiment": "rl2/hidden_side", "env": "tests/HiddenSide-v0", "seed": 0, "iterations": 110,
            "agent": {"name": "rl2", "tasks_per_batch": 32, "trials_per_task": 2, "episodes_per_trial": 2,
                      "hidden_size": 32, "lr": 3e-3, "epochs": 4, "minibatches": 2, "gamma": 0.9,
                      "gae_lambda": 0.95, "normalize_obs": False, "init_std": 0.5},
            "sampler": {"backend": "gymnasium", "workers": 0}, "checkpoint_every": 50,
            "eval": {"every": 0, "split": "test", "tasks": 2, "steps": 1, "episodes": 4}}
    mrl.train(load_config(None, data=data), run_dir=folder).close()
    return folder


def test_maml_adapts_to_a_goal_of_our_own(maml_run, tmp_path):
    """A goal not in PointNav2D's lists, set by hand: one gradient step on 10 episodes collected in that env
    beats the unadapted policy; the adapted policy saved and loaded acts the same."""
    with mrl.load(maml_run) as learner:
        assert learner.name == "maml_trpo" and learner.agent.iteration == 15
        env = gym.make("metarl/PointNav2D-v0")
        metarl.family_of(env).set_task(GoalTask("PointNav2D", (0.37, -0.29)))
        unadapted = learner.adapt(env, steps=0)
        adapted = learner.adapt(env, steps=1, episodes=10, seed=0)
        before = np.mean(unadapted.run_episodes(env, 5, seed=100, deterministic=True))
        after = np.mean(adapted.run_episodes(env, 5, seed=100, deterministic=True))
        assert after > before + 0.2 * abs(before), (before, after)
        # an env's actions: clipped to its bounds, policy units times action_scale
        action = adapted.predict(env.reset(seed=0)[0])
        assert action.shape == (2,) and np.all(np.abs(action) <= 0.1 + 1e-6)

        path = adapted.save(tmp_path / "adapted.pt")
        loaded = mrl.AdaptedPolicy.load(path)
        obs = env.reset(seed=3)[0]
        np.testing.assert_array_equal(loaded.predict(obs, deterministic=True), adapted.predict(obs, deterministic=True))
        assert np.mean(loaded.run_episodes(env, 2, seed=100, deterministic=True)) == pytest.approx(after)


def test_rl2_adapts_in_context_on_an_env_built_by_hand(rl2_run, tmp_path):
    """RL² carries its hidden state out of the adaptation trial: after one episode of context its next
    episode beats its first; saved mid-trial and loaded, it continues the same.

    Judged over both sides, not one: a trained policy's first action leans to one side, and which side is
    a matter of the seed and of the CPU's floating-point path (one side's first episode alone ran from -0.14
    to -1.75 over seeds 0-4 here, and seed 0's side -1 gained only 0.23 from episode 1 to 2). Over both sides
    the first episode cannot beat -0.8 (its first action is the same for d = +1 and d = -1, and
    |a - 0.8| + |a + 0.8| >= 1.6), whatever the machine; the second episode, with the first one in memory,
    reached -0.03 to -0.08 on average over both sides (seeds 0-4, 1 and 2 threads, identical per seed).
    """
    firsts, seconds = [], []
    with mrl.load(rl2_run) as learner:
        env = gym.make("tests/HiddenSide-v0")
        for side in (-1.0, 1.0):
            metarl.family_of(env).set_task(DirectionTask("HiddenSide", side))
            firsts.append(learner.adapt(env, steps=0).run_episodes(env, 1, seed=0, deterministic=True)[0])
            adapted = learner.adapt(env, steps=1, seed=0)
            path = adapted.save(tmp_path / f"rl2{side:+.0f}.pt")
            seconds.append(adapted.run_episodes(env, 1, seed=0, deterministic=True)[0])
            loaded = mrl.AdaptedPolicy.load(path)
            assert loaded.run_episodes(env, 1, seed=0, deterministic=True)[0] == pytest.approx(seconds[-1], abs=1e-6)
    first, second = np.mean(firsts), np.mean(seconds)
    assert first <= -0.8 + 1e-6, firsts  # the bound above: no policy's first episode does better on average
    assert second > -0.4, (firsts, seconds)  # memory of episode 1: at least half the unavoidable loss recovered


def test_the_reward_ablation_tells_a_policy_that_reads_its_rewards(rl2_run):
    """experiments/benchmarks/rl2_reward_ablation.py on the HiddenSide RL² run, whose only clue to the side is the
    reward: the policy reads exactly what each condition says, and in the second episode the real rewards beat
    the other task's (a policy fed the other side's rewards acts as on the other side: about 4 x 1.6 lost)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rl2_reward_ablation",
                                                  ROOT / "experiments/benchmarks/rl2_reward_ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    with mrl.load(rl2_run) as learner:
        tasks = [DirectionTask("HiddenSide", 1.0), DirectionTask("HiddenSide", -1.0)]
        real = ablation.run(learner, tasks, 2, "reward", 0, None, deterministic=True)
        other = ablation.run(learner, tasks, 2, "other_task", 0, real["given"], deterministic=True)
        zero = ablation.run(learner, tasks, 2, "zero", 0, None, deterministic=True)
    assert real["given"].shape == (2, 2, 4)
    np.testing.assert_allclose(real["given"].sum(-1), real["returns"], rtol=1e-5)  # the env's own rewards
    np.testing.assert_array_equal(other["given"], real["given"][::-1])  # task i read task i+1's (of two)
    assert not zero["given"].any()
    assert real["returns"][:, 1].mean() > -0.4, real["returns"]
    assert other["returns"][:, 1].mean() < real["returns"][:, 1].mean() - 2.0, (real["returns"], other["returns"])


def test_evaluate_writes_the_protocols_summary(maml_run):
    with mrl.load(maml_run) as learner:
        summary = learner.evaluate(tasks=3, steps=1, episodes=2)
    assert [s["stage"] for s in summary["stages"]] == [0, 1]
    assert (maml_run / "eval" / "test" / "summary.json").is_file()
    with mrl.load(maml_run) as learner:
        with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
            learner.evaluate(tasks=3, steps=1, episodes=2, repeats=0)
        pooled = learner.evaluate(tasks=3, steps=1, episodes=2, repeats=2)
    assert pooled["num_tasks"] == 6
    assert pooled["stages"][0]["per_task"][:3] == pytest.approx(summary["stages"][0]["per_task"], abs=1e-9)
    assert (maml_run / "eval" / "test-repeats2" / "summary.json").is_file()


def test_bad_input_is_one_clear_error(maml_run, tmp_path):
    with mrl.load(maml_run) as learner:
        with pytest.raises(ValueError, match=r"observation and action shapes .* differ"):
            learner.adapt(gym.make("Pendulum-v1"))
        with pytest.raises(ValueError, match="steps must be >= 0"):
            learner.adapt(gym.make("metarl/PointNav2D-v0"), steps=-1)
        policy = learner.adapt(gym.make("metarl/PointNav2D-v0"), steps=0)
        with pytest.raises(ValueError, match="non-finite"):
            policy.predict(np.array([np.nan, 0.0]))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a policy")
    with pytest.raises(ConfigError, match="not an adapted policy") as err:
        mrl.AdaptedPolicy.load(bad)
    assert len(str(err.value).splitlines()) == 1
    text = tmp_path / "notes.yaml"
    text.write_text("experiment: x\n")
    with pytest.raises(ConfigError, match="not an adapted policy"):
        mrl.AdaptedPolicy.load(text)
    with pytest.raises(ConfigError, match="not a run folder"):
        mrl.load(tmp_path)


@pytest.fixture(scope="module")
def pearl_run(tmp_path_factory):
    """A tiny real PEARL run on PointNav2D (episodes of 10 steps)."""
    folder = tmp_path_factory.mktemp("pearl") / "run"
    mrl.train(ROOT / "experiments/pearl/point_nav_2d.yaml", ["quick=true", "sampler.workers=0", "iterations=1",
                                                             "env_kwargs={max_episode_steps: 10}"], run_dir=folder).close()
    return folder


def _episodes(recorded: dict) -> list[mrl.Episode]:
    """The episodes of one rollout call (one task) as `Episode` records, as a user would have logged them."""
    out = []
    for e in range(recorded["rewards"].shape[1]):
        t = int(recorded["mask"][0, e].sum())
        out.append(mrl.Episode(recorded["observations"][0, e, :t], recorded["actions"][0, e, :t],
                               recorded["rewards"][0, e, :t], bool(recorded["terminated"][0, e]),
                               recorded["last_observations"][0, e]))
    return out


@pytest.mark.parametrize("name", ["maml", "rl2", "pearl"])
def test_adapting_on_recorded_episodes_gives_what_adapt_gave(name, maml_run, rl2_run, pearl_run, monkeypatch):
    """`adapt_on` with the episodes `adapt` collected (logged as a user would: observations, the policy's
    actions, rewards) returns the policy `adapt` returned: same parameters (MAML-TRPO), same hidden state
    (RL²), same context and z (PEARL, whose actions pass through the env's box and back: to float rounding)."""
    run, env_id, goal, steps = {"maml": (maml_run, "metarl/PointNav2D-v0", (0.37, -0.29), 1),
                                "rl2": (rl2_run, "tests/HiddenSide-v0", None, 2),
                                "pearl": (pearl_run, "metarl/PointNav2D-v0", (0.2, 0.3), 2)}[name]
    env = gym.make(env_id, **({"max_episode_steps": 10} if name == "pearl" else {}))
    if goal is not None:
        metarl.family_of(env).set_task(GoalTask("PointNav2D", goal))
    calls = []

    def recording(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        return calls[-1]

    real = mrl.rollout
    with mrl.load(run) as learner:
        monkeypatch.setattr(mrl, "rollout", recording)
        adapted = learner.adapt(env, steps=steps, episodes=4, seed=3)
        monkeypatch.setattr(mrl, "rollout", real)
        episodes = [ep for call in calls for ep in _episodes(call)]
        stages = [episodes] if name == "maml" else [[ep] for ep in episodes]
        replayed = learner.adapt_on(stages, seed=3)
        assert replayed.adapted_steps == adapted.adapted_steps == steps
        env.observation_space.seed(0)
        for _ in range(4):
            obs = env.observation_space.sample()
            a, b = adapted.predict(obs, deterministic=True), replayed.predict(obs, deterministic=True)
            if name == "pearl":
                np.testing.assert_allclose(a, b, atol=1e-4)
            else:
                np.testing.assert_array_equal(a, b)
            adapted.observe(0.0, False)
            replayed.observe(0.0, False)
        # acting on a batch of 3 envs of the task: each row is what the adapted policy does alone (float rounding)
        obs = env.observation_space.sample()
        alone = learner.adapt_on(stages, seed=3).predict(obs, deterministic=True)
        rows, _, _ = learner.adapt_on(stages, seed=3).sample(np.stack([obs] * 3), deterministic=True)
        np.testing.assert_allclose(rows, np.repeat(alone[None], 3, 0), rtol=1e-5, atol=1e-6)
        # no stages: the unadapted policy, without an env (Meta-World's adapter starts every evaluation from it)
        unadapted, fresh = learner.adapt(env, steps=0, seed=3), learner.adapt_on([], seed=3)
        assert fresh.adapted_steps == 0 and fresh.stateful == unadapted.stateful == (name != "maml")
        np.testing.assert_allclose(fresh.predict(obs, deterministic=True), unadapted.predict(obs, deterministic=True),
                                   atol=1e-6)


def test_episodes_from_a_plain_gymnasium_loop(maml_run, rl2_run):
    """Collected by hand, no metarl sampler: MAML-TRPO adapts on 10 episodes of its unadapted policy and then acts
    on a batch of observations; RL² replayed through the two episodes its live policy ran equals that policy."""
    env = gym.make("metarl/PointNav2D-v0")
    metarl.family_of(env).set_task(GoalTask("PointNav2D", (0.37, -0.29)))

    def run_episode(policy, seed: int) -> mrl.Episode:
        obs, _ = env.reset(seed=seed)
        rows, done = [], False
        while not done:
            action, raw, _ = policy.sample(obs)
            nxt, reward, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
            policy.observe(float(reward), done)
            rows.append((obs, raw, reward))
            obs = nxt
        return mrl.Episode(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]),
                           np.array([r[2] for r in rows]), bool(terminated), obs)

    with mrl.load(maml_run) as learner:
        unadapted = learner.adapt(env, steps=0, seed=0)
        episodes = [run_episode(unadapted, seed=s) for s in range(10)]
        assert np.abs(episodes[0].actions).max() > 0.1  # raw: policy units, before action_scale 0.1 and clipping
        adapted = learner.adapt_on([episodes])
        obs = np.stack([env.reset(seed=100 + i)[0] for i in range(5)])
        actions, raw, _ = adapted.sample(obs, deterministic=True)
        assert actions.shape == raw.shape == (5, 2) and np.all(np.abs(actions) <= 0.1 + 1e-6)
        # a row of the batch is the single observation's action to float rounding (a matmul of 5 rows or of 1)
        np.testing.assert_allclose(actions[2], adapted.predict(obs[2], deterministic=True), rtol=1e-5, atol=1e-7)
        before = np.mean(unadapted.run_episodes(env, 5, seed=100, deterministic=True))
        after = np.mean(adapted.run_episodes(env, 5, seed=100, deterministic=True))
        assert after > before, (before, after)
        with pytest.raises(ValueError, match=r"adapt_on: stage 0 episode 1: expected observations \[T, 2\]"):
            learner.adapt_on([[episodes[0], mrl.Episode(np.zeros((3, 5)), np.zeros((3, 2)), np.zeros(3))]])
        with pytest.raises(ValueError, match=r"every stage must hold as many episodes as the first, got \[3, 7\]"):
            learner.adapt_on([episodes[:3], episodes[3:]])

    side = gym.make("tests/HiddenSide-v0")
    metarl.family_of(side).set_task(DirectionTask("HiddenSide", -1.0))
    env = side
    with mrl.load(rl2_run) as learner:
        live = learner.adapt(side, steps=0, seed=0)
        episodes = [run_episode(live, seed=s) for s in range(2)]
        # another seed than the live policy's: its own noise differs, the recorded actions replace it
        replayed = learner.adapt_on([[ep] for ep in episodes], seed=7)
        obs = side.reset(seed=9)[0]
        np.testing.assert_array_equal(replayed.predict(obs, deterministic=True), live.predict(obs, deterministic=True))
        # a batch of 3 envs of the task: each continues the adapted hidden state (so acts as the policy would
        # alone, to float rounding), and from then on the policy runs those 3 envs
        single = learner.adapt_on([[ep] for ep in episodes], seed=7).predict(np.zeros(1), deterministic=True)
        batched = learner.adapt_on([[ep] for ep in episodes], seed=7)
        actions, _, _ = batched.sample(np.zeros((3, 1)), deterministic=True)
        np.testing.assert_allclose(actions, np.repeat(single[None], 3, 0), rtol=1e-5, atol=1e-6)
        batched.observe(np.array([-0.1, -0.2, -0.3]), np.array([False, False, True]))
        with pytest.raises(ValueError, match="runs 3 envs"):
            batched.predict(np.zeros(1))
        with pytest.raises(ValueError, match="used 1 of the 2 episodes given"):
            learner.adapt_on([episodes])


def test_the_acting_calls_log_prob_is_the_policys_density(maml_run, rl2_run, pearl_run):
    """`sample`'s log_prob is the log-density of its raw action: MAML-TRPO's equals the training policy's own
    log_prob (summed over dimensions); RL²'s the Gaussian at the raw mean the same state gives deterministically;
    PEARL's torch's tanh-squashed, box-scaled Gaussian at the actor's pre-squash sample."""
    import torch

    env = gym.make("metarl/PointNav2D-v0")
    obs = env.reset(seed=0)[0]
    with mrl.load(maml_run) as learner:
        s = learner.adapt(env, steps=0).sample(obs)
        with torch.no_grad():
            expected = learner.agent.policy.log_prob(torch.as_tensor(obs)[None], torch.as_tensor(s.raw)[None])
        assert s.log_prob == pytest.approx(float(expected), rel=1e-5)
        batch = learner.adapt(env, steps=0).sample(np.stack([obs, obs]))
        assert batch.log_prob.shape == (2,)
    side = gym.make("tests/HiddenSide-v0")
    with mrl.load(rl2_run) as learner:
        mean = learner.adapt(side, steps=0, seed=0).sample(np.zeros(1), deterministic=True).raw  # unclipped
        s = learner.adapt(side, steps=0, seed=0).sample(np.zeros(1))
        std = learner.agent.model.log_std.detach().exp().double()
        expected = torch.distributions.Normal(torch.as_tensor(mean).double(), std).log_prob(
            torch.as_tensor(s.raw).double()).sum()
        assert s.log_prob == pytest.approx(float(expected), rel=1e-4)
        assert learner.adapt(side, steps=0, seed=0).sample(np.zeros(1), deterministic=True).log_prob == pytest.approx(
            float(-(std.log() + 0.5 * np.log(2 * np.pi)).sum()), rel=1e-5)
    small = gym.make("metarl/PointNav2D-v0", max_episode_steps=10)
    with mrl.load(pearl_run) as learner:
        policy = learner.adapt(small, steps=0, seed=0)
        s = policy.sample(obs)
        noise, log_std, u = (torch.as_tensor(np.asarray(x, np.float64)) for x in policy._actor._density)
        scale = torch.as_tensor((policy.high - policy.low) / 2)
        squashed = torch.distributions.TransformedDistribution(
            torch.distributions.Normal(u - log_std.exp() * noise, log_std.exp()),
            [torch.distributions.TanhTransform(), torch.distributions.AffineTransform(torch.zeros_like(scale), scale)])
        expected = squashed.log_prob(torch.as_tensor(s.raw, dtype=torch.float64)[None].clamp(-0.0999999, 0.0999999)).sum()
        assert s.log_prob == pytest.approx(float(expected), rel=1e-3)
