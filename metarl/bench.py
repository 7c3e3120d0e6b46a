"""``metarl bench SUITE.yaml``: meta-learners and baselines under one protocol, one report.

A suite lists task families, methods and seeds, and the evaluation protocol they all share::

    name: smoke
    out: runs/bench/smoke              # the report folder (default: runs/bench/<name>), relative to the cwd
    imports: [my_families]             # optional: your modules or .py files that register families
    seeds: [0]
    eval: {tasks: 5, steps: 2, episodes: 5}   # held-out tasks, adaptation stages, episodes per stage
    families:
      PointNav2D: {}                   # or {env_kwargs: {...}, eval: {...}, methods: {<method>: {...}}}
    methods:
      maml_trpo: {overrides: [iterations=10]}   # config: the shipped experiments/maml_trpo/point_nav_2d.yaml
      rl2: {overrides: [iterations=40]}
      ppo_scratch: {extra_episodes: [50]}
      sac_scratch: {}
      ppo_multitask: {pretrain_steps: 20000}
      oracle: {pretrain_steps: 20000}
      random: {}

Methods: ``maml_trpo``, ``rl2`` and ``pearl`` (meta-trained from their experiment config, then evaluated), and the
Stable-Baselines3 baselines of `metarl.agents.sb3_baselines`: ``ppo_scratch``, ``sac_scratch``,
``ppo_multitask``, ``sac_multitask``, ``oracle`` (PPO given the task parameters) and ``random``. A family
entry may override the protocol, the env's keyword arguments and any method's options for that family.

Files a suite names (``imports``, a method's ``config``) are found relative to the suite file; a meta-learner
without a ``config`` uses the shipped ``experiments/<method>/<family>.yaml``, wherever metarl is installed.

Every (family, method, seed) is a *cell* with its own folder ``OUT/cells/<family>/<method>/seed<k>/``
(``<family>`` made a safe file name, `file_name`, for ids such as ``me/Mine-v0``);
a finished cell holds ``cell.json`` and is never rerun (a meta-learner's cell interrupted mid-training
resumes from its last checkpoint), so rerunning the command continues a suite. The report (``OUT/report.md``,
``OUT/curves_<family>.png``, ``OUT/results.json`` and ``OUT/results.csv``) is rewritten from the finished
cells after each one. Everything is validated before any work starts.

``--only PATTERN`` (repeatable) runs only the cells whose key ``<family>/<method>/seed<k>`` matches one of the
shell-style patterns (``'*/pearl/*'``, ``'PointNav2D/*'``), for example a method added to a suite whose other
cells have finished; the report still covers every finished cell and says how many are missing.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import io
import json
import math
import re
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

import metarl
from metarl.config import (
    ConfigError,
    EvalConfig,
    RunConfig,
    load_config,
    locate,
    read_yaml,
    resolve_imports,
    shipped,
)
from metarl.evaluation import grouped_bootstrap_ci, iqm, plot_curves, write_summary
from metarl.provenance import MISSING as MISSING_PROVENANCE
from metarl.provenance import Recorder
from metarl.runfolder import record_changes
from metarl.system import atomic_write, work_threads
from metarl.tasks import TaskError, episode_limit

#: baseline method name -> (kind, algorithm); every other method is a meta-learner, an agent of the registry
#: (`metarl.agent`: the built-in ones and any a suite's ``imports`` register), run by its name.
BASELINES: dict[str, tuple[str, str]] = {
    "ppo_scratch": ("scratch", "ppo"),
    "sac_scratch": ("scratch", "sac"),
    "ppo_multitask": ("multitask", "ppo"),
    "sac_multitask": ("multitask", "sac"),
    "oracle": ("oracle", "ppo"),
    "random": ("random", "none"),
}


def method_names() -> list[str]:
    """Every method a suite may list: the registered agents, then the baselines."""
    from metarl.agent import agent_names

    return [*agent_names(), *BASELINES]


def method_kind(method: str) -> tuple[str, str]:
    """``(kind, algorithm)`` of a method: ``("meta", agent name)`` for an agent, a baseline's own otherwise;
    ConfigError if it is neither."""
    from metarl.agent import agent_names

    if method in BASELINES:
        return BASELINES[method]
    if method in agent_names():
        return "meta", method
    raise ConfigError(f"methods.{method}: unknown method; available: {', '.join(method_names())} (for an agent of your "
                      "own, name the module that registers it in the suite's imports: or with --import)")


#: Published results (docs/anchors.md) shown beside ours when the family and horizon match. Returns are
#: only comparable at the same horizon and reward constants; the budgets are the anchors', not ours.
PUBLISHED: list[dict[str, Any]] = [
    {"family": "HalfCheetahDir", "horizon": 100, "source": "learn2learn MAML-TRPO, 3 seeds, 300 iterations",
     "before": "≈ -40", "after": "≈ 270 after 1 step, ≈ 400 after 3 steps"},
    {"family": "HalfCheetahDir", "horizon": 100, "source": "RLlib MAML (ProMP-style), 211M env steps",
     "before": "≈ -14", "after": "≈ 255-265 after 1 step"},
    {"family": "AntFwdBwd", "horizon": 100, "source": "learn2learn MAML-TRPO, ~800 iterations",
     "before": "≈ -50", "after": "≈ 185 after 3 steps"},
    {"family": "AntGoal", "horizon": 200, "source": "RLlib MAML, 372M env steps",
     "before": "≈ -540", "after": "≈ -530 after 2 steps"},
]

_BASELINE_OPTIONS = ("pretrain_steps", "extra_episodes", "pretrain_envs", "params")
_META_OPTIONS = ("config", "overrides")


@dataclasses.dataclass(frozen=True)
class Cell:
    family: str
    method: str
    seed: int
    env_kwargs: dict
    eval: EvalConfig
    options: dict
    resolved: dict | None = None  # a meta-learner's whole run config (so an edited experiment file is seen)
    base: str | None = None  # the suite's folder (a method's config is relative to it); not part of the spec
    imports: tuple[str, ...] = ()  # the suite's imports (part of a meta-learner's resolved config)

    @property
    def key(self) -> str:
        return f"{self.family}/{self.method}/seed{self.seed}"

    def spec(self) -> dict[str, Any]:
        """What the cell's result depends on (a finished cell run with another spec is an error); a copy, as
        JSON values, so editing it leaves the cell as it is."""
        spec = {"family": self.family, "method": self.method, "seed": self.seed, "env_kwargs": self.env_kwargs,
                "eval": dataclasses.asdict(self.eval), "options": self.options}
        if self.resolved is not None:
            spec["config"] = self.resolved
        return json.loads(json.dumps(spec))


@dataclasses.dataclass
class Suite:
    name: str
    out: Path
    families: list[str]
    methods: list[str]
    cells: list[Cell]
    path: Path | None = None
    horizons: dict[str, int] = dataclasses.field(default_factory=dict)  # family -> episode limit
    imports: tuple[str, ...] = ()  # the suite's own and --import's, resolved (`metarl.plugins`)


def file_name(name: str) -> str:
    """``name`` (a family name or any Gymnasium id) as one safe file-name component: unchanged when it is
    letters, digits, ``.``, ``_`` and ``-`` only; otherwise those kept, the rest ``_``, and a short hash of the
    original, so that ``holdout/Mine-v0`` and ``holdout_Mine-v0`` stay apart."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"
    if safe == name:
        return name
    return f"{safe}-{zlib.crc32(name.encode()):08x}"


# ---- loading and validation ------------------------------------------------------------------------------
def _default_config(method: str, family: str) -> str:
    """The shipped ``experiments/<method>/<file>.yaml`` whose name is the family's without underscores and
    case (``Walker2DRandParams`` -> ``walker2d_rand_params.yaml``), wherever metarl is installed."""
    folder = shipped() / method
    for path in sorted(folder.glob("*.yaml")):
        if path.stem.replace("_", "") == family.lower():
            return str(path)
    raise ConfigError(f"methods.{method}.config: metarl ships no {method} config for {family!r} (in {folder}); "
                      "name one (a path relative to the suite file)")


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
    return value


def _method_options(method: str, options: dict, where: str) -> dict:
    kind = method_kind(method)[0]
    allowed = _META_OPTIONS if kind == "meta" else _BASELINE_OPTIONS
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown option for {method}; expected one of {', '.join(allowed)}")
    return dict(options)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = [*out.get(key, []), *value] if key == "overrides" else value
    return out


def load_suite(path: str | Path | None, data: dict | None = None, out: str | Path | None = None,
               imports: tuple[str, ...] = (), seeds: list[int] | None = None) -> Suite:
    """Read and validate a suite; every error names the field (nothing has run yet). ``imports``: more
    user modules (resolved, as ``--import`` gives them) for every cell; ``seeds``: in place of the suite's
    (``metarl bench --seeds``: the same suite at more seeds, its finished cells kept)."""
    from metarl.plugins import load

    if data is None:
        path = locate(path)
        data = read_yaml(path, "suite file")
    data = _mapping(data, "suite")
    if seeds is not None:
        data = {**data, "seeds": list(seeds)}
    unknown = sorted(set(data) - {"name", "out", "seeds", "eval", "families", "methods", "imports"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown suite field; expected name, out, seeds, eval, families, methods, "
                          "imports")
    base = Path(path).resolve().parent if path else None
    suite_imports = resolve_imports(data.get("imports") or [], base)
    for family in _mapping(data.get("families"), "families"):  # the module of a module:Id family
        suite_imports = resolve_imports(list(suite_imports), base, env=family, where="imports")
    suite_imports = tuple(dict.fromkeys((*suite_imports, *imports)))
    try:
        load(suite_imports)
    except TaskError as exc:
        raise ConfigError(f"imports: {exc}") from exc
    name = data.get("name") or (Path(path).stem if path else "bench")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                           for s in seeds):
        raise ConfigError(f"seeds: expected a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: {seeds!r} lists a seed twice (its cells would be pooled twice)")
    base_eval = _mapping(data.get("eval"), "eval")
    families = _mapping(data.get("families"), "families")
    methods = _mapping(data.get("methods"), "methods")
    if not families:
        raise ConfigError("families: list at least one task family (e.g. families: {PointNav2D: {}})")
    if not methods:
        raise ConfigError(f"methods: list at least one method ({', '.join(method_names())})")
    for method in methods:
        method_kind(method)
    cells, horizons = [], {}
    for family, fam_opts in families.items():
        where = f"families.{family}"
        fam_opts = _mapping(fam_opts, where)
        bad = sorted(set(fam_opts) - {"env_kwargs", "eval", "methods"})
        if bad:
            raise ConfigError(f"{where}.{bad[0]}: unknown field; expected env_kwargs, eval, methods")
        env_kwargs = _mapping(fam_opts.get("env_kwargs"), f"{where}.env_kwargs")
        try:
            env = metarl.make_family(family, **env_kwargs)  # a family name or a Gymnasium id
        except TaskError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        except (gym.error.Error, ImportError, TypeError) as exc:  # unknown id, unimportable module, bad kwargs
            raise ConfigError(f"{where}: cannot make {family!r}: {exc}") from exc
        horizons[family] = episode_limit(env)
        try:
            protocol = EvalConfig(**{"every": 0, "split": "test", "tasks": 10, "steps": 3, "episodes": 10,
                                     **base_eval, **_mapping(fam_opts.get("eval"), f"{where}.eval")})
        except TypeError as exc:
            raise ConfigError(f"{where}.eval: {exc}") from exc
        for field in ("tasks", "steps", "episodes", "every"):
            value = getattr(protocol, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if field == "tasks" else 0):
                raise ConfigError(f"{where}.eval.{field}: expected an integer >= {1 if field == 'tasks' else 0}, "
                                  f"got {value!r}")
        if protocol.split not in ("test", "ood"):
            raise ConfigError(f"{where}.eval.split: a suite evaluates on held-out tasks, 'test' or 'ood'; "
                              f"got {protocol.split!r}")
        try:  # e.g. more held-out tasks than a finite family has
            metarl.family_of(env).sample_tasks(protocol.tasks, protocol.split, seed=10_000)
        except TaskError as exc:
            raise ConfigError(f"{where}.eval.tasks: {exc}") from exc
        finally:
            env.close()
        fam_methods = _mapping(fam_opts.get("methods"), f"{where}.methods")
        for method in fam_methods:
            if method not in methods:
                raise ConfigError(f"{where}.methods.{method}: not one of the suite's methods ({', '.join(methods)})")
        for method in methods:
            options = _merge(_method_options(method, _mapping(methods[method], f"methods.{method}"), f"methods.{method}"),
                             _method_options(method, _mapping(fam_methods.get(method), f"{where}.methods.{method}"),
                                             f"{where}.methods.{method}"))
            at = f"{where}.methods.{method}" if method in fam_methods else f"methods.{method}"
            _check_method(family, method, options, env_kwargs, protocol, at, base, suite_imports)
            for seed in seeds:
                resolved = None
                if method_kind(method)[0] == "meta":
                    resolved = meta_config(family, method, options, env_kwargs, protocol, seed, at, base,
                                           suite_imports).to_dict()
                cells.append(Cell(family, method, seed, dict(env_kwargs), protocol, options, resolved,
                                  str(base) if base else None, suite_imports))
    names = {file_name(f): f for f in families}
    if len(names) < len(families):
        raise ConfigError("families: two family ids map to the same file name; rename one")
    out_dir = Path(out or data.get("out") or Path("runs") / "bench" / name)
    return Suite(name=str(name), out=out_dir, families=list(families), methods=list(methods), cells=cells,
                 path=Path(path) if path else None, horizons=horizons, imports=suite_imports)


def _check_method(family: str, method: str, options: dict, env_kwargs: dict, protocol: EvalConfig,
                  where: str, base: Path | None = None, imports: tuple[str, ...] = ()) -> None:
    kind, algo = method_kind(method)
    if kind == "meta":
        meta_config(family, method, options, env_kwargs, protocol, 0, where, base, imports)
        return
    try:
        _baseline_spec(kind, algo, options).check(protocol.steps, protocol.episodes)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


#: the module of the Stable-Baselines3 baselines, loaded where a baseline cell is checked or run (the core
#: imports no agent module; the baselines are found here as the agents are through their registry)
BASELINES_MODULE = "metarl.agents.sb3_baselines"


def _baselines() -> Any:
    import importlib

    return importlib.import_module(BASELINES_MODULE)


def _baseline_spec(kind: str, algo: str, options: dict):
    BaselineSpec = _baselines().BaselineSpec

    opts = dict(options)
    if "extra_episodes" in opts:
        extra = opts["extra_episodes"]
        if not isinstance(extra, list) or not all(isinstance(e, int) for e in extra):
            raise ValueError(f"extra_episodes: expected a list of integers, got {extra!r}")
        opts["extra_episodes"] = tuple(extra)
    for name in ("pretrain_steps", "pretrain_envs"):
        if name in opts and (isinstance(opts[name], bool) or not isinstance(opts[name], int)):
            raise ValueError(f"{name}: expected an integer, got {opts[name]!r}")
    if "params" in opts and not isinstance(opts["params"], dict):
        raise ValueError(f"params: expected a mapping of SB3 arguments, got {opts['params']!r}")
    return BaselineSpec(kind=kind, algo=algo, **opts)


def meta_config(family: str, method: str, options: dict, env_kwargs: dict, protocol: EvalConfig, seed: int,
                where: str = "", base: str | Path | None = None, imports: tuple[str, ...] = ()) -> RunConfig:
    """The run config of a meta-learner cell: its experiment config (``config``, relative to ``base``, the
    suite's folder; else the shipped default), the cell's overrides, seed, protocol and the suite's imports."""
    if options.get("config"):
        path = locate(options["config"], base)
    else:
        try:
            path = _default_config(method, family)
        except ConfigError as exc:
            raise ConfigError(f"{where}.config: {str(exc).split(': ', 1)[1]}") from None
    overrides = options.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{where}.overrides: expected a list of key=value strings, got {overrides!r}")
    try:
        config = load_config(path, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if config.agent_name != method:
        raise ConfigError(f"{where}.config: {path} configures agent {config.agent_name!r}, not {method!r}")
    if {**config.env_kwargs, **env_kwargs} != env_kwargs:
        raise ConfigError(f"{where}: {path} sets env_kwargs {config.env_kwargs}; give them in the suite's "
                          f"families.{family}.env_kwargs instead, so that every method runs the same env")
    return dataclasses.replace(config, env=family, env_kwargs=dict(env_kwargs), seed=seed, eval=protocol,
                               imports=tuple(dict.fromkeys((*imports, *config.imports))))


# ---- running -----------------------------------------------------------------------------------------------
def cell_dir(suite: Suite, cell: Cell) -> Path:
    folder = suite.out / "cells" / file_name(cell.family) / cell.method / f"seed{cell.seed}"
    legacy = suite.out / "cells" / cell.family / cell.method / f"seed{cell.seed}"
    if legacy != folder and not folder.exists() and legacy.is_dir():  # written before ids became safe names
        return legacy
    return folder


def _spec_changes(stored: Any, cell: Cell) -> str | None:
    """How a cell's recorded spec differs from the one the suite now gives, in a few words, or None if it
    does not (options added to the run config since it was recorded, at their old behaviour's value, are no
    difference: `metarl.runfolder.added_options`)."""
    if not isinstance(stored, dict):
        return f"spec {stored!r}"
    changes = record_changes(stored, cell.spec(), config_at="config.")
    return "; ".join(changes[:3]) + ("; ..." if len(changes) > 3 else "") if changes else None


def finished(suite: Suite, cell: Cell) -> dict | None:
    """The cell's stored result, or None if it has not finished; error if it ran with other settings."""
    path = cell_dir(suite, cell) / "cell.json"
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    changes = _spec_changes(stored.get("spec"), cell)
    if changes:
        raise ConfigError(
            f"{cell.key}: {path} was run with other settings than the suite now gives ({changes}); move that cell "
            f"folder (or the whole {suite.out}) away, or point --out at a new folder")
    return stored


def check_partial(suite: Suite, cell: Cell) -> None:
    """Error if an unfinished meta-learner cell holds a run started with other settings (it would resume)."""
    path = cell_dir(suite, cell) / "spec.json"
    changes = _spec_changes(json.loads(path.read_text()), cell) if path.is_file() else None
    if changes:
        raise ConfigError(
            f"{cell.key}: the unfinished run in {path.parent} was started with other settings than the suite now "
            f"gives ({changes}), so it cannot be resumed; move that cell folder away, or point --out at a new folder")


def run_cell(suite: Suite, cell: Cell, log: Callable[[str], None] = print, verbose: bool = True) -> dict:
    """Run one cell and write its ``cell.json``; returns the stored record."""
    folder = cell_dir(suite, cell)
    folder.mkdir(parents=True, exist_ok=True)
    kind, algo = method_kind(cell.method)
    start = time.perf_counter()
    recorder = Recorder()
    if kind == "meta":
        from metarl.training import train

        config = meta_config(cell.family, cell.method, cell.options, cell.env_kwargs, cell.eval, cell.seed,
                             base=cell.base, imports=cell.imports)
        run_dir = folder / "run"
        check_partial(suite, cell)
        # a run started with the cell's settings (spec.json) resumes, even one killed before its first checkpoint
        resume = (run_dir / "config.yaml").is_file() and (folder / "spec.json").is_file()
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)  # of unknown settings: nothing to resume
        atomic_write(folder / "spec.json", json.dumps(cell.spec(), indent=2))
        train(config, run_dir=run_dir, resume=resume, verbose=verbose)
        summary = json.loads((run_dir / "eval" / cell.eval.split / "summary.json").read_text())
        if summary.get("iteration") != config.iterations:  # never report an earlier evaluation as the cell's
            raise ConfigError(f"{cell.key}: {run_dir / 'eval' / cell.eval.split / 'summary.json'} is of iteration "
                              f"{summary.get('iteration')}, not the run's last ({config.iterations}); rerun the suite "
                              "to redo the evaluation")
        cost = {"pretrain_env_steps": int(summary["env_steps"]),
                "adapt_env_steps_per_task": float(summary["stages"][-1]["adapt_env_steps"])}
    else:
        run_baseline = _baselines().run_baseline
        from metarl.training import eval_tasks

        env = metarl.make_family(cell.family, **cell.env_kwargs)
        tasks = eval_tasks(metarl.family_of(env), cell.seed, cell.eval.split, cell.eval.tasks)  # the meta-learners' own
        env.close()
        spec = _baseline_spec(kind, algo, cell.options)
        result, used = run_baseline(spec, cell.family, cell.env_kwargs, tasks, cell.eval.steps, cell.eval.episodes,
                                    seed=cell.seed, log=log)
        summary = write_summary(result, folder, title=f"{cell.method} on {cell.family}", seed=cell.seed,
                                extra={"provenance": recorder.record()})
        cost = {"pretrain_env_steps": used.pretrain_env_steps, "adapt_env_steps_per_task": used.adapt_env_steps_per_task}
    record = {"spec": cell.spec(), "summary": summary, "wall_time_s": time.perf_counter() - start, **cost,
              "resumed": kind == "meta" and resume,
              "provenance": recorder.record(**({"resumed": True} if kind == "meta" and resume else {}))}
    atomic_write(folder / "cell.json", json.dumps(record, indent=2))
    return record


def select_cells(suite: Suite, only: list[str] | tuple[str, ...] | None = None) -> list[Cell]:
    """The suite's cells whose key matches one of the shell-style patterns ``only`` (all of them without any).

    A pattern that matches no cell is an error naming the keys there are (a typo would otherwise run nothing).
    """
    if not only:
        return list(suite.cells)
    for pattern in only:
        if not any(fnmatch.fnmatchcase(c.key, pattern) for c in suite.cells):
            raise ConfigError(f"--only {pattern!r} matches none of the suite's cells; their keys are "
                              f"<family>/<method>/seed<k>, e.g. {suite.cells[0].key!r}")
    return [c for c in suite.cells if any(fnmatch.fnmatchcase(c.key, p) for p in only)]


def plan_cells(suite: Suite, only: list[str] | tuple[str, ...] | None = None) -> tuple[list[Cell], list[Cell], str]:
    """The suite's finished cells, the unfinished ones to run (matching ``only``, see `select_cells`) and a note
    of both for the log. Reads and writes nothing but the cells' records: a pattern that matches nothing, or a
    partial run that cannot be resumed, is an error before any work."""
    chosen = select_cells(suite, only)
    done = [c for c in suite.cells if finished(suite, c) is not None]
    todo = [c for c in chosen if c not in done]
    for cell in todo:
        check_partial(suite, cell)
    note = f"{len(done)} finished already" + (f", {len(todo)} to run by --only" if only else "")
    return done, todo, f"{note}; report in {suite.out}"


def run_suite(suite: Suite, log: Callable[[str], None] = print, verbose: bool = True,
              only: list[str] | tuple[str, ...] | None = None) -> Path:
    """Run every unfinished cell (in order; only those matching ``only`` if given), rewriting the report after
    each; returns the report path."""
    done, todo, note = plan_cells(suite, only)
    suite.out.mkdir(parents=True, exist_ok=True)
    seeds = len({c.seed for c in suite.cells})
    log(f"bench {suite.name}: {len(suite.cells)} cells ({len(suite.families)} families x {len(suite.methods)} "
        f"methods x {seeds} seeds), {note}")
    start = time.perf_counter()
    for i, cell in enumerate(todo):
        elapsed = time.perf_counter() - start
        eta = f", ETA {_fmt(elapsed / i * (len(todo) - i))}" if i else ""
        counter = f"{i + 1}/{len(todo)}" if only else f"{len(done) + i + 1}/{len(suite.cells)}"
        log(f"[{counter}] {cell.key} (elapsed {_fmt(elapsed)}{eta})")
        with work_threads():
            record = run_cell(suite, cell, log=log, verbose=verbose)
        curve = " -> ".join(f"{s['mean_return']:.1f}" for s in record["summary"]["stages"])
        log(f"    done in {_fmt(record['wall_time_s'])}: return by stage {curve}")
        write_report(suite)
    report = write_report(suite)
    log(f"report: {report}")
    return report


def _fmt(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ---- the report ----------------------------------------------------------------------------------------------
def aggregate(records: list[dict]) -> dict[str, Any]:
    """Pool the cells of one (family, method) over seeds: per stage, the mean and the interquartile mean
    over every (task, seed) return, and a 95% bootstrap interval that resamples seeds, then tasks within
    them (`grouped_bootstrap_ci`; over tasks alone with one seed)."""
    stages = []
    first = records[0]["summary"]["stages"]
    for k, stage in enumerate(first):
        groups = [np.asarray(r["summary"]["stages"][k]["per_task"], dtype=np.float64) for r in records]
        values = np.concatenate(groups)
        low, high = grouped_bootstrap_ci(groups, seed=k)
        steps = float(np.mean([r["summary"]["stages"][k]["adapt_env_steps"] for r in records]))
        stages.append({"stage": k, "adapt_episodes": stage["adapt_episodes"], "adapt_env_steps": steps,
                       "mean_return": float(values.mean()), "ci95": [low, high], "iqm": iqm(values), "n": int(values.size)})
        cell_stages = [r["summary"]["stages"][k] for r in records]
        if all("per_task_success" in c for c in cell_stages):  # pooled like the returns
            rates = [np.asarray(c["per_task_success"], dtype=np.float64) for c in cell_stages]
            stages[-1].update(success_rate=float(np.concatenate(rates).mean()),
                              success_ci95=list(grouped_bootstrap_ci(rates, seed=k)))
        names = set.intersection(*(set(c.get("reward_terms", {})) for c in cell_stages))
        if names:
            stages[-1]["reward_terms"] = {n: float(np.mean([c["reward_terms"][n] for c in cell_stages])) for n in sorted(names)}
    return {
        "stages": stages,
        "seeds": [r["spec"]["seed"] for r in records],
        "wall_time_s": float(sum(r["wall_time_s"] for r in records)),
        "pretrain_env_steps": float(np.mean([r["pretrain_env_steps"] for r in records])),
        "adapt_env_steps_per_task": float(np.mean([r["adapt_env_steps_per_task"] for r in records])),
    }


def _num(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    return f"{x:,.1f}" if abs(x) < 1e4 else f"{x:,.0f}"


def _steps(x: float) -> str:
    return "0" if x == 0 else f"{x / 1e6:.2f}M" if x >= 1e5 else f"{x:,.0f}"


def _episode_metric_tables(curves: dict[str, dict], steps: int) -> list[str]:
    """Success rates (where the env reports success) and the reward terms, before and after adaptation."""
    lines: list[str] = []
    last = {m: agg["stages"][min(steps, len(agg["stages"]) - 1)] for m, agg in curves.items()}
    rows = [f"| {m} | {agg['stages'][0]['success_rate']:.2f} | {last[m]['success_rate']:.2f} "
            f"[{last[m]['success_ci95'][0]:.2f}, {last[m]['success_ci95'][1]:.2f}] |"
            for m, agg in curves.items() if "success_rate" in last[m] and "success_rate" in agg["stages"][0]]
    if rows:
        lines += ["Success rate (an episode succeeds if any step reports `info[\"success\"]`), mean over tasks × seeds "
                  "with a 95% bootstrap interval:", "",
                  "| method | before (stage 0) | after (last protocol stage) [95% CI] |", "|---|---|---|", *rows, ""]
    rows = [f"| {m} | {name} | {_num(agg['stages'][0]['reward_terms'][name])} | {_num(value)} |"
            for m, agg in curves.items() if "reward_terms" in agg["stages"][0]
            for name, value in last[m].get("reward_terms", {}).items() if name in agg["stages"][0]["reward_terms"]]
    if rows:
        lines += ["<details><summary>reward terms: the episode sum of each <code>info[\"reward_*\"]</code> term, "
                  "mean over tasks × seeds</summary>", "",
                  "| method | term | before (stage 0) | after (last protocol stage) |", "|---|---|---|---|", *rows, "",
                  "</details>", ""]
    return lines


def _provenance_table(suite: Suite, records: dict[str, dict]) -> list[str]:
    """Which commit, tree and machine state each finished cell ran on."""
    rows = []
    for cell in suite.cells:
        if cell.key not in records:
            continue
        p = records[cell.key].get("provenance") or MISSING_PROVENANCE
        commit = (p.get("commit") or "unknown")[:10] + (" (dirty)" if p.get("dirty") else "")
        shared = {True: f"shared ({p.get('others_share', 0):.0%} others)", False: "alone"}.get(p.get("shared"), "unknown")
        wall = _fmt(p["wall_s"]) if isinstance(p.get("wall_s"), (int, float)) else "unknown"
        rows.append(f"| {cell.key} | {commit} | {p.get('finished', 'unknown')} | {wall} | {shared} |")
    if not rows:
        return []
    return ["<details><summary>provenance: the commit, time and machine state of each cell</summary>", "",
            "| cell | commit | finished | wall time | cores |", "|---|---|---|---|---|", *rows, "", "</details>", ""]


def write_report(suite: Suite) -> Path:
    """Rewrite report.md, curves_<family>.png, results.json and results.csv from the finished cells."""
    records = {c.key: r for c in suite.cells if (r := finished(suite, c)) is not None}
    lines = [f"# Benchmark report: {suite.name}", ""]
    if suite.path is not None:
        lines += [f"Suite: `{suite.path}`. Re-run `metarl bench {suite.path}` to continue it; finished cells are kept.", ""]
    lines += [
        f"{len(records)} of {len(suite.cells)} cells finished. Protocol: held-out tasks; stage 0 is the return "
        "before any experience of the task, stage k after k adaptation stages (a gradient step on `episodes` "
        "episodes for MAML-TRPO, one more episode of the trial for RL², `episodes × horizon` training steps for "
        "the SB3 learners: the most `episodes` episodes can take, more than they do where episodes end early); "
        "returns are of episodes whose actions are sampled from the policy. Mean over tasks × seeds with a 95% "
        "percentile-bootstrap interval (resampling seeds, then tasks within them), and the interquartile mean "
        "(IQM). The oracle (PPO given the true task parameters) and the random policy do not adapt: one "
        "measurement stands for every stage.",
        "",
    ]
    json_out: list[dict] = []
    csv_rows = [["family", "method", "seed", "task", "stage", "adapt_episodes", "adapt_env_steps", "return", "success"]]
    for family in suite.families:
        cells = [c for c in suite.cells if c.family == family]
        horizon = suite.horizons[family]
        lines += [f"## {family}", "", f"Horizon {horizon}; {cells[0].eval.tasks} held-out (`{cells[0].eval.split}`) tasks; "
                  f"{cells[0].eval.episodes} episodes per stage; env kwargs {cells[0].env_kwargs or '{}'}.", ""]
        curves: dict[str, dict] = {}
        summary_rows = []
        detail_rows = []
        for method in suite.methods:
            mine = [records[c.key] for c in cells if c.method == method and c.key in records]
            if not mine:
                summary_rows.append(f"| {method} | not run yet | | | | | | | |")
                continue
            agg = aggregate(mine)
            curves[method] = agg
            json_out.append({"family": family, "method": method, **agg,
                             "cells": [{"seed": r["spec"]["seed"], "summary": r["summary"],
                                        "provenance": r.get("provenance", MISSING_PROVENANCE)} for r in mine]})
            for r in mine:
                for s in r["summary"]["stages"]:
                    for t, value in enumerate(s["per_task"]):
                        csv_rows.append([family, method, r["spec"]["seed"], t, s["stage"], s["adapt_episodes"],
                                         s["adapt_env_steps"], value,
                                         s["per_task_success"][t] if "per_task_success" in s else ""])
            # every method's stage `steps` ends the shared protocol; later stages are a larger budget
            first, last = agg["stages"][0], agg["stages"][min(cells[0].eval.steps, len(agg["stages"]) - 1)]
            beyond = agg["stages"][-1] if len(agg["stages"]) > cells[0].eval.steps + 1 else None
            summary_rows.append(
                f"| {method} | {_num(first['mean_return'])} | {_num(last['mean_return'])} "
                f"[{_num(last['ci95'][0])}, {_num(last['ci95'][1])}] | {_num(last['iqm'])} | {last['adapt_episodes']} | "
                + (f"{_num(beyond['mean_return'])} after {beyond['adapt_episodes']} episodes" if beyond else "-")
                + f" | {_steps(agg['pretrain_env_steps'])} | {_steps(agg['adapt_env_steps_per_task'])} | "
                f"{_fmt(agg['wall_time_s'])} |")
            for s in agg["stages"]:
                detail_rows.append(f"| {method} | {s['stage']} | {s['adapt_episodes']} | {_steps(s['adapt_env_steps'])} | "
                                   f"{_num(s['mean_return'])} | [{_num(s['ci95'][0])}, {_num(s['ci95'][1])}] | "
                                   f"{_num(s['iqm'])} |")
        lines += ["| method | before (stage 0) | after (last protocol stage) [95% CI] | IQM after | adapt. episodes "
                  "| larger budget | (meta-/pre-)training env steps | adaptation env steps per task | wall time |",
                  "|---|---|---|---|---|---|---|---|---|", *summary_rows, ""]
        lines += _episode_metric_tables(curves, cells[0].eval.steps)
        lines += ["<details><summary>every stage</summary>", "",
                  "| method | stage | adapt. episodes | adapt. env steps | mean return | 95% CI | IQM |",
                  "|---|---|---|---|---|---|---|", *detail_rows, "", "</details>", ""]
        within_rows = []
        for method in suite.methods:  # mean over cells of each tenth of the first measured episode
            bins = [r["summary"]["stages"][0]["within_episode"] for c in cells
                    if c.method == method and c.key in records
                    and "within_episode" in (r := records[c.key])["summary"]["stages"][0]]
            if bins:
                within_rows.append(f"| {method} | " + " | ".join(_num(v) for v in np.mean(bins, axis=0)) + " |")
        if within_rows:
            n_bins = len(within_rows[0].split("|")) - 3
            lines += ["<details><summary>within the first measured episode (stage 0): reward per tenth of the "
                      "horizon, so that adaptation inside one episode shows</summary>", "",
                      "| method | " + " | ".join(f"{b + 1}/{n_bins}" for b in range(n_bins)) + " |",
                      "|---|" + "---|" * n_bins, *within_rows, "", "</details>", ""]
        published = [p for p in PUBLISHED if p["family"] == family]
        matching = [p for p in published if p["horizon"] == horizon]
        if matching:
            lines += ["Published (same family and horizon; their budgets, not ours):", "",
                      "| source | before | after |", "|---|---|---|",
                      *[f"| {p['source']} | {p['before']} | {p['after']} |" for p in matching], ""]
        elif published:
            lines += [f"Published results for {family} use horizon {published[0]['horizon']}, ours {horizon}: "
                      "not comparable, so not shown.", ""]
        if curves:
            png = suite.out / f"curves_{file_name(family)}.png"
            plot_curves(curves, png, title=f"{family} (held-out tasks)", xscale="symlog")
            lines += [f"![{family} adaptation curves]({png.name})", ""]
    lines += _provenance_table(suite, records)
    atomic_write(suite.out / "results.json", json.dumps(json_out, indent=1))
    buf = io.StringIO()
    csv.writer(buf).writerows(csv_rows)
    atomic_write(suite.out / "results.csv", buf.getvalue())
    report = suite.out / "report.md"
    atomic_write(report, "\n".join(lines))
    return report


__all__ = ["BASELINES", "PUBLISHED", "Cell", "Suite", "aggregate", "load_suite", "meta_config", "run_cell", "run_suite",
           "write_report"]
