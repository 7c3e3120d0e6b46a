"""The sampler's Ray placement against the local one on the standard HalfCheetahVel batch, side by side.

    python experiments/benchmarks/ray_speed.py [--repeats 5] [--backend native] [--address ADDRESS]
                                               [--out experiments/results/ray_speed.json]

Needs ``pip install -e ".[ray]"``. Without ``--address`` it starts a one-node Ray instance in this process
with as many CPUs as the machine has (and a 200 MB object store), so both placements use the same cores:
the local sampler one worker process per core, the Ray sampler one actor per core. Measured in one run,
alternating, medians over ``--repeats`` (fair on a shared, noisy machine):

* the standard meta-batch, 40 tasks x 20 episodes x 200 steps of HalfCheetahVel, policy inference included
  (Gaussian MLP 64x64, per-task parameters): env steps per second of each placement and their ratio;
* the per-call overhead: a call of 2 tasks x 1 one-step episode, whose time is nearly all placement cost
  (shipping the policy, scheduling, returning the arrays), Ray minus local, in ms;
* what that implies for N nodes of this machine's rate: a batch's time ~ steps / (N x rate) + overhead.
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

import torch

from metarl.policies import GaussianActor, GaussianMLPPolicy
from metarl.provenance import Recorder, write_result
from metarl.sampling import Sampler
from metarl.sampling.ray import RaySampler


def timed(sampler: Sampler, actor_of, tasks, episodes: int, seed: int) -> tuple[float, int]:
    start = time.perf_counter()
    batch = sampler.sample(actor_of(), tasks, episodes, seed=seed)
    return time.perf_counter() - start, batch.env_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--overhead-calls", type=int, default=30)
    parser.add_argument("--backend", default="native", choices=["gymnasium", "native"])
    parser.add_argument("--address", help="an existing Ray cluster (default: a one-node instance started here)")
    parser.add_argument("--out", default="experiments/results/ray_speed.json")
    args = parser.parse_args()
    recorder = Recorder()
    import ray

    cores = os.cpu_count() or 1
    if args.address:
        ray.init(address=args.address, logging_level="WARNING", log_to_driver=False)
    else:
        ray.init(num_cpus=cores, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False)
    workers = int(ray.cluster_resources().get("CPU", cores))
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(17, 6, (64, 64))

    def actor_of():
        return GaussianActor(policy.config, policy.params(), seed=0)

    env = "metarl/HalfCheetahVel-v0"

    def placements(env_kwargs: dict) -> dict[str, Sampler]:
        # each Ray actor holds a CPU until closed: one pair of samplers at a time
        return {"local": Sampler(env, env_kwargs, workers=cores, backend=args.backend),
                "ray": RaySampler(env, env_kwargs, workers=workers, backend=args.backend, timeout=300)}

    samplers = placements({})
    try:
        tasks = samplers["local"].family.sample_tasks(40, "train", seed=0)
        for s in samplers.values():  # start the workers / actors and warm them up
            timed(s, actor_of, tasks[:2], 1, seed=0)
        times: dict[str, list[float]] = {k: [] for k in samplers}
        steps = 0
        for r in range(args.repeats):
            for name, s in samplers.items():
                t, steps = timed(s, actor_of, tasks, 20, seed=r)
                times[name].append(t)
                print(f"repeat {r + 1}: {name:5s} {t:6.2f} s  {steps / t:8,.0f} steps/s", flush=True)
    finally:
        for s in samplers.values():
            s.close()
    tiny = placements({"max_episode_steps": 1})
    try:
        for s in tiny.values():
            timed(s, actor_of, tasks[:2], 1, seed=0)
        call: dict[str, list[float]] = {k: [] for k in tiny}
        for i in range(args.overhead_calls):
            for name, s in tiny.items():
                call[name].append(timed(s, actor_of, tasks[:2], 1, seed=i)[0])
    finally:
        for s in tiny.values():
            s.close()
    rate = {k: steps / statistics.median(v) for k, v in times.items()}
    call_ms = {k: 1000 * statistics.median(v) for k, v in call.items()}
    overhead_ms = call_ms["ray"] - call_ms["local"]
    batch_bytes = 40 * 20 * 200 * (17 + 6 + 3) * 4  # observations, actions, rewards/mask/... as float32
    ratio = rate["ray"] / rate["local"]
    print(f"\nstandard batch ({steps:,} env steps, backend {args.backend}, {cores} cores, {workers} Ray CPUs):")
    print(f"  local {rate['local']:,.0f} steps/s, Ray {rate['ray']:,.0f} steps/s: Ray at {ratio:.2f}x the local sampler")
    print(f"  per-call overhead: Ray {call_ms['ray']:.1f} ms, local {call_ms['local']:.1f} ms a tiny call: "
          f"{overhead_ms:.1f} ms more on Ray")
    node_time = steps / rate["ray"]
    projection = []
    for n in (1, 2, 4, 8, 16, 32):
        t = node_time / n + overhead_ms / 1000
        projection.append({"nodes": n, "batch_s": t, "speedup": node_time / t, "efficiency": node_time / t / n})
        print(f"  {n:2d} nodes like this one: ~{t:.2f} s a batch, {node_time / t:.1f}x one node "
              f"({100 * node_time / t / n:.0f}% efficiency; network transfer of the ~{batch_bytes / 1e6:.0f} MB "
              "batch not included)")
    out = {
        "what": "Ray placement vs local sampler, standard HalfCheetahVel batch (40 tasks x 20 episodes x 200 steps), "
                "side by side in one run, medians; the cores were shared with other work while measured",
        "backend": args.backend, "cores": cores, "ray_cpus": workers, "machine": platform.machine(),
        "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
        "repeats": args.repeats, "env_steps": steps, "times_s": times,
        "steps_per_s": rate, "ray_over_local": ratio,
        "tiny_call_ms": call_ms, "per_call_overhead_ms": overhead_ms, "overhead_calls": args.overhead_calls,
        "batch_mb": batch_bytes / 1e6, "projection": projection,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, out, recorder)
    print(f"wrote {args.out}")
    ray.shutdown()


if __name__ == "__main__":
    main()
