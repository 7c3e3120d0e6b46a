"""Baselines and the benchmark suite: statistics against hand-computed values, the SB3 baselines'
envs and measurement, small learning runs, a trimmed smoke suite end to end (and resumed), bad suites."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re

import numpy as np
import pytest
import torch
import yaml

import metarl
from metarl.agents.sb3_baselines import (
    BaselineSpec,
    TaskInObservation,
    TrainingTasks,
    make_env,
    measure,
    measure_binned,
    pretrain,
    run_baseline,
)
from metarl.bench import BASELINES, _default_config, aggregate, load_suite
from metarl.cli import main
from metarl.config import ConfigError
from metarl.evaluation import bootstrap_ci, grouped_bootstrap_ci, iqm
from metarl.provenance import check
from metarl.tasks import DynamicsTask, GoalTask, HeadingTask

PN = "metarl/PointNav2D-v0"


# ---- statistics --------------------------------------------------------------------------------------------
def test_iqm_drops_a_quarter_from_each_end():
    assert iqm([1, 2, 3, 4, 5, 6, 7, 100]) == pytest.approx(4.5)  # keeps 3, 4, 5, 6
    assert iqm([5, -100, 1, 2, 3]) == pytest.approx(2.0)  # n=5 drops one each end: 1, 2, 3
    assert iqm([7.0]) == 7.0 and iqm([1, 3]) == 2.0 and np.isnan(iqm([]))


def test_bootstrap_ci_hand_computed():
    # Resampling [0, 0, 0, 10]: the mean is 10 B / 4 with B ~ Binomial(4, 1/4). P(B = 0) = 0.316 > 2.5%, so
    # the lower bound is 0; P(B <= 2) = 0.949 < 97.5% < P(B <= 3) = 0.996, so the upper bound is 7.5.
    assert bootstrap_ci(np.array([0.0, 0, 0, 10]), seed=3) == (0.0, 7.5)
    assert bootstrap_ci(np.array([2.5, 2.5, 2.5])) == (2.5, 2.5)
    assert bootstrap_ci(np.array([4.0])) == (4.0, 4.0)
    # a large normal sample: the percentile interval is the normal one, mean +- 1.96 sd / sqrt(n)
    x = np.random.default_rng(0).normal(10.0, 2.0, size=400)
    low, high = bootstrap_ci(x, seed=1)
    half = 1.96 * x.std() / np.sqrt(x.size)
    assert low == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(x.mean() + half, abs=0.1 * half)
    assert bootstrap_ci(x, seed=1) == (low, high)  # fixed seed, same interval


def test_grouped_bootstrap_resamples_seeds_then_tasks():
    # Two seeds, one all 0, one all 10. Resampling seeds gives means 0, 5, 10 with probabilities 1/4, 1/2, 1/4,
    # so the 95% interval is [0, 10]. Pooling the eight values as independent would give a narrower one: the
    # mean is 10 K / 8, K ~ Binomial(8, 1/2), P(K <= 0) = 0.4% < 2.5% < P(K <= 1) = 3.5%: [1.25, 8.75].
    groups = [np.zeros(4), np.full(4, 10.0)]
    assert grouped_bootstrap_ci(groups, seed=0) == (0.0, 10.0)
    assert bootstrap_ci(np.concatenate(groups), seed=0) == (1.25, 8.75)
    assert grouped_bootstrap_ci([np.array([0.0, 0, 0, 10])], seed=3) == (0.0, 7.5)  # one seed: over tasks


def test_aggregate_pools_tasks_and_seeds():
    def record(seed, stage0, stage1):
        stages = [{"adapt_episodes": 5 * k, "adapt_env_steps": 500.0 * k, "per_task": v} for k, v in enumerate([stage0, stage1])]
        return {"spec": {"seed": seed}, "summary": {"stages": stages}, "wall_time_s": 2.0, "pretrain_env_steps": 100,
                "adapt_env_steps_per_task": 1000.0}

    agg = aggregate([record(0, [1, 2], [10, 20]), record(1, [3, 4], [30, 1000])])
    s0, s1 = agg["stages"]
    assert s0["mean_return"] == pytest.approx(2.5) and s0["n"] == 4
    assert s1["mean_return"] == pytest.approx(265.0) and s1["iqm"] == pytest.approx(25.0)  # (20 + 30) / 2
    assert s1["ci95"] == list(grouped_bootstrap_ci([np.array([10.0, 20]), np.array([30.0, 1000])], seed=1))
    assert agg["wall_time_s"] == 4.0 and agg["seeds"] == [0, 1] and s1["adapt_episodes"] == 5


# ---- baseline envs and measurement --------------------------------------------------------------------------
def test_task_features():
    assert np.allclose(HeadingTask("AntDir", np.pi / 2).features(), [0.0, 1.0])
    assert np.allclose(GoalTask("AntGoal", (1.0, -2.0)).features(), [1.0, -2.0])
    task = DynamicsTask("X", (("body_mass", (1.5, 1 / 1.5)), ("dof_damping", (1.0,))))
    assert np.allclose(task.features(), [np.log(1.5), -np.log(1.5), 0.0])


def test_oracle_observation_carries_the_task():
    task = metarl.family_of(metarl.make_family("PointNav2D")).sample_tasks(1, "test")[0]
    env = make_env(PN, {}, task, oracle=True)
    assert isinstance(env, TaskInObservation) and env.observation_space.shape == (4,)
    obs, _ = env.reset(seed=0)
    assert np.allclose(obs[2:], task.goal)
    obs, *_ = env.step(np.zeros(2, dtype=np.float32))
    assert np.allclose(obs[2:], task.goal)


def test_training_tasks_change_every_episode_and_come_from_the_training_split():
    env = make_env(PN, {}, training_seed=0)
    assert isinstance(env, TrainingTasks)
    family = metarl.family_of(env)
    heldout = set(family.sample_tasks(family.n_heldout, "test"))
    seen = set()
    for _ in range(5):
        env.reset()
        seen.add(family.task)
    assert len(seen) == 5 and not seen & heldout


def test_measure_equals_a_hand_rollout():
    task = metarl.family_of(metarl.make_family("PointNav2D")).sample_tasks(1, "test")[0]
    action = np.array([0.05, -0.02])
    returns = measure(lambda obs: np.tile(action, (len(obs), 1)), PN, {}, task, episodes=3, seed=11)
    for i in range(3):
        env = make_env(PN, {}, task)
        env.reset(seed=11 + i)
        total, done = 0.0, False
        while not done:
            _, r, term, trunc, _ = env.step(action)
            total, done = total + r, term or trunc
        assert returns[i] == pytest.approx(total)


def test_measure_binned_splits_each_episode_over_the_horizon():
    """PointNav2D (horizon 100) in 10 bins: each bin holds the rewards of 10 consecutive steps."""
    task = metarl.family_of(metarl.make_family("PointNav2D")).sample_tasks(1, "test")[0]
    action = np.array([0.03, 0.01])
    binned = measure_binned(lambda obs: np.tile(action, (len(obs), 1)), PN, {}, task, episodes=2, seed=5)
    assert binned.shape == (2, 10)
    env = make_env(PN, {}, task)
    env.reset(seed=6)  # the second episode
    rewards = [env.step(action)[1] for _ in range(100)]
    np.testing.assert_allclose(binned[1], np.add.reduceat(rewards, np.arange(0, 100, 10)))
    np.testing.assert_allclose(binned.sum(-1), measure(lambda obs: np.tile(action, (len(obs), 1)), PN, {}, task,
                                                       episodes=2, seed=5))


def test_ppo_from_scratch_learns_and_the_protocol_counts_its_experience():
    task = metarl.family_of(metarl.make_family("PointNav2D")).sample_tasks(1, "test")[0]
    result, cost = run_baseline(BaselineSpec("scratch", "ppo", extra_episodes=(40,)), PN, {}, [task], steps=1,
                                episodes=4, seed=0, log=lambda _: None)
    assert result.adapt_episodes == [0, 4, 40] and result.adapt_env_steps == [0.0, 400.0, 4000.0]
    assert cost.adapt_env_steps_per_task == 4000
    assert result.returns[0, -1] > result.returns[0, 0] + 20  # about -87 -> -26 on this task


def test_budget_is_env_steps_where_episodes_end_early():
    # HopperRandParams episodes end when the hopper falls: a stage's budget is still episodes x horizon env
    # steps, counted by the learner, and the result records what it trained on.
    env_id = metarl.env_id("HopperRandParams")
    task = metarl.family_of(metarl.make_family(env_id)).sample_tasks(1, "test")[0]
    result, cost = run_baseline(BaselineSpec("scratch", "ppo"), env_id, {"max_episode_steps": 50}, [task], steps=2,
                                episodes=2, seed=0, log=lambda _: None)
    assert result.adapt_episodes == [0, 2, 4] and result.adapt_env_steps == [0.0, 100.0, 200.0]
    assert cost.adapt_env_steps_per_task == 200


def test_oracle_uses_the_task_it_is_told_and_beats_random():
    tasks = metarl.family_of(metarl.make_family("PointNav2D")).sample_tasks(3, "test")
    threads = torch.get_num_threads()
    oracle, cost = run_baseline(BaselineSpec("oracle", pretrain_steps=20_000), PN, {}, tasks, 1, 4, 0, lambda _: None)
    rand, _ = run_baseline(BaselineSpec("random"), PN, {}, tasks, 1, 4, 0, lambda _: None)
    assert cost.pretrain_env_steps >= 20_000 and cost.adapt_env_steps_per_task == 0
    assert torch.get_num_threads() == threads  # the baselines run on one torch thread, then restore the setting
    assert oracle.returns.mean() > rand.returns.mean() + 20  # about -17 against -75
    # told the wrong goal (the goal mirrored through the origin), the same policy does much worse
    model = pretrain(BaselineSpec("oracle", pretrain_steps=20_000), PN, {}, seed=0, log=lambda _: None)

    def told(sign):
        return lambda obs: model.predict(np.concatenate([obs[:, :2], sign * obs[:, 2:]], 1), deterministic=False)[0]

    right = np.mean([measure(told(1.0), PN, {}, t, 4, 0, oracle=True).mean() for t in tasks])
    wrong = np.mean([measure(told(-1.0), PN, {}, t, 4, 0, oracle=True).mean() for t in tasks])
    assert right > wrong + 20


# ---- the suite -----------------------------------------------------------------------------------------------
def _trimmed_smoke(out) -> dict:
    """experiments/benchmarks/smoke.yaml with every budget cut to seconds."""
    data = yaml.safe_load(open("experiments/benchmarks/smoke.yaml"))
    assert set(data["methods"]) == {"maml_trpo", "rl2", "pearl", "ppo_scratch", "sac_scratch", "ppo_multitask", "oracle",
                                    "random"}
    data["out"] = str(out)
    data["eval"] = {"tasks": 2, "steps": 1, "episodes": 2}
    data["methods"].update({
        "maml_trpo": {"overrides": ["iterations=2", "agent.tasks_per_batch=3", "agent.episodes_per_task=2",
                                    "agent.hidden=[8]", "sampler.workers=0"]},
        "rl2": {"overrides": ["iterations=2", "agent.tasks_per_batch=2", "agent.hidden_size=8", "sampler.workers=0"]},
        "pearl": {"overrides": ["quick=true", "iterations=2", "sampler.workers=0"]},
        "ppo_scratch": {"extra_episodes": [4]},
        "sac_scratch": {"params": {"learning_starts": 10, "batch_size": 32}},
        "ppo_multitask": {"pretrain_steps": 512, "pretrain_envs": 2},
        "oracle": {"pretrain_steps": 512, "pretrain_envs": 2},
    })
    return data


def test_trimmed_smoke_suite_reports_every_method_and_resumes(tmp_path, capsys):
    data = _trimmed_smoke(tmp_path / "report")
    suite_file = tmp_path / "smoke.yaml"
    suite_file.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["bench", str(suite_file), "--quiet"]) == 0
    out = tmp_path / "report"
    report = (out / "report.md").read_text()
    for method in data["methods"]:
        assert f"| {method} | " in report and "not run yet" not in report
    assert (out / "curves_PointNav2D.png").stat().st_size > 10_000
    # every method, meta-learner or baseline, reports its return inside the first measured episode
    within = report[report.index("within the first measured episode"):].split("</details>")[0]
    for method in data["methods"]:
        row = next(line for line in within.splitlines() if line.startswith(f"| {method} | "))
        assert len(row.strip("|").split("|")) == 1 + 10
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results] == list(data["methods"])
    stages = {r["method"]: len(r["stages"]) for r in results}
    assert stages["maml_trpo"] == stages["rl2"] == stages["pearl"] == stages["random"] == 2 and stages["ppo_scratch"] == 3
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * sum(stages.values())  # a row per task and stage
    # the meta-learners' held-out tasks are the baselines' tasks
    tasks = {r["method"]: [json.dumps(t) for t in r["cells"][0]["summary"]["tasks"]] for r in results
             if "tasks" in r["cells"][0]["summary"]}
    assert len(set(map(tuple, tasks.values()))) == 1 and len(tasks) == len(data["methods"])
    # every cell records its provenance, in its cell.json and in results.json, and the report lists them
    for row in results:
        for cell in row["cells"]:
            check(cell, row["method"])
            assert cell["provenance"]["command"].startswith("metarl bench") and cell["provenance"]["cpu_s"] > 0
    assert "provenance: the commit, time and machine state of each cell" in report
    table = report.split("provenance: the commit, time and machine state of each cell")[1].split("</details>")[0]
    rows = [line for line in table.splitlines() if line.startswith("| PointNav2D/")]
    assert len(rows) == 8 and all(re.match(r"\| \S+ \| [0-9a-f]{10}( \(dirty\))? \| ", row) for row in rows), rows
    assert all(re.fullmatch(r"[0-9a-f]{40}", cell["provenance"]["commit"]) for row in results for cell in row["cells"])

    # again: nothing reruns
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*/*/cell.json")}
    assert len(stamps) == 8
    capsys.readouterr()
    assert main(["bench", str(suite_file), "--quiet"]) == 0
    assert "8 finished already" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # a finished cell run with other settings is an error, and nothing is overwritten
    data["methods"]["random"] = {"params": {}}
    suite_file.write_text(yaml.safe_dump(data))
    assert main(["bench", str(suite_file), "--quiet"]) == 2
    assert "was run with other settings" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.parametrize("change, message", [
    ({"methods": {"ppo_scrach": {}}}, "methods.ppo_scrach: unknown method"),
    ({"families": {"PointNav3D": {}}}, "families.PointNav3D: unknown task family"),
    ({"methods": {"oracle": {"pretrain_steps": 0}}}, "pretrain_steps: a oracle baseline needs a budget > 0"),
    ({"methods": {"ppo_multitask": {}}}, "pretrain_steps: a multitask baseline needs a budget > 0"),
    ({"eval": {"steps": 0}, "methods": {"sac_scratch": {}}}, "needs an adaptation budget"),
    ({"methods": {"ppo_scratch": {"extra_episodes": [5]}}}, "extra_episodes: 5 must be a multiple"),
    ({"methods": {"random": {"iterations": 3}}}, "methods.random.iterations: unknown option"),
    ({"methods": {"maml_trpo": {"overrides": ["agent.inner_lr=fast"]}}}, "agent.inner_lr: expected a number"),
    ({"families": {"HalfCheetahDir": {"eval": {"tasks": 5}}}}, "HalfCheetahDir.eval.tasks"),
    ({"seeds": []}, "seeds: expected a non-empty list"),
    ({"seeds": [0, 0]}, "lists a seed twice"),
    ({"eval": {"tasks": 2, "steps": 1, "episodes": 2, "split": "train"}}, "eval.split: a suite evaluates on held-out"),
    ({"eval": {"tasks": 2.5, "steps": 1, "episodes": 2}}, "eval.tasks: expected an integer >= 1"),
    ({"methods": {"sac_scratch": {"params": {"learning_rat": 0.1}}}}, "params.learning_rat: not an argument of SB3's SAC"),
    ({"methods": {"ppo_scratch": {"params": {"n_steps": 64}}}}, "params.n_steps: set by the protocol"),
])
def test_bad_suites_fail_before_any_work(tmp_path, capsys, change, message):
    data = {"out": str(tmp_path / "out"), "eval": {"tasks": 2, "steps": 1, "episodes": 2},
            "families": {"PointNav2D": {}}, "methods": {"random": {}}}
    for key, value in change.items():
        data[key] = value
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_suite(path)
    assert main(["bench", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("metarl bench: error:")
    assert not os.path.exists(tmp_path / "out")


def test_only_runs_the_matching_cells_and_reports_every_finished_one(tmp_path, capsys):
    data = {"out": str(tmp_path / "out"), "seeds": [0, 1], "eval": {"tasks": 2, "steps": 1, "episodes": 2},
            "families": {"PointNav2D": {}}, "methods": {"random": {}, "oracle": {"pretrain_steps": 200}}}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    cells = tmp_path / "out" / "cells" / "PointNav2D"
    assert main(["bench", str(path), "--quiet", "--only", "*/random/seed1"]) == 0
    assert sorted(str(p.relative_to(cells)) for p in cells.glob("*/*/cell.json")) == ["random/seed1/cell.json"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "1 of 4 cells finished" in report and "| random | -70" in report and "| oracle | not run yet |" in report
    capsys.readouterr()
    assert main(["bench", str(path), "--quiet", "--only", "*/random/*", "--only", "*/oracle/seed0"]) == 0
    out = capsys.readouterr().out
    assert "1 finished already, 2 to run by --only" in out and "[1/2] PointNav2D/oracle/seed0" in out
    assert "[2/2] PointNav2D/random/seed0" in out
    assert sorted(str(p.relative_to(cells)) for p in cells.glob("*/*/cell.json")) == [
        "oracle/seed0/cell.json", "random/seed0/cell.json", "random/seed1/cell.json"]
    assert "3 of 4 cells finished" in (tmp_path / "out" / "report.md").read_text()
    # a pattern matching nothing is one clear error, and nothing is run or rewritten
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert main(["bench", str(path), "--only", "*/ppo/*"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--only '*/ppo/*' matches none of the suite's cells" in err
    assert main(["bench", str(path), "--only", "*/random/*", "--report-only"]) == 2
    assert "--report-only runs none" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()} == stamps


def test_seeds_runs_a_suite_at_more_seeds_keeping_its_finished_cells(tmp_path, capsys):
    """``--seeds 0 1`` on a one-seed suite whose seed-0 cells are finished runs only seed 1's and reports both."""
    data = {"out": str(tmp_path / "out"), "seeds": [0], "eval": {"tasks": 2, "steps": 1, "episodes": 2},
            "families": {"PointNav2D": {}}, "methods": {"random": {}}}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["bench", str(path), "--quiet"]) == 0
    first = tmp_path / "out" / "cells" / "PointNav2D" / "random" / "seed0" / "cell.json"
    stamp = first.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["bench", str(path), "--quiet", "--seeds", "0", "1"]) == 0
    assert "1 finished already" in capsys.readouterr().out
    assert first.stat().st_mtime_ns == stamp  # kept, not rerun
    assert (first.parents[1] / "seed1" / "cell.json").is_file()
    assert "2 of 2 cells finished" in (tmp_path / "out" / "report.md").read_text()
    assert main(["bench", str(path), "--seeds", "1", "1"]) == 2
    assert "lists a seed twice" in capsys.readouterr().err


def test_committed_suites_are_valid():
    for name in ("smoke", "quick", "full"):
        suite = load_suite(f"experiments/benchmarks/{name}.yaml")
        assert set(suite.methods) >= {"maml_trpo", "rl2", "pearl", *BASELINES} - {"sac_multitask"}, name
    quick = load_suite("experiments/benchmarks/quick.yaml")
    assert quick.families == ["PointNav2D", "HalfCheetahVel", "HalfCheetahDir", "AntGoal", "HopperRandParams"]
    # every shipped suite validates (its method configs resolved relative to the suite file), e.g. the RL²
    # comparison whose rl2 cells use ../rl2/half_cheetah_vel_varibad.yaml's agent on other families
    from pathlib import Path

    for path in sorted(Path("experiments/benchmarks").glob("*.yaml")):
        if path.name == "metaworld.yaml" and importlib.util.find_spec("metaworld") is None:
            with pytest.raises(ConfigError, match="install the extra"):  # tests/test_metaworld.py loads it
                load_suite(path)
            continue
        load_suite(path)
    rl2 = load_suite("experiments/benchmarks/rl2_vs_multitask.yaml")
    cell = next(c for c in rl2.cells if c.method == "rl2" and c.family == "HalfCheetahDir")
    agent = cell.spec()["config"]["agent"]
    assert agent["embedding"] == "separate" and agent["reward_input"] == "raw" and cell.spec()["config"]["env"] == "HalfCheetahDir"


def test_an_unfinished_run_with_other_settings_is_not_resumed(tmp_path, capsys):
    data = {"out": str(tmp_path / "out"), "eval": {"tasks": 2, "steps": 1, "episodes": 2},
            "families": {"PointNav2D": {}}, "methods": {"maml_trpo": {"overrides": ["iterations=1"]}}}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    suite = load_suite(path)
    assert suite.cells[0].spec()["config"]["agent"]["name"] == "maml_trpo"  # the resolved config is in the spec
    folder = tmp_path / "out" / "cells" / "PointNav2D" / "maml_trpo" / "seed0"
    (folder / "run" / "checkpoints").mkdir(parents=True)
    (folder / "run" / "checkpoints" / "latest.pt").write_bytes(b"a checkpoint of some other run")
    spec = suite.cells[0].spec()
    spec["config"]["agent"]["inner_lr"] = 0.5  # as if the experiment file had been edited since
    (folder / "spec.json").write_text(json.dumps(spec))
    assert main(["bench", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot be resumed" in err and "config.agent.inner_lr 0.5 -> 0.1" in err
    assert (folder / "run" / "checkpoints" / "latest.pt").read_bytes() == b"a checkpoint of some other run"
    assert not (folder / "cell.json").exists()


def test_a_cell_recorded_before_an_option_existed_is_still_finished_and_resumable(tmp_path):
    """A cell whose recorded spec predates a run-config option (the agent's added_options) matches a suite giving that
    option its old behaviour's value; any other value, or a field missing from the suite's spec, is a change."""
    from metarl.bench import check_partial, finished
    from metarl.runfolder import added_options

    added = added_options("maml_trpo")
    old_behaviour = [f"{option}={json.dumps(value)}" for option, value in added.items()]
    suite = load_suite(None, {"out": str(tmp_path / "out"), "eval": {"tasks": 2, "steps": 1, "episodes": 2},
                              "families": {"PointNav2D": {}}, "methods": {"maml_trpo": {"overrides": old_behaviour}}})
    cell = suite.cells[0]
    folder = tmp_path / "out" / "cells" / "PointNav2D" / "maml_trpo" / "seed0"
    folder.mkdir(parents=True)
    old = cell.spec()
    for option in added:
        section, name = option.split(".")
        assert old["config"][section].pop(name) == added[option]
    record = {"spec": old, "summary": {"stages": []}}
    (folder / "cell.json").write_text(json.dumps(record))
    (folder / "spec.json").write_text(json.dumps(old))
    assert finished(suite, cell) == record
    check_partial(suite, cell)

    changed = cell.spec()
    changed["config"]["agent"]["inner_objective"] = "lvc"  # the suite now asks for another value: not the same cell
    changed = dataclasses.replace(cell, resolved=changed["config"])
    with pytest.raises(ConfigError, match=r"config.agent.inner_objective \(absent\) -> 'lvc'"):
        finished(suite, changed)
    with pytest.raises(ConfigError, match=r"cannot be resumed"):
        check_partial(suite, changed)
    # only a run config's options are loosened: a cell-level field missing from the record is a change
    (folder / "cell.json").write_text(json.dumps({"spec": {k: v for k, v in old.items() if k != "eval"}}))
    with pytest.raises(ConfigError, match=r"\(eval \(absent\) -> \{"):
        finished(suite, cell)


def test_default_experiment_configs_are_found_for_every_family():
    for family in metarl.FAMILIES:
        for method in ("maml_trpo", "rl2"):
            assert os.path.isfile(_default_config(method, family)), (method, family)
