"""RL² training throughput beside sb3-contrib's RecurrentPPO with the same recurrent size, epochs, minibatches and
frames per update, measured side by side in one run.

    python experiments/benchmarks/rl2_speed.py [--config experiments/rl2/half_cheetah_vel_varibad.yaml]
        [--repeats 3] [--out experiments/results/rl2_vs_recurrent_ppo_speed.json] [key=value ...]

Equal work on both sides, from the RL² config (default VariBAD's RL² on HalfCheetahVel):

* frames per update: RL²'s ``tasks_per_batch x trials_per_task`` parallel trials of ``episodes_per_trial``
  episodes (16 x 2 trials of 2 x 200 steps = 12,800); RecurrentPPO the same number of envs (32) for the same
  number of steps per rollout (400), each env on one training task;
* the recurrent core: one recurrent layer of ``hidden_size`` units shared by actor and critic (RL²: a GRU;
  RecurrentPPO: an LSTM, ``shared_lstm=True, enable_critic_lstm=False``) with ``head_hidden`` tanh layers to
  each head;
* the update: ``epochs`` passes of ``minibatches`` minibatches (RL²: whole trials re-run from a zero state;
  RecurrentPPO: SB3's sequence minibatches of ``frames / minibatches`` steps), the same lr, clip and discounts.

What differs and cannot be matched is stated beside the figures: RL²'s input embeddings (small ReLU layers for
state, action and reward) and its reward input; and the sampler, which belongs to each library (RL²: metarl's
sampler, one worker process per core; RecurrentPPO: SB3's ``DummyVecEnv``, the envs stepped in its own process
one after another, as SB3 collects for recurrent policies). So three figures per side: training throughput
(collection + update, env steps per second), collection alone, and seconds per update of 12,800 frames: the
last is the learner's cost at equal work.
"""

from __future__ import annotations

from metarl.system import sleeping_openmp_threads

sleeping_openmp_threads()  # a program: PyTorch's threads sleep while they wait (set before torch loads)

import argparse
import statistics
import time
from pathlib import Path

import gymnasium as gym

import metarl
from metarl.agents.rl2 import RL2
from metarl.config import RunConfig, load_config
from metarl.provenance import Recorder, write_result
from metarl.sampling import make_sampler


def recurrent_ppo_rates(config: RunConfig, env_id: str, rollouts: int = 2) -> tuple[float, float, float]:
    """(training env steps/s, collection-only env steps/s, update seconds per rollout) of sb3-contrib's
    RecurrentPPO matched to the RL² config."""
    try:
        from sb3_contrib import RecurrentPPO
    except ImportError:
        raise SystemExit("rl2_speed.py: sb3-contrib is not installed; pip install sb3-contrib") from None
    import torch
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv

    a = config.agent
    horizon = gym.make(env_id).spec.max_episode_steps
    n_envs, n_steps = a.tasks_per_batch * a.trials_per_task, a.episodes_per_trial * horizon
    tasks = metarl.family_of(gym.make(env_id)).sample_tasks(n_envs, "train", seed=0)

    def make(task):
        def thunk():
            env = gym.make(env_id)
            metarl.family_of(env).set_task(task)
            return env
        return thunk

    class Clock(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.collect = 0.0
            self._start = 0.0

        def _on_rollout_start(self) -> None:
            self._start = time.perf_counter()

        def _on_rollout_end(self) -> None:
            self.collect += time.perf_counter() - self._start

        def _on_step(self) -> bool:
            return True

    vec = DummyVecEnv([make(t) for t in tasks])
    model = RecurrentPPO(
        "MlpLstmPolicy", vec, n_steps=n_steps, batch_size=n_envs * n_steps // a.minibatches, n_epochs=a.epochs,
        learning_rate=a.lr, gamma=a.gamma, gae_lambda=a.gae_lambda, clip_range=a.clip, ent_coef=a.entropy_coef,
        vf_coef=a.value_coef, max_grad_norm=a.max_grad_norm, seed=0, device="cpu", verbose=0,
        policy_kwargs={"lstm_hidden_size": a.hidden_size, "n_lstm_layers": 1, "shared_lstm": True,
                       "enable_critic_lstm": False, "net_arch": {"pi": list(a.head_hidden), "vf": list(a.head_hidden)},
                       "activation_fn": torch.nn.Tanh})
    model.learn(total_timesteps=n_envs * n_steps)  # warm-up rollout and update
    clock = Clock()
    steps = n_envs * n_steps * rollouts
    start = time.perf_counter()
    model.learn(total_timesteps=steps, callback=clock, reset_num_timesteps=False)
    total = time.perf_counter() - start
    vec.close()
    return steps / total, steps / clock.collect, (total - clock.collect) / rollouts


def rl2_rates(config: RunConfig, iterations: int = 4) -> tuple[float, float, float, str]:
    """(training env steps/s, collection-only env steps/s, update seconds per iteration, the sampler backend
    it ran on: "auto" resolved), over ``iterations``."""
    n = config.agent.tasks_per_batch
    with make_sampler(metarl.env_id(config.env), config.env_kwargs, config.sampler.backend, config.sampler.workers) as sampler:
        agent = RL2(config.agent, sampler, seed=0)
        agent.train_step(sampler.family.sample_tasks(n, "train", seed=0))  # warm-up: starts the workers
        start, steps, sampling, update = time.perf_counter(), agent.env_steps, 0.0, 0.0
        for i in range(iterations):
            m = agent.train_step(sampler.family.sample_tasks(n, "train", seed=i + 1))
            sampling, update = sampling + m["time/sampling_s"], update + m["time/update_s"]
        new = agent.env_steps - steps
        return new / (time.perf_counter() - start), new / sampling, update / iterations, sampler.backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).parents[1] / "rl2" / "half_cheetah_vel_varibad.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="experiments/results/rl2_vs_recurrent_ppo_speed.json")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config (a quick check)")
    args = parser.parse_args()
    recorder = Recorder()
    config = load_config(args.config, args.overrides)
    env_id = metarl.env_id(config.env)
    raw: dict[str, list[float]] = {k: [] for k in ("rl2", "rl2_collection", "rl2_update_s", "recurrent_ppo",
                                                   "recurrent_ppo_collection", "recurrent_ppo_update_s")}
    backend = None
    for r in range(args.repeats):  # interleaved, so both see the same machine load
        rate, collect, update, backend = rl2_rates(config)
        raw["rl2"].append(rate)
        raw["rl2_collection"].append(collect)
        raw["rl2_update_s"].append(update)
        rate, collect, update = recurrent_ppo_rates(config, env_id)
        raw["recurrent_ppo"].append(rate)
        raw["recurrent_ppo_collection"].append(collect)
        raw["recurrent_ppo_update_s"].append(update)
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:,.2f}" for k, v in raw.items()), flush=True)
    med = {k: statistics.median(v) for k, v in raw.items()}
    a = config.agent
    horizon = gym.make(env_id).spec.max_episode_steps
    result = {
        "benchmark": "rl2_vs_recurrent_ppo_speed", "family": config.env, "config": Path(args.config).name,
        "frames_per_update": a.tasks_per_batch * a.trials_per_task * a.episodes_per_trial * horizon,
        "matched": {"recurrent_size": a.hidden_size, "head_hidden": list(a.head_hidden), "epochs": a.epochs,
                    "minibatches": a.minibatches, "lr": a.lr, "clip": a.clip},
        "differs": ["RL²: GRU, RecurrentPPO: LSTM (about 4/3 of the GRU's recurrent weights)",
                    "RL² embeds state, action and reward by small ReLU layers; RecurrentPPO takes the observation",
                    f"sampler: RL² metarl's {backend} sampler, one worker process per core; RecurrentPPO SB3's "
                    "DummyVecEnv in its own process"],
        "rl2_sampler_backend": backend,
        "steps_per_s": {"rl2": med["rl2"], "recurrent_ppo": med["recurrent_ppo"]},
        "collection_steps_per_s": {"rl2": med["rl2_collection"], "recurrent_ppo": med["recurrent_ppo_collection"]},
        "update_s": {"rl2": med["rl2_update_s"], "recurrent_ppo": med["recurrent_ppo_update_s"]},
        "ratio_training": med["rl2"] / med["recurrent_ppo"],
        "ratio_update": med["recurrent_ppo_update_s"] / med["rl2_update_s"],
        "raw": raw,
    }
    write_result(args.out, result, recorder)
    print(f"{config.env}, {result['frames_per_update']:,} frames per update: training RL² {med['rl2']:,.0f} "
          f"steps/s, RecurrentPPO {med['recurrent_ppo']:,.0f} ({result['ratio_training']:.2f}x); update "
          f"{med['rl2_update_s']:.2f} s against {med['recurrent_ppo_update_s']:.2f} s ({result['ratio_update']:.2f}x); "
          f"written to {args.out}")


if __name__ == "__main__":
    main()
