"""What an ML10 or ML45 task switch costs: a slot's Meta-World env moved to a task of another env class.

    .venv-metaworld/bin/python experiments/benchmarks/metaworld_switch.py [--family ML10] [--switches 40]
        [--repeats 3] [--out experiments/results/metaworld_switch_speed.json]

An ML10 slot runs a new task every iteration; when the task's env differs from the one the slot holds, the family
builds the new Meta-World env (and frees the old one). Meta-World's constructor compiles the scene's XML each time;
the families' default (``fast``) builds it from a model compiled once per process
(`metarl.envs._metaworld_fast.construct`). This times ``set_task`` over ``--switches`` training tasks of
``--family`` drawn with a seed (consecutive tasks mostly of different envs), for both, taken in turn in each of
``--repeats`` rounds (a fresh family each round; the compiled models are kept by the process, so the first round
includes compiling each class once, as a worker's first iteration does), median over rounds; also a 500-step
episode of random actions for scale. The result file carries its provenance (whether other work shared the
cores).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import metarl
from metarl.provenance import Recorder, write_result


def switch_ms(family_id: str, fast: bool, switches: int, seed: int) -> tuple[float, int]:
    """Mean milliseconds per ``set_task`` over ``switches`` drawn training tasks, and how many changed env."""
    env = metarl.make_family(family_id, fast=fast)
    try:
        family = metarl.family_of(env)
        tasks = family.sample_tasks(switches, "train", seed=seed)
        changes = sum(a.env_name != b.env_name for a, b in zip([family.task, *tasks], tasks, strict=False))
        start = time.perf_counter()
        for task in tasks:
            family.set_task(task)
        return 1000 * (time.perf_counter() - start) / switches, changes
    finally:
        env.close()


def episode_ms(family_id: str) -> float:
    env = metarl.make_family(family_id)
    try:
        rng = np.random.default_rng(0)
        env.reset(seed=0)
        start = time.perf_counter()
        for _ in range(500):
            env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
        return 1000 * (time.perf_counter() - start)
    finally:
        env.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="ML10", help="ML10 or ML45 (default ML10)")
    parser.add_argument("--switches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="experiments/results/metaworld_switch_speed.json")
    args = parser.parse_args()
    recorder = Recorder()
    rounds: dict[str, list[float]] = {"fast": [], "metaworld": []}
    changes = []
    for k in range(args.repeats):
        for name, fast in (("fast", True), ("metaworld", False)):
            ms, changed = switch_ms(args.family, fast, args.switches, seed=k)
            rounds[name].append(ms)
        changes.append(changed)
        print(f"round {k}: {rounds['fast'][-1]:.1f} ms a set_task with the families' construction, "
              f"{rounds['metaworld'][-1]:.1f} ms with Meta-World's ({changed} of {args.switches} changed env)",
              flush=True)
    medians = {name: statistics.median(v) for name, v in rounds.items()}
    episode = episode_ms(args.family)
    result = {"benchmark": "metaworld_switch", "family": args.family, "switches": args.switches,
              "env_changes_per_round": changes, "ms_per_set_task": medians, "rounds_ms": rounds,
              "metaworld_over_fast": medians["metaworld"] / medians["fast"], "episode_500_steps_ms": episode}
    path = write_result(args.out, result, recorder)
    print(f"median: {medians['fast']:.1f} ms (fast) vs {medians['metaworld']:.1f} ms (Meta-World's constructor): "
          f"{result['metaworld_over_fast']:.1f}x; a 500-step episode of random actions {episode:.0f} ms")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
