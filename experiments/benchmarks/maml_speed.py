"""Speed of MAML-TRPO's sampling and of a full meta-iteration at the standard HalfCheetahVel setting.

    python experiments/benchmarks/maml_speed.py [--repeats 3] [--backends gymnasium native]
                                                [--out experiments/results/maml_speed.json]

Measures in one run (so the ratios are fair on a shared, noisy machine), medians over ``--repeats``:

* Gymnasium's own single-env step rate: ``gymnasium.make("HalfCheetah-v5").step`` with random actions;
* for each sampler backend: the sampler collecting the standard meta-batch, 40 tasks x 20 episodes x 200
  steps, policy inference included (Gaussian MLP 64x64, per-task parameters), on all cores; and a full
  MAML-TRPO iteration at the anchors' setting (pre- and post-adaptation sampling, inner step,
  second-order TRPO outer step), split into sampling and update time;
* ``--fisher-subsample 1 4``: the update at learn2learn's HalfCheetah figure setting
  (experiments/maml_trpo/l2l_half_cheetah_fwd_bwd.yaml: 40 x 20 x 200, (100, 100) ReLU) with each
  ``agent.fisher_subsample``, taken in turn on the same recorded meta-batches (so the ratio is fair on
  shared cores): conjugate gradient's products, the meta-gradient and the line search, and the cosine
  between each setting's CG direction and the exact one.
"""

from __future__ import annotations

from metarl.system import sleeping_openmp_threads

sleeping_openmp_threads()  # a program: PyTorch's threads sleep while they wait (set before torch loads)

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import metarl
from metarl.agents.maml_trpo import MAMLTRPO, MAMLTRPOConfig
from metarl.policies import GaussianActor, GaussianMLPPolicy
from metarl.provenance import Recorder, write_result
from metarl.sampling import Sampler
from metarl.speed import gym_env_rate


def gymnasium_single_env_rate(steps: int = 5000) -> float:
    env = gym.make("HalfCheetah-v5")
    try:
        return gym_env_rate(env, steps, seed=0)
    finally:
        env.close()


def fisher_subsample_update_times(values: list[int], repeats: int) -> dict:
    """Update time (everything after sampling) at learn2learn's figure setting for each fisher_subsample,
    on ``repeats`` recorded meta-batches, each setting in turn on the same batch."""
    import dataclasses

    from metarl.config import load_config, shipped
    from metarl.optim import conjugate_gradient
    from metarl.training import build_agent

    config = load_config(shipped() / "maml_trpo" / "l2l_half_cheetah_fwd_bwd.yaml", ["sampler.backend=native"])
    sampler, agent = build_agent(config)
    recorded = []
    operators = agent.trpo_operators
    agent.trpo_operators = lambda theta, outer: recorded.append(outer) or operators(theta, outer)
    try:
        for r in range(repeats):  # also trains a little, so the batches are not all at the initial policy
            agent.train_step(sampler.family.sample_tasks(config.agent.tasks_per_batch, "train", seed=200 + r))
    finally:
        sampler.close()
    agent.trpo_operators = operators
    base, theta = agent.config, agent.policy.params()
    times: dict[int, list[float]] = {k: [] for k in values}
    cosines: dict[int, list[float]] = {k: [] for k in values}
    for outer in recorded:
        exact = None
        for k in sorted(values):
            agent.config = dataclasses.replace(base, fisher_subsample=k)
            start = time.perf_counter()
            loss, grad, fvp = agent.trpo_operators(theta, outer)
            direction = conjugate_gradient(fvp, -grad, iters=base.cg_iters)
            fvp(direction)  # the step's scale, 0.5 s^T F s
            agent.meta_objective(theta, outer, create_graph=False)  # one line-search evaluation
            times[k].append(time.perf_counter() - start)
            exact = direction if exact is None else exact  # the smallest value's (1: exact)
            cosines[k].append(float(torch.dot(direction, exact) / (direction.norm() * exact.norm())))
            print(f"fisher_subsample {k}: update {times[k][-1]:.2f} s, CG direction cosine to "
                  f"fisher_subsample {min(values)}: {cosines[k][-1]:.4f}")
    agent.config = base
    reference = statistics.median(times[min(values)])
    return {"config": "experiments/maml_trpo/l2l_half_cheetah_fwd_bwd.yaml", "repeats": repeats,
            "update_s": {str(k): statistics.median(t) for k, t in times.items()},
            "speedup_over_smallest": {str(k): reference / statistics.median(t) for k, t in times.items()},
            "cg_direction_cosine": {str(k): statistics.median(c) for k, c in cosines.items()},
            "raw": {"update_s": {str(k): t for k, t in times.items()}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=3, help="full MAML iterations to time")
    parser.add_argument("--backends", nargs="*", default=["gymnasium", "native"], choices=["gymnasium", "native"],
                        help="sampler backends to time (none: only --fisher-subsample)")
    parser.add_argument("--fisher-subsample", type=int, nargs="*", default=[],
                        help="also time the l2l-setting update with these agent.fisher_subsample values")
    parser.add_argument("--out", default="experiments/results/maml_speed.json")
    args = parser.parse_args()
    recorder = Recorder()
    torch.set_num_threads(os.cpu_count() or 1)

    gym_rates = [gymnasium_single_env_rate() for _ in range(args.repeats)]
    print(f"gymnasium HalfCheetah-v5 single env: {statistics.median(gym_rates):,.0f} steps/s (median of {args.repeats})")

    tasks_n, episodes = 40, 20
    per_backend = {}
    for backend in args.backends:
        with Sampler("metarl/HalfCheetahVel-v0", backend=backend) as sampler:
            policy = GaussianMLPPolicy(17, 6, (64, 64))
            tasks = sampler.family.sample_tasks(tasks_n, "train", seed=0)
            sampler.sample(GaussianActor(policy.config, policy.params(), seed=0), tasks, episodes, seed=0)  # warm-up
            sample_rates = []
            for r in range(args.repeats):
                start = time.perf_counter()
                batch = sampler.sample(GaussianActor(policy.config, policy.params(), seed=r), tasks, episodes, seed=r + 1)
                sample_rates.append(batch.env_steps / (time.perf_counter() - start))
            print(f"{backend} sampler, {tasks_n} tasks x {episodes} episodes x 200 steps, {sampler.workers} workers, "
                  f"with policy inference: {statistics.median(sample_rates):,.0f} steps/s (median of {args.repeats})")

            agent = MAMLTRPO(MAMLTRPOConfig(), sampler, seed=0)
            iters = []
            for it in range(args.iterations):
                m = agent.train_step(sampler.family.sample_tasks(tasks_n, "train", seed=100 + it))
                iters.append({k: m[k] for k in ("time/iteration_s", "time/sampling_s", "time/update_s")})
                print(f"{backend}: MAML-TRPO iteration {it + 1}: {m['time/iteration_s']:.1f} s "
                      f"(sampling {m['time/sampling_s']:.1f} s, update {m['time/update_s']:.1f} s)")
            per_backend[backend] = {
                "sampler_steps_per_s": statistics.median(sample_rates),
                "sampler_over_gymnasium_single_env": statistics.median(sample_rates) / statistics.median(gym_rates),
                "sampler_workers": sampler.workers,
                "maml_iteration_s": statistics.median(i["time/iteration_s"] for i in iters),
                "maml_iteration_sampling_s": statistics.median(i["time/sampling_s"] for i in iters),
                "maml_iteration_update_s": statistics.median(i["time/update_s"] for i in iters),
                "raw": {"sampler": sample_rates, "iterations": iters},
            }

    fisher = fisher_subsample_update_times(args.fisher_subsample, args.repeats) if args.fisher_subsample else None

    result = {
        "benchmark": "maml_speed",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": str(torch.__version__), "metarl": metarl.__version__},
        "repeats": args.repeats,
        "gymnasium_single_env_steps_per_s": statistics.median(gym_rates),
        "meta_batch": {"tasks": tasks_n, "episodes_per_task": episodes, "horizon": 200},
        "backends": per_backend,
        "fisher_subsample_update": fisher,
        "raw": {"gymnasium": gym_rates},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, result, recorder)
    for backend, r in per_backend.items():
        print(f"{backend}: sampler / gymnasium single env = {r['sampler_over_gymnasium_single_env']:.2f}x; "
              f"MAML-TRPO iteration {r['maml_iteration_s']:.1f} s (median; update {r['maml_iteration_update_s']:.1f} s)")
    print(f"written to {args.out}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
