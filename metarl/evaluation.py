"""The one evaluation protocol of metarl: adaptation curves on held-out tasks.

Stage 0 is the return of the episodes the meta-learned policy produces before it has seen the task;
stage k is the return after k adaptation stages. The x axis is the adaptation experience consumed
before the measured episodes (``adapt_episodes`` and ``adapt_env_steps``, per task); the y axis is the
mean return of the measured episodes, per task, summarised across tasks with a bootstrap 95% interval.
Gradient-based agents adapt by gradient steps, recurrent agents by carrying their state, baselines by
training; every agent returns an `AdaptationResult` and the files below are the same for all of them.

Written to ``RUN_DIR/eval/<split>/``: ``summary.json``, ``summary.csv``, ``per_task.csv``,
``adaptation_curve.png`` and, where the agent reports it, ``within_episode.png`` (the return in each tenth
of the horizon inside the measured episodes, per stage; ``within_episode`` in each stage of the summary).
The previous evaluation's files are removed first and ``summary.json``, which names the iteration evaluated, is
written last: a folder with a summary.json holds one complete evaluation, and one without it (a killed
evaluation) holds files of the unfinished one only.

Beyond the return, each stage carries the episode metrics of the measured episodes: ``success_rate`` (an
episode succeeds if any of its steps has ``info["success"]`` true) with its 95% interval over tasks, where the
env reports success, and ``reward_terms``, the mean episode sum of each ``info["reward_*"]`` term.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from metarl.system import atomic_write, fault_point, fsync_dir, warn
from metarl.tasks import Task


@dataclasses.dataclass
class AdaptationResult:
    """Returns ``[n_tasks, n_stages]`` and the adaptation experience consumed before each stage.

    ``within_episode`` (optional) ``[n_tasks, n_stages, bins]``: the mean over the measured episodes of the
    reward collected in each of ``bins`` equal spans of the horizon (`EpisodeBatch.binned_returns`), so
    that adaptation *inside* an episode shows (RL² on HalfCheetahVel infers the target speed within the
    first episode). Summed over bins it is ``returns``."""

    tasks: list[Task]
    returns: np.ndarray
    adapt_episodes: list[int]
    adapt_env_steps: list[float]
    within_episode: np.ndarray | None = None
    success: np.ndarray | None = None  # [n_tasks, n_stages]: fraction of measured episodes that succeeded
    reward_terms: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # name -> [n_tasks, n_stages]


def stage_metrics(records: list[Any], n_stages: int, returns: np.ndarray | None = None
                  ) -> tuple[np.ndarray | None, dict[str, np.ndarray]] | None:
    """Success and reward terms ``[n_tasks, n_stages]`` (means over each stage's episodes) from the sampler calls
    of an evaluation or a training iteration (`metarl.sampling.SampleRecord`, in call order). Stages are taken
    in call order, as `metarl.agent.StageRollout` describes them: a call with K episodes per trial holds the
    next K stages, episode ``e`` of it at stage ``offset + e % K`` (MAML: one call per stage; RL²: one call,
    stage k = episode k of each trial). None if the calls do not hold exactly ``n_stages`` stages, or (given
    ``returns``, ``[n_tasks, n_stages]``) if their returns are not those: then the calls were something else."""
    if not records or sum(r.episodes_per_trial for r in records) != n_stages:
        return None
    n_tasks = records[0].returns.shape[0]
    if any(r.returns.shape[0] != n_tasks for r in records):
        return None
    reported = any(r.success is not None for r in records)
    success = np.zeros((n_tasks, n_stages)) if reported else None
    terms: dict[str, np.ndarray] = {}
    stage = 0
    for r in records:
        K = r.episodes_per_trial
        for k in range(K):
            if returns is not None and not np.allclose(r.returns[:, k::K].mean(1), returns[:, stage], rtol=1e-4, atol=1e-4):
                return None
            if success is not None and r.success is not None:
                success[:, stage] = r.success[:, k::K].mean(1)
            for name, values in r.reward_terms.items():
                terms.setdefault(name, np.zeros((n_tasks, n_stages)))[:, stage] = values[:, k::K].mean(1)
            stage += 1
    return success, terms


def with_episode_metrics(result: AdaptationResult, records: list[Any]) -> AdaptationResult:
    """``result`` with the success and reward terms of the sampler calls that produced it (`stage_metrics`),
    unless the agent reported them itself."""
    if result.success is not None or result.reward_terms:
        return result
    found = stage_metrics(records, result.returns.shape[1], result.returns)
    if found is None:
        return result
    return dataclasses.replace(result, success=found[0], reward_terms=found[1])


def episode_scalars(records: list[Any], prefix: str = "meta") -> dict[str, float]:
    """Scalars of the episodes a training iteration sampled (`stage_metrics` over all its sampler calls):
    ``<prefix>/success_rate_stage{k}`` where the env reports success and ``<prefix>/<reward term>_stage{k}``,
    the mean episode sum of each term, stage k being k adaptation stages into the iteration's tasks."""
    found = stage_metrics(records, sum(r.episodes_per_trial for r in records))
    if found is None:
        return {}
    success, terms = found
    out = {}
    if success is not None:
        out.update({f"{prefix}/success_rate_stage{k}": float(v) for k, v in enumerate(success.mean(0))})
    for name, values in sorted(terms.items()):
        out.update({f"{prefix}/{name}_stage{k}": float(v) for k, v in enumerate(values.mean(0))})
    return out


def bootstrap_ci(values: np.ndarray, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return (float("nan"), float("nan"))
    if values.size == 1:
        return (float(values[0]), float(values[0]))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def stratified_bootstrap_ci(values: np.ndarray, strata: np.ndarray, confidence: float = 0.95, resamples: int = 2000,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` whose rows fall in ``strata`` (e.g. several
    adaptations on each of a fixed list of tasks): each resample draws with replacement *within* every
    stratum, keeping its size, so the interval is that of the mean over these strata, without the variation
    of which strata were drawn."""
    values, strata = np.asarray(values, dtype=np.float64), np.asarray(strata)
    if values.shape != strata.shape or values.ndim != 1:
        raise ValueError(f"stratified_bootstrap_ci: values {values.shape} and strata {strata.shape} must be "
                         "1-D and of one length")
    if values.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    sums = np.zeros(resamples)
    for stratum in np.unique(strata):
        v = values[strata == stratum]
        sums += v[rng.integers(0, v.size, size=(resamples, v.size))].sum(axis=1)
    means = sums / values.size
    alpha = (1 - confidence) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def grouped_bootstrap_ci(groups: list[np.ndarray], confidence: float = 0.95, resamples: int = 2000,
                         seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over several groups (e.g. seeds, each with its per-task
    values): each resample draws the groups with replacement, then values within each drawn group, so the
    interval carries the between-group (seed-to-seed) variation too. One group is `bootstrap_ci`."""
    groups = [np.asarray(g, dtype=np.float64).ravel() for g in groups]
    if len(groups) == 1:
        return bootstrap_ci(groups[0], confidence, resamples, seed)
    if any(g.size == 0 for g in groups):
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(groups), size=(resamples, len(groups)))
    sums, counts = np.zeros(resamples), np.zeros(resamples)
    for slot in range(len(groups)):
        for gi, g in enumerate(groups):
            rows = np.flatnonzero(picks[:, slot] == gi)
            if rows.size:
                sums[rows] += g[rng.integers(0, g.size, size=(rows.size, g.size))].sum(axis=1)
                counts[rows] += g.size
    means = sums / counts
    alpha = (1 - confidence) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


# Two-sided 95% quantiles of Student's t distribution, t_{0.975, df} (standard tables).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_ci95(values: np.ndarray) -> tuple[float, float]:
    """95% confidence interval of the mean of a few independent values (seeds): mean +- t * s / sqrt(n),
    with Student's t at n - 1 degrees of freedom (a bootstrap over 3 seeds would be far too narrow).
    One value gives (nan, nan)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n < 2:
        return (float("nan"), float("nan"))
    df = n - 1
    t = _T975.get(df) or _T975[max(k for k in _T975 if k <= df)]  # conservative between table rows
    half = t * values.std(ddof=1) / np.sqrt(n)
    return (float(values.mean() - half), float(values.mean() + half))


def iqm(values: np.ndarray) -> float:
    """Interquartile mean: the mean of the values left after dropping the lowest and the highest quarter
    (``floor(n / 4)`` values from each end, as ``scipy.stats.trim_mean(values, 0.25)`` and rliable do).
    Robust to a few failed tasks or seeds, yet uses half the data, unlike the median."""
    values = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if values.size == 0:
        return float("nan")
    cut = values.size // 4
    return float(values[cut:values.size - cut].mean())


def summarize(result: AdaptationResult, seed: int = 0, strata: np.ndarray | None = None) -> dict[str, Any]:
    """The JSON summary: one entry per stage with mean, bootstrap CI over tasks and per-task returns; from
    stage 1 on also the adaptation gain (``gain``: mean over tasks of the stage's return minus stage 0's) with
    its paired bootstrap CI (``gain_ci95``, resampling tasks, so task-to-task spread shared by both stages
    cancels: a gain can be clear while the two stages' own intervals overlap). ``strata`` (one label per row,
    e.g. the task of each of several adaptations per task): every interval resamples within the strata
    (`stratified_bootstrap_ci`)."""
    def ci(values: np.ndarray, k: int) -> tuple[float, float]:
        if strata is None:
            return bootstrap_ci(values, seed=seed + k)
        return stratified_bootstrap_ci(values, strata, seed=seed + k)

    stages = []
    for k in range(result.returns.shape[1]):
        column = result.returns[:, k]
        low, high = ci(column, k)
        stages.append({
            "stage": k,
            "adapt_episodes": int(result.adapt_episodes[k]),
            "adapt_env_steps": float(result.adapt_env_steps[k]),
            "mean_return": float(column.mean()),
            "ci95": [low, high],
            "per_task": [float(v) for v in column],
        })
        if k > 0:  # paired over tasks: each task's return at this stage minus its own before adaptation
            diff = column - result.returns[:, 0]
            stages[-1].update(gain=float(diff.mean()), gain_ci95=list(ci(diff, k)))
        if result.within_episode is not None:  # mean over tasks of each bin's reward
            stages[-1]["within_episode"] = [float(v) for v in result.within_episode[:, k].mean(0)]
        if result.success is not None:
            rates = result.success[:, k]
            stages[-1].update(success_rate=float(rates.mean()), success_ci95=list(ci(rates, k)),
                              per_task_success=[float(v) for v in rates])
        if result.reward_terms:
            stages[-1]["reward_terms"] = {name: float(v[:, k].mean()) for name, v in sorted(result.reward_terms.items())}
    summary = {"num_tasks": len(result.tasks), "tasks": [t.to_dict() for t in result.tasks], "stages": stages}
    groups = by_env(summary)
    if groups is not None:
        summary["by_env"] = groups
    return summary


def by_env(summary: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Per env of a family whose tasks name one (``env_name``: Meta-World's ML10 and ML45), from an evaluation's
    summary (its ``tasks`` and each stage's ``per_task`` and ``per_task_success``), in name order: its count of
    distinct tasks (and of ``adaptations`` where a task was adapted to more than once: ``--repeats``) and, per
    stage, the mean return and (where measured) the success rate over them. None where the tasks do not name envs
    or name only one (ML1: the whole summary is that env's)."""
    tasks = summary["tasks"]
    names = [task.get("env_name") for task in tasks]
    if None in names or len(set(names)) < 2:
        return None
    stages = summary["stages"]
    success = all("per_task_success" in stage for stage in stages)
    out = []
    for name in sorted(set(names)):
        rows = [i for i, n in enumerate(names) if n == name]
        distinct = len({json.dumps(tasks[i], sort_keys=True) for i in rows})
        entry: dict[str, Any] = {"env": name, "tasks": distinct,
                                 **({"adaptations": len(rows)} if len(rows) != distinct else {}),
                                 "mean_return": [float(np.mean([st["per_task"][i] for i in rows])) for st in stages]}
        if success:
            entry["success_rate"] = [float(np.mean([st["per_task_success"][i] for i in rows])) for st in stages]
        out.append(entry)
    return out


def plot_within_episode(summary: dict[str, Any], title: str = "", path: str | Path | None = None):
    """The return in each span of the horizon inside the measured episodes, one line per stage (None if the
    summary has no within-episode bins)."""
    stages = [s for s in summary["stages"] if "within_episode" in s]
    if not stages:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bins = len(stages[0]["within_episode"])
    for s in stages:
        ax.plot([(b + 0.5) / bins for b in range(bins)], s["within_episode"], marker=".",
                label=f"stage {s['stage']} ({s['adapt_episodes']} episodes before)")
    ax.set_xlabel("fraction of the horizon")
    ax.set_ylabel(f"reward per 1/{bins} of the horizon (mean over tasks)")
    return _finish(fig, ax, title, path)


def write_summary(result: AdaptationResult, out_dir: str | Path, title: str = "", extra: dict[str, Any] | None = None,
                  seed: int = 0, strata: np.ndarray | None = None) -> dict[str, Any]:
    """Write summary.csv / per_task.csv / adaptation_curve.png (/ within_episode.png) and, last, summary.json into
    ``out_dir``, after removing the files of the evaluation written there before (``strata``: as `summarize`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(result, seed=seed, strata=strata)
    if extra:
        summary.update(extra)
    left = [name for name in EVAL_FILES if (out / name).exists()]
    if left and "summary.json" not in left:
        warn(f"{out} held files of an evaluation that did not finish ({', '.join(left)}); replacing them")
    for name in EVAL_FILES:  # summary.json first: from here on the folder claims no complete evaluation
        (out / name).unlink(missing_ok=True)
    fsync_dir(out)

    success = result.success is not None
    terms = sorted(result.reward_terms)
    rows = [["stage", "adapt_episodes", "adapt_env_steps", "mean_return", "ci95_low", "ci95_high"]
            + (["success_rate", "success_ci95_low", "success_ci95_high"] if success else []) + terms]
    for s in summary["stages"]:
        rows.append([s["stage"], s["adapt_episodes"], s["adapt_env_steps"], s["mean_return"], *s["ci95"]]
                    + ([s["success_rate"], *s["success_ci95"]] if success else [])
                    + [s["reward_terms"][name] for name in terms])
    atomic_write(out / "summary.csv", _csv(rows))
    fault_point("eval_files")
    task_rows = [["task", *[f"stage{s['stage']}" for s in summary["stages"]]]
                 + ([f"success_stage{s['stage']}" for s in summary["stages"]] if success else [])]
    for i, task in enumerate(result.tasks):
        task_rows.append([json.dumps(task.params()), *[float(v) for v in result.returns[i]]]
                         + ([float(v) for v in result.success[i]] if success else []))
    atomic_write(out / "per_task.csv", _csv(task_rows))
    plot_curves({title or "metarl": summary}, out / "adaptation_curve.png", title=title)
    plot_within_episode(summary, title=f"{title}: within the measured episodes", path=out / "within_episode.png")
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))  # the record that the evaluation is complete
    return summary


#: The files of one evaluation in its folder (history.jsonl and video/ are kept across evaluations); metaworld.json
#: (`metarl.metaworld_eval`, written after the others) measures the same checkpoint, so a new evaluation removes it.
EVAL_FILES = ("summary.json", "summary.csv", "per_task.csv", "adaptation_curve.png", "within_episode.png",
              "metaworld.json")


def _csv(rows: list[list[Any]]) -> str:
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def plot_curves(curves: dict[str, dict[str, Any]], path: str | Path | None = None, title: str = "",
                xscale: str = "linear"):
    """Plot adaptation curves (one line per method, CI band) against adaptation episodes; returns the figure.

    ``xscale="symlog"`` spreads curves measured at very different budgets (RL²'s 0-4 episodes beside a
    baseline's hundreds) over one readable axis, linear up to one episode and logarithmic beyond."""
    # A bare Figure with its own Agg canvas: no pyplot state (nothing to leak across evaluations) and
    # no change to the user's matplotlib backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, summary in curves.items():
        xs = [s["adapt_episodes"] for s in summary["stages"]]
        ys = [s["mean_return"] for s in summary["stages"]]
        low = [s["ci95"][0] for s in summary["stages"]]
        high = [s["ci95"][1] for s in summary["stages"]]
        ax.plot(xs, ys, marker="o", label=label)
        ax.fill_between(xs, low, high, alpha=0.2)
    if xscale == "symlog":
        ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("adaptation episodes per task (before the measured episodes)")
    ax.set_ylabel("mean return (95% CI over tasks)")
    return _finish(fig, ax, title, path)


def _finish(fig, ax, title: str, path: str | Path | None):
    """Title, grid and legend; written atomically to ``path`` when given; returns the figure."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
        fig.savefig(tmp)
        os.replace(tmp, path)
    return fig
