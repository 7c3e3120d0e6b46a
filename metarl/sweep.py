"""``metarl sweep SWEEP.yaml``: a search over config keys and seeds with Ray Tune, and a sensitivity report.

A sweep names an experiment config, the keys to vary and how, the seeds, and how a trial is scored::

    name: maml_point_nav_sensitivity
    config: ../maml_trpo/point_nav_2d.yaml   # relative to the sweep file
    out: runs/sweep/maml_point_nav           # default: runs/sweep/<name>, relative to the cwd
    overrides: [iterations=5, eval.every=0]  # for every trial
    seeds: [0, 1]
    search: grid                             # grid: every combination; random: `samples` draws (seeded by `seed`)
    samples: 12                              # random only
    seed: 0                                  # random only
    params:                                  # dotted config keys
      agent.inner_lr: [0.05, 0.1, 0.2]       # a list: its values (grid), or a uniform choice (random)
      agent.max_kl: {loguniform: [0.003, 0.03]}   # random only: uniform, loguniform, randint [low, high]
    score: gain                              # gain: held-out return after the last adaptation stage minus
                                             # before it; return: the last stage's return
    splits: [test, ood]                      # held-out splits scored (the first ranks the configurations)
    cpus_per_trial: 1

A trial is one (configuration, seed): a `metarl train` run in ``OUT/trials/<config id>/seed<k>/run`` followed by
the shared evaluation protocol on each split (`metarl.api.MetaLearner.evaluate`, the run's ``eval`` settings),
scored per held-out task. Trials run as Ray Tune trials (`ray.tune.Tuner`, one CPU each by default) on the
cluster that ``--address`` / ``RAY_ADDRESS`` names or on a local instance; the configurations of a random
search are drawn here with a seeded generator, so a rerun draws the same ones. Resumable: a trial that
finished has ``trial.json`` and is never rerun; one interrupted mid-training continues from its checkpoint
(where OUT is on this machine or a shared filesystem). The report (``OUT/report.md``, ``OUT/sensitivity.png``,
``OUT/results.json``, ``OUT/results.csv``) is rewritten from the finished trials: per hyperparameter the score
of each value with a 95% bootstrap interval over seeds and then tasks, the best configurations, and plots;
a family's training range (``env_kwargs.train_range`` of PointNav2D) is a key like any other, so scoring
``splits: [test, ood]`` answers how the width of training shapes transfer.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from metarl.config import ConfigError, load_config, locate, read_yaml
from metarl.evaluation import grouped_bootstrap_ci
from metarl.provenance import MISSING as MISSING_PROVENANCE
from metarl.provenance import Recorder
from metarl.system import atomic_write

DISTRIBUTIONS = ("uniform", "loguniform", "randint")
KEYS = {"name", "config", "out", "overrides", "seeds", "search", "samples", "seed", "params", "score", "splits",
        "cpus_per_trial"}


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    path: Path | None
    config: Path
    out: Path
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    search: str
    params: dict[str, Any]
    points: tuple[dict[str, Any], ...]  # the configurations, in order
    score: str = "gain"
    splits: tuple[str, ...] = ("test",)
    cpus_per_trial: float = 1.0

    def trials(self) -> list[tuple[int, int]]:
        return [(i, s) for i in range(len(self.points)) for s in self.seeds]

    def folder(self, i: int, seed: int) -> Path:
        return self.out / "trials" / point_id(i, self.points[i]) / f"seed{seed}"

    def overrides_of(self, i: int, seed: int) -> list[str]:
        return [*self.overrides, *(f"{k}={json.dumps(v)}" for k, v in self.points[i].items()), f"seed={seed}"]


def point_id(i: int, point: dict[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(point, sort_keys=True).encode()).hexdigest()[:8]
    return f"c{i:03d}-{digest}"


def _draw(rng: np.random.Generator, key: str, spec: Any) -> Any:
    if isinstance(spec, list):
        return spec[int(rng.integers(len(spec)))]
    (kind, (low, high)), = spec.items()
    if kind == "uniform":
        return float(rng.uniform(low, high))
    if kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return int(rng.integers(low, high + 1))


def _check_param(key: str, spec: Any, search: str) -> None:
    where = f"params.{key}"
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where}: expected a non-empty list of values")
        return
    if search == "grid":
        raise ConfigError(f"{where}: a grid search takes a list of values, got {spec!r}")
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
        raise ConfigError(f"{where}: expected a list of values or one of {{{', '.join(DISTRIBUTIONS)}: [low, high]}}, "
                          f"got {spec!r}")
    (kind, bounds), = spec.items()
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds)
            and bounds[0] < bounds[1]):
        raise ConfigError(f"{where}.{kind}: expected [low, high] with low < high, got {bounds!r}")
    if kind == "loguniform" and bounds[0] <= 0:
        raise ConfigError(f"{where}.loguniform: expected low > 0, got {bounds[0]}")


def load_sweep(path: str | Path, out: str | Path | None = None, imports: tuple[str, ...] = ()) -> Sweep:
    """Read and validate a sweep file; every configuration's run config is validated before any work.
    ``imports``: more user modules (``--import``, resolved), added to every trial's run config's ``imports``
    beside the config's own, so that each trial (on any Ray node that has the files) imports them too."""
    path = Path(path)
    data = read_yaml(path, "sweep file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping")
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown sweep key; expected one of {', '.join(sorted(KEYS))}")
    for key in ("name", "config", "params"):
        if key not in data:
            raise ConfigError(f"{key}: missing (a sweep needs name, config and params)")
    name = str(data["name"])
    config = locate(data["config"], path.parent)
    search = data.get("search", "grid")
    if search not in ("grid", "random"):
        raise ConfigError(f"search: expected grid or random, got {search!r}")
    params = data["params"]
    if not isinstance(params, dict) or not params:
        raise ConfigError("params: expected a mapping of dotted config keys to values or distributions")
    for key, spec in params.items():
        _check_param(key, spec, search)
    seeds = data.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)) or len(set(seeds)) < len(seeds):
        raise ConfigError(f"seeds: expected a non-empty list of distinct integers, got {seeds!r}")
    if data.get("score", "gain") not in ("gain", "return"):
        raise ConfigError(f"score: expected gain or return, got {data['score']!r}")
    splits = data.get("splits", ["test"])
    if not (isinstance(splits, list) and splits and set(splits) <= {"test", "ood"}):
        raise ConfigError(f"splits: expected a list of held-out splits (test, ood), got {splits!r}")
    overrides = data.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError("overrides: expected a list of key=value strings")
    if imports:  # the config's own imports, then --import's, as the trials' run configs record them
        own = load_config(config, list(overrides)).imports
        overrides = [*overrides, f"imports={json.dumps(list(dict.fromkeys((*own, *imports))))}"]
    if search == "grid":
        points = [dict(zip(params, values, strict=True)) for values in itertools.product(*params.values())]
    else:
        samples = data.get("samples")
        if not isinstance(samples, int) or samples < 1:
            raise ConfigError(f"samples: a random search needs samples >= 1, got {samples!r}")
        rng = np.random.default_rng(int(data.get("seed", 0)))
        points = [{k: _draw(rng, k, spec) for k, spec in params.items()} for _ in range(samples)]
    cpus = data.get("cpus_per_trial", 1.0)
    if not isinstance(cpus, (int, float)) or cpus <= 0:
        raise ConfigError(f"cpus_per_trial: expected a number > 0, got {cpus!r}")
    # absolute: Tune runs each trial in a working folder of its own
    sweep = Sweep(name=name, path=path, config=Path(config).resolve(),
                  out=Path(out or data.get("out") or f"runs/sweep/{name}").resolve(),
                  overrides=tuple(overrides), seeds=tuple(seeds), search=search, params=params, points=tuple(points),
                  score=data.get("score", "gain"), splits=tuple(splits), cpus_per_trial=float(cpus))
    made: set[str] = set()
    for i, point in enumerate(sweep.points):  # before any work: every configuration must be a valid run
        try:
            run = load_config(sweep.config, sweep.overrides_of(i, sweep.seeds[0]))
        except ConfigError as exc:
            raise ConfigError(f"configuration {point}: {exc}") from None
        key = json.dumps([run.env, run.env_kwargs], sort_keys=True)
        if key not in made:  # the env each distinct env_kwargs makes (e.g. a training range out of bounds)
            made.add(key)
            _check_env(run, point, splits)
    return sweep


def _check_env(run: Any, point: dict[str, Any], splits: list[str]) -> None:
    import metarl
    from metarl.tasks import TaskError

    try:
        env = metarl.make_family(run.env, **run.env_kwargs)
    except (TaskError, TypeError, ValueError) as exc:
        raise ConfigError(f"configuration {point}: env_kwargs: {exc}") from None
    has_ood = metarl.family_of(env).has_ood
    env.close()
    if "ood" in splits and not has_ood:
        raise ConfigError(f"splits: {run.env} has no ood split")


# ---- one trial --------------------------------------------------------------------------------------------
def scores_of(summary: dict[str, Any], score: str) -> list[float]:
    """Per held-out task: the last stage's return minus stage 0's (gain) or the last stage's (return)."""
    last = np.asarray(summary["stages"][-1]["per_task"], dtype=np.float64)
    if score == "return":
        return last.tolist()
    return (last - np.asarray(summary["stages"][0]["per_task"], dtype=np.float64)).tolist()


def run_trial(sweep: Sweep, i: int, seed: int) -> dict[str, Any]:
    """Train configuration ``i`` with ``seed`` (resuming an interrupted run) and score it; the trial record."""
    import metarl.api as mrl
    from metarl.training import train

    start = time.perf_counter()
    recorder = Recorder(command=shlex.join(["metarl", "train", str(sweep.config), *sweep.overrides_of(i, seed)]))
    config = load_config(sweep.config, sweep.overrides_of(i, seed))
    run_dir = sweep.folder(i, seed) / "run"
    resume = (run_dir / "checkpoints").is_dir() and (run_dir / "config.yaml").is_file()
    if run_dir.exists() and not resume:
        import shutil

        shutil.rmtree(run_dir)  # killed before its first checkpoint: nothing to resume
    train(config, run_dir=run_dir, resume=resume, verbose=False)
    learner = mrl.load(run_dir)
    try:
        e = config.eval
        splits = {split: learner.evaluate(split, e.tasks, e.steps, e.episodes) for split in sweep.splits}
    finally:
        learner.close()
    return {"config": i, "point": sweep.points[i], "seed": seed, "score": sweep.score,
            "per_task": {s: scores_of(summary, sweep.score) for s, summary in splits.items()},
            "stages": {s: [st["mean_return"] for st in summary["stages"]] for s, summary in splits.items()},
            "wall_time_s": time.perf_counter() - start, "provenance": recorder.record(resumed=resume)}


def finished(sweep: Sweep, i: int, seed: int) -> dict | None:
    path = sweep.folder(i, seed) / "trial.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_sweep(sweep: Sweep, address: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Run the unfinished trials with Ray Tune, write each ``trial.json`` and the report; the report path."""
    from metarl.sampling.ray import connect

    ray = connect(address)
    from ray import tune

    sweep.out.mkdir(parents=True, exist_ok=True)
    todo = [(i, s) for i, s in sweep.trials() if finished(sweep, i, s) is None]
    log(f"sweep {sweep.name}: {len(sweep.points)} configurations x {len(sweep.seeds)} seeds, "
        f"{len(sweep.trials()) - len(todo)} trials finished already; {ray.cluster_resources().get('CPU', 0):g} Ray CPUs; "
        f"report in {sweep.out}")
    if todo:
        def trainable(cfg: dict[str, Any]) -> None:
            record = run_trial(sweep, *cfg["trial"])
            # written here (this machine or a shared filesystem) and again by the driver from the result
            atomic_write(sweep.folder(*cfg["trial"]) / "trial.json", json.dumps(record, indent=1))
            tune.report({"score": float(np.mean(record["per_task"][sweep.splits[0]])), "record": json.dumps(record)})

        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": sweep.cpus_per_trial}),
            param_space={"trial": tune.grid_search([list(t) for t in todo])},
            tune_config=tune.TuneConfig(metric="score", mode="max", reuse_actors=False),
            run_config=tune.RunConfig(name="tune", storage_path=str((sweep.out / "tune").resolve()), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
        results = tuner.fit()
        errors = []
        for result in results:
            if result.error is not None or "record" not in (result.metrics or {}):
                errors.append(f"trial {result.config.get('trial')}: {str(result.error).splitlines()[0] if result.error else 'no result'}")
                continue
            record = json.loads(result.metrics["record"])
            sweep.folder(record["config"], record["seed"]).mkdir(parents=True, exist_ok=True)
            atomic_write(sweep.folder(record["config"], record["seed"]) / "trial.json", json.dumps(record, indent=1))
        if errors:
            write_report(sweep)
            raise ConfigError(f"{len(errors)} of {len(todo)} trials failed (rerun to retry them); first: {errors[0]}")
    report = write_report(sweep)
    log(f"report: {report}")
    return report


# ---- the report -------------------------------------------------------------------------------------------
def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _fmt_value(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _ci(groups: list[list[float]], seed: int = 0) -> tuple[float, float, float]:
    arrays = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    values = np.concatenate(arrays)
    low, high = grouped_bootstrap_ci(arrays, seed=seed)
    return float(values.mean()), low, high


def _levels(sweep: Sweep, key: str) -> list[tuple[str, Callable[[Any], bool]]]:
    """The values of ``key`` the report groups by: each listed value, or four quantile bins of drawn ones."""
    values = [p[key] for p in sweep.points]
    distinct = sorted(set(values), key=lambda v: (isinstance(v, str), v if not isinstance(v, (list, dict)) else str(v)))
    if len(distinct) <= 8 or not all(isinstance(v, (int, float)) for v in distinct):
        return [(_fmt_value(v), lambda x, v=v: x == v) for v in distinct]
    edges = np.quantile(values, [0, 0.25, 0.5, 0.75, 1.0])
    return [(f"[{_fmt_value(float(lo))}, {_fmt_value(float(hi))}{']' if b == 3 else ')'}",
             lambda x, lo=lo, hi=hi, b=b: lo <= x < hi or (b == 3 and x == hi)) for b, (lo, hi) in
            enumerate(itertools.pairwise(edges))]


def write_report(sweep: Sweep) -> Path:
    """Rewrite report.md, sensitivity.png, results.json and results.csv from the finished trials."""
    records = [r for i, s in sweep.trials() if (r := finished(sweep, i, s)) is not None]
    what = ("held-out return after the last adaptation stage minus before any (adaptation gain)" if sweep.score == "gain"
            else "held-out return after the last adaptation stage")
    lines = [f"# Sweep report: {sweep.name}", "",
             f"Config `{_shown(sweep.config)}` with {list(sweep.overrides)}; {sweep.search} search over "
             f"{', '.join(f'`{k}`' for k in sweep.params)}: {len(sweep.points)} configurations x {len(sweep.seeds)} "
             f"seeds ({len(records)} of {len(sweep.trials())} trials finished). Score: {what}, per held-out task, "
             f"on the {' and '.join(f'`{s}`' for s in sweep.splits)} split{'s' if len(sweep.splits) > 1 else ''}. "
             "Means over tasks x seeds with a 95% bootstrap interval resampling seeds, then tasks within them.", ""]
    if sweep.path is not None:
        lines += [f"Rerun `metarl sweep {sweep.path}` to continue it; finished trials are kept.", ""]
    by_config: dict[int, list[dict]] = {}
    for r in records:
        by_config.setdefault(r["config"], []).append(r)
    rows_json, plots = [], []
    for split in sweep.splits:
        lines += [f"## Split `{split}`", ""]
        for key in sweep.params:
            rows, xs = [], []
            for label, match in _levels(sweep, key):
                mine = [r for r in records if match(r["point"][key])]
                if not mine:
                    continue
                groups = [[x for r in mine if r["seed"] == s for x in r["per_task"][split]] for s in sweep.seeds]
                mean, low, high = _ci(groups)
                before = np.mean([r["stages"][split][0] for r in mine])
                after = np.mean([r["stages"][split][-1] for r in mine])
                rows.append(f"| {label} | {mean:.2f} [{low:.2f}, {high:.2f}] | {before:.2f} | {after:.2f} | "
                            f"{len({r['config'] for r in mine})} |")
                xs.append((label, mean, low, high, before, after))
            lines += [f"### `{key}`", "", "| value | score [95% CI] | return before adaptation | after | configurations |",
                      "|---|---|---|---|---|", *rows, ""]
            plots.append((split, key, xs))
        ranked = []
        for i, mine in by_config.items():
            groups = [r["per_task"][split] for r in mine]
            mean, low, high = _ci(groups)
            ranked.append((mean, low, high, i, len(mine)))
            rows_json.append({"split": split, "config": i, "point": sweep.points[i], "score": mean, "ci95": [low, high],
                              "seeds": sorted(r["seed"] for r in mine),
                              "per_seed": {str(r["seed"]): float(np.mean(r["per_task"][split])) for r in mine},
                              "stages": {str(r["seed"]): r["stages"][split] for r in mine},
                              "provenance": {str(r["seed"]): r.get("provenance", MISSING_PROVENANCE) for r in mine}})
        ranked.sort(reverse=True)
        lines += ["### Best configurations", "", "| rank | " + " | ".join(f"`{k}`" for k in sweep.params)
                  + " | score [95% CI] | seeds |", "|---|" + "---|" * len(sweep.params) + "---|---|"]
        for rank, (mean, low, high, i, n) in enumerate(ranked[:5], 1):
            lines.append(f"| {rank} | " + " | ".join(_fmt_value(sweep.points[i][k]) for k in sweep.params)
                         + f" | {mean:.2f} [{low:.2f}, {high:.2f}] | {n} |")
        lines.append("")
    if records:
        _plot(sweep, plots, sweep.out / "sensitivity.png")
        lines += ["![sensitivity](sensitivity.png)", ""]
    atomic_write(sweep.out / "results.json", json.dumps(rows_json, indent=1))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["config", *sweep.params, "seed", "split", "task", "score"])
    for r in records:
        for split in sweep.splits:
            for t, v in enumerate(r["per_task"][split]):
                writer.writerow([r["config"], *(r["point"][k] for k in sweep.params), r["seed"], split, t, v])
    atomic_write(sweep.out / "results.csv", buf.getvalue())
    report = sweep.out / "report.md"
    atomic_write(report, "\n".join(lines))
    return report


def _plot(sweep: Sweep, plots: list, path: Path) -> None:
    # A bare Figure with its own Agg canvas, as metarl.evaluation's plots: the user's backend is left alone
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = list(sweep.params)
    fig = Figure(figsize=(max(6.0, 4.2 * len(keys)), 6.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(keys), squeeze=False, sharex="col")
    for col, key in enumerate(keys):
        top, bottom = axes[0][col], axes[1][col]
        for n, split in enumerate(sweep.splits):
            xs = next(x for s, k, x in plots if s == split and k == key)
            if not xs:
                continue
            pos = np.arange(len(xs))
            means = np.array([x[1] for x in xs])
            err = np.array([[x[1] - x[2] for x in xs], [x[3] - x[1] for x in xs]])
            top.errorbar(pos, means, yerr=err, marker="o", capsize=3, label=split, color=f"C{n}")
            bottom.plot(pos, [x[4] for x in xs], ls="--", marker="o", color=f"C{n}", label=f"{split}: before")
            bottom.plot(pos, [x[5] for x in xs], ls="-", marker="o", color=f"C{n}", label=f"{split}: after")
            bottom.set_xticks(pos, [x[0] for x in xs], rotation=30 if len(xs) > 4 else 0)
        top.set_ylabel(f"score ({sweep.score})")
        bottom.set_ylabel("held-out return")
        bottom.set_xlabel(key)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, handlelength=4)
    fig.suptitle(f"{sweep.name}: score by value (95% CI over seeds, then tasks);\n"
                 "held-out return before and after adaptation", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
