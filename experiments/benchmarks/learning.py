"""Learning benchmark for any agent: train a config (over one or several seeds), evaluate on held-out tasks,
write the figures to a file.

    python experiments/benchmarks/learning.py CONFIG [key=value ...] --out experiments/results/NAME.json
    python experiments/benchmarks/learning.py CONFIG [key=value ...] --seeds 0 1 2 --out ...   # several seeds
    python experiments/benchmarks/learning.py --resume RUN_DIR iterations=N --out ...   # continue one run
    python experiments/benchmarks/learning.py --combine A.json B.json ... --out ALL.json  # seeds run apart

One seed writes the training curve (pre- and post-adaptation return per iteration), the held-out adaptation
curve of the final policy (mean return and 95% bootstrap CI over tasks per adaptation stage), the held-out
curve over training (every ``eval.every`` iterations, from the run's ``eval/<split>/history.jsonl``), wall
time, env steps and the resolved config.

``--seeds`` runs the seeds one after the other (the cores are the parallelism) in the run folders
``<run_root>/<experiment>/learning-seed<k>``, writes the file after every seed, and is resumable: run the
same command again and finished seeds are read back, a killed seed continues from its checkpoint (its
``wall_time_s`` is then that of the resumed part, ``resumed: true``; ``train_time_s`` is always whole; the
command's fields that a resume may change, such as ``sampler.workers`` or ``sampler.max_slots``, apply to it and
may differ from the first command's), and a seed folder that holds a run of other settings is refused with the
fields that differ, not continued. The file holds every seed's result and ``aggregate``: per adaptation stage
and per evaluation iteration, the mean over seeds with a 95% t-interval across seeds (and where the env reports success, as Meta-World's do, the
success rate per stage the same way: ``heldout_success_stages``); beside it a PNG of the per-seed curves and
their mean.

Where the held-out evaluation swings between evaluations (HalfCheetahDir's two tasks: by 100 and more ten
iterations apart), the final point is one phase of that swing. So every result also carries ``heldout_late``:
per adaptation stage, the mean of the held-out curve over its last third (the evaluations at iterations
>= 2/3 of the run), and the aggregate the mean of those over seeds with its t-interval (``heldout_late_stages``).
``--final-repeats R`` also evaluates each seed's final policy with R independent adaptations per held-out task,
pooled (``metarl eval --repeats R``, into ``RUN_DIR/eval/<split>-repeats<R>/``): ``heldout_repeated`` per seed,
``heldout_repeated_stages`` over seeds. Seeds read back from an earlier file get it too, from their folders.
On a Meta-World family, ``--metaworld-protocol N`` also runs Meta-World's own evaluation on each seed's final
policy (`metarl.metaworld_eval.run_protocol`: its defaults, N evaluations of 10 sub-envs, as shipped and per
sub-env): ``metaworld_protocol`` per seed (beside metarl's own figure at the matching stage) and, over seeds,
``metaworld_protocol_success`` (each variant's success rate, mean with its t-interval). Read-back seeds too.

``--combine`` gathers seeds trained by separate commands (single-seed or ``--seeds`` result files) into one
multi-seed file with the same ``aggregate`` and PNG, no training: refused, naming the field, unless every file's
resolved config is the same but for ``seed``, ``experiment``, ``run_root`` and ``checkpoint_every`` (and the
fields a resume may change), with the same number of iterations; a seed in two files is refused too. ``combined_from`` records each
file with its seeds, overrides and note.
"""

from __future__ import annotations

from metarl.system import sleeping_openmp_threads

sleeping_openmp_threads()  # a program: PyTorch's threads sleep while they wait (set before torch loads)

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from metarl.config import RunConfig, load_config
from metarl.evaluation import t_ci95
from metarl.provenance import MISSING as MISSING_PROVENANCE
from metarl.provenance import Recorder
from metarl.runfolder import (
    MAY_CHANGE,
    config_changes,
    config_record,
    load_run_config,
    read_eval_history,
    record_changes,
    with_added_options,
)
from metarl.system import atomic_write
from metarl.training import train


def late_stages(curve: list[dict[str, Any]], iterations: int) -> dict[str, Any] | None:
    """The held-out curve's mean per adaptation stage over the evaluations at iterations >= 2/3 of the run
    (None when the run evaluated nowhere there)."""
    first = 2 * iterations / 3
    late = [e for e in curve if e["iteration"] >= first]
    if not late:
        return None
    k_max = min(len(e["stages"]) for e in late)
    return {"from_iteration": late[0]["iteration"], "to_iteration": late[-1]["iteration"], "evaluations": len(late),
            "stages": [{"stage": k, "mean_return": float(np.mean([e["stages"][k]["mean_return"] for e in late]))}
                       for k in range(k_max)]}


def run_result(config: RunConfig, run_dir: Path, wall: float) -> dict[str, Any]:
    """What one finished run contributes: curves, held-out stages, cost."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = json.loads((run_dir / "eval" / config.eval.split / "summary.json").read_text())
    curve = read_eval_history(run_dir / "eval" / config.eval.split / "history.jsonl")
    return {
        "seed": config.seed,
        "wall_time_s": wall,
        "train_time_s": sum(r["time/iteration_s"] for r in rows),
        "iterations": len(rows),
        "env_steps": rows[-1]["env_steps"],
        "training_curve": [
            {"iteration": r["iteration"], "env_steps": r["env_steps"], "pre": r["meta/return_pre_adaptation"],
             "post": r["meta/return_post_adaptation"],
             **({"inner_kl": r["meta/inner_kl"]} if "meta/inner_kl" in r else {}),
             # where the env reports info["success"] (Meta-World): the share of episodes that succeeded, per
             # stage (MAML-TRPO: before and after the inner step; RL²: episode k of the trial)
             **{k[len("meta/"):]: v for k, v in r.items() if k.startswith("meta/success_rate_stage")}} for r in rows
        ],
        "heldout": {
            "split": summary["split"], "num_tasks": summary["num_tasks"], "horizon": summary["horizon"],
            "stages": [{k: s[k] for k in ("stage", "adapt_episodes", "adapt_env_steps", "mean_return", "ci95",
                                          "gain", "gain_ci95", "within_episode", "success_rate", "success_ci95",
                                          "per_task_success", "reward_terms")
                        if k in s and s[k] is not None}
                       for s in summary["stages"]],
            **({"by_env": summary["by_env"]} if "by_env" in summary else {}),  # Meta-World ML10/ML45
        },
        "heldout_curve": curve,
        "heldout_late": late_stages(curve, len(rows)),
        "run_dir": str(run_dir),
    }


@contextlib.contextmanager
def final_policy(run_dir: Path, iterations: int, flag: str) -> Iterator[Any]:
    """The `metarl.api.MetaLearner` of the run folder's newest checkpoint, for ``flag``'s evaluation of a seed's final
    policy. Refused (SystemExit naming ``flag``) unless that checkpoint is the result's final policy (iteration
    ``iterations``): a folder gone, extended since, or fallen back to its previous checkpoint is not what the
    result describes."""
    import metarl.api as mrl

    if not (run_dir / "config.yaml").is_file():
        raise SystemExit(f"{flag}: the run folder {run_dir} of a finished seed is gone (or the path is relative to "
                         "another directory); the final policy cannot be evaluated again")
    with mrl.load(run_dir) as learner:
        if learner.agent.iteration != iterations:
            raise SystemExit(f"{flag}: {run_dir} holds iteration {learner.agent.iteration}, not the final policy of "
                             f"this result (iteration {iterations}); not evaluated")
        yield learner


def repeated_eval(run_dir: Path, repeats: int, iterations: int) -> dict[str, Any]:
    """The final policy's held-out evaluation with ``repeats`` independent adaptations per task (the run's
    eval settings otherwise), as the result files store it. Refused unless the folder's newest checkpoint
    is the result's final policy (iteration ``iterations``): a folder extended since, or fallen back to
    its previous checkpoint, is not what the result describes."""
    with final_policy(run_dir, iterations, "--final-repeats") as learner:
        summary = learner.evaluate(repeats=repeats)
    keep = ("stage", "adapt_episodes", "mean_return", "ci95", "gain", "gain_ci95", "success_rate", "success_ci95")
    return {"repeats": repeats, "distinct_tasks": summary["distinct_tasks"], "num_tasks": summary["num_tasks"],
            "iteration": summary["iteration"],
            "stages": [{k: st[k] for k in keep if k in st} for st in summary["stages"]],
            **({"by_task": by_task(summary)} if summary["distinct_tasks"] <= MAX_BY_TASK else {})}


def protocol_eval(run_dir: Path, num_evals: int, iterations: int, heldout: dict[str, Any]) -> dict[str, Any]:
    """Meta-World's own evaluation (both variants, its defaults, ``num_evals`` evaluations) of the final policy in
    ``run_dir``, with metarl's figure at the matching stage of ``heldout`` (the seed's final evaluation); refused
    unless the folder's newest checkpoint is that policy (iteration ``iterations``), as `repeated_eval`."""
    from metarl.metaworld_eval import PROTOCOL, SUB_ENVS, beside_metarl, run_protocol

    with final_policy(run_dir, iterations, "--metaworld-protocol") as learner:
        try:
            result = run_protocol(learner, sub_envs=SUB_ENVS, **dict(PROTOCOL, num_evals=num_evals))
        except ValueError as exc:
            raise SystemExit(f"--metaworld-protocol: {exc}") from None
    return beside_metarl(result, heldout["stages"])


def print_protocol(name: str, result: dict[str, Any] | None) -> None:
    if result:
        from metarl.metaworld_eval import report_lines

        print(f"{name}: Meta-World's own evaluation, iteration {result['iteration']}:")
        for line in report_lines(result):
            print(f"  {line}")


MAX_BY_TASK = 10  # families with this many distinct held-out tasks or fewer get each task's own returns


def by_task(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each distinct task's mean return per stage over its repeated adaptations, in the order the tasks first
    appear: a mean over HalfCheetahDir's two directions can hide one of them not adapting at all."""
    groups: dict[str, list[int]] = {}
    for i, task in enumerate(summary["tasks"]):
        groups.setdefault(json.dumps(task, sort_keys=True), []).append(i)
    return [{"task": json.loads(key), "adaptations": len(rows),
             "mean_return": [sum(st["per_task"][i] for i in rows) / len(rows) for st in summary["stages"]]}
            for key, rows in groups.items()]


def aggregate(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds and a 95% t-interval across seeds: the final held-out stages, the held-out curve at
    the iterations every seed evaluated, each seed's late-curve mean (computed here from its curve, so seeds
    read back from an older file get it too), and the training curve's post-adaptation return."""
    def stat(values: list[float]) -> dict[str, Any]:
        return {"mean": float(np.mean(values)), "ci95": list(t_ci95(np.array(values))), "per_seed": values}

    def by_stage(per_seed_stages: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """Each seed's list of stages -> per stage (as far as every seed has it) the stat of their returns."""
        n = min(len(x) for x in per_seed_stages)
        return [{"stage": k, **stat([x[k]["mean_return"] for x in per_seed_stages])} for k in range(n)]

    stages = by_stage([s["heldout"]["stages"] for s in seeds])
    success = None  # where every seed's env reports success (Meta-World): its rate per stage, over seeds
    if all("success_rate" in st for s in seeds for st in s["heldout"]["stages"]):
        n = min(len(s["heldout"]["stages"]) for s in seeds)
        success = [{"stage": k, **stat([s["heldout"]["stages"][k]["success_rate"] for s in seeds])} for k in range(n)]
    common = sorted(set.intersection(*({e["iteration"] for e in s["heldout_curve"]} for s in seeds)))
    curve = []
    for it in common:
        evals = [next(e for e in s["heldout_curve"] if e["iteration"] == it) for s in seeds]
        curve.append({"iteration": it, "stages": by_stage([e["stages"] for e in evals])})
    lates = [late_stages(s["heldout_curve"], s["iterations"]) for s in seeds]
    late = by_stage([x["stages"] for x in lates]) if all(lates) else None
    repeats = {s.get("heldout_repeated", {}).get("repeats") for s in seeds}
    repeated = None
    if len(repeats) == 1 and None not in repeats:  # every seed, with one R
        repeated = by_stage([s["heldout_repeated"]["stages"] for s in seeds])
    protocol = None  # Meta-World's own evaluation of every seed's final policy: each variant's success over seeds
    if all("metaworld_protocol" in s for s in seeds):
        protocol = {v: stat([s["metaworld_protocol"][v]["success_rate"] for s in seeds])
                    for v in ("shipped", "per_env") if all(v in s["metaworld_protocol"] for s in seeds)}
        if all("metarl" in s["metaworld_protocol"] for s in seeds):
            protocol["metarl"] = stat([s["metaworld_protocol"]["metarl"]["success_rate"] for s in seeds])
    n_it = min(len(s["training_curve"]) for s in seeds)
    training = [{"iteration": i + 1, "pre": float(np.mean([s["training_curve"][i]["pre"] for s in seeds])),
                 "post": float(np.mean([s["training_curve"][i]["post"] for s in seeds]))} for i in range(n_it)]
    return {"seeds": [s["seed"] for s in seeds], "heldout_stages": stages,
            **({"heldout_success_stages": success} if success else {}),
            **({"metaworld_protocol_success": protocol} if protocol else {}), "heldout_curve": curve,
            "heldout_late_stages": late, "heldout_repeated_stages": repeated,
            "heldout_repeats": repeats.pop() if repeated else None, "training_curve_mean": training,
            "wall_time_s": stat([s["wall_time_s"] for s in seeds]),
            "train_time_s": stat([s["train_time_s"] for s in seeds])}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    seeds = result["per_seed"]
    for s in seeds:
        axes[0].plot([r["iteration"] for r in s["training_curve"]], [r["post"] for r in s["training_curve"]],
                     lw=0.6, alpha=0.5, label=f"seed {s['seed']} post")
        curve = s["heldout_curve"]
        if curve and len(curve[0]["stages"]) > 1:
            axes[1].plot([e["iteration"] for e in curve], [e["stages"][1]["mean_return"] for e in curve],
                         lw=0.8, alpha=0.6, label=f"seed {s['seed']}")
    agg = result.get("aggregate")
    if agg and agg["heldout_curve"] and len(agg["heldout_curve"][0]["stages"]) > 1:
        its = [e["iteration"] for e in agg["heldout_curve"]]
        for k, style in ((0, "--"), (1, "-")):
            mean = [e["stages"][k]["mean"] for e in agg["heldout_curve"]]
            axes[1].plot(its, mean, "k" + style, lw=2, label=f"mean, stage {k}")
            if len(seeds) > 1:
                lo = [e["stages"][k]["ci95"][0] for e in agg["heldout_curve"]]
                hi = [e["stages"][k]["ci95"][1] for e in agg["heldout_curve"]]
                axes[1].fill_between(its, lo, hi, color="k", alpha=0.12)
    axes[0].set(title="training: return after adaptation", xlabel="iteration", ylabel="return")
    axes[1].set(title="held-out: after 1 step (seeds), mean stage 0 / 1", xlabel="iteration", ylabel="return")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['agent']} on {result['config']['env']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_stages(name: str, stages: list[dict[str, Any]], key: str = "mean_return") -> None:
    curve = " -> ".join(f"{s[key]:.1f} [{s['ci95'][0]:.1f}, {s['ci95'][1]:.1f}]" for s in stages)
    print(f"{name}: held-out return by adaptation stage: {curve}", flush=True)
    gains = [f"{s['gain']:+.1f} [{s['gain_ci95'][0]:+.1f}, {s['gain_ci95'][1]:+.1f}]" for s in stages if "gain" in s]
    if gains:
        print(f"{name}: paired gain over stage 0 by stage: {', '.join(gains)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run (overrides: iterations=N only)")
    parser.add_argument("--seeds", type=int, nargs="+", help="run these seeds one after another (resumable)")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", required=True)
    parser.add_argument("--note", default="", help="free text stored with the result (e.g. what to compare with)")
    parser.add_argument("--final-repeats", type=int, default=1, metavar="R",
                        help="also evaluate the final policy with R independent adaptations per held-out task")
    parser.add_argument("--metaworld-protocol", type=int, default=None, metavar="N",
                        help="Meta-World families: also run Meta-World's own evaluation (N evaluations) on each "
                        "seed's final policy")
    parser.add_argument("--combine", nargs="+", metavar="FILE",
                        help="gather these result files' seeds (the same settings) into --out, without training")
    args = parser.parse_args()
    if args.final_repeats < 1:
        parser.error(f"--final-repeats must be >= 1, got {args.final_repeats}")
    if args.metaworld_protocol is not None and args.metaworld_protocol < 1:
        parser.error(f"--metaworld-protocol must be >= 1, got {args.metaworld_protocol}")
    out = Path(args.out)
    recorder = Recorder()
    if args.combine:
        if (args.config or args.overrides or args.seeds or args.resume or args.final_repeats > 1
                or args.metaworld_protocol is not None):
            parser.error("--combine takes result files and --out (and --note) only")
        return combine(args.combine, out, args.note, recorder)
    if args.seeds:
        if args.resume:
            parser.error("--seeds and --resume do not go together (rerun the --seeds command to resume)")
        if len(set(args.seeds)) != len(args.seeds):
            parser.error(f"--seeds: duplicate seeds in {args.seeds}")
        return multi_seed(args, out, recorder)
    start = time.perf_counter()
    previous: dict = {}
    if args.resume:
        if args.config:  # argparse reads the first key=value as CONFIG
            args.overrides = [args.config, *args.overrides]
        run_dir = Path(args.resume)
        config = load_config(None, args.overrides, data=load_run_config(run_dir).to_dict())
        train(config, run_dir=run_dir, resume=True)
        previous = json.loads(out.read_text()) if out.is_file() else {}
        args.overrides = [*previous.get("overrides", []), *args.overrides]
        args.note = args.note or previous.get("note", "")
        wall = time.perf_counter() - start + float(previous.get("wall_time_s", 0.0))
    else:
        config = load_config(args.config, args.overrides)
        run_dir = train(config)
        wall = time.perf_counter() - start
    result = {"benchmark": "learning", "agent": config.agent_name, "config": config.to_dict(),
              "overrides": args.overrides, "note": args.note, **run_result(config, run_dir, wall)}
    if args.final_repeats > 1:
        result["heldout_repeated"] = repeated_eval(run_dir, args.final_repeats, result["iterations"])
    if args.metaworld_protocol is not None:
        result["metaworld_protocol"] = protocol_eval(run_dir, args.metaworld_protocol, result["iterations"],
                                                     result["heldout"])
    result["provenance"] = recorder.record(resumed=bool(args.resume))
    if previous:  # the earlier parts of a resumed run keep their own records
        result["provenance_earlier"] = [*previous.get("provenance_earlier", []),
                                        previous.get("provenance", MISSING_PROVENANCE)]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(result, indent=2) + "\n")
    print(f"{config.env}: {result['iterations']} iterations, {result['env_steps']:,} env steps, training "
          f"{result['train_time_s']:.0f} s; written to {out}")
    print_stages(config.env, result["heldout"]["stages"])
    print_late(config.env, result["heldout_late"])
    print_repeated(config.env, result.get("heldout_repeated"))
    print_protocol(config.env, result.get("metaworld_protocol"))


def print_repeated(name: str, repeated: dict[str, Any] | None) -> None:
    if repeated:
        print_stages(f"{name}, final policy, {repeated['repeats']} adaptations per task "
                     f"({repeated['num_tasks']} in all)", repeated["stages"])
        for task in repeated.get("by_task", []):
            print(f"{name}, task {json.dumps(task['task'])}: " + " -> ".join(f"{v:.1f}" for v in task["mean_return"]))


def print_late(name: str, late: dict[str, Any] | None) -> None:
    if late:
        values = " -> ".join(f"{s['mean_return']:.1f}" for s in late["stages"])
        print(f"{name}: held-out curve's mean over its last third (iterations {late['from_iteration']}-"
              f"{late['to_iteration']}, {late['evaluations']} evaluations) by stage: {values}", flush=True)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict's leaves by dotted key (``{"sampler": {"workers": 2}}`` -> ``{"sampler.workers": 2}``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _settings(overrides: list[str]) -> list[str]:
    """The overrides that decide a run's numbers: all but those of fields a resume may change (`MAY_CHANGE`:
    the sampler's workers and slots, the device), which may differ between the commands that write one file."""
    return [o for o in overrides if o.split("=", 1)[0].strip() not in MAY_CHANGE]


def multi_seed(args: argparse.Namespace, out: Path, recorder: Recorder) -> None:
    previous = json.loads(out.read_text()) if out.is_file() else {}
    done = {s["seed"]: s for s in previous.get("per_seed", [])}
    if previous and _settings(previous.get("overrides", [])) != _settings(args.overrides):
        raise SystemExit(f"{out}: written with overrides {previous.get('overrides')}, not {args.overrides}; "
                         "use another --out (or delete it) rather than mixing settings")
    per_seed = []
    config = None
    for seed in args.seeds:
        config = load_config(args.config, [*args.overrides, f"seed={seed}"])
        if done.get(seed, {}).get("iterations") == config.iterations:
            entry = done[seed]  # finished earlier (a file older than heldout_late gets it from its curve)
            entry.setdefault("heldout_late", late_stages(entry["heldout_curve"], entry["iterations"]))
            entry.setdefault("provenance", MISSING_PROVENANCE)
            if args.final_repeats > 1 and entry.get("heldout_repeated", {}).get("repeats") != args.final_repeats:
                entry = {**entry, "heldout_repeated": repeated_eval(Path(entry["run_dir"]), args.final_repeats,
                                                                    entry["iterations"])}
                print_repeated(f"seed {seed}", entry["heldout_repeated"])
            if args.metaworld_protocol is not None and entry.get("metaworld_protocol", {}).get(
                    "protocol", {}).get("num_evals") != args.metaworld_protocol:
                entry = {**entry, "metaworld_protocol": protocol_eval(Path(entry["run_dir"]), args.metaworld_protocol,
                                                                      entry["iterations"], entry["heldout"])}
                print_protocol(f"seed {seed}", entry["metaworld_protocol"])
                write_multi(out, args, config, [*per_seed, entry], recorder, complete=False)
            per_seed.append(entry)
            continue
        run_dir = Path(config.run_root) / config.experiment / f"learning-seed{seed}"
        resume = (run_dir / "config.yaml").is_file()
        if resume:  # a killed seed continues in its folder (from its checkpoint, if it got one), with its config
            stored = load_run_config(run_dir)
            changes = config_changes(config_record(stored.to_dict()), config.to_dict())
            if changes:  # a folder of other settings (an earlier command, another --out) is not continued
                raise SystemExit(f"{run_dir}: holds a run of other settings ({'; '.join(changes)}); set "
                                 "experiment=NAME for these settings, or delete that folder to start afresh")
            # with its config, but for what a resume may change (the sampler's workers and slots, the device)
            carried = [f"{key}={json.dumps(value)}" for key, value in _flat(config.to_dict()).items()
                       if key in MAY_CHANGE]
            config = load_config(None, [f"iterations={config.iterations}", *carried], data=stored.to_dict())
        start, seed_recorder = time.perf_counter(), Recorder()
        train(config, run_dir=run_dir, resume=resume)
        per_seed.append({**run_result(config, run_dir, time.perf_counter() - start), "resumed": resume})
        if args.final_repeats > 1:  # after the wall time: an evaluation, not training
            per_seed[-1]["heldout_repeated"] = repeated_eval(run_dir, args.final_repeats, per_seed[-1]["iterations"])
        if args.metaworld_protocol is not None:
            per_seed[-1]["metaworld_protocol"] = protocol_eval(run_dir, args.metaworld_protocol,
                                                               per_seed[-1]["iterations"], per_seed[-1]["heldout"])
        per_seed[-1]["provenance"] = seed_recorder.record(resumed=resume)
        print_stages(f"seed {seed}", per_seed[-1]["heldout"]["stages"])
        print_late(f"seed {seed}", per_seed[-1]["heldout_late"])
        print_repeated(f"seed {seed}", per_seed[-1].get("heldout_repeated"))
        print_protocol(f"seed {seed}", per_seed[-1].get("metaworld_protocol"))
        write_multi(out, args, config, per_seed, recorder, complete=False)
    print_aggregate(write_multi(out, args, config, per_seed, recorder, complete=True))


#: Config fields that may differ between the files `combine` gathers: where a seed ran, not what it ran.
COMBINE_MAY_DIFFER = MAY_CHANGE | {"seed", "experiment", "run_root", "checkpoint_every"}  # (no number depends on them)


def combine(files: list[str], out: Path, note: str, recorder: Recorder) -> None:
    """Gather the seeds of several result files (the same settings, trained apart) into one multi-seed file."""
    per_seed: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []
    first: dict[str, Any] | None = None
    for name in files:
        try:
            result = json.loads(Path(name).read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--combine: cannot read {name}: {exc}") from None
        if not isinstance(result, dict) or result.get("benchmark") != "learning" or "config" not in result:
            raise SystemExit(f"--combine: {name} is not a learning.py result file")
        seeds = result["per_seed"] if "per_seed" in result else [
            {k: v for k, v in result.items() if k not in ("benchmark", "agent", "config", "overrides", "note")}]
        if first is None:
            first = result
        else:
            changes = record_changes(with_added_options(first["config"]), with_added_options(result["config"]),
                                     COMBINE_MAY_DIFFER)
            if changes:
                raise SystemExit(f"--combine: {name} ran other settings than {files[0]} ({'; '.join(changes)})")
        for entry in seeds:
            if per_seed and entry["iterations"] != per_seed[0]["iterations"]:
                raise SystemExit(f"--combine: {name} seed {entry['seed']} ran {entry['iterations']} iterations, "
                                 f"not {per_seed[0]['iterations']} as seed {per_seed[0]['seed']}")
            if entry["seed"] in [s["seed"] for s in per_seed]:
                raise SystemExit(f"--combine: seed {entry['seed']} is in two files (the second: {name})")
            per_seed.append({**entry, "provenance": entry.get("provenance", result.get("provenance", MISSING_PROVENANCE))})
        sources.append({"file": name, "seeds": [s["seed"] for s in seeds], "overrides": result.get("overrides", []),
                        "note": result.get("note", "")})
    assert first is not None
    seeds = [s["seed"] for s in per_seed]
    result = {"benchmark": "learning", "agent": first["agent"], "config": {**first["config"], "seed": None},
              "overrides": first.get("overrides", []), "note": note, "combined_from": sources, "seeds": seeds,
              "complete": True, "per_seed": per_seed, "aggregate": aggregate(per_seed),
              "provenance": recorder.record()}
    save_multi(out, result)
    print(f"seeds {seeds} from {len(files)} files written to {out}")
    print_aggregate(result["aggregate"])


def print_aggregate(agg: dict[str, Any]) -> None:
    n = len(agg["seeds"])
    print_stages(f"mean of {n} seeds", agg["heldout_stages"], key="mean")
    if agg.get("heldout_success_stages"):
        print(f"mean of {n} seeds: held-out success by stage: " + " -> ".join(
            f"{s['mean']:.1%} [{s['ci95'][0]:.1%}, {s['ci95'][1]:.1%}]" for s in agg["heldout_success_stages"]))
    if agg["heldout_late_stages"]:
        print_stages(f"mean of {n} seeds, held-out curve's last third", agg["heldout_late_stages"], key="mean")
    names = {"shipped": "Meta-World's evaluation as shipped", "per_env": "Meta-World's evaluation per sub-env",
             "metarl": "metarl's evaluator at the same stage"}
    for variant, figure in agg.get("metaworld_protocol_success", {}).items():
        print(f"mean of {n} seeds: {names[variant]}: success {figure['mean']:.1%} "
              f"[{figure['ci95'][0]:.1%}, {figure['ci95'][1]:.1%}]")
    if agg["heldout_repeated_stages"]:
        print_stages(f"mean of {n} seeds, final policy, {agg['heldout_repeats']} adaptations per task",
                     agg["heldout_repeated_stages"], key="mean")


def write_multi(out: Path, args: argparse.Namespace, config: RunConfig, per_seed: list[dict], recorder: Recorder,
                complete: bool) -> dict[str, Any]:
    """Write a multi-seed result file and its PNG; returns its aggregate."""
    result = {"benchmark": "learning", "agent": config.agent_name, "config": {**config.to_dict(), "seed": None},
              "overrides": args.overrides, "note": args.note, "seeds": args.seeds, "complete": complete,
              "per_seed": per_seed, "aggregate": aggregate(per_seed), "provenance": recorder.record()}
    save_multi(out, result)
    return result["aggregate"]


def save_multi(out: Path, result: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
