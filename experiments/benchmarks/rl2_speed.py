"""RL² training throughput beside Stable-Baselines3 PPO on the same family, measured in one run.

    python experiments/benchmarks/rl2_speed.py [--family HalfCheetahVel] [--repeats 3] [--out experiments/results/rl2_speed.json]

Both numbers are env steps per second of *training* (collection + update), medians over ``--repeats``:

* RL²: ``RL2.train_step`` at the experiment's default setting (16 tasks x 1 trial x 2 episodes, GRU 128,
  2 epochs x 4 minibatches) on the default sampler (one worker per core);
* SB3 PPO: ``PPO("MlpPolicy")`` with 8 envs in a ``DummyVecEnv`` (SB3's defaults: 2048 steps per env per
  rollout, 10 epochs, minibatch 64), ``learn`` for two rollouts, each env set to a training task.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import gymnasium as gym
import torch

import metarl
from metarl.agents.rl2 import RL2, RL2Config
from metarl.sampling import GymnasiumSampler


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


def rl2_rate(env_id: str, iterations: int = 4) -> float:
    with GymnasiumSampler(env_id) as sampler:
        agent = RL2(RL2Config(), sampler, seed=0)
        agent.train_step(sampler.family.sample_tasks(16, "train", seed=0))  # warm-up: starts the workers
        start, steps = time.perf_counter(), agent.env_steps
        for i in range(iterations):
            agent.train_step(sampler.family.sample_tasks(16, "train", seed=i + 1))
        return (agent.env_steps - steps) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="HalfCheetahVel")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="experiments/results/rl2_speed.json")
    args = parser.parse_args()
    env_id = metarl.env_id(args.family)
    rl2, sb3 = [], []
    for r in range(args.repeats):  # interleaved, so both see the same machine load
        rl2.append(rl2_rate(env_id))
        sb3.append(sb3_ppo_rate(env_id))
        print(f"repeat {r + 1}: RL² {rl2[-1]:,.0f} steps/s, SB3 PPO {sb3[-1]:,.0f} steps/s", flush=True)
    result = {
        "benchmark": "rl2_speed", "family": args.family, "cpus": os.cpu_count(), "torch": str(torch.__version__),
        "rl2_steps_per_s": statistics.median(rl2), "sb3_ppo_steps_per_s": statistics.median(sb3),
        "ratio_rl2_over_sb3": statistics.median(rl2) / statistics.median(sb3),
        "raw": {"rl2": rl2, "sb3_ppo": sb3},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.family}: RL² {result['rl2_steps_per_s']:,.0f} steps/s, SB3 PPO {result['sb3_ppo_steps_per_s']:,.0f} "
          f"steps/s (ratio {result['ratio_rl2_over_sb3']:.2f}); written to {args.out}")


if __name__ == "__main__":
    main()
