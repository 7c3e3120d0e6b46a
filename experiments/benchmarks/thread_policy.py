"""How PyTorch's OpenMP wait policy behaves on a machine whose cores are shared.

    python experiments/benchmarks/thread_policy.py [--load N] [--iterations K] --out FILE.json

For MAML-TRPO (HalfCheetahVel, the standard 40 x 20 x 200 batch) and RL² (HalfCheetahVel, its shipped
config), trains K iterations in a fresh process under ``OMP_WAIT_POLICY=ACTIVE`` (threads spin while they
wait: libgomp's default) and ``PASSIVE`` (threads sleep: what the ``metarl`` command sets), each with and without N competing CPU-bound processes (``--load``; a stand-in for another
job on the same cores), and writes the median update and sampling time per iteration (the first iteration,
which starts the workers, is left out). The machine's own load is recorded too: run it on an otherwise
idle machine for the idle figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"maml_trpo": "experiments/maml_trpo/half_cheetah_vel.yaml", "rl2": "experiments/rl2/half_cheetah_vel.yaml"}


def _child(agent: str, iterations: int) -> None:
    import metarl  # noqa: F401  (OMP_WAIT_POLICY comes from the parent, which sets it for each child)
    from metarl.config import load_config
    from metarl.system import work_threads
    from metarl.training import build_agent

    config = load_config(ROOT / CONFIGS[agent])
    sampler, trainer = build_agent(config)
    rows = []
    try:
        with work_threads():  # one OpenBLAS thread, as metarl's training runs
            for it in range(iterations):
                m = trainer.train_step(sampler.family.sample_tasks(config.agent.tasks_per_batch, "train", seed=it))
                rows.append({"update_s": m["time/update_s"], "sampling_s": m["time/sampling_s"]})
    finally:
        sampler.close()
    print(json.dumps(rows))


def _burn() -> None:
    x = 0
    while True:
        x = (x * 1103515245 + 12345) % 2**31


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("AGENT", "ITERATIONS"), help=argparse.SUPPRESS)
    parser.add_argument("--load", type=int, default=1, help="competing CPU-bound processes in the shared condition")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--agents", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        return _child(args.child[0], int(args.child[1]))
    if not args.out:
        parser.error("--out FILE.json is required")
    from metarl.provenance import Recorder, write_result

    recorder = Recorder()
    results = []
    for agent in args.agents:
        for load in (0, args.load):
            for policy in ("ACTIVE", "PASSIVE"):
                burners = [mp.Process(target=_burn, daemon=True) for _ in range(load)]
                for b in burners:
                    b.start()
                load_before = os.getloadavg()[0]
                start = time.perf_counter()
                try:
                    out = subprocess.run([sys.executable, __file__, "--child", agent, str(args.iterations)], cwd=ROOT,
                                         env={**os.environ, "OMP_WAIT_POLICY": policy}, capture_output=True,
                                         text=True, timeout=3600)
                    if out.returncode != 0:
                        raise SystemExit(f"{agent} under {policy} failed:\n{out.stderr[-3000:]}")
                finally:
                    for b in burners:
                        b.terminate()
                rows = json.loads(out.stdout.strip().splitlines()[-1])[1:]
                row = {"agent": agent, "omp_wait_policy": policy, "competing_processes": load,
                       "machine_load_before": load_before, "wall_s": time.perf_counter() - start,
                       "update_s_median": statistics.median(r["update_s"] for r in rows),
                       "sampling_s_median": statistics.median(r["sampling_s"] for r in rows),
                       "update_s": [r["update_s"] for r in rows]}
                results.append(row)
                print(f"{agent:9s} {policy:7s} +{load} competing: update {row['update_s_median']:.2f} s, "
                      f"sampling {row['sampling_s_median']:.2f} s per iteration (machine load {load_before:.1f})",
                      flush=True)
    write_result(args.out, {"benchmark": "thread_policy", "cores": os.cpu_count(), "results": results}, recorder)


if __name__ == "__main__":
    main()
