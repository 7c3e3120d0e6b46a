"""RL² training throughput beside Stable-Baselines3 PPO on the same family, measured in one run.

    python experiments/benchmarks/rl2_speed.py [--config experiments/rl2/half_cheetah_vel_varibad.yaml]
        [--repeats 3] [--out experiments/results/rl2_speed.json]

Both numbers are env steps per second of *training* (collection + update), medians over ``--repeats``:

* RL²: ``RL2.train_step`` with the config's agent settings (default: VariBAD's RL² on HalfCheetahVel, 16 tasks
  x 2 trials x 2 episodes = 12,800 frames per update, GRU 128, 2 epochs x 4 minibatches of whole trials) on
  the config's sampler (default: the native backend, one worker per core); its collection-only rate and
  update time are reported too;
* SB3 PPO: ``PPO("MlpPolicy")`` with 8 envs in a ``DummyVecEnv`` (SB3's defaults: 2048 steps per env per
  rollout, 10 epochs, minibatch 64), ``learn`` for two rollouts, each env set to a training task.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import gymnasium as gym
import torch

import metarl
from metarl.agents.rl2 import RL2
from metarl.config import RunConfig, load_config
from metarl.provenance import Recorder, write_result
from metarl.sampling import make_sampler


def sb3_ppo_rate(env_id: str, n_envs: int = 8, rollouts: int = 2) -> float:
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    tasks = metarl.family_of(gym.make(env_id)).sample_tasks(n_envs, "train", seed=0)

    def make(task):
        def thunk():
            env = gym.make(env_id)
            metarl.family_of(env).set_task(task)
            return env
        return thunk

    vec = DummyVecEnv([make(t) for t in tasks])
    model = PPO("MlpPolicy", vec, seed=0, device="cpu", verbose=0)
    steps = model.n_steps * n_envs * rollouts
    start = time.perf_counter()
    model.learn(total_timesteps=steps)
    rate = steps / (time.perf_counter() - start)
    vec.close()
    return rate


def rl2_rate(config: RunConfig, iterations: int = 4) -> tuple[float, float, float, str]:
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
    parser.add_argument("--out", default="experiments/results/rl2_speed.json")
    args = parser.parse_args()
    recorder = Recorder()
    config = load_config(args.config)
    env_id = metarl.env_id(config.env)
    rl2, collect, update, sb3 = [], [], [], []
    for r in range(args.repeats):  # interleaved, so both see the same machine load
        rate, collect_rate, update_s, backend = rl2_rate(config)
        rl2.append(rate)
        collect.append(collect_rate)
        update.append(update_s)
        sb3.append(sb3_ppo_rate(env_id))
        print(f"repeat {r + 1}: RL² {rl2[-1]:,.0f} steps/s (collection {collect_rate:,.0f}/s, update {update_s:.2f} s), "
              f"SB3 PPO {sb3[-1]:,.0f} steps/s", flush=True)
    a = config.agent
    result = {
        "benchmark": "rl2_speed", "family": config.env, "config": Path(args.config).name, "cpus": os.cpu_count(),
        "torch": str(torch.__version__), "sampler_backend": backend,
        "frames_per_update": a.tasks_per_batch * a.trials_per_task * a.episodes_per_trial * gym.make(env_id).spec.max_episode_steps,
        "rl2_steps_per_s": statistics.median(rl2), "sb3_ppo_steps_per_s": statistics.median(sb3),
        "ratio_rl2_over_sb3": statistics.median(rl2) / statistics.median(sb3),
        "rl2_collection_steps_per_s": statistics.median(collect), "rl2_update_s": statistics.median(update),
        "raw": {"rl2": rl2, "rl2_collection": collect, "rl2_update_s": update, "sb3_ppo": sb3},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, result, recorder)
    print(f"{config.env}: RL² {result['rl2_steps_per_s']:,.0f} steps/s, SB3 PPO {result['sb3_ppo_steps_per_s']:,.0f} "
          f"steps/s (ratio {result['ratio_rl2_over_sb3']:.2f}); written to {args.out}")


if __name__ == "__main__":
    main()
