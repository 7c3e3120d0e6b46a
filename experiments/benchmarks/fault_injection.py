"""Kill metarl with SIGKILL at chosen and at random moments, resume, and compare with an uninterrupted run.

    python experiments/benchmarks/fault_injection.py [--random-kills 10] [--out experiments/results/fault_injection.json]

For MAML-TRPO and RL² on PointNav2D (tiny settings: 3 iterations, a mid-run evaluation after iteration 2, the
first of the run, and the final one after 3; sampler.workers=0 unless a case says otherwise):

* **Named moments.** Each case runs ``metarl train`` with ``METARL_FAULT=<point>[:N]`` (`metarl.system.fault_point`:
  the process SIGKILLs itself the N-th time it reaches that point), then ``metarl train --resume`` (with the next
  fault of a double kill, then without) until it exits 0 (one case kills a sampler worker process instead, which
  stops training with exit code 1).
* **Random moments** (the shape of an outside probe): ``--random-kills`` K per agent, SIGKILL sent from outside at a
  moment drawn uniformly over the uninterrupted run's wall time (seeded; a run that finishes before its moment, the
  machine being quieter than when the wall time was measured, gives the wall time for a new draw, at most 3),
  then resumed. Each records what the kill interrupted, read from the run folder (an iteration, or an evaluation:
  the first one included).

Every resumed run is compared with the uninterrupted one: every value of the final checkpoint (agent state,
iteration, env steps), ``metrics.jsonl`` (all but the ``time/`` keys), ``eval/test/summary.json``, ``summary.csv``,
``per_task.csv``, ``history.jsonl`` (every evaluation), and every TensorBoard scalar point (all but ``time/``,
duplicates counted). Kills of ``metarl eval`` (compared with an uninterrupted eval of the same run) and of
``metarl bench`` (a MAML-TRPO cell and a random-policy cell, compared with an uninterrupted suite) follow.
The results file lists every case with what differed; ``all_identical`` is the verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from metarl.provenance import Recorder, write_result

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
    ("midrun_eval_files", ["eval_files:1"], "mid-run evaluation: summary.csv written, the rest and summary.json not"),
    ("midrun_eval_history", ["eval_history:1"], "mid-run evaluation: files and TensorBoard written, its history "
     "line not"),
    ("midrun_eval_logged", ["eval_logged:1"], "mid-run evaluation written and logged, not recorded done"),
    ("final_eval", ["eval:2"], "final evaluation computed, nothing written"),
    ("final_eval_files", ["eval_files:2"], "final evaluation: summary.csv written, the rest and summary.json not"),
    ("final_eval_logged", ["eval_logged:2"], "final evaluation written and logged, not recorded done"),
    ("double_kill", ["iteration:3", "eval_files:1"], "iteration 3, then the resume in its final evaluation"),
    ("double_kill_checkpoint", ["checkpoint:1", "checkpoint:1"], "first checkpoint write, then the resume's "
     "next checkpoint write"),
    ("sampler_worker", ["worker:3"], "a sampler worker process (sampler.workers=1) before its third rollout; "
     "the main process stops with exit code 1"),
]
#: per case: overrides beyond COMMON, and the exit code of the interrupted command (SIGKILL: -9)
VARIANTS = {"sampler_worker": (["sampler.workers=1"], 1)}


def _env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "METARL_FAULT"}
    if fault:
        env["METARL_FAULT"] = fault
    return env


def _cli(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metarl.cli", *args], cwd=REPO, env=_env(fault), capture_output=True,
                          text=True, timeout=900)


def _kill_after(args: list[str], seconds: float) -> int:
    """Run the command and SIGKILL it ``seconds`` after its start (if it is still running); its exit code."""
    proc = subprocess.Popen([sys.executable, "-m", "metarl.cli", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        return proc.wait()


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
    history = [(r / "eval" / "test" / "history.jsonl") for r in (a, b)]
    if not history[1].is_file() or history[0].read_text() != history[1].read_text():
        diffs.append("eval/test/history.jsonl")
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


def interrupted(run: Path) -> str:
    """What a kill interrupted, read from the run folder it left."""
    if not (run / "config.yaml").is_file():
        return "startup, before config.yaml"
    latest = run / "checkpoints" / "latest.pt"
    previous = run / "checkpoints" / "previous.pt"
    try:
        at = torch.load(latest if latest.is_file() else previous, weights_only=True)["iteration"]
    except (OSError, RuntimeError, KeyError):
        return "iteration 1, before the first checkpoint"
    try:
        done = json.loads((run / "checkpoints" / "evals.json").read_text())["done"]
    except (OSError, ValueError, KeyError):
        done = []
    config = yaml.safe_load((run / "config.yaml").read_text())
    every, last = config["eval"]["every"], config["iterations"]
    if (at == last or (every and at % every == 0)) and at not in done:
        return f"the evaluation after iteration {at}" + (" (the run's first)" if not done else "")
    return f"iteration {at + 1}" if at < last else "after the last evaluation was recorded"


def random_cases(agent: str, kills: int, duration: float, work: Path, reference: Path, seed: int) -> list[dict]:
    """``kills`` runs of ``agent`` each SIGKILLed from outside at a moment uniform over ``duration`` seconds (the
    uninterrupted run's wall time), resumed and compared with ``reference``."""
    rng = random.Random(seed)
    out = []
    for k in range(kills):
        run = work / f"{agent}-random{k}"
        for _attempt in range(3):  # a run that finished before its moment (a quieter machine) measures the next draw
            at = rng.uniform(0, duration)
            shutil.rmtree(run, ignore_errors=True)
            began = time.perf_counter()
            code = _kill_after(["train", *AGENTS[agent], *COMMON, "--run-dir", str(run), "--quiet"], at)
            if code != 0:
                break
            duration = time.perf_counter() - began
        record: dict[str, Any] = {"case": f"random{k}", "agent": agent, "kill_at_s": round(at, 2),
                                  "kill_at_fraction": round(at / duration, 3), "draws": _attempt + 1,
                                  "exit_codes": [code], "killed": code == -9}
        record["interrupts"] = interrupted(run) if record["killed"] else "nothing: the run finished first"
        done = None
        if code != 0:  # killed before config.yaml was in place: started again in place, as --resume says to
            again = ["--resume", str(run)] if (run / "config.yaml").is_file() else [*AGENTS[agent], *COMMON, "--run-dir",
                                                                                    str(run)]
            done = _cli(["train", *again, "--quiet"])
        if done is not None:
            record["exit_codes"].append(done.returncode)
        record["finished"] = code == 0 or done.returncode == 0
        if not record["finished"]:
            record["error"] = done.stderr.strip().splitlines()[-1:] if done.stderr.strip() else []
        record["differences"] = compare_runs(reference, run) if record["finished"] else ["did not finish"]
        record["identical"] = record["finished"] and not record["differences"]
        out.append(record)
    return out


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


def _report(record: dict[str, Any]) -> None:
    label = record.get("case") or record["faults"][0]
    print(f"{record.get('agent', record.get('command')):<10} {label:<24} exit codes {record['exit_codes']} "
          + (f"({record['interrupts']}) " if "kill_at_s" in record else "")
          + ("identical" if record["identical"] else "DIFFERS: " + ", ".join(record["differences"])), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "fault_injection.json"))
    parser.add_argument("--keep", help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--random-kills", type=int, default=10, help="kills at random moments per agent (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random moments")
    parser.add_argument("--shared", default="alone", help="what else ran on the cores, written into the results "
                        "(default 'alone')")
    args = parser.parse_args()
    recorder = Recorder()
    work = Path(args.keep or tempfile.mkdtemp(prefix="metarl-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cases: list[dict[str, Any]] = []
    references, durations = {}, {}
    for agent in AGENTS:
        reference = work / f"{agent}-reference"
        began = time.perf_counter()
        done = _cli(["train", *AGENTS[agent], *COMMON, "--run-dir", str(reference), "--quiet"])
        durations[agent] = time.perf_counter() - began
        assert done.returncode == 0, done.stderr
        references[agent] = reference
        for name, faults, what in CASES:
            record = {"case": name, "interrupts": what, **run_case(agent, name, faults, work, reference)}
            cases.append(record)
            _report(record)
        for record in random_cases(agent, args.random_kills, durations[agent], work, reference,
                                   seed=args.seed * 1000 + len(references)):
            cases.append(record)
            _report(record)
    for record in eval_cases(references["maml_trpo"], work) + bench_cases(work):
        cases.append(record)
        _report(record)
    random_kills = [c for c in cases if "kill_at_s" in c and c["killed"]]
    kills = sum(len(c["faults"]) for c in cases if "faults" in c) + len(random_kills)
    result = {
        "what": "SIGKILL at named moments (metarl.system.fault_point) and at moments uniform over the run (from "
                "outside), resume/rerun, compare with an uninterrupted run",
        "what_else_ran": args.shared,
        "settings": {"agents": AGENTS, "common": COMMON, "family": "PointNav2D", "random_kills_per_agent":
                     args.random_kills, "seed": args.seed,
                     "uninterrupted_wall_time_s": {a: round(t, 1) for a, t in durations.items()}},
        "kills": kills,
        "random_kills": {"sent": len([c for c in cases if "kill_at_s" in c]), "landed": len(random_kills),
                         "in_an_evaluation": sum("evaluation" in c["interrupts"] for c in random_kills),
                         "in_the_first_evaluation": sum("first" in c["interrupts"] for c in random_kills),
                         "identical": sum(c["identical"] for c in random_kills)},
        "cases": cases,
        "all_identical": all(c["identical"] for c in cases),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    write_result(args.out, result, recorder)
    print(f"{sum(c['identical'] for c in cases)}/{len(cases)} cases identical ({kills} kills, "
          f"{len(random_kills)} of them at random moments); written to {args.out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
