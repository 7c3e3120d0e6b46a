"""Success and return per Meta-World env across the seeds of an ML10 or ML45 result: which envs adapt.

    python experiments/benchmarks/metaworld_by_env.py RUN_DIR [RUN_DIR ...] [--split test] --out FILE.json

A held-out success rate on ML10 is a mean over five envs that differ by an order of magnitude (door-close succeeds
almost always, shelf-place gives a random or untrained policy a reward of 0 at every step), so the mean alone
hides which envs adapt. For each run folder (one per seed, each evaluated on ``--split``: ``metarl train`` does
the held-out split, ``metarl eval RUN --split train`` the training one) this reads ``eval/<split>/summary.json``
and groups its tasks by env (`metarl.evaluation.by_env`); the file holds each seed's per-env figures and, per env
and stage, their mean over seeds with each seed's value, and carries its provenance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from metarl.evaluation import by_env
from metarl.provenance import Recorder, write_result


def per_env(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per env (name order), per stage: the mean over ``summaries`` (one per seed) of the env's mean return and
    success rate, with each seed's value. ValueError if the summaries do not hold the same envs and stages."""
    groups = [by_env(s) for s in summaries]
    if any(g is None for g in groups):
        raise ValueError("metaworld_by_env: a summary whose tasks do not name several envs (an ML10 or ML45 "
                         "evaluation is needed; ML1's whole summary is its env's)")
    names = [[e["env"] for e in g] for g in groups]
    stages = {len(s["stages"]) for s in summaries}
    if any(n != names[0] for n in names) or len(stages) != 1:
        raise ValueError(f"metaworld_by_env: the runs' evaluations differ (envs {names}, stage counts {sorted(stages)})")
    out = []
    for i, name in enumerate(names[0]):
        entries = [g[i] for g in groups]
        row: dict[str, Any] = {"env": name, "tasks_per_seed": [e["tasks"] for e in entries]}
        for key in ("mean_return", "success_rate"):
            if all(key in e for e in entries):
                per_seed = np.array([e[key] for e in entries])  # [seeds, stages]
                row[key] = [float(v) for v in per_seed.mean(0)]
                row[f"{key}_per_seed"] = per_seed.tolist()
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders, one per seed")
    parser.add_argument("--split", default="test", help="the evaluation to read: eval/<split>/ (default test)")
    parser.add_argument("--out", required=True, help="the result file (JSON)")
    args = parser.parse_args()
    recorder = Recorder()
    summaries, sources = [], []
    for run in args.runs:
        path = Path(run) / "eval" / args.split / "summary.json"
        if not path.is_file():
            raise SystemExit(f"{path}: no evaluation on the {args.split} split (metarl eval {run} --split {args.split})")
        summary = json.loads(path.read_text())
        summaries.append(summary)
        sources.append({"file": str(path), "family": summary.get("family"), "agent": summary.get("agent"),
                        "iteration": summary.get("iteration"), "num_tasks": summary.get("num_tasks")})
    try:
        rows = per_env(summaries)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    result = {"benchmark": "metaworld_by_env", "split": args.split, "runs": sources, "by_env": rows,
              "stages": [{k: s[k] for k in ("stage", "adapt_episodes") if k in s} for s in summaries[0]["stages"]]}
    path = write_result(args.out, result, recorder)
    print(f"{'env':<24} {'success by stage (mean of ' + str(len(summaries)) + ' seeds)':<40} return by stage")
    for row in rows:
        success = " -> ".join(f"{v:.1%}" for v in row.get("success_rate", []))
        print(f"{row['env']:<24} {success:<40} {' -> '.join(f'{v:.1f}' for v in row['mean_return'])}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
