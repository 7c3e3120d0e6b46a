"""The training loop, the run folder and held-out evaluation of a saved run.

Run folder (nothing a run writes goes elsewhere)::

    runs/<experiment>/<YYYYmmdd-HHMMSS>-<seed>/
        config.yaml           resolved config + meta (package versions, git revision, command)
        events.out.tfevents.* TensorBoard: meta/, loss/, time/, eval/ keyed by total env steps
        metrics.jsonl         one line of training metrics per iteration
        checkpoints/latest.pt written atomically every `checkpoint_every` iterations
        eval/<split>/         summary.json, summary.csv, per_task.csv, adaptation_curve.png (the latest
                              evaluation); history.jsonl (every evaluation made during training)
        eval/<split>/video/   task<j>_before|after|before_after.gif (metarl eval --video)

The loop talks to agents through a small protocol: ``train_step(tasks) -> metrics``,
``evaluate_adaptation(tasks, steps, episodes, seed) -> AdaptationResult``, ``state_dict()``,
``load_state_dict()``, ``env_steps``, ``iteration`` and ``config.tasks_per_batch``; videos also need
``adaptation_rollouts(tasks, steps, episodes, seed) -> list[metarl.video.StageRollout]``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import yaml

import metarl
from metarl.config import ConfigError, RunConfig, agent_class, load_config
from metarl.evaluation import AdaptationResult, atomic_write, plot_curves, plot_within_episode, write_summary
from metarl.sampling import make_sampler
from metarl.tasks import TaskError


def resolve_env_id(env: str) -> str:
    return metarl.env_id(env) if env in metarl.FAMILIES else env


def build_agent(config: RunConfig):
    """The sampler and agent a config describes (raises ConfigError for an unknown env)."""
    env_id = resolve_env_id(config.env)
    try:
        metarl.make_family(env_id, **config.env_kwargs).close()
    except TaskError as exc:
        raise ConfigError(f"env: {exc}") from exc
    except (gym.error.Error, ImportError, TypeError) as exc:
        # unknown id, a module:Id whose module does not import, env_kwargs the env does not take;
        # anything else is a bug in the env and keeps its traceback
        raise ConfigError(f"env: cannot make {config.env!r}: {exc}") from exc
    try:
        sampler = make_sampler(env_id, config.env_kwargs, config.sampler.backend, config.sampler.workers)
    except TaskError as exc:  # e.g. backend native on an env it does not run
        raise ConfigError(f"sampler: {exc}") from exc
    try:
        agent = agent_class(config.agent_name)(config.agent, sampler, seed=config.seed)
    except TaskError as exc:  # e.g. an agent that cannot run on this env's spaces
        sampler.close()
        raise ConfigError(f"agent: {exc}") from exc
    if hasattr(agent, "set_total_iterations"):
        agent.set_total_iterations(config.iterations)
    return sampler, agent


def _meta(sampler: Any = None) -> dict[str, Any]:
    import gymnasium
    import mujoco

    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "git_revision": rev,
        "sampler_backend": getattr(sampler, "backend", None),  # what sampler.backend auto resolved to
        "versions": {"metarl": metarl.__version__, "python": platform.python_version(), "torch": str(torch.__version__),
                     "mujoco": mujoco.__version__, "gymnasium": gymnasium.__version__, "numpy": np.__version__},
    }


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.yaml)")
    data = yaml.safe_load(path.read_text())
    data.pop("meta", None)
    return load_config(None, data=data)


def load_checkpoint(run_dir: Path, agent: Any) -> dict[str, Any]:
    path = run_dir / "checkpoints" / "latest.pt"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        agent.load_state_dict(state["agent"])
    except (RuntimeError, KeyError) as exc:
        raise ConfigError(f"{path}: checkpoint does not match the run's config: {exc}") from exc
    return state


class _Logger:
    """TensorBoard + metrics.jsonl; the x axis is total env steps."""

    def __init__(self, run_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)
        self.jsonl = run_dir / "metrics.jsonl"

    def log(self, metrics: dict[str, float], step: int, iteration: int) -> None:
        for key, value in metrics.items():
            if "/" in key:
                self.writer.add_scalar(key, value, step)
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"iteration": iteration, "env_steps": step, **metrics}) + "\n")

    def log_eval(self, summary: dict[str, Any], split: str, step: int, title: str) -> None:
        for stage in summary["stages"]:
            self.writer.add_scalar(f"eval/{split}/return_stage{stage['stage']}", stage["mean_return"], step)
        first, last = summary["stages"][0]["mean_return"], summary["stages"][-1]["mean_return"]
        self.writer.add_scalar(f"eval/{split}/adaptation_gain", last - first, step)
        fig = plot_curves({title: summary}, title=f"{title} ({split}, {step:,} env steps)")
        self.writer.add_figure(f"eval/{split}/adaptation_curve", fig, step)
        within = plot_within_episode(summary, title=f"{title}: within the measured episodes ({step:,} env steps)")
        if within is not None:
            self.writer.add_figure(f"eval/{split}/within_episode", within, step)
            bins = summary["stages"][0]["within_episode"]
            self.writer.add_scalar(f"eval/{split}/stage0_last_minus_first_bin", bins[-1] - bins[0], step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _truncate_jsonl(path: Path, iteration: int) -> None:
    """Keep the lines of iterations up to the checkpoint; drop later ones and a line cut by a kill."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("iteration", iteration + 1) <= iteration:
            keep.append(line)
    atomic_write(path, "".join(line + "\n" for line in keep))


def record_eval_history(path: Path, summary: dict[str, Any]) -> None:
    """Add one training-time evaluation to ``eval/<split>/history.jsonl`` (the held-out curve over
    iterations, so that a reported number is never one phase of an oscillation). Lines of the same or
    later iterations (left by a run that was killed and resumed from an earlier checkpoint) are replaced."""
    rows = read_eval_history(path)
    rows = [r for r in rows if r["iteration"] < summary["iteration"]]
    rows.append({
        "iteration": summary["iteration"], "env_steps": summary["env_steps"],
        "stages": [{k: s[k] for k in ("stage", "adapt_episodes", "mean_return", "ci95")} for s in summary["stages"]],
    })
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_eval_history(path: Path) -> list[dict[str, Any]]:
    """The evaluations ``record_eval_history`` wrote, in iteration order ([] if none yet)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def eval_tasks(family: Any, seed: int, split: str, tasks: int) -> list[Any]:
    """The held-out tasks a run with ``seed`` is evaluated on (the same list for its curve, its videos and
    the benchmark baselines set beside it)."""
    try:
        return family.sample_tasks(tasks, split=split, seed=seed + 10_000)
    except TaskError as exc:
        raise ConfigError(f"eval: {exc}") from exc


def _eval_seed(config: RunConfig) -> int:
    return config.seed + 20_000


def evaluate_run(agent: Any, config: RunConfig, run_dir: Path, split: str, tasks: int, steps: int,
                 episodes: int, logger: _Logger | None = None) -> dict[str, Any]:
    family = agent.sampler.family
    held_out = eval_tasks(family, config.seed, split, tasks)
    result: AdaptationResult = agent.evaluate_adaptation(held_out, steps, episodes, seed=_eval_seed(config))
    title = f"{config.agent_name} on {family.family}"
    summary = write_summary(result, run_dir / "eval" / split, title=title, extra={
        "split": split, "agent": config.agent_name, "family": family.family, "iteration": agent.iteration,
        "env_steps": agent.env_steps, "horizon": agent.sampler.horizon,
    })
    if logger is not None:
        logger.log_eval(summary, split, agent.env_steps, title)
    return summary


def render_run(agent: Any, config: RunConfig, run_dir: Path, split: str, tasks: int, steps: int, episodes: int,
               video_tasks: int = 1, size: tuple[int, int] = (320, 240), fps: float | None = None,
               verbose: bool = False) -> list[Path]:
    """Videos of the evaluation `evaluate_run` with the same arguments makes: its first ``video_tasks``
    held-out tasks before and after adaptation, replayed from the agent's `adaptation_rollouts`, into
    ``RUN_DIR/eval/<split>/video/`` and TensorBoard (``eval/<split>/video/task<j>``, x = env steps)."""
    from metarl.video import VideoError, check_renderable, write_videos

    if not hasattr(agent, "adaptation_rollouts"):
        raise VideoError(f"agent {config.agent_name!r} cannot replay its evaluation (no adaptation_rollouts); "
                         "videos are not available for it")
    if steps < 1:
        raise VideoError("a video needs at least one adaptation stage (--steps >= 1) to show before and after")
    check_renderable(agent.sampler.env_id, agent.sampler.env_kwargs)  # before the adaptation, which takes time
    # Per-task results do not depend on the other tasks of a sampler call (seeds and noise are per task
    # index), so adapting on the first tasks alone reproduces what the evaluation did for them.
    shown = eval_tasks(agent.sampler.family, config.seed, split, tasks)[:video_tasks]
    plans = agent.adaptation_rollouts(shown, steps, episodes, seed=_eval_seed(config))
    logger = _Logger(run_dir)
    try:
        return write_videos(agent.sampler.env_id, agent.sampler.env_kwargs, shown, plans, steps,
                            run_dir / "eval" / split / "video", size=size, fps=fps, writer=logger.writer,
                            global_step=agent.env_steps, tag=f"eval/{split}/video", verbose=verbose)
    finally:
        logger.close()


def write_run_config(run_dir: Path, config: RunConfig, meta: dict[str, Any]) -> None:
    atomic_write(run_dir / "config.yaml", yaml.safe_dump({**config.to_dict(), "meta": meta}, sort_keys=False))


def train(config: RunConfig, run_dir: Path | None = None, resume: bool = False, verbose: bool = True) -> Path:
    """Meta-train as ``config`` says; returns the run folder. With ``resume``, continue ``run_dir``."""
    sampler, agent = build_agent(config)
    logger: _Logger | None = None
    try:
        if resume:
            assert run_dir is not None
            state = load_checkpoint(run_dir, agent)
            start = int(state["iteration"])
            stored = yaml.safe_load((run_dir / "config.yaml").read_text())
            if stored.get("iterations") != config.iterations:  # resumed with iterations=N: keep the folder true
                meta = dict(stored.get("meta") or {})
                meta.setdefault("changes", []).append(
                    {"at_iteration": start, "iterations": [stored.get("iterations"), config.iterations],
                     "command": " ".join(sys.argv)})
                write_run_config(run_dir, config, meta)
            _truncate_jsonl(run_dir / "metrics.jsonl", start)
            logger = _Logger(run_dir, purge_step=agent.env_steps + 1)
            if verbose:
                print(f"resuming {run_dir} at iteration {start} ({agent.env_steps:,} env steps)")
        else:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = run_dir or Path(config.run_root) / config.experiment / f"{stamp}-{config.seed}"
            if run_dir.exists() and any(run_dir.iterdir()):
                raise ConfigError(f"run folder {run_dir} already exists and is not empty (use --resume to continue it)")
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            write_run_config(run_dir, config, _meta(sampler))
            logger = _Logger(run_dir)
            logger.writer.add_text("config", "```\n" + yaml.safe_dump(config.to_dict(), sort_keys=False) + "\n```")
            start = 0
            if verbose:
                print(f"run folder: {run_dir} (sampler backend: {sampler.backend})")
        family = sampler.family
        n_tasks = config.agent.tasks_per_batch
        t_start = time.perf_counter()
        it = start
        for it in range(start, config.iterations):
            task_seed = int(np.random.SeedSequence([config.seed, it]).generate_state(1)[0])
            tasks = family.sample_tasks(n_tasks, "train", seed=task_seed)
            metrics = agent.train_step(tasks)
            for key, value in metrics.items():
                if not np.isfinite(value):
                    raise FloatingPointError(f"iteration {it + 1}: {key} is {value}; stopping (last checkpoint kept)")
            logger.log(metrics, agent.env_steps, it + 1)
            if (it + 1) % config.checkpoint_every == 0 or it + 1 == config.iterations:
                logger.writer.flush()  # events up to the checkpoint are on disk before it is
                _atomic_save({"agent": agent.state_dict(), "iteration": it + 1, "env_steps": agent.env_steps},
                             run_dir / "checkpoints" / "latest.pt")
            if verbose:
                done = it + 1 - start
                per_it = (time.perf_counter() - t_start) / done
                print(
                    f"[{it + 1}/{config.iterations}] {agent.env_steps / 1e6:.2f}M steps | "
                    f"{metrics.get('time/env_steps_per_s', 0):,.0f} steps/s | "
                    f"pre {metrics.get('meta/return_pre_adaptation', float('nan')):.1f} "
                    f"post {metrics.get('meta/return_post_adaptation', float('nan')):.1f} | "
                    f"{per_it:.1f}s/it | ETA {_fmt_time(per_it * (config.iterations - it - 1))}",
                    flush=True,
                )
            if config.eval.every and (it + 1) % config.eval.every == 0 and it + 1 < config.iterations:
                _eval_and_report(agent, config, run_dir, logger, verbose)
        if start < config.iterations or not (run_dir / "eval" / config.eval.split / "summary.json").exists():
            _eval_and_report(agent, config, run_dir, logger, verbose)
        return run_dir
    finally:
        if logger is not None:
            logger.close()
        sampler.close()


def _eval_and_report(agent, config: RunConfig, run_dir: Path, logger: _Logger, verbose: bool) -> None:
    e = config.eval
    summary = evaluate_run(agent, config, run_dir, e.split, e.tasks, e.steps, e.episodes, logger)
    record_eval_history(run_dir / "eval" / e.split / "history.jsonl", summary)
    if verbose:
        curve = " -> ".join(f"{s['mean_return']:.1f}" for s in summary["stages"])
        print(f"  eval ({e.split}, {e.tasks} tasks): return by adaptation stage {curve}", flush=True)
