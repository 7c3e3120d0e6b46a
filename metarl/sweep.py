"""``metarl sweep SWEEP.yaml``: a search over config keys and seeds on Ray Tune, and a sensitivity report.

A sweep names an experiment config, the keys to vary and how, the seeds, how a trial is scored, the search
algorithm and the scheduler::

    name: maml_point_nav_sensitivity
    config: ../maml_trpo/point_nav_2d.yaml   # relative to the sweep file
    out: runs/sweep/maml_point_nav           # default: runs/sweep/<name>, relative to the cwd
    overrides: [iterations=30, eval.every=5] # for every trial
    seeds: [0, 1]
    search: grid                             # grid: every combination; random: `samples` draws (Tune's
                                             # random search, seeded by `seed`); optuna: `samples` configurations
                                             # proposed by Optuna's TPE (seeded by `seed`) from the scores so far
    samples: 12                              # random and optuna only
    seed: 0                                  # random and optuna only
    params:                                  # dotted config keys
      agent.inner_lr: [0.05, 0.1, 0.2]       # a list: its values (grid), or a uniform choice (random, optuna)
      agent.max_kl: {loguniform: [0.003, 0.03]}   # random and optuna only: uniform, loguniform, randint
                                                  # [low, high] (randint: both ends included)
    scheduler: none                          # none: every trial trains to the end; asha: Tune's ASHA stops
                                             # trials whose score at a rung is below the top 1/reduction_factor
    # scheduler: {name: asha, grace_period: 5, reduction_factor: 2, max_t: 30}   (training iterations;
    #                                        # defaults: eval.every, 2, the config's iterations)
    score: gain                              # gain: held-out return after the last adaptation stage minus
                                             # before it; return: the last stage's return
    splits: [test, ood]                      # held-out splits scored (the first ranks the configurations)
    cpus_per_trial: 1
    max_concurrent: 0                        # trials running at once (0: as many as the cluster's CPUs fit);
                                             # 1 runs them one after another, in the search's order

A trial is one (configuration, seed): a `metarl train` run in ``OUT/trials/<config id>/seed<k>/run`` followed by
the shared evaluation protocol on each split (`metarl.api.MetaLearner.evaluate`, the run's ``eval`` settings),
scored per held-out task. Each trial is a Ray Tune trial (`ray.tune.Tuner`, one CPU each by default) on the
cluster that ``--address`` / ``RAY_ADDRESS`` names or on a local instance. The search space is Tune's: a list
is ``tune.grid_search`` (grid) or ``tune.choice`` (random, optuna), a distribution ``tune.uniform``,
``tune.loguniform`` or ``tune.randint``; seeds are a grid dimension (grid, random: a drawn configuration runs
with every seed) or Tune's ``Repeater`` (optuna: each proposal runs with every seed and Optuna learns their
mean). During training, each run's evaluation every ``eval.every`` iterations is reported to Tune
(``score``: the sweep's score on the first split, mean over its held-out tasks; ``iteration``; ``env_steps``),
so the scheduler acts on it (metric ``score``, mode max); the trial's last report is the protocol's score
after training. A trial ASHA stops is recorded as stopped early, with the iteration, score and env steps it
reached, and is left out of the sensitivity tables, which compare configurations trained to the end.

The user's modules (the config's ``imports:``, ``--import``, a ``module:Id`` env's module) reach the Ray nodes
through the job's ``runtime_env`` (``py_modules``; `metarl.sampling.ray.connect`), not through paths the nodes
happen to share; metarl itself must be installed on every node.

Resumable: a trial that finished (trained to the end, or stopped early) has ``trial.json`` and is never
trained again: a rerun replays its recorded evaluations to Tune, so the scheduler and Optuna see it as before;
one interrupted mid-training continues from its checkpoint (where OUT is on this machine or a shared
filesystem), its evaluations so far replayed first. A random search's seeded draws are the same on a rerun.
Optuna's proposals depend on the scores it has seen and the order they arrived, so a rerun asks it to
evaluate the configurations already tried first (their finished trials replayed, not retrained) and then to
propose the rest: the configurations after an interruption may differ from those an uninterrupted sweep
would have tried. The report (``OUT/report.md``, ``OUT/sensitivity.png``, ``OUT/results.json``,
``OUT/results.csv``, ``OUT/trials.json``) is rewritten from the finished trials: per hyperparameter the score
of each value with a 95% bootstrap interval over seeds and then tasks, the best configurations, the trials
stopped early, the compute spent (training iterations and env steps, against every trial run to the end),
and plots; a family's training range (``env_kwargs.train_range`` of PointNav2D) is a key like any other, so
scoring ``splits: [test, ood]`` answers how the width of training shapes transfer.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import io
import itertools
import json
import shlex
import socket
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

SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("none", "asha")
ASHA_OPTIONS = ("name", "grace_period", "reduction_factor", "max_t")
DISTRIBUTIONS = ("uniform", "loguniform", "randint")
KEYS = {"name", "config", "out", "overrides", "seeds", "search", "samples", "seed", "params", "score", "splits",
        "cpus_per_trial", "scheduler", "max_concurrent"}


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
    points: tuple[dict[str, Any], ...]  # grid: the configurations, in order; random, optuna: () (drawn by Tune)
    score: str = "gain"
    splits: tuple[str, ...] = ("test",)
    cpus_per_trial: float = 1.0
    max_concurrent: int = 0  # Tune's max_concurrent_trials; 0: no limit beyond the cluster's CPUs
    samples: int = 0  # random, optuna: configurations drawn
    seed: int = 0  # random, optuna: the searcher's seed
    scheduler: dict[str, Any] | None = None  # asha: {grace_period, reduction_factor, max_t}; None: none
    iterations: int = 0  # of the trials' run config (what a trial trained to the end spends)

    @property
    def configurations(self) -> int:
        return len(self.points) if self.search == "grid" else self.samples

    def trial_count(self) -> int:
        return self.configurations * len(self.seeds)

    def trials(self) -> list[tuple[int, int]]:
        """The (configuration index, seed) of a grid's trials."""
        return [(i, s) for i in range(len(self.points)) for s in self.seeds]

    def folder(self, i: int, seed: int) -> Path:
        return self.out / "trials" / point_id(i, self.points[i]) / f"seed{seed}"

    def config_id(self, point: dict[str, Any]) -> str:
        """A configuration's folder name: ``c<index>-<hash>`` in a grid, ``<search>-<hash>`` otherwise."""
        if self.search == "grid":
            return point_id(self.points.index(point), point)
        return f"{self.search}-{_digest(point)}"

    def config_key(self, point: dict[str, Any]) -> int | str:
        """How records and results.json name a configuration: its index in a grid, else its folder name."""
        return self.points.index(point) if self.search == "grid" else self.config_id(point)

    def folder_of(self, point: dict[str, Any], seed: int) -> Path:
        return self.out / "trials" / self.config_id(point) / f"seed{seed}"

    def overrides_for(self, point: dict[str, Any], seed: int) -> list[str]:
        return [*self.overrides, *(f"{k}={json.dumps(v)}" for k, v in point.items()), f"seed={seed}"]

    def overrides_of(self, i: int, seed: int) -> list[str]:
        return self.overrides_for(self.points[i], seed)


def _digest(point: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(point, sort_keys=True).encode()).hexdigest()[:8]


def point_id(i: int, point: dict[str, Any]) -> str:
    return f"c{i:03d}-{_digest(point)}"


def _plain(value: Any) -> Any:
    """A value as JSON and the config take it (Tune's draws may be numpy scalars)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


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
    if kind == "randint" and not all(isinstance(b, int) for b in bounds):
        raise ConfigError(f"{where}.randint: expected integer bounds, got {bounds!r}")


def _scheduler(spec: Any, run: Any) -> dict[str, Any] | None:
    """The scheduler's settings (None: none), checked against the trials' run config ``run``."""
    if spec in (None, "none"):
        return None
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"scheduler: expected none, asha or a mapping {{name: asha, grace_period: ..., "
                          f"reduction_factor: ..., max_t: ...}}, got {spec!r}")
    name = spec.get("name")
    if name == "none" and len(spec) == 1:
        return None
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler.name: expected one of {', '.join(SCHEDULERS)}, got {name!r}")
    unknown = sorted(set(spec) - set(ASHA_OPTIONS))
    if unknown:
        raise ConfigError(f"scheduler.{unknown[0]}: unknown option; expected one of {', '.join(ASHA_OPTIONS)}")
    every = run.eval.every
    if not every or every >= run.iterations:
        raise ConfigError(f"scheduler: asha acts on the evaluations made during training; eval.every={every} with "
                          f"iterations={run.iterations} makes none (set eval.every below iterations in overrides)")
    out = {"grace_period": spec.get("grace_period", every), "reduction_factor": spec.get("reduction_factor", 2),
           "max_t": spec.get("max_t", run.iterations)}
    for key in ("grace_period", "max_t"):
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"scheduler.{key}: expected a whole number of training iterations >= 1, got {value!r}")
    rf = out["reduction_factor"]
    if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 1:
        raise ConfigError(f"scheduler.reduction_factor: expected a number > 1, got {rf!r}")
    if out["grace_period"] > out["max_t"]:
        raise ConfigError(f"scheduler.grace_period: {out['grace_period']} is beyond max_t={out['max_t']}")
    return out


def _checked_points(params: dict[str, Any], search: str) -> list[dict[str, Any]]:
    """The configurations validated before any work: every one of a grid; otherwise each listed value and both
    ends of each range, the other keys at their first value or lower end."""
    if search == "grid":
        return [dict(zip(params, values, strict=True)) for values in itertools.product(*params.values())]

    def options(spec: Any) -> list[Any]:
        return list(spec) if isinstance(spec, list) else list(next(iter(spec.values())))

    base = {k: options(spec)[0] for k, spec in params.items()}
    points = [base]
    for key, spec in params.items():
        points += [{**base, key: v} for v in options(spec)[1:]]
    return points


def load_sweep(path: str | Path, out: str | Path | None = None, imports: tuple[str, ...] = ()) -> Sweep:
    """Read and validate a sweep file; its configurations' run configs are validated before any work (a grid's
    every one; a drawn search's listed values and range ends). ``imports``: more user modules (``--import``,
    resolved), added to every trial's run config's ``imports`` beside the config's own."""
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
    if search not in SEARCHES:
        raise ConfigError(f"search: expected one of {', '.join(SEARCHES)}, got {search!r}")
    if search == "optuna" and importlib.util.find_spec("optuna") is None:
        import metarl

        raise ConfigError(f"search: optuna needs the optuna package: {metarl.install_hint('ray')}")
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
    samples, seed = 0, 0
    if search != "grid":
        samples = data.get("samples")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ConfigError(f"samples: a {search} search needs samples >= 1, got {samples!r}")
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed: expected an integer (the searcher's seed), got {seed!r}")
    run = load_config(config, list(overrides))
    if imports:  # the config's own imports, then --import's, as the trials' run configs record them
        overrides = [*overrides, f"imports={json.dumps(list(dict.fromkeys((*run.imports, *imports))))}"]
    if run.eval.split != splits[0]:  # the evaluations during training score what ranks the configurations
        overrides = [*overrides, f"eval.split={splits[0]}"]
    scheduler = _scheduler(data.get("scheduler"), run)
    cpus = data.get("cpus_per_trial", 1.0)
    if not isinstance(cpus, (int, float)) or cpus <= 0:
        raise ConfigError(f"cpus_per_trial: expected a number > 0, got {cpus!r}")
    concurrent = data.get("max_concurrent", 0)
    if isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 0:
        raise ConfigError(f"max_concurrent: expected a whole number >= 0 (0: no limit), got {concurrent!r}")
    checked = _checked_points(params, search)
    # absolute: Tune runs each trial in a working folder of its own
    sweep = Sweep(name=name, path=path, config=Path(config).resolve(),
                  out=Path(out or data.get("out") or f"runs/sweep/{name}").resolve(),
                  overrides=tuple(overrides), seeds=tuple(seeds), search=search, params=params,
                  points=tuple(checked) if search == "grid" else (), score=data.get("score", "gain"),
                  splits=tuple(splits), cpus_per_trial=float(cpus), max_concurrent=concurrent, samples=samples,
                  seed=seed, scheduler=scheduler, iterations=run.iterations)
    made: set[str] = set()
    for point in checked:  # before any work: every configuration must be a valid run
        try:
            trial_run = load_config(sweep.config, sweep.overrides_for(point, sweep.seeds[0]))
        except ConfigError as exc:
            raise ConfigError(f"configuration {point}: {exc}") from None
        key = json.dumps([trial_run.env, trial_run.env_kwargs], sort_keys=True)
        if key not in made:  # the env each distinct env_kwargs makes (e.g. a training range out of bounds)
            made.add(key)
            _check_env(trial_run, point, splits)
    return sweep


def _check_env(run: Any, point: dict[str, Any], splits: list[str]) -> None:
    import metarl
    from metarl.plugins import load
    from metarl.tasks import TaskError

    try:
        load(run.imports)  # the user's modules that register the env
        env = metarl.make_family(run.env, **run.env_kwargs)
    except (TaskError, TypeError, ValueError) as exc:
        raise ConfigError(f"configuration {point}: env_kwargs: {exc}") from None
    has_ood = metarl.family_of(env).has_ood
    env.close()
    if "ood" in splits and not has_ood:
        raise ConfigError(f"splits: {run.env} has no ood split")


def user_modules(sweep: Sweep) -> list[str]:
    """The user's modules every trial imports (resolved entries): its run config's ``imports`` and the module
    of a ``module:Id`` env."""
    from metarl.plugins import module_of

    run = load_config(sweep.config, list(sweep.overrides))
    module = module_of(run.env)
    return list(dict.fromkeys([*run.imports, *([module] if module else [])]))


# ---- one trial --------------------------------------------------------------------------------------------
def scores_of(summary: dict[str, Any], score: str) -> list[float]:
    """Per held-out task: the last stage's return minus stage 0's (gain) or the last stage's (return)."""
    last = np.asarray(summary["stages"][-1]["per_task"], dtype=np.float64)
    if score == "return":
        return last.tolist()
    return (last - np.asarray(summary["stages"][0]["per_task"], dtype=np.float64)).tolist()


def _eval_row(evaluation: dict[str, Any], score: str) -> dict[str, Any]:
    """What Tune gets of an evaluation during training (a summary or a history.jsonl line): the score, the mean
    over held-out tasks of `scores_of`'s, from the stages' mean returns."""
    stages = [s["mean_return"] for s in evaluation["stages"]]
    value = stages[-1] - stages[0] if score == "gain" else stages[-1]
    return {"iteration": int(evaluation["iteration"]), "env_steps": int(evaluation["env_steps"]), "score": float(value)}


def _where() -> dict[str, str]:
    """The Ray node this process runs on (its id and address) and the host's name."""
    import ray

    return {"node": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "host": socket.gethostname()}


def run_trial(sweep: Sweep, point: dict[str, Any], seed: int,
              report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train configuration ``point`` with ``seed`` (resuming an interrupted run) and score it; the trial record.
    ``report`` gets each evaluation during training before the last (its evaluations before an interruption
    first), as `_eval_row` gives it."""
    import metarl.api as mrl
    from metarl.runfolder import evals_done, read_eval_history
    from metarl.training import train

    start = time.perf_counter()
    overrides = sweep.overrides_for(point, seed)
    recorder = Recorder(command=shlex.join(["metarl", "train", str(sweep.config), *overrides]))
    config = load_config(sweep.config, overrides)
    run_dir = sweep.folder_of(point, seed) / "run"
    history_file = run_dir / "eval" / config.eval.split / "history.jsonl"
    resume = (run_dir / "checkpoints").is_dir() and (run_dir / "config.yaml").is_file()
    if run_dir.exists() and not resume:
        import shutil

        shutil.rmtree(run_dir)  # killed before its first checkpoint: nothing to resume
    if resume and report is not None:  # the evaluations made before the interruption, as they were reported
        done = set(evals_done(run_dir) or [])
        for line in read_eval_history(history_file):
            if line["iteration"] in done and line["iteration"] < config.iterations:
                report(_eval_row(line, sweep.score))

    def on_eval(summary: dict[str, Any]) -> None:
        if report is not None and summary["iteration"] < config.iterations:  # the last: the protocol's score below
            report(_eval_row(summary, sweep.score))

    train(config, run_dir=run_dir, resume=resume, verbose=False, on_eval=on_eval)
    learner = mrl.load(run_dir)
    try:
        e = config.eval
        env_steps = int(learner.agent.env_steps)
        splits = {split: learner.evaluate(split, e.tasks, e.steps, e.episodes) for split in sweep.splits}
    finally:
        learner.close()
    per_task = {s: scores_of(summary, sweep.score) for s, summary in splits.items()}
    history = [_eval_row(line, sweep.score) for line in read_eval_history(history_file)
               if line["iteration"] < config.iterations]
    reached = {"iteration": config.iterations, "env_steps": env_steps,
               "score": float(np.mean(per_task[sweep.splits[0]]))}
    return {"config": sweep.config_key(point), "point": point, "seed": seed, "score": sweep.score,
            "status": "completed", "reached": reached, "history": [*history, reached], "per_task": per_task,
            "stages": {s: [st["mean_return"] for st in summary["stages"]] for s, summary in splits.items()},
            "wall_time_s": time.perf_counter() - start, "provenance": recorder.record(resumed=resume)}


def read_record(folder: Path) -> dict | None:
    path = folder / "trial.json"
    return json.loads(path.read_text()) if path.is_file() else None


def finished(sweep: Sweep, i: int, seed: int) -> dict | None:
    return read_record(sweep.folder(i, seed))


def records_of(sweep: Sweep) -> list[dict[str, Any]]:
    """The finished trials' records (a grid's in its order; otherwise by configuration folder and seed)."""
    if sweep.search == "grid":
        return [r for i, s in sweep.trials() if (r := finished(sweep, i, s)) is not None]
    found = []
    for path in sorted((sweep.out / "trials").glob(f"{sweep.search}-*/seed*/trial.json")):
        record = json.loads(path.read_text())
        if set(record["point"]) == set(sweep.params) and record["seed"] in sweep.seeds:
            found.append(record)
    return found


def _status(record: dict[str, Any]) -> str:
    return record.get("status", "completed")  # records written before trials could be stopped early


def _replay(record: dict[str, Any], report: Callable[[dict[str, Any]], None], split: str, iterations: int) -> None:
    """Report a finished trial's evaluations again, as they were, ending with its record if it completed."""
    history = record.get("history") or [{"iteration": iterations, "env_steps": 0,
                                         "score": float(np.mean(record["per_task"][split]))}]
    for row in history[:-1]:
        report({**row, "replayed": True})
    last = {**history[-1], "replayed": True}
    report({**last, "record": json.dumps(record)} if _status(record) == "completed" else last)


def _tune_space(spec: Any, search: str) -> Any:
    from ray import tune

    if isinstance(spec, list):
        return tune.grid_search(spec) if search == "grid" else tune.choice(spec)
    (kind, (low, high)), = spec.items()
    if kind == "uniform":
        return tune.uniform(low, high)
    if kind == "loguniform":
        return tune.loguniform(low, high)
    return tune.randint(low, high + 1)  # Tune's upper end is excluded, ours included


def _tune_setup(sweep: Sweep, known: list[dict[str, Any]]) -> tuple[dict[str, Any], Any, int]:
    """(param_space, search algorithm, num_samples) of the sweep's search; ``known``: the configurations of a
    drawn search tried already (Optuna evaluates them first)."""
    from ray import tune

    space = {k: _tune_space(spec, sweep.search) for k, spec in sweep.params.items()}
    if sweep.search == "grid":
        return {"point": space, "seed": tune.grid_search(list(sweep.seeds))}, None, 1
    if sweep.search == "random":  # the draws stay the same across the seed dimension
        from ray.tune.search import BasicVariantGenerator

        alg = BasicVariantGenerator(random_state=sweep.seed, constant_grid_search=True)
        return {"point": space, "seed": tune.grid_search(list(sweep.seeds))}, alg, sweep.samples
    from ray.tune.search import Repeater
    from ray.tune.search.optuna import OptunaSearch

    tried = [{f"point/{k}": v for k, v in p.items()} for p in known[:sweep.samples]]  # Tune's flattened keys
    optuna = OptunaSearch(seed=sweep.seed, points_to_evaluate=tried or None)
    return {"point": space}, Repeater(optuna, repeat=len(sweep.seeds)), sweep.samples * len(sweep.seeds)


def _seed_of(sweep: Sweep, cfg: dict[str, Any]) -> int:
    return int(cfg["seed"]) if "seed" in cfg else sweep.seeds[int(cfg["__trial_index__"])]


def _stopped_record(sweep: Sweep, point: dict[str, Any], seed: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    keep = ("iteration", "env_steps", "score")
    history = [{k: _plain(r[k]) for k in keep} for r in rows]
    overrides = sweep.overrides_for(point, seed)
    return {"config": sweep.config_key(point), "point": point, "seed": seed, "score": sweep.score, "status": "stopped",
            "reached": history[-1], "history": history,
            "where": {k: rows[-1][k] for k in ("node", "node_ip", "host") if k in rows[-1]},
            "provenance": Recorder(command=shlex.join(["metarl", "train", str(sweep.config), *overrides])).record()}


def run_sweep(sweep: Sweep, address: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Run the sweep on Ray Tune (finished trials replayed, not retrained), write each ``trial.json`` and the
    report; the report path."""
    from metarl.sampling.ray import connect

    ray = connect(address, imports=user_modules(sweep))
    from ray import tune

    sweep.out.mkdir(parents=True, exist_ok=True)
    done = {str(sweep.folder_of(r["point"], r["seed"])): r for r in records_of(sweep)}
    stopped = sum(_status(r) == "stopped" for r in done.values())
    log(f"sweep {sweep.name}: {sweep.search} search, {sweep.configurations} configurations x {len(sweep.seeds)} seeds, "
        f"scheduler {'asha' if sweep.scheduler else 'none'}; {len(done)} trials finished already"
        + (f" ({stopped} stopped early)" if stopped else "")
        + f"; {ray.cluster_resources().get('CPU', 0):g} Ray CPUs; report in {sweep.out}")
    split = sweep.splits[0]

    def trainable(cfg: dict[str, Any]) -> None:
        point, seed = _plain(cfg["point"]), _seed_of(sweep, cfg)
        folder = sweep.folder_of(point, seed)
        where = _where()

        def report(row: dict[str, Any]) -> None:
            tune.report({**row, **where})

        record = done.get(str(folder)) or read_record(folder)
        if record is not None:
            _replay(record, report, split, sweep.iterations)
            return
        record = run_trial(sweep, point, seed, report)
        record["where"] = where
        # written here (this machine or a shared filesystem) and again by the driver from the result
        atomic_write(folder / "trial.json", json.dumps(record, indent=1))
        report({**record["reached"], "record": json.dumps(record)})

    known = []  # a drawn search's configurations tried already, in the order they were
    for r in sorted(done.values(), key=lambda r: r.get("provenance", {}).get("time", "")):
        if r["point"] not in known:
            known.append(r["point"])
    param_space, search_alg, num_samples = _tune_setup(sweep, known)
    scheduler = None
    if sweep.scheduler:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="iteration", **sweep.scheduler)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": sweep.cpus_per_trial}),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric="score", mode="max", search_alg=search_alg, scheduler=scheduler,
                                    num_samples=num_samples, reuse_actors=False,
                                    max_concurrent_trials=sweep.max_concurrent or None),
        run_config=tune.RunConfig(name="tune", storage_path=str((sweep.out / "tune").resolve()), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
    results = tuner.fit()
    errors, new_stopped = [], 0
    for result in results:
        cfg = result.config or {}
        if "point" not in cfg:
            errors.append(f"a trial without a configuration: {result.error}")
            continue
        point, seed = _plain(cfg["point"]), _seed_of(sweep, cfg)
        folder = sweep.folder_of(point, seed)
        if (folder / "trial.json").is_file():
            continue
        metrics = result.metrics or {}
        if "record" in metrics:
            record = json.loads(metrics["record"])
        elif result.error is not None:
            errors.append(f"trial {point} seed {seed}: {str(result.error).splitlines()[0]}")
            continue
        else:  # ended by the scheduler after the evaluations it reported
            frame = result.metrics_dataframe
            rows = [] if frame is None or "score" not in frame else [
                r for r in frame.to_dict("records") if r.get("score") is not None and not r.get("replayed")]
            if not rows:
                errors.append(f"trial {point} seed {seed}: no result")
                continue
            record = _stopped_record(sweep, point, seed, rows)
            new_stopped += 1
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "trial.json", json.dumps(record, indent=1))
    if new_stopped:
        log(f"{new_stopped} trials stopped early by the scheduler")
    if errors:
        write_report(sweep)
        raise ConfigError(f"{len(errors)} of {sweep.trial_count()} trials failed (rerun to retry them); first: {errors[0]}")
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


def _levels(points: list[dict[str, Any]], key: str) -> list[tuple[str, Callable[[Any], bool]]]:
    """The values of ``key`` the report groups by: each listed value, or four quantile bins of drawn ones."""
    values = [p[key] for p in points]
    distinct = sorted(set(values), key=lambda v: (isinstance(v, str), v if not isinstance(v, (list, dict)) else str(v)))
    if len(distinct) <= 8 or not all(isinstance(v, (int, float)) for v in distinct):
        return [(_fmt_value(v), lambda x, v=v: x == v) for v in distinct]
    edges = np.quantile(values, [0, 0.25, 0.5, 0.75, 1.0])
    return [(f"[{_fmt_value(float(lo))}, {_fmt_value(float(hi))}{']' if b == 3 else ')'}",
             lambda x, lo=lo, hi=hi, b=b: lo <= x < hi or (b == 3 and x == hi)) for b, (lo, hi) in
            enumerate(itertools.pairwise(edges))]


def write_report(sweep: Sweep) -> Path:
    """Rewrite report.md, sensitivity.png, results.json, results.csv and trials.json from the finished trials."""
    every = records_of(sweep)
    records = [r for r in every if _status(r) == "completed"]
    stopped = [r for r in every if _status(r) != "completed"]
    points = [r["point"] for r in records]
    what = ("held-out return after the last adaptation stage minus before any (adaptation gain)" if sweep.score == "gain"
            else "held-out return after the last adaptation stage")
    how = {"grid": "grid search", "random": f"random search ({sweep.samples} draws, seed {sweep.seed})",
           "optuna": f"Optuna search ({sweep.samples} configurations, seed {sweep.seed})"}[sweep.search]
    if sweep.scheduler:
        s = sweep.scheduler
        how += (f" with ASHA (grace period {s['grace_period']}, reduction factor {s['reduction_factor']:g}, "
                f"max_t {s['max_t']} training iterations)")
    lines = [f"# Sweep report: {sweep.name}", "",
             f"Config `{_shown(sweep.config)}` with {list(sweep.overrides)}; {how} over "
             f"{', '.join(f'`{k}`' for k in sweep.params)}: {sweep.configurations} configurations x {len(sweep.seeds)} "
             f"seeds ({len(every)} of {sweep.trial_count()} trials finished"
             + (f", {len(stopped)} of them stopped early" if stopped else "") + f"). Score: {what}, per held-out task, "
             f"on the {' and '.join(f'`{s}`' for s in sweep.splits)} split{'s' if len(sweep.splits) > 1 else ''}. "
             "Means over tasks x seeds with a 95% bootstrap interval resampling seeds, then tasks within them"
             + ("; the tables compare the trials trained to the end" if stopped else "") + ".", ""]
    if sweep.path is not None:
        lines += [f"Rerun `metarl sweep {sweep.path}` to continue it; finished trials are kept.", ""]
    by_config: dict[int | str, list[dict]] = {}
    for r in records:
        by_config.setdefault(r["config"], []).append(r)
    rows_json, plots = [], []
    for split in sweep.splits:
        lines += [f"## Split `{split}`", ""]
        for key in sweep.params:
            rows, xs = [], []
            for label, match in _levels(points, key):
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
            ranked.append((mean, low, high, str(i), mine[0]["point"], len(mine)))
            rows_json.append({"split": split, "config": i, "point": mine[0]["point"], "score": mean, "ci95": [low, high],
                              "seeds": sorted(r["seed"] for r in mine),
                              "per_seed": {str(r["seed"]): float(np.mean(r["per_task"][split])) for r in mine},
                              "stages": {str(r["seed"]): r["stages"][split] for r in mine},
                              "provenance": {str(r["seed"]): r.get("provenance", MISSING_PROVENANCE) for r in mine}})
        ranked.sort(reverse=True)
        lines += ["### Best configurations", "", "| rank | " + " | ".join(f"`{k}`" for k in sweep.params)
                  + " | score [95% CI] | seeds |", "|---|" + "---|" * len(sweep.params) + "---|---|"]
        for rank, (mean, low, high, _, point, n) in enumerate(ranked[:5], 1):
            lines.append(f"| {rank} | " + " | ".join(_fmt_value(point[k]) for k in sweep.params)
                         + f" | {mean:.2f} [{low:.2f}, {high:.2f}] | {n} |")
        lines.append("")
    if records:
        _plot(sweep, plots, sweep.out / "sensitivity.png")
        lines += ["![sensitivity](sensitivity.png)", ""]
    if stopped:
        lines += ["## Trials stopped early", "", "The scheduler ended these trials after the evaluation below "
                  f"(score on `{sweep.splits[0]}` of the evaluation during training, mean over its held-out tasks).", "",
                  "| " + " | ".join(f"`{k}`" for k in sweep.params) + " | seed | stopped at iteration | score then | "
                  "env steps |", "|" + "---|" * (len(sweep.params) + 4)]
        for r in stopped:
            reached = r["reached"]
            lines.append("| " + " | ".join(_fmt_value(r["point"][k]) for k in sweep.params)
                         + f" | {r['seed']} | {reached['iteration']} of {sweep.iterations} | {reached['score']:.2f} | "
                         f"{reached['env_steps']:,} |")
        lines.append("")
    compute = compute_of(sweep, every)
    if every:
        lines += ["## Compute", "", f"Training iterations spent by the finished trials: {compute['iterations']:,}, "
                  f"against {compute['iterations_to_the_end']:,} to train every one of them to the end "
                  f"({compute['iterations_saved_pct']:.0f}% saved); env steps spent in training: "
                  f"{compute['env_steps']:,}" + ("" if compute["env_steps_complete"] else
                                                 " (trials recorded before env steps were: not counted)") + ".", ""]
    atomic_write(sweep.out / "results.json", json.dumps(rows_json, indent=1))
    trials = [{"config": r["config"], "point": r["point"], "seed": r["seed"], "status": _status(r),
               "reached": r.get("reached"), "history": r.get("history"), "where": r.get("where")} for r in every]
    atomic_write(sweep.out / "trials.json", json.dumps({"compute": compute, "trials": trials}, indent=1))
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


def compute_of(sweep: Sweep, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The training the finished trials spent: iterations (against every trial trained to the end) and env steps
    (the sum of what each reached; training only, not the evaluations)."""
    iterations = sum((r.get("reached") or {}).get("iteration", sweep.iterations) for r in records)
    full = len(records) * sweep.iterations
    return {"trials": len(records), "stopped": sum(_status(r) != "completed" for r in records),
            "iterations": iterations, "iterations_to_the_end": full,
            "iterations_saved_pct": 100.0 * (1 - iterations / full) if full else 0.0,
            "env_steps": sum(int((r.get("reached") or {}).get("env_steps", 0)) for r in records),
            "env_steps_complete": all("reached" in r for r in records)}


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
