"""PEARL's throughput: gradient steps per second of the update and env steps per second of collection.

    python experiments/benchmarks/pearl_speed.py [--config experiments/pearl/half_cheetah_vel.yaml]
        [--repeats 3] [--steps 20] [--out experiments/results/pearl_speed.json]

Measured in one run, interleaved over ``--repeats`` (medians reported, the cores as they are):

* update: ``PEARL.update`` (torch's default threads, and the shipped sizes once more on one thread) (context batch, RL batch, losses, three optimiser steps, Polyak) on buffers filled
  by one real collection, at the config's sizes (the shipped reduced ratio) and at the authors' (meta-batch
  16 x 256 transitions, 300-unit networks); ``--steps`` steps each, after one warm-up step;
* collection: ``Sampler.sample`` with a `PEARLActor` (z per slot, stochastic actions) for ``tasks_per_batch``
  tasks x ``prior + posterior + extra`` episodes, on the native and the gymnasium backend (the config's
  workers), after a warm-up call that starts the workers;
* the iteration's wall time that follows at each ratio: collection of one iteration plus ``train_steps``
  (authors: 2000) gradient steps.
"""

from __future__ import annotations

from metarl.system import sleeping_openmp_threads

sleeping_openmp_threads()  # a program: PyTorch's threads sleep while they wait (set before torch loads)

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import torch

import metarl
from metarl.agents.pearl import PEARL
from metarl.config import load_config
from metarl.provenance import Recorder, write_result
from metarl.sampling import make_sampler

AUTHORS = {"train_steps": 2000, "meta_batch": 16, "batch_size": 256, "hidden": (300, 300, 300)}


def update_rate(agent: PEARL, steps: int) -> float:
    """Gradient steps per second of ``agent.update`` over ``steps`` steps (meta-batches drawn as training does)."""
    c = agent.config
    ready = [i for i in range(c.num_train_tasks) if agent.replay[i].size]
    batches = [[ready[k] for k in agent.rng.integers(0, len(ready), c.meta_batch)] for _ in range(steps + 1)]
    agent.update(batches[0])  # warm-up
    start = time.perf_counter()
    for pool_idx in batches[1:]:
        agent.update(pool_idx)
    return steps / (time.perf_counter() - start)


def collection_rate(config, backend: str) -> float:
    a = config.agent
    with make_sampler(metarl.env_id(config.env), config.env_kwargs, backend, config.sampler.workers) as sampler:
        agent = PEARL(dataclasses.replace(a, num_train_tasks=a.tasks_per_batch), sampler, seed=0)
        tasks = agent.train_tasks
        sampler.sample(agent.actor(), tasks, 1, seed=0)  # warm-up: starts the workers
        start = time.perf_counter()
        batch = sampler.sample(agent.actor(), tasks, a.episodes_per_task, seed=1)
        return batch.env_steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).parents[1] / "pearl" / "half_cheetah_vel.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="experiments/results/pearl_speed.json")
    args = parser.parse_args()
    recorder = Recorder()
    config = load_config(args.config)
    shipped = dataclasses.replace(config.agent, num_train_tasks=8, tasks_per_batch=2, initial_episodes=2)
    authors = dataclasses.replace(shipped, **AUTHORS)
    threads = torch.get_num_threads()
    raw: dict[str, list[float]] = {"update_shipped": [], "update_authors": [], "update_shipped_1thread": [],
                                   "collect_native": [], "collect_gymnasium": []}
    with make_sampler(metarl.env_id(config.env), config.env_kwargs, "auto", config.sampler.workers) as sampler:
        agents = {}
        for name, agent_config in (("shipped", shipped), ("authors", authors)):
            agents[name] = PEARL(agent_config, sampler, seed=0)
            agents[name]._collect(list(range(8)), 2, posterior=False, to_context=True)  # real transitions to sample
        for r in range(args.repeats):
            for name, agent in agents.items():
                raw[f"update_{name}"].append(update_rate(agent, args.steps))
            torch.set_num_threads(1)  # the update alone on one core (what a loaded machine may do better with)
            raw["update_shipped_1thread"].append(update_rate(agents["shipped"], args.steps))
            torch.set_num_threads(threads)
            for backend in ("native", "gymnasium"):
                raw[f"collect_{backend}"].append(collection_rate(config, backend))
            print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:,.1f}/s" for k, v in raw.items()), flush=True)
    med = {k: statistics.median(v) for k, v in raw.items()}
    a = config.agent
    steps_per_iteration = a.tasks_per_batch * a.episodes_per_task * sampler.horizon
    collect_s = steps_per_iteration / med["collect_native"]
    result = {
        "benchmark": "pearl_speed", "family": config.env, "config": Path(args.config).name, "cpus": os.cpu_count(),
        "torch": str(torch.__version__), "torch_threads": threads,
        "note": "shared cores (other work ran on the machine at the same time)",
        "shipped": {k: getattr(a, k) for k in AUTHORS}, "authors": AUTHORS,
        "gradient_steps_per_s": {"shipped": med["update_shipped"], "authors": med["update_authors"],
                                 "shipped_1thread": med["update_shipped_1thread"]},
        "collection_env_steps_per_s": {"native": med["collect_native"], "gymnasium": med["collect_gymnasium"]},
        "env_steps_per_iteration": steps_per_iteration,
        "iteration_s": {"shipped": collect_s + a.train_steps / med["update_shipped"],
                        "authors": collect_s + AUTHORS["train_steps"] / med["update_authors"]},
        "raw": raw,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_result(out, result, recorder)
    print(f"{config.env}: update {med['update_shipped']:.1f} gradient steps/s (shipped sizes), "
          f"{med['update_authors']:.1f} (authors'); collection {med['collect_native']:,.0f} env steps/s native, "
          f"{med['collect_gymnasium']:,.0f} gymnasium; an iteration {result['iteration_s']['shipped']:.0f} s "
          f"(shipped) vs {result['iteration_s']['authors']:.0f} s (authors'); written to {out}")


if __name__ == "__main__":
    main()
