"""``metarl sweep`` files: grid, random and Optuna searches, the ASHA scheduler's settings, bad sweeps failing
before any work, and the training loop's per-evaluation callback the scheduler acts on (no Ray needed; sweeps
themselves run in tests/test_ray.py on a multi-node cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metarl.config import ConfigError
from metarl.sweep import _checked_points, _eval_row, compute_of, load_sweep, scores_of

BASE = {"name": "s", "config": str(Path("experiments/maml_trpo/point_nav_2d.yaml").resolve()),
        "params": {"agent.inner_lr": [0.05, 0.1], "agent.max_kl": [0.005, 0.01, 0.02]}}


def _load(tmp_path, **change):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**BASE, **change}))
    return load_sweep(path)


def test_grid_is_every_combination_and_random_draws_are_seeded(tmp_path):
    grid = _load(tmp_path, seeds=[0, 1])
    assert len(grid.points) == 6 and len(grid.trials()) == 12
    assert grid.points[1] == {"agent.inner_lr": 0.05, "agent.max_kl": 0.01}
    assert grid.overrides_of(1, 1) == ["agent.inner_lr=0.05", "agent.max_kl=0.01", "seed=1"]
    params = {"agent.inner_lr": {"loguniform": [0.01, 1.0]}, "agent.max_kl": [0.01, 0.02], "agent.cg_iters": {"randint": [5, 9]}}
    drawn = _load(tmp_path, search="random", samples=8, seed=3, params=params, seeds=[0, 1])
    assert drawn.points == () and drawn.configurations == 8 and drawn.trial_count() == 16  # Tune draws them
    assert drawn.config_id({"agent.inner_lr": 0.1}) == drawn.config_id({"agent.inner_lr": 0.1}) != \
        drawn.config_id({"agent.inner_lr": 0.2})
    assert drawn.config_id({"agent.inner_lr": 0.1}).startswith("random-")
    # checked before any work: each listed value and both ends of each range, the rest at their first
    assert _checked_points(params, "random") == [
        {"agent.inner_lr": 0.01, "agent.max_kl": 0.01, "agent.cg_iters": 5},
        {"agent.inner_lr": 1.0, "agent.max_kl": 0.01, "agent.cg_iters": 5},
        {"agent.inner_lr": 0.01, "agent.max_kl": 0.02, "agent.cg_iters": 5},
        {"agent.inner_lr": 0.01, "agent.max_kl": 0.01, "agent.cg_iters": 9}]
    assert grid.folder(1, 1) == grid.folder_of(grid.points[1], 1) and grid.config_key(grid.points[1]) == 1
    assert scores_of({"stages": [{"per_task": [1.0, 2.0]}, {"per_task": [4.0, 1.0]}]}, "gain") == [3.0, -1.0]
    assert scores_of({"stages": [{"per_task": [1.0, 2.0]}, {"per_task": [4.0, 1.0]}]}, "return") == [4.0, 1.0]


@pytest.mark.parametrize("change, message", [
    ({"serach": "grid"}, "serach: unknown sweep key"),
    ({"params": {"agent.inner_lr": {"uniform": [0.1, 0.2]}}}, "params.agent.inner_lr: a grid search takes a list"),
    ({"search": "random", "params": {"agent.inner_lr": [0.1]}}, "samples: a random search needs samples >= 1"),
    ({"search": "bayes"}, "search: expected one of grid, random, optuna, got 'bayes'"),
    ({"search": "random", "samples": 2, "params": {"agent.gamma": {"uniform": [0.5, 1.5]}}},
     "configuration {'agent.gamma': 1.5}: agent.gamma"),
    ({"search": "random", "samples": 2, "params": {"agent.cg_iters": {"randint": [2, 5.5]}}},
     "params.agent.cg_iters.randint: expected integer bounds"),
    ({"scheduler": "hyperband"}, "scheduler.name: expected one of none, asha, got 'hyperband'"),
    ({"scheduler": {"name": "asha", "grace": 2}}, "scheduler.grace: unknown option; expected one of"),
    ({"scheduler": {"name": "asha", "grace_period": 0}}, "scheduler.grace_period: expected a whole number"),
    ({"scheduler": {"name": "asha", "grace_period": 2.5}}, "scheduler.grace_period: expected a whole number"),
    ({"scheduler": {"name": "asha", "reduction_factor": 1}}, "scheduler.reduction_factor: expected a number > 1"),
    ({"scheduler": {"name": "asha", "grace_period": 20, "max_t": 10}}, "scheduler.grace_period: 20 is beyond max_t=10"),
    ({"scheduler": ["asha"]}, "scheduler: expected none, asha or a mapping"),
    ({"max_concurrent": -1}, "max_concurrent: expected a whole number >= 0 (0: no limit), got -1"),
    ({"max_concurrent": 1.5}, "max_concurrent: expected a whole number >= 0"),
    ({"scheduler": "asha", "overrides": ["eval.every=0"]}, "scheduler: asha acts on the evaluations made during training"),
    ({"search": "random", "samples": 2, "params": {"agent.inner_lr": {"loguniform": [0, 1]}}}, "expected low > 0"),
    ({"params": {"agent.inner_lrr": [0.1]}}, "configuration {'agent.inner_lrr': 0.1}: agent.inner_lrr"),
    ({"splits": ["train"]}, "splits: expected a list of held-out splits"),
    ({"score": "auc"}, "score: expected gain or return"),
    ({"params": {"env_kwargs.train_range": [0.0]}}, "train_range must be in"),
])
def test_bad_sweeps_fail_before_any_work(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("{", r"\{").replace("}", r"\}")
                       .replace("(", r"\(").replace(")", r"\)")):
        _load(tmp_path, **change)
    assert not (tmp_path / "runs").exists()


def test_shipped_sweeps_are_valid():
    sensitivity = load_sweep("experiments/sweeps/maml_point_nav_sensitivity.yaml")
    assert len(sensitivity.points) >= 12 and len(sensitivity.seeds) >= 2 and len(sensitivity.params) >= 3
    assert {"agent.inner_lr", "agent.max_kl"} <= set(sensitivity.params)
    diversity = load_sweep("experiments/sweeps/point_nav_task_diversity.yaml")
    assert len(diversity.points) >= 4 and len(diversity.seeds) >= 2 and diversity.splits == ("test", "ood")
    asha = load_sweep("experiments/sweeps/asha_vs_grid.yaml")
    assert asha.scheduler == {"grace_period": 4, "reduction_factor": 2, "max_t": 16} and len(asha.points) == 6


def test_optuna_not_installed_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^search: optuna needs the optuna package: pip install"):
        _load(tmp_path, search="optuna", samples=4)


def test_asha_defaults_follow_the_evaluations_during_training(tmp_path):
    sweep = _load(tmp_path, scheduler="asha", overrides=["iterations=12", "eval.every=3"])
    assert sweep.scheduler == {"grace_period": 3, "reduction_factor": 2, "max_t": 12} and sweep.iterations == 12
    sweep = _load(tmp_path, scheduler={"name": "asha", "grace_period": 4, "reduction_factor": 3},
                  overrides=["iterations=12", "eval.every=2"])
    assert sweep.scheduler == {"grace_period": 4, "reduction_factor": 3, "max_t": 12}
    assert _load(tmp_path, scheduler={"name": "none"}).scheduler is None
    assert _load(tmp_path).max_concurrent == 0 and _load(tmp_path, max_concurrent=1).max_concurrent == 1
    assert _load(tmp_path, splits=["ood"]).overrides[-1] == "eval.split=ood"  # evaluations score the ranking split


def test_compute_counts_what_each_trial_reached(tmp_path):
    sweep = _load(tmp_path, overrides=["iterations=10"])
    records = [{"status": "completed", "reached": {"iteration": 10, "env_steps": 1000, "score": 1.0}},
               {"status": "stopped", "reached": {"iteration": 2, "env_steps": 200, "score": -1.0}},
               {"status": "stopped", "reached": {"iteration": 4, "env_steps": 400, "score": 0.0}}]
    assert compute_of(sweep, records) == {"trials": 3, "stopped": 2, "iterations": 16, "iterations_to_the_end": 30,
                                          "iterations_saved_pct": pytest.approx(100 * 14 / 30), "env_steps": 1600,
                                          "env_steps_complete": True}


def test_training_calls_on_eval_after_each_recorded_evaluation(tmp_path):
    from metarl.config import load_config
    from metarl.training import train

    config = load_config(BASE["config"], ["iterations=3", "eval.every=2", "agent.tasks_per_batch=2",
                                          "agent.episodes_per_task=2", "agent.hidden=[8]", "sampler.workers=0",
                                          "eval.tasks=2", "eval.steps=1", "eval.episodes=2"])
    seen = []

    def on_eval(summary):  # called once the evaluation is written and recorded as done
        history = (tmp_path / "run" / "eval" / "test" / "history.jsonl").read_text().splitlines()
        seen.append((summary["iteration"], summary["env_steps"], len(history), _eval_row(summary, "gain")))

    train(config, run_dir=tmp_path / "run", verbose=False, on_eval=on_eval)
    assert [(it, n) for it, _, n, _ in seen] == [(2, 1), (3, 2)]
    steps, row = seen[0][1], seen[0][3]
    stages = [s["mean_return"] for s in json_lines(tmp_path / "run" / "eval" / "test" / "history.jsonl")[0]["stages"]]
    assert row == {"iteration": 2, "env_steps": steps, "score": pytest.approx(stages[-1] - stages[0])}


def json_lines(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def test_user_modules_are_shipped_and_a_missing_path_loads_the_shipped_copy(tmp_path, monkeypatch):
    import json
    import sys

    from metarl import plugins

    # what this test loads must not stay on the list every later sampler worker of this process imports
    monkeypatch.setattr(plugins, "_LOADED", list(plugins._LOADED))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "sweepfam_file.py").write_text("X = 1\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "sweepfam_name.py").write_text("X = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    entries = [str(tmp_path / "a" / "sweepfam_file.py"), "sweepfam_name", "numpy", "metarl.envs"]
    files, names = plugins.shipped(entries)  # installed code (numpy, metarl) is every node's own
    assert files == [entries[0], str(tmp_path / "b" / "sweepfam_name.py")]
    assert names == {entries[0]: "sweepfam_file", "sweepfam_name": "sweepfam_name"}
    # a node without the file: the entry loads the copy the job shipped (here: the module on the path)
    gone = str(tmp_path / "elsewhere" / "sweepfam_name.py")
    monkeypatch.setenv(plugins.SHIPPED_ENV, json.dumps({gone: "sweepfam_name"}))
    monkeypatch.delitem(sys.modules, "sweepfam_name", raising=False)
    assert plugins.resolve(gone) == gone and plugins.load([gone]) == ["sweepfam_name"]
    assert sys.modules["sweepfam_name"].X == 2
    monkeypatch.delenv(plugins.SHIPPED_ENV)
    with pytest.raises(plugins.TaskError, match="does not exist"):
        plugins.load([str(tmp_path / "elsewhere" / "other.py")])
