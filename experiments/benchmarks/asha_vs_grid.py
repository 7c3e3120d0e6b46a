"""ASHA against a grid sweep of the same space: trials stopped, compute saved, and whether the best agrees.

    python experiments/benchmarks/asha_vs_grid.py [--out experiments/results/sweeps/asha_vs_grid.json]
                                                  [--work runs/asha_vs_grid] [--cpus 2]

Needs ``pip install -e ".[ray]"``. Runs `experiments/sweeps/asha_vs_grid.yaml` (MAML-TRPO on PointNav2D, a grid
over inner lr x max KL with some clearly poor values, evaluated every few iterations) twice on a one-node Ray
instance started here with ``--cpus`` CPUs: once with the sweep's ASHA scheduler, once with ``scheduler: none``
(every trial trained to the end). Records, per sweep: trials, trials stopped early, training iterations and env
steps spent, wall time, the best configuration and its score; and ASHA's savings against the grid (iterations
and env steps, %) and whether both pick the same best configuration. Each sweep's report stays in ``--work``.
"""

from __future__ import annotations

from metarl.system import sleeping_openmp_threads

sleeping_openmp_threads()  # a program: PyTorch's threads sleep while they wait (set before torch loads)

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

from metarl.provenance import Recorder, write_result
from metarl.sweep import load_sweep, run_sweep

SWEEP = Path(__file__).resolve().parents[1] / "sweeps" / "asha_vs_grid.yaml"


def best(out: Path) -> dict:
    rows = json.loads((out / "results.json").read_text())
    top = max(rows, key=lambda r: r["score"])
    return {"point": top["point"], "score": top["score"], "ci95": top["ci95"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default=str(SWEEP))
    parser.add_argument("--work", default="runs/asha_vs_grid", help="the two sweeps' folders (replaced)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the Ray instance (trials at once)")
    parser.add_argument("--out", default="experiments/results/sweeps/asha_vs_grid.json")
    parser.add_argument("--note", help="what else ran on the machine (the provenance also measures it)")
    args = parser.parse_args()
    recorder = Recorder()
    import ray

    ray.init(num_cpus=args.cpus, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
             logging_level="WARNING", log_to_driver=False)
    spec = yaml.safe_load(Path(args.sweep).read_text())
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sweeps = {}
    for name, scheduler in (("asha", spec["scheduler"]), ("grid", "none")):
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**spec, "config": str((Path(args.sweep).parent / spec["config"]).resolve()),
                                        "scheduler": scheduler, "out": str(work / name)}))
        sweep = load_sweep(path)
        start = time.perf_counter()
        run_sweep(sweep, log=lambda line, name=name: print(f"[{name}] {line}", flush=True))
        wall = time.perf_counter() - start
        trials = json.loads((sweep.out / "trials.json").read_text())
        sweeps[name] = {"scheduler": scheduler, "wall_s": round(wall, 1), **trials["compute"],
                        "best": best(sweep.out),
                        "stopped_trials": [{"point": t["point"], "seed": t["seed"], **t["reached"]}
                                           for t in trials["trials"] if t["status"] == "stopped"]}
    a, g = sweeps["asha"], sweeps["grid"]
    result = {
        "what": "the same sweep (experiments/sweeps/asha_vs_grid.yaml) with ASHA and with every trial trained to "
                "the end; training iterations and env steps count training only (evaluations not included)",
        "sweep": spec,
        "cpus": args.cpus,
        "note": args.note,
        "sweeps": sweeps,
        "iterations_saved_pct": round(100 * (1 - a["iterations"] / g["iterations"]), 1),
        "env_steps_saved_pct": round(100 * (1 - a["env_steps"] / g["env_steps"]), 1),
        "wall_saved_pct": round(100 * (1 - a["wall_s"] / g["wall_s"]), 1),
        "same_best": a["best"]["point"] == g["best"]["point"],
    }
    path = write_result(args.out, result, recorder)
    print(json.dumps({k: v for k, v in result.items() if k not in ("sweep", "sweeps")}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
