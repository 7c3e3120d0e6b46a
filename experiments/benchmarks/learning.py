"""Learning benchmark for any agent: train a config, evaluate on held-out tasks, write the figures to a file.

    python experiments/benchmarks/learning.py CONFIG [key=value ...] --out experiments/results/NAME.json
    python experiments/benchmarks/learning.py --resume RUN_DIR iterations=N --out ...   # continue a run

Writes the training curve (pre- and post-adaptation return per iteration), the held-out adaptation
curve (mean return and 95% bootstrap CI per adaptation stage), wall time, env steps and the resolved
config. The run folder itself goes to runs/ as usual (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from metarl.config import load_config
from metarl.training import load_run_config, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run (overrides: iterations=N only)")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", required=True)
    parser.add_argument("--note", default="", help="free text stored with the result (e.g. what to compare with)")
    args = parser.parse_args()
    start = time.perf_counter()
    previous: dict = {}
    if args.resume:
        if args.config:  # argparse reads the first key=value as CONFIG
            args.overrides = [args.config, *args.overrides]
        run_dir = Path(args.resume)
        config = load_config(None, args.overrides, data=load_run_config(run_dir).to_dict())
        train(config, run_dir=run_dir, resume=True)
        previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
        args.overrides = [*previous.get("overrides", []), *args.overrides]
        args.note = args.note or previous.get("note", "")
        wall = time.perf_counter() - start + float(previous.get("wall_time_s", 0.0))
    else:
        config = load_config(args.config, args.overrides)
        run_dir = train(config)
        wall = time.perf_counter() - start
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "eval" / config.eval.split / "summary.json").read_text())
    result = {
        "benchmark": "learning",
        "agent": config.agent_name,
        "config": config.to_dict(),
        "overrides": args.overrides,
        "note": args.note,
        "wall_time_s": wall,
        "train_time_s": sum(r["time/iteration_s"] for r in rows),
        "iterations": len(rows),
        "env_steps": rows[-1]["env_steps"],
        "training_curve": [
            {"iteration": r["iteration"], "env_steps": r["env_steps"], "pre": r["meta/return_pre_adaptation"],
             "post": r["meta/return_post_adaptation"]} for r in rows
        ],
        "heldout": {
            "split": summary["split"], "num_tasks": summary["num_tasks"], "horizon": summary["horizon"],
            "stages": [{k: s[k] for k in ("stage", "adapt_episodes", "adapt_env_steps", "mean_return", "ci95")}
                       for s in summary["stages"]],
        },
        "run_dir": str(run_dir),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    curve = " -> ".join(f"{s['mean_return']:.1f} [{s['ci95'][0]:.1f}, {s['ci95'][1]:.1f}]" for s in result["heldout"]["stages"])
    print(f"{config.env}: {len(rows)} iterations, {result['env_steps']:,} env steps, training {result['train_time_s']:.0f} s; "
          f"held-out return by adaptation stage: {curve}; written to {args.out}")


if __name__ == "__main__":
    main()
