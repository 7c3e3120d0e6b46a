"""Kill metarl with SIGKILL at chosen moments, resume, and compare with an uninterrupted run.

    python experiments/benchmarks/fault_injection.py [--out experiments/results/fault_injection.json]

For MAML-TRPO and RL² on PointNav2D (tiny settings: 3 iterations, a mid-run evaluation after iteration 2,
the final one after 3, sampler.workers=0 unless a case says otherwise), each case runs ``metarl train`` with
``METARL_FAULT=<point>[:N]`` (`metarl.system.fault_point`: the process SIGKILLs itself the N-th time it
reaches that point), then ``metarl train --resume`` (with the next fault of a double kill, then without)
until it exits 0 (one case kills a sampler worker process instead, which stops training with exit code
1), and compares the run folder with an uninterrupted run's: every value of the final
checkpoint (agent state, iteration, env steps), ``metrics.jsonl`` (all but the ``time/`` keys),
``eval/test/summary.json``, ``summary.csv`` and ``per_task.csv``, and every TensorBoard scalar point (all
but ``time/``, duplicates counted). Kills of ``metarl eval`` (compared with an uninterrupted eval of the
same run) and of ``metarl bench`` (a MAML-TRPO cell and a random-policy cell, compared with an uninterrupted
suite) follow.
The results file lists every case with what differed; ``all_identical`` is the verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
AGENTS = {
    "maml_trpo": ["experiments/maml_trpo/point_nav_2d.yaml", "agent.tasks_per_batch=4", "agent.episodes_per_task=4",
                  "agent.hidden=[16]"],
    "rl2": ["experiments/rl2/point_nav_2d.yaml", "agent.tasks_per_batch=4", "agent.hidden_size=16"],
}
COMMON = ["iterations=3", "eval.every=2", "eval.tasks=3", "eval.steps=2", "eval.episodes=2", "sampler.workers=0",
          "checkpoint_every=1"]
#: (name, faults of the first run and of each resume, what the kill interrupts)
CASES = [
    ("startup", ["iteration:1"], "before the first checkpoint (iteration 1 sampled tasks)"),
    ("iteration", ["iteration:3"], "iteration 3, after two checkpoints"),
    ("metrics_append", ["metrics:2"], "after iteration 2's metrics line, before its checkpoint"),
    ("first_checkpoint_write", ["checkpoint:1"], "first checkpoint written, not yet renamed into place"),
    ("checkpoint_write", ["checkpoint:2"], "second checkpoint written beside previous.pt, not yet renamed"),
    ("midrun_eval", ["eval:1"], "mid-run evaluation computed, nothing written"),
    ("midrun_eval_files", ["eval_files:1"], "mid-run evaluation: summary.json written, csv/png not"),
    ("midrun_eval_logged", ["eval_logged:1"], "mid-run evaluation written and logged, not recorded done"),
    ("final_eval", ["eval:2"], "final evaluation computed, nothing written"),
    ("final_eval_files", ["eval_files:2"], "final evaluation: summary.json written, csv/png not"),
    ("final_eval_logged", ["eval_logged:2"], "final evaluation written and logged, not recorded done"),
    ("double_kill", ["iteration:3", "eval_files:1"], "iteration 3, then the resume in its final evaluation"),
    ("double_kill_checkpoint", ["checkpoint:1", "checkpoint:1"], "first checkpoint write, then the resume's "
     "next checkpoint write"),
    ("sampler_worker", ["worker:3"], "a sampler worker process (sampler.workers=1) before its third rollout; "
     "the main process stops with exit code 1"),
]
#: per case: overrides beyond COMMON, and the exit code of the interrupted command (SIGKILL: -9)
VARIANTS = {"sampler_worker": (["sampler.workers=1"], 1)}


def _cli(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "METARL_FAULT"}
    if fault:
        env["METARL_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "metarl.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(obj, (list, tuple)) and not isinstance(obj, str):
        out = {}
        for i, value in enumerate(obj):
            out.update(_flatten(value, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if not tag.startswith("time/")}


def metrics_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def compare_summaries(a: Path, b: Path) -> list[str]:
    diffs = []
    try:
        sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
        for key in ("iteration", "env_steps", "stages", "tasks", "num_tasks"):
            if sa.get(key) != sb.get(key):
                diffs.append(f"summary.json {key}")
        for name in ("summary.csv", "per_task.csv", "adaptation_curve.png"):
            if not (b / name).is_file():
                diffs.append(f"{name} missing")
            elif name.endswith(".csv") and (a / name).read_text() != (b / name).read_text():
                diffs.append(f"{name} differs")
    except (OSError, ValueError) as exc:
        diffs.append(f"summary unreadable: {exc}")
    return diffs


def _without_workers(record: str | None) -> Any:
    data = json.loads(record) if record else {}
    data.get("sampler", {}).pop("workers", None)
    return data


def compare_runs(a: Path, b: Path) -> list[str]:
    """What differs between run folders ``a`` (uninterrupted) and ``b`` (killed and resumed)."""
    diffs = []
    x = _flatten(torch.load(a / "checkpoints" / "latest.pt", weights_only=True))
    y = _flatten(torch.load(b / "checkpoints" / "latest.pt", weights_only=True))
    for key in sorted(set(x) | set(y)):
        if key == "sha256":
            continue
        u, v = x.get(key), y.get(key)
        if key == "config":  # the sampler_worker case runs with sampler.workers=1, which may differ
            u, v = (_without_workers(c) for c in (u, v))
        same = (torch.equal(u, v) if isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor) else u == v)
        if not same:
            diffs.append(f"checkpoint {key}")
    if metrics_rows(a) != metrics_rows(b):
        diffs.append("metrics.jsonl")
    diffs += compare_summaries(a / "eval" / "test", b / "eval" / "test")
    sa, sb = scalars(a), scalars(b)
    for tag in sorted(set(sa) | set(sb)):
        if sa.get(tag) != sb.get(tag):
            diffs.append(f"tensorboard {tag}: {len(sa.get(tag, []))} vs {len(sb.get(tag, []))} points")
    if len(list(b.glob("events.out.tfevents.*"))) < 1:
        diffs.append("no events file")
    return diffs


def run_case(agent: str, name: str, faults: list[str], work: Path, reference: Path) -> dict[str, Any]:
    run = work / f"{agent}-{name}"
    extra, expected = VARIANTS.get(name, ([], -9))
    args = [*AGENTS[agent], *COMMON, *extra, "--run-dir", str(run), "--quiet"]
    record: dict[str, Any] = {"agent": agent, "faults": faults, "exit_codes": []}
    done = _cli(["train", *args], fault=faults[0])
    record["exit_codes"].append(done.returncode)
    for fault in [*faults[1:], None]:
        if done.returncode == 0:
            break
        done = _cli(["train", "--resume", str(run), "--quiet"], fault=fault)
        record["exit_codes"].append(done.returncode)
    record["killed"] = all(code == expected for code in record["exit_codes"][: len(faults)])
    record["finished"] = done.returncode == 0
    if done.returncode != 0:
        record["error"] = done.stderr.strip().splitlines()[-1:] if done.stderr.strip() else []
    record["differences"] = compare_runs(reference, run) if record["finished"] else ["did not finish"]
    record["identical"] = record["killed"] and record["finished"] and not record["differences"]
    return record


def eval_cases(reference: Path, work: Path) -> list[dict[str, Any]]:
    """``metarl eval`` killed in its evaluation and between its files, then rerun."""
    out = []
    clean = work / "eval-clean"
    shutil.copytree(reference, clean, ignore=shutil.ignore_patterns(".lock"))
    assert _cli(["eval", str(clean), "--split", "ood"]).returncode == 0
    for fault in ("eval:1", "eval_files:1"):
        run = work / f"eval-{fault.replace(':', '')}"
        shutil.copytree(reference, run, ignore=shutil.ignore_patterns(".lock"))
        killed = _cli(["eval", str(run), "--split", "ood"], fault=fault)
        again = _cli(["eval", str(run), "--split", "ood"])
        diffs = compare_summaries(clean / "eval" / "ood", run / "eval" / "ood") if again.returncode == 0 else ["failed"]
        out.append({"command": "eval", "faults": [fault], "exit_codes": [killed.returncode, again.returncode],
                    "differences": diffs, "identical": killed.returncode == -9 and again.returncode == 0 and not diffs})
    return out


def bench_cases(work: Path) -> list[dict[str, Any]]:
    """``metarl bench`` (a MAML-TRPO cell and a random-policy cell) killed in the meta cell's training and
    final evaluation, rerun, and compared with an uninterrupted suite."""
    def suite(name: str) -> Path:
        data = {"name": name, "out": str(work / name), "eval": {"tasks": 3, "steps": 1, "episodes": 2},
                "families": {"PointNav2D": {}},
                "methods": {"maml_trpo": {"overrides": ["iterations=2", "agent.tasks_per_batch=3",
                                                        "agent.episodes_per_task=2", "agent.hidden=[8]",
                                                        "sampler.workers=0"]},
                            "random": {}}}
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    assert _cli(["bench", str(suite("bench-clean")), "--quiet"]).returncode == 0
    clean = json.loads((work / "bench-clean" / "results.json").read_text())
    out = []
    for fault in ("iteration:2", "eval_files:1", "eval:1"):
        name = f"bench-{fault.replace(':', '')}"
        path = suite(name)
        killed = _cli(["bench", str(path), "--quiet"], fault=fault)
        again = _cli(["bench", str(path), "--quiet"])
        diffs = []
        if again.returncode != 0:
            diffs.append("failed: " + " ".join(again.stderr.strip().splitlines()[-1:]))
        else:
            cell = "cells/PointNav2D/maml_trpo/seed0"
            a = json.loads((work / "bench-clean" / cell / "cell.json").read_text())
            b = json.loads((work / name / cell / "cell.json").read_text())
            for key in ("summary", "pretrain_env_steps", "adapt_env_steps_per_task"):
                if a[key] != b[key]:
                    diffs.append(f"cell.json {key}")
            results = json.loads((work / name / "results.json").read_text())
            if _strip_times(results) != _strip_times(clean):
                diffs.append("results.json")
        out.append({"command": "bench", "faults": [fault], "exit_codes": [killed.returncode, again.returncode],
                    "differences": diffs, "identical": killed.returncode == -9 and again.returncode == 0 and not diffs})
    return out


def _strip_times(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_times(v) for k, v in obj.items() if "time" not in k and k not in ("out", "name", "resumed")}
    if isinstance(obj, list):
        return [_strip_times(v) for v in obj]
    return obj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "fault_injection.json"))
    parser.add_argument("--keep", help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="metarl-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cases: list[dict[str, Any]] = []
    references = {}
    for agent in AGENTS:
        reference = work / f"{agent}-reference"
        done = _cli(["train", *AGENTS[agent], *COMMON, "--run-dir", str(reference), "--quiet"])
        assert done.returncode == 0, done.stderr
        references[agent] = reference
        for name, faults, what in CASES:
            record = {"case": name, "interrupts": what, **run_case(agent, name, faults, work, reference)}
            cases.append(record)
            print(f"{agent:<10} {name:<24} exit codes {record['exit_codes']} "
                  f"{'identical' if record['identical'] else 'DIFFERS: ' + ', '.join(record['differences'])}",
                  flush=True)
    for record in eval_cases(references["maml_trpo"], work) + bench_cases(work):
        cases.append(record)
        print(f"{record['command']:<10} {record['faults'][0]:<24} exit codes {record['exit_codes']} "
              f"{'identical' if record['identical'] else 'DIFFERS: ' + ', '.join(record['differences'])}", flush=True)
    result = {
        "what": "SIGKILL at named moments (metarl.system.fault_point), resume/rerun, compare with an uninterrupted run",
        "settings": {"agents": AGENTS, "common": COMMON, "family": "PointNav2D"},
        "kills": sum(len(c["faults"]) for c in cases),
        "cases": cases,
        "all_identical": all(c["identical"] for c in cases),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{sum(c['identical'] for c in cases)}/{len(cases)} cases identical ({result['kills']} kills); "
          f"written to {args.out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
