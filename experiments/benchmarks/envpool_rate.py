"""EnvPool's C++ MuJoCo HalfCheetah-v5 (or ``--env``, e.g. ``MetaWorld/Reach-v3``) stepped with the policy inference `metarl speed` gives every method: run
by `metarl speed --envpool-python PYTHON` in a Python environment of its own (EnvPool pins numpy < 2), it prints
one JSON line ``{"rate": env steps per second, "envpool": version}``; only the stepping loop is timed.
experiments/benchmarks/metaworld_speed.py times EnvPool's native Meta-World v3 envs with ``--env``.

    PYTHON experiments/benchmarks/envpool_rate.py --steps 160000 --envs 16 --threads 2 --horizon 200 --seed 0
"""

from __future__ import annotations

import argparse
import json
import time

import envpool
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--env", default="HalfCheetah-v5", help="EnvPool task id (default HalfCheetah-v5)")
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--horizon", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    env = envpool.make(args.env, env_type="gymnasium", num_envs=args.envs, batch_size=args.envs,
                       num_threads=args.threads, seed=args.seed, max_episode_steps=args.horizon)
    rng = np.random.default_rng(args.seed)
    obs, _ = env.reset()
    obs_dim, act_dim = obs.shape[1], env.action_space.shape[0]
    w1, w2, w3 = (rng.normal(size=shape) / np.sqrt(shape[0]) for shape in ((obs_dim, 64), (64, 64), (64, act_dim)))
    low, high = env.action_space.low, env.action_space.high
    done = 0
    start = time.perf_counter()
    while done < args.steps:
        mean = np.tanh(np.tanh(obs @ w1) @ w2) @ w3
        obs, *_ = env.step(np.clip(mean + rng.normal(size=mean.shape), low, high).astype(np.float64))
        done += args.envs
    print(json.dumps({"rate": done / (time.perf_counter() - start), "envpool": envpool.__version__}))


if __name__ == "__main__":
    main()
