"""What an RL² update costs per frame beside what collecting that frame costs, for variants of one config.

    python experiments/benchmarks/rl2_update_cost.py [CONFIG] [--iterations 2] [--out FILE.json]
        [--variant NAME key=value ...] ...

RL² is update-bound where its trials are long: on Meta-World (10 episodes of 500 steps per trial, GRU 256,
10 epochs of 4 minibatches of whole trials, the Meta-World paper's settings) each update re-runs and
back-propagates 5,000-step sequences ten times. For each variant (the config with its overrides), this trains
``--iterations`` iterations from scratch and records, from the agent's own timers (``time/sampling_s`` and
``time/update_s`` of every iteration after the first, which warms the sampler's env slots), the seconds per
1,000 frames of collection and of the update, and their ratio (an update that keeps pace with sampling has a
ratio <= 1). The default variants, on experiments/rl2/ml1_reach.yaml:

* ``paper``: the config as it is (GRU 256, whole 5,000-step trials, 10 epochs);
* ``chunk500``: ``bptt_chunk=500`` (back-propagation through one episode at a time, the hidden state carried
  across chunks without gradient);
* ``epochs4``: ``epochs=4``;
* ``gru128``: ``hidden_size=128``;
* ``light``: all three.

Every variant samples the same batches' size (``tasks_per_batch x trials_per_task x episodes_per_trial``
episodes per iteration) with the same sampler, so the collection figures differ only by the policy's cost and
by noise. The result file carries its provenance (whether other work shared the cores).
"""

from __future__ import annotations

from metarl.system import sleeping_openmp_threads

sleeping_openmp_threads()  # a program: PyTorch's threads sleep while they wait (set before torch loads)

import argparse
import statistics
from pathlib import Path

import metarl
from metarl.agents.rl2 import RL2
from metarl.config import load_config
from metarl.provenance import Recorder, write_result
from metarl.sampling import make_sampler

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VARIANTS = {
    "paper": [],
    "chunk500": ["agent.bptt_chunk=500"],
    "epochs4": ["agent.epochs=4"],
    "gru128": ["agent.hidden_size=128"],
    "light": ["agent.bptt_chunk=500", "agent.epochs=4", "agent.hidden_size=128"],
}


def measure(config_path: str, overrides: list[str], iterations: int) -> dict[str, float]:
    config = load_config(config_path, overrides)
    a = config.agent
    with make_sampler(metarl.env_id(config.env), config.env_kwargs, config.sampler.backend,
                      config.sampler.workers) as sampler:
        agent = RL2(a, sampler, seed=0)
        rows = [agent.train_step(sampler.family.sample_tasks(a.tasks_per_batch, "train", seed=i))
                for i in range(iterations)]
        backend = sampler.backend
    timed = rows[1:] or rows
    frames = statistics.mean(r["time/sampling_steps_per_s"] * r["time/sampling_s"] for r in timed)
    sampling = statistics.mean(r["time/sampling_s"] for r in timed)
    update = statistics.mean(r["time/update_s"] for r in timed)
    return {"frames_per_iteration": round(frames), "sampling_s": round(sampling, 2), "update_s": round(update, 2),
            "sampling_s_per_1k_frames": round(1000 * sampling / frames, 3),
            "update_s_per_1k_frames": round(1000 * update / frames, 3),
            "update_over_sampling": round(update / sampling, 2),
            "env_steps_per_s": round(frames / (sampling + update), 1), "sampler": backend}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "experiments" / "rl2" / "ml1_reach.yaml"))
    parser.add_argument("--iterations", type=int, default=2, help="per variant; the first warms up (default 2)")
    parser.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                        help="a variant: its name and its overrides (repeatable; default: the five above)")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "rl2_update_cost.json"))
    args = parser.parse_args()
    if args.iterations < 1:
        parser.error("--iterations must be >= 1")
    variants = {v[0]: v[1:] for v in args.variant} if args.variant else DEFAULT_VARIANTS

    recorder = Recorder()
    rows = []
    for name, overrides in variants.items():
        row = {"variant": name, "overrides": overrides, **measure(args.config, overrides, args.iterations)}
        rows.append(row)
        print(f"{name:<10} update {row['update_s_per_1k_frames']:.3f} s / 1k frames, sampling "
              f"{row['sampling_s_per_1k_frames']:.3f} s / 1k frames: update / sampling {row['update_over_sampling']:.2f}; "
              f"{row['env_steps_per_s']:,.0f} env steps/s training", flush=True)
    config = Path(args.config).resolve()
    result = {"config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else args.config,
              "iterations": args.iterations, "rows": rows,
              "note": "per variant, the mean over the iterations after the first; provenance.shared says whether "
                      "other work was busy on the cores"}
    print(f"written to {write_result(args.out, result, recorder)}")


if __name__ == "__main__":
    main()
