"""The ``metarl`` command line.

    metarl families                     list the task families
    metarl rollout FAMILY [--split S]   roll out a random policy on tasks of a family
    metarl check ID                     check a (custom) task family against metarl's contracts
    metarl train CONFIG [k=v ...]       meta-train (see experiments/), --resume RUN_DIR to continue
    metarl eval RUN_DIR [--split S]     adaptation curve on held-out tasks -> RUN_DIR/eval/<split>/
    metarl eval RUN_DIR --video         ... plus GIFs and MP4s of held-out episodes before and after adaptation
    metarl eval zoo:NAME                evaluate a pretrained zoo entry -> runs/zoo/NAME/eval/<split>/, against
                                        the figure it records
    metarl zoo [NAME]                   list the zoo of pretrained meta-policies, or show one entry
    metarl zoo --export RUN_DIR AGENT/NAME --to DIR   make a zoo entry of a run of your own
    metarl speed [--family F] [--json]  simulator / Gymnasium / sampler step rates, side by side
    metarl bench SUITE.yaml [--out DIR] meta-learners and SB3 baselines under one protocol, one report
    metarl sweep SWEEP.yaml [--out DIR] a search over config keys and seeds on Ray Tune, with its report
    metarl reproduce NAME [--quick]     regenerate a headline result of experiments/manifest.yaml (--list,
                                        --table [--write] for the README's results table, --check)
    metarl --version                    the installed version

``train`` takes ``key=value`` overrides anywhere after its command (before, between or after the options).

Every command takes ``--import MODULE_OR_FILE`` (repeatable): a module or a .py file of yours that registers
your own task families or agents (the same as ``imports:`` in a config or suite; see `metarl.plugins`).

Usage errors (unknown family, bad arguments) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import metarl
from metarl.provenance import invoked_as
from metarl.tasks import TaskError


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def _cmd_families(args: argparse.Namespace) -> int:
    _user_code(args)  # a bad --import is an error here too; the table lists the built-in families
    print(f"{'family':<20} {'id':<30} {'horizon':>7} {'obs':>5} {'act':>4}  splits")
    for name in metarl.FAMILIES:
        env = metarl.make_family(name)
        fam = metarl.family_of(env)
        splits = "train, test" + (", ood" if fam.has_ood else "") + ("" if fam.disjoint_heldout else " (test = all tasks)")
        print(
            f"{name:<20} {metarl.env_id(name):<30} {fam.horizon:>7} {env.observation_space.shape[0]:>5} "
            f"{env.action_space.shape[0]:>4}  {splits}"
        )
        env.close()
    from metarl.envs.meta_world import family_ids, installed

    if installed():  # not made here: each Meta-World family loads its own MuJoCo models
        print(f"Meta-World (the metaworld extra): ML1-<env> as metarl/ML1-<env>-v0 for its {len(family_ids()) - 2} v3 "
              "envs (e.g. ML1-reach-v3), ML10 and ML45 as metarl/ML10-v0, metarl/ML45-v0; horizon 500, obs 39, act 4, splits train, test")
    return 0


def _user_code(args: argparse.Namespace) -> tuple[str, ...]:
    """Import the modules named by ``--import`` (relative paths: to the current directory); their stored form."""
    from metarl.plugins import load, resolve

    resolved: list[str] = []
    for entry in getattr(args, "imports", None) or ():
        try:
            resolved.append(resolve(entry))
            load(resolved[-1:])
        except TaskError as exc:
            raise UsageError(f"--import {entry}: {exc}") from exc
    return tuple(resolved)


def _cmd_rollout(args: argparse.Namespace) -> int:
    _user_code(args)
    names = list(metarl.FAMILIES) if args.all else [args.family]
    if not args.all and args.family is None:
        raise UsageError("rollout: name a FAMILY or pass --all")
    if args.episodes < 1:
        raise UsageError(f"rollout: --episodes must be >= 1, got {args.episodes}")
    for name in names:
        try:
            env = metarl.make_family(name)
            fam = metarl.family_of(env)
            task = fam.sample_tasks(1, split=args.split, seed=args.seed)[0]
        except TaskError as exc:
            raise UsageError(str(exc)) from exc
        fam.set_task(task)
        env.action_space.seed(args.seed)
        start, steps, returns = time.perf_counter(), 0, []
        for episode in range(args.episodes):
            env.reset(seed=args.seed + episode)
            total, done = 0.0, False
            while not done:
                _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
                total += float(reward)
                steps += 1
                done = terminated or truncated
            returns.append(total)
        rate = steps / (time.perf_counter() - start)
        params = ", ".join(f"{k}={_short(v)}" for k, v in task.params().items())
        print(f"{name:<20} {args.split} task ({params}): random-policy return {np.mean(returns):9.2f} "
              f"over {args.episodes} episode(s), {steps} steps, {rate:,.0f} steps/s")
        env.close()
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from metarl.checks import SKIPPABLE, FamilyCheckError, check_family

    _user_code(args)
    gid = metarl.resolve_id(args.family)  # a family name (built-in or Meta-World's) or an id
    skip = tuple(args.skip or ())
    try:
        passed = check_family(gid, skip=skip)
    except TaskError as exc:
        raise UsageError(str(exc)) from exc
    except FamilyCheckError as exc:
        print(f"FAIL {exc}")
        return 1
    for what in passed:
        print(f"ok   {what}")
    for name in skip:
        print(f"skipped {SKIPPABLE[name]} (--skip {name})")
    print(f"{gid}: all {len(passed)} checks passed" + (f", {len(skip)} skipped" if skip else ""))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    import metarl.api as mrl
    from metarl.config import ConfigError, load_config
    from metarl.runfolder import load_run_config

    imports = _user_code(args)
    try:
        if args.resume:
            run_dir = Path(args.resume)
            if args.config and "=" not in args.config:
                raise ConfigError(f"--resume continues {run_dir} with its own config.yaml; {args.config!r} would be "
                                  "ignored (to train with another config, start a new run without --resume)")
            if args.run_dir:
                raise ConfigError("--resume RUN_DIR names the run folder; --run-dir is for new runs")
            overrides = list(args.overrides) + ([args.config] if args.config else [])
            bad = [o for o in overrides if not o.startswith("iterations=")]
            if bad:
                raise ConfigError(f"--resume continues a run with its own config; only iterations=N may be changed, got {bad[0]!r}")
            for o in overrides:
                if o.split("=", 1)[1].strip().startswith(("+", "-")):
                    raise ConfigError(f"{o}: iterations=N is the run's new total number of iterations, not an "
                                      "increment; give the total (e.g. iterations=12)")
            config = load_run_config(run_dir, trust_code=args.trust_run_code)
            if overrides:
                config = load_config(None, overrides, data=config.to_dict())
            mrl.train(_on_ray(config, args), run_dir=run_dir, resume=True, verbose=not args.quiet).close()
        else:
            if not args.config:
                raise ConfigError("train: give a CONFIG file (e.g. experiments/maml_trpo/point_nav_2d.yaml) or --resume RUN_DIR")
            config = load_config(args.config, args.overrides)
            if imports:  # recorded in the run's config.yaml, so eval and --resume import them too
                config = dataclasses.replace(config, imports=tuple(dict.fromkeys(config.imports + imports)))
            mrl.train(_on_ray(config, args), run_dir=Path(args.run_dir) if args.run_dir else None,
                      verbose=not args.quiet).close()
    except (ConfigError, TaskError, FloatingPointError) as exc:
        raise UsageError(str(exc)) from exc
    return 0


def _on_ray(config, args: argparse.Namespace):
    """The config with its sampler placed on a Ray cluster if --ray or --address was given."""
    import dataclasses

    if not (args.ray or args.address):
        return config
    sampler = dataclasses.replace(config.sampler, placement="ray", address=args.address or config.sampler.address)
    return dataclasses.replace(config, sampler=sampler)


def _trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-run-code", action="store_true", help="import code that the run folder's own config.yaml "
                   "names from inside the folder (a module beside config.yaml); without it such a folder is refused, "
                   "since a folder someone shared could run anything that way")


def _ray_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--ray", action="store_true", help=f"{what} on a Ray cluster (the ray extra: pip install -e \".[ray]\"): "
                   "the one at --address, else RAY_ADDRESS, else the one started on this machine with `ray start`, "
                   "else a new local instance (ray.init's rules)")
    p.add_argument("--address", help="the Ray cluster's address (implies --ray), e.g. 10.0.0.1:6379 or auto")


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    video = _video_options(args)
    if video is not None:
        from metarl.video import configure_gl

        configure_gl()  # before anything imports mujoco: a headless Linux machine renders through EGL

    from metarl import zoo
    from metarl.config import ConfigError
    from metarl.runfolder import load_run_config, run_lock
    from metarl.video import VideoError

    _user_code(args)
    entry = None
    try:
        if zoo.is_reference(args.run_dir):
            entry = zoo.find(args.run_dir)
            run_dir = Path("runs") / "zoo" / entry.name
            config = zoo.entry_config(entry, trust_code=args.trust_run_code)
            if args.repeats is None and video is None:  # the protocol of the figure it records (a video shows one)
                args.repeats = int(entry.evaluation.get("repeats", 1))
        else:
            run_dir = Path(args.run_dir)
            config = load_run_config(run_dir, trust_code=args.trust_run_code)
        args.repeats = 1 if args.repeats is None else args.repeats
        for name in ("steps", "episodes", "tasks", "repeats"):
            value = getattr(args, name)
            if value is not None and value < (0 if name == "steps" else 1):
                raise ConfigError(f"--{name} must be {'>= 0' if name == 'steps' else '>= 1'}, got {value}")
        if video is not None and args.repeats != 1:
            raise ConfigError("--video shows one adaptation per task: leave out --repeats")
        e = config.eval
        split, tasks = args.split or e.split, args.tasks or e.tasks
        steps, episodes = e.steps if args.steps is None else args.steps, args.episodes or e.episodes
        if video is not None:
            if video["tasks"] > tasks:
                raise ConfigError(f"--video-tasks ({video['tasks']}) must be at most the number of tasks evaluated ({tasks})")
            if steps < 1:
                raise ConfigError("--video needs at least one adaptation stage (--steps >= 1) to show before and after")
        if args.metaworld_protocol is not None:
            from metarl.metaworld_eval import check_cli

            check_cli(config, split, args.metaworld_protocol, args.repeats)
        with run_lock(run_dir):
            _evaluate(run_dir, config, split, tasks, steps, episodes, video, args.repeats, args.device,
                      args.trust_run_code, entry, reuse=args.reuse)
            if args.metaworld_protocol is not None:  # Meta-World's own protocol beside it (metarl/metaworld_eval.py)
                from metarl.metaworld_eval import evaluate_cli
                from metarl.runfolder import eval_dir

                evaluate_cli(run_dir, eval_dir(run_dir, split, args.repeats), args.metaworld_protocol, args.device,
                             args.trust_run_code, entry)
    except (ConfigError, TaskError, VideoError, FloatingPointError) as exc:
        raise UsageError(str(exc)) from exc
    return 0


def eval_table(summary: dict[str, Any]) -> list[str]:
    """The lines `metarl eval` prints for an evaluation's summary: per stage the adaptation experience, the mean
    return and, where the env reports success, the success rate, each with its 95% interval; then, for a family
    whose tasks name their envs (Meta-World's ML10 and ML45), each env's return and success by stage."""
    success = all("success_rate" in s for s in summary["stages"])
    lines = [f"{'stage':>5} {'adapt episodes':>14} {'adapt steps':>11} {'mean return':>11}  95% CI"
             + (" " * 19 + "success  95% CI" if success else "")]
    for s in summary["stages"]:
        interval = f"[{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]"
        lines.append(f"{s['stage']:>5} {s['adapt_episodes']:>14} {s['adapt_env_steps']:>11.0f} "
                     f"{s['mean_return']:>11.2f}  {f'{interval:<24}' if success else interval}"
                     + (f" {s['success_rate']:>7.1%}  [{s['success_ci95'][0]:.1%}, {s['success_ci95'][1]:.1%}]"
                        if success else ""))
    for env in summary.get("by_env", []):
        rates = env.get("success_rate")
        count = f"{env['tasks']:>3} tasks" + (f" x {env['adaptations'] // env['tasks']}" if "adaptations" in env else "")
        lines.append(f"  {env['env']:<24} {count}  return by stage "
                     + " -> ".join(f"{v:.1f}" for v in env["mean_return"])
                     + ("  success " + " -> ".join(f"{v:.0%}" for v in rates) if rates else ""))
    return lines


def _evaluate(run_dir: Path, config: Any, split: str, tasks: int, steps: int, episodes: int, video: dict | None,
              repeats: int = 1, device: str | None = None, trust_code: bool = False, entry: Any = None,
              reuse: bool = False) -> None:
    import metarl.api as mrl
    from metarl import zoo
    from metarl.runfolder import check_writable, eval_dir, eval_target
    from metarl.training import evaluate_run, render_run

    check_writable(run_dir, run_dir / "eval", eval_dir(run_dir, split, repeats))
    # a zoo entry (its policy, evaluated into runs/zoo/NAME/), or the run's config and newest usable checkpoint
    learner = mrl.load(run_dir if entry is None else entry.folder, device=device, trust_code=trust_code)
    agent = learner.agent
    try:
        # the caller holds the run lock; a checkpoint older than the folder's evaluation (a fallback) writes beside it
        out = eval_target(run_dir, split, repeats, agent.iteration)
        check_writable(out)
        summary = (same_evaluation(out / "summary.json", agent.iteration, split, tasks, steps, episodes, repeats)
                   if reuse else None)
        if summary is not None:
            print(f"--reuse: keeping {out}/summary.json, an evaluation of the same checkpoint (iteration "
                  f"{agent.iteration}) with the same protocol ({tasks} {split} tasks, {steps} stages of {episodes} "
                  "episodes)", flush=True)
        else:
            if reuse:
                print(f"--reuse: {out} holds no evaluation of iteration {agent.iteration} with this protocol",
                      flush=True)
            print(f"evaluating {run_dir} (iteration {agent.iteration}) on {tasks} {split} tasks"
                  + (f" x {repeats} adaptations" if repeats > 1 else "")
                  + f", {steps} adaptation stages of {episodes} episodes ...", flush=True)
            summary = evaluate_run(agent, learner.config, run_dir, split, tasks, steps, episodes, repeats=repeats,
                                   out=out, progress=lambda line: print(line, flush=True))
        for line in eval_table(summary):
            print(line)
        if repeats > 1:
            print(f"({repeats} independent adaptations on each of {tasks} tasks, pooled: {repeats * tasks})")
        print(f"written to {out}/ (summary.json, summary.csv, per_task.csv, "
              "adaptation_curve.png)", flush=True)
        if entry is not None:
            same, lines = zoo.reproduction(entry, summary)
            print(f"zoo entry {entry.name} records (iteration {entry.meta.get('iteration')}):")
            for line in lines:
                print(f"  {line}")
            if same is not None:
                print("  every stage inside its recorded interval: the figure is reproduced" if same else
                      "  a stage lies outside its recorded interval: the figure is NOT reproduced here")
        if video is not None:
            print(f"rendering {video['tasks']} held-out task(s) before and after adaptation "
                  f"(MUJOCO_GL={os.environ.get('MUJOCO_GL')}) ...", flush=True)
            paths = render_run(agent, config, run_dir, split, tasks, steps, episodes, video["tasks"],
                               video["size"], video["fps"], verbose=True, out=out)
            print(f"written to {paths[0].parent}/ ({sum(p.suffix == '.gif' for p in paths)} GIFs, each with its MP4) "
                  f"and TensorBoard (eval/{split}/video/)")
    finally:
        learner.close()


def same_evaluation(path: Path, iteration: int, split: str, tasks: int, steps: int, episodes: int,
                    repeats: int = 1) -> dict | None:
    """The evaluation summary at ``path`` where it measured the checkpoint at ``iteration`` on ``tasks`` tasks of
    ``split`` with ``steps`` adaptation stages of ``episodes`` episodes, ``repeats`` adaptations per task (what
    ``metarl eval --reuse`` keeps), else None (absent, unreadable or another protocol)."""
    import json

    try:
        summary = json.loads(path.read_text())
        stages = summary["stages"]
        same = (summary.get("iteration") == iteration and summary.get("split") == split
                and summary.get("distinct_tasks", summary.get("num_tasks")) == tasks
                and int(summary.get("repeats", 1)) == repeats and len(stages) == steps + 1
                and all(s["stage"] == k and s["adapt_episodes"] == k * episodes for k, s in enumerate(stages)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return None
    return summary if same else None


def _video_options(args: argparse.Namespace) -> dict | None:
    """The checked --video options (None without --video); the others need --video."""
    if not args.video:
        given = [flag for flag, value in (("--video-tasks", args.video_tasks), ("--video-size", args.video_size),
                                          ("--fps", args.fps)) if value is not None]
        if given:
            raise UsageError(f"{given[0]} needs --video")
        return None
    n = 1 if args.video_tasks is None else args.video_tasks
    if n < 1:
        raise UsageError(f"--video-tasks must be >= 1, got {n}")
    if args.fps is not None and not 1 <= args.fps <= 50:
        raise UsageError(f"--fps must be between 1 and 50 (GIF frame delays), got {args.fps}")
    text = args.video_size or "320x240"
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--video-size must be WIDTHxHEIGHT in pixels (e.g. 320x240), got {text!r}") from None
    if not (16 <= width <= 2048 and 16 <= height <= 2048):
        raise UsageError(f"--video-size: width and height must be between 16 and 2048 pixels, got {text!r}")
    return {"tasks": n, "size": (width, height), "fps": args.fps}


def _cmd_speed(args: argparse.Namespace) -> int:
    from metarl.provenance import Recorder
    from metarl.speed import DEFAULT_FAMILIES, format_table, measure, write_json

    _user_code(args)
    recorder = Recorder()
    families = args.family or list(DEFAULT_FAMILIES)
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    results = []
    for family in families:
        print(f"measuring {family}: {args.tasks} tasks x {args.episodes} episodes, {args.repeats} repeats ...")
        try:
            results.append(measure(family, args.tasks, args.episodes, args.repeats, args.workers, args.steps,
                                   envpool_python=args.envpool_python,
                                   **({"async_envs": args.async_envs} if args.async_envs else {})))
        except (TaskError, ValueError) as exc:
            raise UsageError(str(exc)) from exc
        if args.json:  # written after each family, so a long run keeps what it measured
            write_json(results, args.json, recorder)
    print(format_table(results))
    if args.json:
        print(f"written to {args.json}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from metarl.bench import load_suite, run_suite, select_cells, write_report
    from metarl.config import ConfigError
    from metarl.runfolder import run_lock

    imports = _user_code(args)
    try:
        suite = load_suite(args.suite, out=args.out, imports=imports, seeds=args.seeds)
        if args.only and args.report_only:
            raise ConfigError("--only selects cells to run and --report-only runs none: give one of them (the "
                              "report always covers every finished cell)")
        select_cells(suite, args.only)  # a pattern matching no cell fails before anything is touched
        with run_lock(suite.out, "bench folder"):
            if args.report_only:
                print(f"report: {write_report(suite)}")
                return 0
            if args.ray or args.address:
                from metarl.ray_bench import run_suite_on_ray

                run_suite_on_ray(suite, address=args.address, cpus_per_cell=args.cpus_per_cell, only=args.only)
            else:
                run_suite(suite, verbose=not args.quiet, only=args.only)
    except (ConfigError, TaskError, FloatingPointError) as exc:
        raise UsageError(str(exc)) from exc
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from metarl.config import ConfigError
    from metarl.runfolder import run_lock
    from metarl.sweep import load_sweep, run_sweep, write_report

    imports = _user_code(args)
    try:
        sweep = load_sweep(args.sweep, out=args.out, imports=imports)
        with run_lock(sweep.out, "sweep folder"):
            if args.report_only:
                print(f"report: {write_report(sweep)}")
                return 0
            run_sweep(sweep, address=args.address)
    except (ConfigError, TaskError, FloatingPointError) as exc:
        raise UsageError(str(exc)) from exc
    return 0


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):  # dynamics scales
        return "{" + ", ".join(f"{f}: {len(v)} multipliers" for f, v in value) + "}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_short(v) for v in value) + ")"
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metarl", description="Meta-reinforcement learning for robotics.")
    parser.add_argument("--version", action="version", version=f"metarl {metarl.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--import", dest="imports", action="append", metavar="MODULE_OR_FILE",
                        help="a module or .py file of yours to import first, e.g. one that registers your task "
                        "families (repeatable; like imports: in a config or suite)")

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:  # every command takes --import
        return sub.add_parser(name, parents=[common], **kwargs)

    p = command("families", help="list the built-in task families")
    p.set_defaults(func=_cmd_families)

    p = command("rollout", help="roll out a random policy on a task of a family")
    p.add_argument("family", nargs="?", help="family name (e.g. HalfCheetahVel) or Gymnasium id")
    p.add_argument("--all", action="store_true", help="every built-in family")
    p.add_argument("--split", default="test", choices=metarl.SPLITS)
    p.add_argument("--episodes", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_rollout)

    p = command("train", help="meta-train an agent from a YAML config")
    p.add_argument("config", nargs="?", help="experiment YAML (e.g. experiments/maml_trpo/point_nav_2d.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys (agent.inner_lr=0.05, quick=true)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--run-dir", help="write the run here instead of runs/<experiment>/<timestamp>-<seed>")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    _trust_flag(p)
    _ray_flags(p, "sample")
    p.set_defaults(func=_cmd_train)

    p = command("eval", help="evaluate few-episode adaptation of a trained run on held-out tasks")
    p.add_argument("run_dir", help="a run folder written by metarl train, or zoo:NAME (a pretrained entry; "
                   "metarl zoo lists them), or an exported zoo entry's folder")
    p.add_argument("--split", choices=metarl.SPLITS, default=None, help="task split (default: the config's eval.split)")
    p.add_argument("--steps", type=int, default=None, help="adaptation stages after stage 0 (default: config, 3)")
    p.add_argument("--episodes", type=int, default=None, help="episodes per stage (default: config)")
    p.add_argument("--tasks", type=int, default=None, help="number of held-out tasks (default: config)")
    p.add_argument("--repeats", type=int, default=None, help="adapt this many times on each task, independently, "
                   "and pool them (for families with few tasks, e.g. HalfCheetahDir's two); writes "
                   "RUN_DIR/eval/<split>-repeats<R>/ (default 1; for a zoo entry, the repeats of its figure)")
    p.add_argument("--device", default=None, help="where adaptation's gradient steps run: auto, cpu, cuda or cuda:N "
                   "(default: the run's device setting)")
    p.add_argument("--video", action="store_true", help="also render held-out episodes before and after adaptation "
                   "(off-screen; GIFs and MP4s in RUN_DIR/eval/<split>/video/ and TensorBoard eval/<split>/video/)")
    p.add_argument("--video-tasks", type=int, default=None, help="with --video: tasks to render, the first of the "
                   "evaluation's (default 1)")
    p.add_argument("--video-size", default=None, metavar="WxH", help="with --video: frame size (default 320x240)")
    p.add_argument("--fps", type=int, default=None, help="with --video: frames per second (default: the env's rate, "
                   "at most 25); frames are dropped to play at about real time")
    p.add_argument("--reuse", action="store_true", help="keep the folder's evaluation where it measured the same "
                   "checkpoint with the same tasks, stages and episodes (e.g. to add --metaworld-protocol to a run's "
                   "final evaluation without measuring it again); otherwise evaluate")
    p.add_argument("--metaworld-protocol", type=int, nargs="?", const=10, default=None, metavar="N",
                   help="Meta-World families: also run Meta-World's own metalearning_evaluation (N evaluations, "
                   "default 10) through an adapter, as shipped and per sub-env (Metaworld PR #577's effect); "
                   "printed beside metarl's figure, written to RUN_DIR/eval/<split>/metaworld.json")
    _trust_flag(p)
    p.set_defaults(func=_cmd_eval)

    p = command("zoo", help="list the pretrained meta-policies shipped with metarl, show one, or export a run as one")
    p.add_argument("name", nargs="?", help="an entry to show (e.g. maml_trpo/point_nav_2d); with --export, the new "
                   "entry's name (AGENT/NAME)")
    p.add_argument("--export", metavar="RUN_DIR", help="make a zoo entry of this finished run (its final held-out "
                   "evaluation is the figure the entry records)")
    p.add_argument("--to", metavar="DIR", help="with --export: the zoo folder to write NAME into")
    p.add_argument("--summary", metavar="FILE", help="with --export: the evaluation summary.json to record "
                   "(default: the run's evaluation of its checkpoint with the most adaptations per task)")
    p.add_argument("--result", metavar="FILE", help="with --export: the committed result file the run belongs to")
    p.add_argument("--description", default="", help="with --export: one line on what the entry is")
    p.add_argument("--trained-by", help="with --export: the command(s) that trained the run (default: the one its "
                   "evaluation records: for a run trained in parts, the last part's)")
    p.set_defaults(func=_cmd_zoo)

    p = command("speed", help="measure raw MuJoCo, Gymnasium and sampler step rates side by side")
    p.add_argument("--family", action="append", help="a MuJoCo family (repeatable; default: HalfCheetahVel, "
                   "AntGoal, HopperRandParams)")
    p.add_argument("--tasks", type=int, default=40, help="tasks in the sampled meta-batch (default 40)")
    p.add_argument("--episodes", type=int, default=20, help="episodes per task (default 20)")
    p.add_argument("--repeats", type=int, default=3, help="repeats; the median is reported (default 3)")
    p.add_argument("--steps", type=int, default=4000, help="steps for the single-env rates (default 4000)")
    p.add_argument("--workers", type=int, default=None, help="sampler processes (default: one per core)")
    p.add_argument("--async-envs", type=int, default=None, help="env processes of Gymnasium's AsyncVectorEnv "
                   "(default 16)")
    p.add_argument("--envpool-python", metavar="PYTHON", help="also time EnvPool's HalfCheetah-v5 under this "
                   "Python (an environment with envpool installed)")
    p.add_argument("--json", metavar="FILE", help="also write the rates to FILE")
    p.set_defaults(func=_cmd_speed)

    p = command("bench", help="run a benchmark suite (meta-learners and baselines) and write its report")
    p.add_argument("suite", help="suite YAML (e.g. experiments/benchmarks/smoke.yaml)")
    p.add_argument("--out", help="report folder (default: the suite's out, else runs/bench/<name>)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the finished cells, run nothing")
    p.add_argument("--quiet", action="store_true", help="no per-iteration training lines")
    p.add_argument("--only", action="append", metavar="PATTERN",
                   help="run only the cells whose key <family>/<method>/seed<k> matches this shell-style pattern, "
                   "e.g. '*/pearl/*' (repeatable; the report still covers every finished cell)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="run the suite at these seeds instead of its own (e.g. --seeds 0 1 2: the cells of seed 0 "
                   "already finished in the report folder are kept, seeds 1 and 2 are added)")
    _ray_flags(p, "run the cells as Ray tasks")
    p.add_argument("--cpus-per-cell", type=float, default=1.0, help="with --ray: CPUs each cell asks for (default 1)")
    p.set_defaults(func=_cmd_bench)

    p = command("sweep", help="search over config keys and seeds with Ray Tune; write a sensitivity report")
    p.add_argument("sweep", help="sweep YAML (e.g. experiments/sweeps/maml_point_nav_sensitivity.yaml)")
    p.add_argument("--out", help="report folder (default: the sweep's out, else runs/sweep/<name>)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the finished trials, run nothing")
    p.add_argument("--address", help="the Ray cluster's address (default: RAY_ADDRESS, else the cluster started on "
                   "this machine, else a new local instance)")
    p.set_defaults(func=_cmd_sweep)

    p = command("reproduce", help="regenerate a headline result from experiments/manifest.yaml")
    p.add_argument("name", nargs="?", help="the manifest entry (see --list)")
    p.add_argument("--quick", action="store_true", help="run the entry's quick variant (minutes), into "
                   "runs/reproduce/NAME-quick/")
    p.add_argument("--out", help="folder for the regenerated result (default runs/reproduce/NAME)")
    p.add_argument("--update", action="store_true", help="once the command has finished, replace the committed "
                   "result file with the regenerated one")
    p.add_argument("--list", action="store_true", help="list the entries with their committed figures")
    p.add_argument("--table", action="store_true", help="print the README's results table from the result files")
    p.add_argument("--write", action="store_true", help="with --table: write it into README.md and "
                   "docs/reproducing.md")
    p.add_argument("--check", action="store_true", help="check every entry's result file (provenance, figures) "
                   "and the README's table against them")
    p.set_defaults(func=_cmd_reproduce)

    p = command("check", help="check that a Gymnasium id is a well-formed task family")
    p.add_argument("family", help="family name or Gymnasium id (module:Id-v0 imports module first)")
    p.add_argument("--skip", action="append", metavar="CHECK", help="leave out a check that does not apply "
                   "(repeatable): gymnasium, sb3 (e.g. an env with a compute_reward method, which SB3's checker "
                   "takes for a GoalEnv), task-effect, vector")
    p.set_defaults(func=_cmd_check)
    return parser


def _cmd_zoo(args: argparse.Namespace) -> int:
    from metarl import zoo
    from metarl.config import ConfigError

    try:
        if args.export:
            if not (args.name and args.to):
                raise UsageError("--export RUN_DIR needs the new entry's name (AGENT/NAME) and --to DIR")
            entry = zoo.export(args.export, args.name, args.to, summary=args.summary, result=args.result,
                               description=args.description, trained_by=args.trained_by)
            print(f"written {entry.folder}/ ({entry.meta['policy_bytes']:,} bytes of policy): {entry.headline()}")
            print(f"evaluate it: metarl eval {entry.folder}; in Python: metarl.api.load({str(entry.folder)!r})")
            return 0
        if any((args.to, args.summary, args.result, args.description, args.trained_by)):
            raise UsageError("--to, --summary, --result, --description and --trained-by go with --export")
        if args.name:
            entry = zoo.find(args.name if zoo.is_reference(args.name) else zoo.PREFIX + args.name)
            m, e = entry.meta, entry.evaluation
            print(f"{entry.name}: {m.get('description') or ''}")
            print(f"  agent {entry.agent}, family {entry.family}, iteration {m.get('iteration')}, "
                  f"{m.get('env_steps'):,} env steps; written by metarl {m.get('metarl')} (zoo format {m.get('format')})")
            print(f"  evaluation: {e.get('tasks')} {e.get('split')} tasks, {e.get('steps')} adaptation stages of "
                  f"{e.get('episodes')} episodes, {e.get('repeats', 1)} adaptation(s) per task")
            for s in e.get("stages", []):
                print(f"    stage {s['stage']}: {s['mean_return']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]"
                      + (f"; success {s['success_rate']:.1%} [{s['success_ci95'][0]:.1%}, {s['success_ci95'][1]:.1%}]"
                         if "success_rate" in s else ""))
            if entry.requires:
                print(f"  needs the {', '.join(entry.requires)} extra: {metarl.install_hint(entry.requires[0])}"
                      + (" (not installed here)" if entry.missing() else ""))
            print(f"  result: {m.get('result') or '(its own run)'}")
            print(f"  trained by: {m.get('trained_by')}")
            commit = (m.get("provenance") or {}).get("commit")
            print(f"  at commit {commit}; policy {m.get('policy_bytes', 0):,} bytes")
            print(f"  evaluate: metarl eval zoo:{entry.name}   adapt in Python: metarl.api.load('zoo:{entry.name}')")
            return 0
        found = zoo.entries()
        if not found:
            print("the zoo is empty (a broken install? reinstall metarl)")
            return 1
        for entry in found:
            needs = f" [needs the {', '.join(entry.missing())} extra]" if entry.missing() else ""
            print(f"{entry.name:28s} {entry.family:16s} {entry.headline()}{needs}")
        print("show one: metarl zoo NAME; evaluate: metarl eval zoo:NAME; in Python: metarl.api.load('zoo:NAME')")
        return 0
    except ConfigError as exc:  # zoo.ZooError included
        raise UsageError(str(exc)) from None


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from metarl import manifest
    from metarl.config import ConfigError

    try:
        entries = manifest.load_manifest()
        if args.check:
            problems = manifest.check_all(entries, *manifest.pages())
            for line in problems:
                print(f"metarl reproduce: {line}", file=sys.stderr)
            print(f"{len(entries)} entries checked: {'all consistent' if not problems else f'{len(problems)} problems'}")
            return 1 if problems else 0
        if args.table:
            text = manifest.table(entries)
            if args.write:
                for page in manifest.pages():
                    manifest.write_readme_table(page, text)
                    print(f"written into {page}")
            else:
                print(text, end="")
            return 0
        if args.list or not args.name:
            for e in entries.values():
                try:
                    shown = "; ".join(f"{k} {v}" for k, v in manifest.figures(e, manifest.read_result(
                        manifest.root() / e.result, e.name)))
                except manifest.ManifestError as exc:
                    shown = f"(unreadable: {exc})"
                print(f"{e.name:28s} {e.tasks:15s} seeds {e.seeds:9s} {shown}")
            return 0
        manifest.reproduce(args.name, quick=args.quick, out=Path(args.out) if args.out else None, update=args.update)
        return 0
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _check_mujoco_gl() -> None:
    """MuJoCo refuses an unknown ``MUJOCO_GL`` with a traceback when it is imported (the accepted values
    are those of ``mujoco/rendering/classic/gl_context.py``); say so in one line before anything imports it."""
    value = os.environ.get("MUJOCO_GL")
    if value is None or value.lower().strip() in ("disable", "disabled", "off", "false", "0"):
        return
    valid = ["enable", "enabled", "on", "true", "1", "glfw", ""]
    valid += {"linux": ["glx", "egl", "osmesa"], "win32": ["wgl"], "darwin": ["cgl"]}.get(sys.platform, [])
    if value.lower().strip() not in valid:
        raise UsageError(f"MUJOCO_GL={value!r} is not a rendering backend MuJoCo accepts here; "
                         "use egl or osmesa (headless) or glfw (with a display), or unset it")


def _check_distribution() -> None:
    """A distribution named ``metarl`` (the unrelated project of that name on the public index, or this
    project's former name) installed beside metarl-robotics claims the same import name, and the files of the
    two mix: say so in one line instead of failing somewhere inside."""
    from importlib import metadata

    try:
        other = metadata.distribution("metarl")
    except metadata.PackageNotFoundError:
        return
    if other.metadata["Name"].lower() != metarl.DISTRIBUTION:
        raise UsageError(f"another distribution named metarl ({other.version}) is installed in this Python and claims "
                         f"the import name metarl: pip uninstall metarl, then reinstall this project "
                         f"({metarl.DISTRIBUTION}: bash scripts/setup.sh, or pip install -e . in a clone)")


def _drop_cwd_from_path() -> None:
    """Never import code from the current directory by accident (a run folder someone shared may hold a
    ``yaml.py``): drop it from ``sys.path`` where Python put it (``''`` for ``-c``, the directory itself
    for ``python -m``; the ``metarl`` script puts its own bin folder there instead)."""
    cwd = os.path.realpath(os.getcwd())
    sys.path[:] = [p for p in sys.path if p != "" and os.path.realpath(p) != cwd]


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as the program (the metarl script, python -m metarl.cli), not called from Python
        _drop_cwd_from_path()
        from metarl.provenance import git_state_at_start
        from metarl.system import sleeping_openmp_threads

        sleeping_openmp_threads()  # before anything imports torch (a command imports it when it needs it)
        git_state_at_start()  # the code this command runs: what its result files record, whatever is committed later
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come anywhere after the command (Hydra's and RL Zoo's users write them after the
    # options); anything else left over is the usual one-line usage error
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra)):
        parser.parse_args(argv)
    if extra:
        args.overrides = [*args.overrides, *extra]
    from metarl.sampling import WorkerDied
    from metarl.system import work_threads

    try:
        _check_distribution()
        _check_mujoco_gl()
        with invoked_as(["metarl", *(sys.argv[1:] if argv is None else argv)]), work_threads():
            return int(args.func(args))
    except UsageError as exc:
        print(f"metarl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except WorkerDied as exc:  # not a usage error (exit code 1), but one line: which worker, and what to run
        again = "" if "metarl train --resume" in str(exc) else (
            "; what was written is kept, run the command again to continue: metarl "
            + " ".join(sys.argv[1:] if argv is None else argv))
        print(f"metarl {args.command}: error: {exc}{again}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
