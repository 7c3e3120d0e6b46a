"""``metarl sweep`` files: expansion of grid and random searches, and bad sweeps failing before any work (no
Ray needed; the sweep itself runs in tests/test_ray.py on a two-node cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metarl.config import ConfigError
from metarl.sweep import load_sweep, point_id, scores_of

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
    a = _load(tmp_path, search="random", samples=8, seed=3, params=params)
    b = _load(tmp_path, search="random", samples=8, seed=3, params=params)
    assert a.points == b.points and len(a.points) == 8  # a rerun draws the same configurations
    assert all(0.01 <= p["agent.inner_lr"] <= 1.0 and p["agent.max_kl"] in (0.01, 0.02) and 5 <= p["agent.cg_iters"] <= 9
               for p in a.points)
    assert a.points != _load(tmp_path, search="random", samples=8, seed=4, params=params).points
    assert point_id(0, a.points[0]) != point_id(0, a.points[1])
    assert scores_of({"stages": [{"per_task": [1.0, 2.0]}, {"per_task": [4.0, 1.0]}]}, "gain") == [3.0, -1.0]
    assert scores_of({"stages": [{"per_task": [1.0, 2.0]}, {"per_task": [4.0, 1.0]}]}, "return") == [4.0, 1.0]


@pytest.mark.parametrize("change, message", [
    ({"serach": "grid"}, "serach: unknown sweep key"),
    ({"params": {"agent.inner_lr": {"uniform": [0.1, 0.2]}}}, "params.agent.inner_lr: a grid search takes a list"),
    ({"search": "random", "params": {"agent.inner_lr": [0.1]}}, "samples: a random search needs samples >= 1"),
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
