"""The training loop, the run folder and held-out evaluation of a saved run.

Run folder (nothing a run writes goes elsewhere)::

    runs/<experiment>/<YYYYmmdd-HHMMSS>-<seed>/
        config.yaml           resolved config + meta (package versions, git revision, command)
        events.out.tfevents.* TensorBoard: meta/, loss/, time/, eval/ keyed by total env steps
        metrics.jsonl         one line of training metrics per iteration
        checkpoints/latest.pt written atomically every `checkpoint_every` iterations, with a checksum;
                              previous.pt, the one before; evals.json, the evaluations finished
                              (`metarl.runfolder`)
        .lock                 the advisory lock of the one command writing here
        eval/<split>/         summary.json, summary.csv, per_task.csv, adaptation_curve.png (the latest
                              evaluation); history.jsonl (every evaluation made during training)
        eval/<split>/video/   task<j>_before|after|before_after.gif and .mp4 (metarl eval --video)

The loop talks to agents through the agent protocol (`metarl.agent.Agent`) and finds them through its
registry (`metarl.agent.get_agent`), never by importing one.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import yaml

import metarl
from metarl.config import ConfigError, RunConfig, agent_class, read_yaml, resolve_device
from metarl.evaluation import (
    AdaptationResult,
    episode_scalars,
    plot_curves,
    plot_within_episode,
    with_episode_metrics,
    write_summary,
)
from metarl.provenance import Recorder
from metarl.runfolder import (
    check_new_run_folder,
    check_writable,
    config_record,
    eval_dir,
    eval_files_problem,
    evals_done,
    latest_checkpoint,
    legacy_eval_done,
    load_agent_state,
    no_config_error,
    read_event_files,
    rebuild_event_points,
    record_eval_done,
    record_eval_history,
    run_lock,
    save_checkpoint,
    set_aside_damaged,
    truncate_jsonl,
    write_run_config,
)
from metarl.sampling import WorkerDied, make_sampler
from metarl.system import fault_point, warn, work_threads
from metarl.tasks import TaskError


def resolve_env_id(env: str) -> str:
    return metarl.resolve_id(env)


def build_agent(config: RunConfig):
    """The sampler and agent a config describes (raises ConfigError for an unknown env)."""
    from metarl.plugins import load

    env_id = resolve_env_id(config.env)
    try:
        load(config.imports)  # the user's modules, here and (through the sampler) in its worker processes
    except TaskError as exc:
        raise ConfigError(f"imports: {exc}") from exc
    try:
        metarl.make_family(env_id, **config.env_kwargs).close()
    except TaskError as exc:
        raise ConfigError(f"env: {exc}") from exc
    except (gym.error.Error, ImportError, TypeError) as exc:
        # unknown id, a module:Id whose module does not import, env_kwargs the env does not take;
        # anything else is a bug in the env and keeps its traceback
        raise ConfigError(f"env: cannot make {config.env!r}: {exc}") from exc
    try:
        sampler = make_sampler(env_id, config.env_kwargs, config.sampler.backend, config.sampler.workers,
                               config.sampler.placement, max_slots=config.sampler.max_slots,
                               **(config.sampler.ray_options() if config.sampler.placement == "ray" else {}))
    except TaskError as exc:  # e.g. backend native on an env it does not run
        raise ConfigError(f"sampler: {exc}") from exc
    try:
        check_budget(config, sampler.horizon)
    except ConfigError:
        sampler.close()
        raise
    try:
        cls = agent_class(config.agent_name)
        device = resolve_device(config.device, cls)  # CUDA refused in one line where there is none
        agent = cls(config.agent, sampler, seed=config.seed)
    except TaskError as exc:  # e.g. an agent that cannot run on this env's spaces
        sampler.close()
        raise ConfigError(f"agent: {exc}") from exc
    except ConfigError:
        sampler.close()
        raise
    agent.to(device)  # the update's modules and optimisers; the sampler's actors stay numpy on the CPU
    agent.set_total_iterations(config.iterations)
    return sampler, agent


#: Sizes beyond these are typos, not experiments: refused before any work (the anchors' largest
#: settings are ~3e5 env steps an iteration and ~2e8 in all).
MAX_STEPS_PER_ITERATION = 10**8
MAX_TOTAL_STEPS = 10**12


def check_budget(config: RunConfig, horizon: int) -> None:
    """ConfigError if an iteration, an evaluation or the whole run would take absurdly many env steps."""
    a = config.agent
    episodes = getattr(a, "episodes_per_task", None)
    if episodes is not None:  # gradient-based: sampled before and after each inner step
        episodes *= getattr(a, "inner_steps", 0) + 1
    else:
        episodes = getattr(a, "trials_per_task", 1) * getattr(a, "episodes_per_trial", 1)
    per_iteration = a.tasks_per_batch * episodes * horizon
    if per_iteration > MAX_STEPS_PER_ITERATION:
        raise ConfigError(f"agent: an iteration would take up to {per_iteration:.3g} env steps ({a.tasks_per_batch} "
                          f"tasks x {episodes} episodes x horizon {horizon}); the limit is {MAX_STEPS_PER_ITERATION:.0e}")
    if per_iteration * config.iterations > MAX_TOTAL_STEPS:
        raise ConfigError(f"iterations: {config.iterations} iterations would take up to "
                          f"{per_iteration * config.iterations:.3g} env steps; the limit is {MAX_TOTAL_STEPS:.0e}")
    e = config.eval
    per_eval = e.tasks * e.episodes * (e.steps + 1) * horizon
    if per_eval > MAX_STEPS_PER_ITERATION:
        raise ConfigError(f"eval: an evaluation would take up to {per_eval:.3g} env steps; the limit is "
                          f"{MAX_STEPS_PER_ITERATION:.0e}")


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


def _after_existing_event_files(run_dir: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and a name starts with the second it was
    created in, then the host and pid: a file created in the same second as an existing one (a resume
    right after a kill) may sort before it, so the older file's points would be read after the newer
    file's purge. Wait (at most a second) until a new file's second is later than every existing one's."""
    stamps = []
    for path in run_dir.glob("events.out.tfevents.*"):
        try:
            stamps.append(int(path.name.split(".")[3]))
        except (IndexError, ValueError):
            continue
    if stamps:
        wait = max(stamps) + 1 - time.time()
        if 0 < wait <= 2:
            time.sleep(wait)


class _Logger:
    """TensorBoard + metrics.jsonl; the x axis is total env steps."""

    def __init__(self, run_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        _after_existing_event_files(run_dir)
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
            if "success_rate" in stage:
                self.writer.add_scalar(f"eval/{split}/success_rate_stage{stage['stage']}", stage["success_rate"], step)
            for name, value in stage.get("reward_terms", {}).items():
                self.writer.add_scalar(f"eval/{split}/{name}_stage{stage['stage']}", value, step)
        first, last = summary["stages"][0]["mean_return"], summary["stages"][-1]["mean_return"]
        self.writer.add_scalar(f"eval/{split}/adaptation_gain", last - first, step)
        if "gain_ci95" in summary["stages"][-1]:  # the paired interval: a gain is clear when its low end is > 0
            self.writer.add_scalar(f"eval/{split}/adaptation_gain_ci95_low", summary["stages"][-1]["gain_ci95"][0], step)
            self.writer.add_scalar(f"eval/{split}/adaptation_gain_ci95_high", summary["stages"][-1]["gain_ci95"][1], step)
        fig = plot_curves({title: summary}, title=f"{title} ({split}, {step:,} env steps)")
        self.writer.add_figure(f"eval/{split}/adaptation_curve", fig, step)
        within = plot_within_episode(summary, title=f"{title}: within the measured episodes ({step:,} env steps)")
        if within is not None:
            self.writer.add_figure(f"eval/{split}/within_episode", within, step)
            bins = summary["stages"][0]["within_episode"]
            self.writer.add_scalar(f"eval/{split}/stage0_last_minus_first_bin", bins[-1] - bins[0], step)
        self.writer.flush()

    def log_hparams(self, config: RunConfig, summary: dict[str, Any], split: str, step: int) -> None:
        """The run's settings and its final held-out figures in TensorBoard's HParams view (one session per run:
        runs compared side by side by their settings)."""
        hparams: dict[str, Any] = {}

        def flatten(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, inner in value.items():
                    flatten(f"{prefix}{key}.", inner)
            else:
                hparams[prefix[:-1]] = value if isinstance(value, (bool, int, float, str)) else str(value)

        flatten("", {k: v for k, v in config.to_dict().items() if k not in ("run_root", "experiment", "eval")})
        metrics = {f"hparam/{split}/return_stage{s['stage']}": float(s["mean_return"]) for s in summary["stages"]}
        if len(summary["stages"]) > 1:
            metrics[f"hparam/{split}/adaptation_gain"] = float(summary["stages"][-1]["mean_return"]
                                                               - summary["stages"][0]["mean_return"])
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        # into the run's own event file (SummaryWriter.add_hparams would start another one in a subfolder)
        for summary_proto in hparams_summaries(hparams, metrics):
            self.writer.file_writer.add_summary(summary_proto, step)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def check_finite_state(state: Any, what: str, where: str = "") -> None:
    """FloatingPointError naming the first non-finite floating-point tensor of a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and not bool(torch.isfinite(state).all()):
            raise FloatingPointError(f"{what} {where or 'tensor'} non-finite; stopping before anything of it is "
                                     "written (last checkpoint kept)")
    elif isinstance(state, dict):
        for key, value in state.items():
            check_finite_state(value, what, f"{where}.{key}" if where else str(key))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            check_finite_state(value, what, f"{where}[{i}]")


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
                 episodes: int, logger: _Logger | None = None, repeats: int = 1, out: Path | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The evaluation protocol on ``tasks`` held-out tasks. ``repeats`` R > 1 adapts R times on each task,
    independently (the bundled agents seed episodes and action noise by a task's position in the call, so
    each copy has its own and the first copy is the R = 1 evaluation), and pools the R x tasks adaptations,
    the intervals resampling within each task: for a family with few tasks (HalfCheetahDir has two) one
    adaptation per task is one draw of a noisy quantity. Written to ``out`` (default: `eval_dir`)."""
    if repeats < 1:
        raise ConfigError(f"eval: repeats must be >= 1, got {repeats}")
    family = agent.sampler.family
    held_out = eval_tasks(family, config.seed, split, tasks)
    recorder = Recorder()
    report = None
    if progress is not None:
        started, done = time.perf_counter(), [0]

        def report(record: Any, call: int) -> None:
            done[0] += int(record.returns.size) * agent.sampler.horizon
            progress(f"  evaluating: batch {call} collected ({record.returns.shape[0]} tasks x "
                     f"{record.returns.shape[1]} episodes; up to {done[0]:,} env steps so far, "
                     f"{_fmt_time(time.perf_counter() - started)})")

    with agent.sampler.recording(report) as calls, work_threads():  # success and reward terms of the episodes
        result: AdaptationResult = agent.evaluate_adaptation(held_out * repeats, steps, episodes,
                                                             seed=_eval_seed(config))
    result = with_episode_metrics(result, calls)
    fault_point("eval")
    title = f"{config.agent_name} on {family.family}" + (f", {repeats} adaptations per task" if repeats > 1 else "")
    strata = np.tile(np.arange(len(held_out)), repeats) if repeats > 1 else None
    summary = write_summary(result, out or eval_dir(run_dir, split, repeats), title=title, strata=strata, extra={
        "split": split, "agent": config.agent_name, "family": family.family, "iteration": agent.iteration,
        "env_steps": agent.env_steps, "horizon": agent.sampler.horizon,
        **({"repeats": repeats, "distinct_tasks": len(held_out)} if repeats > 1 else {}),
        "provenance": recorder.record(),
    })
    if logger is not None:
        logger.log_eval(summary, split, agent.env_steps, title)
    return summary


def render_run(agent: Any, config: RunConfig, run_dir: Path, split: str, tasks: int, steps: int, episodes: int,
               video_tasks: int = 1, size: tuple[int, int] = (320, 240), fps: float | None = None,
               verbose: bool = False, out: Path | None = None) -> list[Path]:
    """Videos of the evaluation `evaluate_run` with the same arguments makes: its first ``video_tasks``
    held-out tasks before and after adaptation, replayed from the agent's `adaptation_rollouts`, into
    ``video/`` of its folder ``out`` (default ``RUN_DIR/eval/<split>/``) and TensorBoard
    (``eval/<split>/video/task<j>``, x = env steps)."""
    from metarl.video import VideoError, check_renderable, write_videos

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
                            (out or run_dir / "eval" / split) / "video", size=size, fps=fps, writer=logger.writer,
                            global_step=agent.env_steps, tag=f"eval/{split}/video", verbose=verbose)
    finally:
        logger.close()


def _eval_due(config: RunConfig, iteration: int) -> bool:
    """Whether the training schedule evaluates after ``iteration`` (mid-run every ``eval.every``, and at
    the end)."""
    if iteration < 1:
        return False
    return iteration == config.iterations or bool(config.eval.every and iteration % config.eval.every == 0)


def train(config: RunConfig, run_dir: Path | None = None, resume: bool = False, verbose: bool = True,
          on_eval: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Meta-train as ``config`` says; returns the run folder. With ``resume``, continue ``run_dir``: from its
    newest usable checkpoint, or from iteration 0 in place if it was killed before its first one. Only one
    process at a time trains or evaluates in a run folder (`metarl.runfolder.run_lock`). ``on_eval``, if
    given, is called with each evaluation's summary (``iteration``, ``env_steps``, ``stages``, ...) once the
    evaluation is recorded: every ``eval.every`` iterations and at the end (`metarl sweep` reports it to Ray
    Tune's scheduler)."""
    sampler, agent = build_agent(config)  # validates the env, sampler and agent before anything is written
    try:
        return train_agent(config, sampler, agent, run_dir, resume, verbose, on_eval)
    finally:
        sampler.close()


def train_agent(config: RunConfig, sampler: Any, agent: Any, run_dir: Path | None = None, resume: bool = False,
                verbose: bool = True, on_eval: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """`train` with the sampler and agent `build_agent` made for ``config`` (left open: the trained agent stays
    usable, as `metarl.api.train` keeps it); returns the run folder."""
    eval_tasks(sampler.family, config.seed, config.eval.split, config.eval.tasks)  # refused before training
    if not resume:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = run_dir or Path(config.run_root) / config.experiment / f"{stamp}-{config.seed}"
        check_new_run_folder(run_dir)
    elif not (run_dir / "config.yaml").is_file():
        raise no_config_error(run_dir)
    with run_lock(run_dir), work_threads():
        if not resume:
            check_new_run_folder(run_dir)  # again, now that no other process can start one there
        return _train_locked(config, run_dir, resume, verbose, sampler, agent, on_eval)


def _train_locked(config: RunConfig, run_dir: Path, resume: bool, verbose: bool, sampler: Any, agent: Any,
                  on_eval: Callable[[dict[str, Any]], None] | None = None) -> Path:
    ckpt_dir = run_dir / "checkpoints"
    check_writable(run_dir, ckpt_dir, run_dir / "eval", run_dir / "eval" / config.eval.split)
    logger: _Logger | None = None
    try:
        done: list[int] = []
        redo_eval = False
        if resume:
            state = latest_checkpoint(ckpt_dir)
            if state is not None:
                load_agent_state(run_dir, state, agent, config)
                start = int(state["iteration"])
            else:  # killed before its first checkpoint: start again in place, unless checkpoints were removed
                start = 0
                rows = [line for line in (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines()
                        if line.strip()] if (run_dir / "metrics.jsonl").is_file() else []
                if len(rows) > config.checkpoint_every:  # (== : killed while writing the first checkpoint)
                    raise ConfigError(f"{run_dir}: no checkpoint, yet metrics.jsonl records {len(rows)} iterations "
                                      "(the checkpoints were removed?); refusing to restart it in place")
            if config.iterations < start:
                raise ConfigError(f"iterations: the checkpoint of {run_dir} is at iteration {start}; "
                                  f"iterations={config.iterations} would shrink the run below it")
            recorded = evals_done(run_dir)
            unrecorded = recorded is None
            if unrecorded:  # a run folder from before the record: trust complete summaries of this iteration
                recorded = [start] if legacy_eval_done(run_dir, config, start) else []
            done = [k for k in recorded if k <= start]
            redo_eval = _eval_due(config, start) and start not in done
            if done and not redo_eval:  # the files of the last evaluation done: damaged or removed since?
                problem = eval_files_problem(run_dir, config.eval.split, max(done))
                if problem and max(done) == start:
                    warn(f"{problem}; redoing the evaluation of iteration {start} from its checkpoint")
                    redo_eval = True
                elif problem:
                    warn(f"{problem}: the evaluation of iteration {max(done)} is lost (no checkpoint of that "
                         "iteration is kept; history.jsonl keeps its returns), the next evaluation replaces it")
            readable, damaged = read_event_files(run_dir)
            for line in damaged:
                warn(f"{line}; the scalars metrics.jsonl and eval/{config.eval.split}/history.jsonl keep are written "
                     "again, the figures, text, HParams row and other evaluation scalars (success, reward terms) after it "
                     "are lost")
            if start == config.iterations and not redo_eval:
                if damaged:
                    logger = _Logger(run_dir)
                    rebuild_event_points(run_dir, config.eval.split, readable, agent.env_steps + 1, logger.writer)
                if verbose:
                    print(f"{run_dir} is finished (iteration {start} of {config.iterations}, evaluated); nothing to do")
                return run_dir
            set_aside_damaged(ckpt_dir)  # all checks passed: from here on the resume writes
            if unrecorded:  # from now on an evaluation is done only once the record says so, the first one too
                record_eval_done(run_dir, done)
            stored = read_yaml(run_dir / "config.yaml", "run config") or {}
            if stored.get("iterations") != config.iterations:  # resumed with iterations=N: keep the folder true
                meta = dict(stored.get("meta") or {})
                meta.setdefault("changes", []).append(
                    {"at_iteration": start, "iterations": [stored.get("iterations"), config.iterations],
                     "command": " ".join(sys.argv)})
                write_run_config(run_dir, config, meta)
            row = truncate_jsonl(run_dir / "metrics.jsonl", start)
            # Events after the checkpoint are dropped (purge_step); when the evaluation at the checkpoint's
            # iteration is redone, its partial points too, and the iteration's own scalars are logged again.
            logger = _Logger(run_dir, purge_step=agent.env_steps + (0 if (redo_eval or not start) else 1))
            if damaged:  # points below the purge step that the damage made unreadable
                rebuild_event_points(run_dir, config.eval.split, readable,
                                     agent.env_steps + (0 if (redo_eval or not start) else 1), logger.writer)
            if start == 0:  # all of it purged, the config text included
                logger.writer.add_text("config", "```\n" + yaml.safe_dump(config.to_dict(), sort_keys=False) + "\n```")
            elif redo_eval and row is not None:
                for key, value in row.items():
                    if "/" in key:
                        logger.writer.add_scalar(key, value, agent.env_steps)
            if verbose:
                print(f"resuming {run_dir} at iteration {start} ({agent.env_steps:,} env steps)"
                      + (" (redoing the interrupted evaluation)" if redo_eval else ""))
        else:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            write_run_config(run_dir, config, _meta(sampler))
            # no evaluation done yet, recorded: a kill during the first one leaves it to be redone (without the
            # record, complete summary files were taken as done and its history line and points were lost)
            record_eval_done(run_dir, [])
            logger = _Logger(run_dir)
            logger.writer.add_text("config", "```\n" + yaml.safe_dump(config.to_dict(), sort_keys=False) + "\n```")
            start = 0
            if verbose:
                print(f"run folder: {run_dir} (sampler backend: {sampler.backend})")
        if redo_eval:
            _eval_and_report(agent, config, run_dir, logger, verbose, done, on_eval)
        family = sampler.family
        n_tasks = config.agent.tasks_per_batch
        record = config_record(config.to_dict())
        t_start = time.perf_counter()
        for it in range(start, config.iterations):
            task_seed = int(np.random.SeedSequence([config.seed, it]).generate_state(1)[0])
            tasks = family.sample_tasks(n_tasks, "train", seed=task_seed)
            fault_point("iteration")
            steps_before, t_it = agent.env_steps, time.perf_counter()
            with sampler.recording() as calls:
                metrics = agent.train_step(tasks)
            it_rate = (agent.env_steps - steps_before) / max(time.perf_counter() - t_it, 1e-9)
            metrics.update(episode_scalars(calls))  # meta/success_rate_stage{k}, meta/reward_<term>_stage{k}
            for key, value in metrics.items():
                if not np.isfinite(value):
                    raise FloatingPointError(f"iteration {it + 1}: {key} is {value}; stopping (last checkpoint kept)")
            check_finite_state(agent.state_dict(), f"iteration {it + 1}: the update made agent state")
            logger.log(metrics, agent.env_steps, it + 1)
            fault_point("metrics")
            if (it + 1) % config.checkpoint_every == 0 or it + 1 == config.iterations:
                logger.writer.flush()  # events up to the checkpoint are on disk before it is
                save_checkpoint(ckpt_dir, {"agent": agent.state_dict(), "iteration": it + 1,
                                           "env_steps": agent.env_steps, "config": record})
            if verbose:
                done_its = it + 1 - start
                per_it = (time.perf_counter() - t_start) / done_its
                # the training batch's return before and after adaptation, where the agent reports them
                returns = "".join(f"{label} {metrics[key]:.1f} " for label, key in (
                    ("pre", "meta/return_pre_adaptation"), ("post", "meta/return_post_adaptation")) if key in metrics)
                print(
                    f"[{it + 1}/{config.iterations}] {agent.env_steps / 1e6:.2f}M steps | {it_rate:,.0f} steps/s | "
                    + (f"{returns}| " if returns else "")
                    + f"{per_it:.1f}s/it | ETA {_fmt_time(per_it * (config.iterations - it - 1))}",
                    flush=True,
                )
            if _eval_due(config, it + 1):
                _eval_and_report(agent, config, run_dir, logger, verbose, done, on_eval)
        return run_dir
    except WorkerDied as exc:  # nothing of the interrupted iteration or evaluation counts: its resume redoes it
        raise WorkerDied(f"{exc}; the run keeps its last checkpoint: resume it with metarl train --resume "
                         f"{run_dir}") from None
    finally:
        if logger is not None:
            logger.close()


def _eval_and_report(agent, config: RunConfig, run_dir: Path, logger: _Logger, verbose: bool, done: list[int],
                     on_eval: Callable[[dict[str, Any]], None] | None = None) -> None:
    e = config.eval
    summary = evaluate_run(agent, config, run_dir, e.split, e.tasks, e.steps, e.episodes, logger)
    if agent.iteration == config.iterations:  # the final figures: the run's row in TensorBoard's HParams view
        logger.log_hparams(config, summary, e.split, agent.env_steps)
    fault_point("eval_history")
    record_eval_history(run_dir / "eval" / e.split / "history.jsonl", summary)
    fault_point("eval_logged")
    done.append(agent.iteration)  # files, history and TensorBoard points (flushed by log_eval) are all written
    record_eval_done(run_dir, done)
    if verbose:
        curve = " -> ".join(f"{s['mean_return']:.1f}" for s in summary["stages"])
        print(f"  eval ({e.split}, {e.tasks} tasks): return by adaptation stage {curve}", flush=True)
    if on_eval is not None:
        on_eval(summary)
