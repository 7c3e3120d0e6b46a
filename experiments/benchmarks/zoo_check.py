"""Re-run every zoo entry's recorded evaluation and compare it with the figure the entry records.

    python experiments/benchmarks/zoo_check.py [--only NAME ...] [--out experiments/results/zoo/reproduction.json]

Each entry is evaluated as ``metarl eval zoo:NAME`` does (its recorded split, tasks, stages, episodes and
adaptations per task; the evaluation seeds follow from its config), into a temporary folder. Per entry the
file holds the recorded and the measured mean return of every stage (and success rate, where the entry records
one), whether each measured figure lies inside the recorded 95% interval, the largest difference, and the wall
time of the evaluation. An entry whose extra is not installed (the Meta-World ones) is skipped with a line.
"""

from __future__ import annotations

from metarl.system import sleeping_openmp_threads

sleeping_openmp_threads()  # a program: PyTorch's threads sleep while they wait (set before torch loads)

import argparse
import tempfile
import time
from pathlib import Path

import metarl
import metarl.api as mrl
from metarl import zoo
from metarl.provenance import Recorder, write_result


def check(entry: zoo.Entry, folder: Path) -> dict:
    e = entry.evaluation
    started = time.perf_counter()
    with mrl.load(entry.folder) as learner:
        learner.run_dir = folder / entry.name  # not runs/zoo/ of the current folder
        summary = learner.evaluate(split=e["split"], tasks=e["tasks"], steps=e["steps"], episodes=e["episodes"],
                                   repeats=e.get("repeats", 1))
    wall = time.perf_counter() - started
    inside, lines = zoo.reproduction(entry, summary)
    measured = [s["mean_return"] for s in summary["stages"]]
    recorded = [s["mean_return"] for s in e["stages"]]
    return {"name": entry.name, "agent": entry.agent, "family": entry.family, "protocol": {
        k: e.get(k) for k in ("split", "tasks", "steps", "episodes", "repeats")},
        "recorded": recorded, "recorded_ci95": [s["ci95"] for s in e["stages"]], "measured": measured,
        "measured_ci95": [s["ci95"] for s in summary["stages"]], "inside": inside,
        "max_abs_difference": max(abs(a - b) for a, b in zip(measured, recorded, strict=True)),
        **({"recorded_success": [s["success_rate"] for s in e["stages"]],
            "measured_success": [s["success_rate"] for s in summary["stages"]]}
           if all("success_rate" in s for s in e["stages"]) else {}),
        "eval_wall_s": round(wall, 1), "lines": lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these entries (default: every shipped one)")
    parser.add_argument("--out", default="experiments/results/zoo/reproduction.json")
    args = parser.parse_args()
    recorder = Recorder()
    entries = [zoo.find(zoo.PREFIX + n) for n in args.only] if args.only else zoo.entries()
    for entry in [e for e in entries if e.missing()]:
        print(f"{entry.name:28s} skipped: needs the {', '.join(entry.missing())} extra "
              f"({metarl.install_hint(entry.missing()[0])})")
    entries = [e for e in entries if not e.missing()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for entry in entries:
            row = check(entry, Path(tmp))
            rows.append(row)
            print(f"{row['name']:28s} {'reproduced' if row['inside'] else 'NOT reproduced'}: largest difference "
                  f"{row['max_abs_difference']:.4f} ({row['eval_wall_s']:.0f} s)", flush=True)
    write_result(args.out, {"benchmark": "zoo_reproduction", "entries": rows,
                            "all_reproduced": all(r["inside"] for r in rows)}, recorder)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
