"""The learning benchmark script: several seeds through one command, resumable, with the held-out curve over
training and the mean and t-interval across seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metarl.evaluation import t_ci95
from metarl.provenance import FIELDS, check, git_state
from metarl.runfolder import read_eval_history

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "benchmarks" / "learning.py"


def test_t_ci95_hand_computed():
    # [1, 2, 3]: mean 2, s = 1, t_{0.975, 2} = 4.303 -> 2 +- 4.303 / sqrt(3)
    lo, hi = t_ci95(np.array([1.0, 2.0, 3.0]))
    assert (lo, hi) == pytest.approx((2 - 4.303 / np.sqrt(3), 2 + 4.303 / np.sqrt(3)))
    # two values 0 and 10: mean 5, s = sqrt(50), t_{0.975, 1} = 12.706
    lo, hi = t_ci95(np.array([0.0, 10.0]))
    assert (lo, hi) == pytest.approx((5 - 12.706 * np.sqrt(50) / np.sqrt(2), 5 + 12.706 * np.sqrt(50) / np.sqrt(2)))
    assert all(np.isnan(t_ci95(np.array([4.0]))))
    # 22 values: between table rows the next smaller df's (larger) quantile is used: t_{0.975, 20} = 2.086
    values = np.arange(22, dtype=float)
    half = (t_ci95(values)[1] - t_ci95(values)[0]) / 2
    assert half == pytest.approx(2.086 * values.std(ddof=1) / np.sqrt(22))


def test_stratified_bootstrap_ci_hand_computed():
    from metarl.evaluation import bootstrap_ci, stratified_bootstrap_ci

    # two tasks, each adapted three times with the same result: resampling within a task changes nothing, so
    # the interval is the point 5, where resampling across both (bootstrap_ci) mixes the tasks unevenly
    values, strata = np.array([0.0, 10.0, 0.0, 10.0, 0.0, 10.0]), np.tile([0, 1], 3)
    assert stratified_bootstrap_ci(values, strata) == (5.0, 5.0)
    assert bootstrap_ci(values)[0] < 3.0
    # task A: [0, 1], task B: [10, 10]. A's resampled sum is 0, 1, 2 with probability 1/4, 1/2, 1/4, so the
    # mean over 4 is 5.0, 5.25, 5.5: the 95% interval is [5.0, 5.5]
    assert stratified_bootstrap_ci(np.array([0.0, 10.0, 1.0, 10.0]), np.array([0, 1, 0, 1])) == (5.0, 5.5)
    with pytest.raises(ValueError, match="one length"):
        stratified_bootstrap_ci(np.zeros(4), np.zeros(3))


def _run(args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_two_seeds_one_command_resumable(tmp_path):
    config = ROOT / "experiments" / "maml_trpo" / "point_nav_2d.yaml"
    out = tmp_path / "two_seeds.json"
    overrides = ["iterations=4", "agent.tasks_per_batch=4", "agent.episodes_per_task=4", "eval.every=2",
                 "eval.tasks=4", "eval.steps=1", "eval.episodes=4", f"run_root={tmp_path / 'runs'}",
                 "sampler.workers=0"]
    done = _run([str(config), *overrides, "--seeds", "0", "1", "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["complete"] and result["seeds"] == [0, 1]
    assert [s["seed"] for s in result["per_seed"]] == [0, 1]
    for s in result["per_seed"]:
        assert s["iterations"] == 4 and len(s["training_curve"]) == 4
        # evaluated at iteration 2 (every 2) and at the end (4): the held-out curve over training
        assert [e["iteration"] for e in s["heldout_curve"]] == [2, 4]
        assert s["heldout_curve"][-1]["stages"][1]["mean_return"] == s["heldout"]["stages"][1]["mean_return"]
        assert "inner_kl" in s["training_curve"][0]
        # the paired gain reaches the result file, at the end and along the held-out curve
        stage = s["heldout"]["stages"][1]
        assert stage["gain"] == pytest.approx(stage["mean_return"] - s["heldout"]["stages"][0]["mean_return"], abs=1e-4)
        assert stage["gain_ci95"][0] <= stage["gain"] <= stage["gain_ci95"][1]
        assert "gain_ci95" in s["heldout_curve"][0]["stages"][1]
    # different seeds, different numbers; the aggregate is their mean with a t-interval around it
    a, b = (s["heldout"]["stages"][1]["mean_return"] for s in result["per_seed"])
    assert a != b
    agg = result["aggregate"]["heldout_stages"][1]
    assert agg["mean"] == pytest.approx((a + b) / 2)
    assert agg["ci95"] == pytest.approx(list(t_ci95(np.array([a, b]))))
    assert [e["iteration"] for e in result["aggregate"]["heldout_curve"]] == [2, 4]
    # the late-curve mean: of 4 iterations only the evaluation at 4 (>= 2/3 of 4) is late, so it is the final one
    for s in result["per_seed"]:
        late = s["heldout_late"]
        assert (late["from_iteration"], late["to_iteration"], late["evaluations"]) == (4, 4, 1)
        assert late["stages"][1]["mean_return"] == s["heldout"]["stages"][1]["mean_return"]
    assert result["aggregate"]["heldout_late_stages"][1]["mean"] == pytest.approx((a + b) / 2)
    assert out.with_suffix(".png").stat().st_size > 1000
    # provenance: the file's (the whole command) and each seed's (its own training), complete and plausible
    check(result, str(out))
    for record in [result["provenance"], *(s["provenance"] for s in result["per_seed"])]:
        assert set(FIELDS) <= set(record) and record["commit"] == git_state()["commit"]
        assert record["wall_s"] > 0 and record["cpu_s"] > 0 and isinstance(record["shared"], bool)
        assert "learning.py" in record["command"] and "--seeds 0 1" in record["command"]
    assert result["provenance"]["wall_s"] >= sum(s["provenance"]["wall_s"] for s in result["per_seed"])

    # The same command again: finished seeds are read back, nothing is retrained
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("latest.pt")}
    again = _run([str(config), *overrides, "--seeds", "0", "1", "--out", str(out)], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("latest.pt")} == before
    assert json.loads(out.read_text())["per_seed"] == result["per_seed"]

    # --final-repeats on the same command: nothing is retrained; each final policy is evaluated again with 2
    # independent adaptations per held-out task, pooled. The first copy of each task is exactly the run's own
    # final evaluation (same checkpoint, same per-index seeds); the second is a fresh draw.
    repeats = _run([str(config), *overrides, "--seeds", "0", "1", "--out", str(out), "--final-repeats", "2"], tmp_path)
    assert repeats.returncode == 0, repeats.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("latest.pt")} == before
    with_repeats = json.loads(out.read_text())
    for s in with_repeats["per_seed"]:
        rep = s["heldout_repeated"]
        assert (rep["repeats"], rep["distinct_tasks"], rep["num_tasks"], rep["iteration"]) == (2, 4, 8, 4)
        plain = json.loads((Path(s["run_dir"]) / "eval" / "test" / "summary.json").read_text())
        pooled = json.loads((Path(s["run_dir"]) / "eval" / "test-repeats2" / "summary.json").read_text())
        assert pooled["tasks"][:4] == pooled["tasks"][4:] == plain["tasks"]
        for k in range(2):
            per_task = pooled["stages"][k]["per_task"]
            assert per_task[:4] == pytest.approx(plain["stages"][k]["per_task"], abs=1e-9)
            assert not np.allclose(per_task[4:], per_task[:4])
            assert rep["stages"][k]["mean_return"] == pytest.approx(np.mean(per_task))
        assert rep["stages"][1]["gain"] == pytest.approx(np.mean(np.subtract(pooled["stages"][1]["per_task"],
                                                                             pooled["stages"][0]["per_task"])))
        # each distinct task's own returns (few distinct tasks): the mean of its two adaptations, per stage
        assert [t["task"] for t in rep["by_task"]] == plain["tasks"]
        for i, task in enumerate(rep["by_task"]):
            assert task["adaptations"] == 2
            assert task["mean_return"] == pytest.approx([(st["per_task"][i] + st["per_task"][i + 4]) / 2
                                                         for st in pooled["stages"]])
    means = [s["heldout_repeated"]["stages"][1]["mean_return"] for s in with_repeats["per_seed"]]
    assert with_repeats["aggregate"]["heldout_repeated_stages"][1]["mean"] == pytest.approx(np.mean(means))
    assert "final policy, 2 adaptations per task" in repeats.stdout
    assert repeats.stdout.count(", task {") == 8  # each seed's 4 tasks
    # the pooled intervals resample within each task (the 4 held-out tasks, each adapted twice)
    from metarl.evaluation import stratified_bootstrap_ci

    pooled = json.loads((Path(with_repeats["per_seed"][0]["run_dir"]) / "eval" / "test-repeats2" / "summary.json")
                        .read_text())
    assert pooled["stages"][1]["ci95"] == pytest.approx(list(stratified_bootstrap_ci(
        np.array(pooled["stages"][1]["per_task"]), np.tile(np.arange(4), 2), seed=1)))

    # A folder whose newest usable checkpoint is not the result's final policy (here latest.pt is gone, so
    # loading falls back to previous.pt, iteration 3) is refused, by name, and the file is left as it was
    seed0 = Path(with_repeats["per_seed"][0]["run_dir"])
    (seed0 / "checkpoints" / "latest.pt").rename(tmp_path / "latest0.pt")
    written = out.read_bytes()
    moved = _run([str(config), *overrides, "--seeds", "0", "1", "--out", str(out), "--final-repeats", "3"], tmp_path)
    assert moved.returncode != 0 and "holds iteration 3, not the final policy" in moved.stderr
    assert out.read_bytes() == written
    (tmp_path / "latest0.pt").rename(seed0 / "checkpoints" / "latest.pt")

    # A seed killed before its first checkpoint (its folder holds config.yaml and no checkpoint yet) is
    # trained again in place by the same command, to the same numbers; a field a resume may change
    # (sampler.max_slots: the 16 episodes of a call in rounds of 5 slots, the same episodes) is taken from
    # the command, not from the folder's config, and does not count as other settings against --out
    import shutil

    seed1 = tmp_path / "runs" / "maml_trpo" / "point_nav_2d" / "learning-seed1"
    for name in ("checkpoints", "eval"):
        shutil.rmtree(seed1 / name)
    for name in ("metrics.jsonl",):
        (seed1 / name).unlink()
    out.write_text(json.dumps({**result, "per_seed": result["per_seed"][:1]}))
    redo = _run([str(config), *overrides, "sampler.max_slots=5", "--seeds", "0", "1", "--out", str(out)], tmp_path)
    assert redo.returncode == 0, redo.stderr[-2000:]
    redone = json.loads(out.read_text())
    assert redone["config"]["sampler"]["max_slots"] == 5 and redone["per_seed"][1]["resumed"]
    assert "max_slots" not in result["config"]["sampler"]
    again_seed1 = redone["per_seed"][1]
    assert again_seed1["heldout"] == result["per_seed"][1]["heldout"]
    assert again_seed1["training_curve"] == result["per_seed"][1]["training_curve"]

    # Other overrides are refused rather than mixed in
    mixed = _run([str(config), *overrides, "agent.inner_lr=0.2", "--seeds", "0", "1", "--out", str(out)], tmp_path)
    assert mixed.returncode != 0 and "overrides" in mixed.stderr

    # A seed folder left by other settings (a killed run, then another --out) is refused, naming the field,
    # and left as it was
    config_file = seed1 / "config.yaml"
    before = config_file.read_bytes()
    other = _run([str(config), *overrides, "agent.inner_lr=0.2", "--seeds", "1", "--out", str(tmp_path / "o.json")],
                 tmp_path)
    assert other.returncode != 0 and "agent.inner_lr" in other.stderr and "other settings" in other.stderr
    assert config_file.read_bytes() == before and not (tmp_path / "o.json").exists()

    # Seeds trained by separate commands (the two-seed file and a single-seed run of seed 2 in another
    # experiment folder) gather into one file: their entries as they were, the aggregate over all three
    single = tmp_path / "seed2.json"
    alone = _run([str(config), *overrides, "seed=2", "experiment=elsewhere", "--out", str(single)], tmp_path)
    assert alone.returncode == 0, alone.stderr[-2000:]
    both = json.loads(out.read_text())
    combined = tmp_path / "combined.json"
    gathered = _run(["--combine", str(out), str(single), "--out", str(combined), "--note", "n"], tmp_path)
    assert gathered.returncode == 0, gathered.stderr[-2000:]
    merged = json.loads(combined.read_text())
    seed2 = json.loads(single.read_text())
    assert merged["seeds"] == [0, 1, 2] and merged["complete"] and merged["note"] == "n"
    assert merged["per_seed"][:2] == both["per_seed"]
    assert merged["per_seed"][2]["heldout"] == seed2["heldout"] and merged["per_seed"][2]["seed"] == 2
    finals = [s["heldout"]["stages"][1]["mean_return"] for s in merged["per_seed"]]
    assert len(set(finals)) == 3
    assert merged["aggregate"]["heldout_stages"][1]["mean"] == pytest.approx(np.mean(finals))
    assert merged["aggregate"]["heldout_stages"][1]["ci95"] == pytest.approx(list(t_ci95(np.array(finals))))
    assert [(x["file"], x["seeds"]) for x in merged["combined_from"]] == [(str(out), [0, 1]), (str(single), [2])]
    assert combined.with_suffix(".png").stat().st_size > 1000

    # Refused, naming what is wrong, with --out left as it was: other settings, another length, a seed twice
    written = combined.read_bytes()
    for change, message in ((lambda r: r["config"]["agent"].update(inner_lr=0.2), "agent.inner_lr 0.1 -> 0.2"),
                            (lambda r: r.update(iterations=5), "ran 5 iterations, not 4"),
                            (lambda r: r.update(seed=1), "seed 1 is in two files")):
        bad = json.loads(single.read_text())
        change(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        refused = _run(["--combine", str(out), str(tmp_path / "bad.json"), "--out", str(combined)], tmp_path)
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr[-2000:]
        assert combined.read_bytes() == written


def _learning_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("learning_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_late_curve_mean_hand_computed():
    """The held-out curve's mean over its last third: evaluations at iterations >= 2/3 of the run, per stage;
    across seeds the mean of those with a t-interval, computed from each seed's curve."""
    learning = _learning_module()

    def curve(values):  # evaluations every 10 iterations; stage 0 fixed at -40, stage 1 the given values
        return [{"iteration": 10 * (i + 1), "stages": [{"stage": 0, "mean_return": -40.0},
                                                       {"stage": 1, "mean_return": v}]} for i, v in enumerate(values)]

    # 30 iterations: 2/3 is 20, so the evaluations at 20 and 30 count: (250 + 100) / 2
    late = learning.late_stages(curve([0.0, 250.0, 100.0]), 30)
    assert (late["from_iteration"], late["to_iteration"], late["evaluations"]) == (20, 30, 2)
    assert [s["mean_return"] for s in late["stages"]] == [-40.0, 175.0]
    # 45 iterations (evaluated to 40): 2/3 is 30, so 30 and 40: (6 + 8) / 2
    assert learning.late_stages(curve([2.0, 4.0, 6.0, 8.0]), 45)["stages"][1]["mean_return"] == 7.0
    assert learning.late_stages(curve([1.0]), 30) is None  # no evaluation in the last third
    seeds = [{"seed": k, "iterations": 30, "heldout_curve": curve(v), "wall_time_s": 1.0, "train_time_s": 1.0,
              "heldout": {"stages": [{"mean_return": -40.0}, {"mean_return": v[-1]}]},
              "training_curve": [{"pre": 0.0, "post": 0.0}]}
             for k, v in ((0, [0.0, 250.0, 100.0]), (1, [0.0, 150.0, 250.0]))]
    agg = learning.aggregate(seeds)["heldout_late_stages"]
    assert agg[1]["mean"] == 187.5 and agg[1]["per_seed"] == [175.0, 200.0]
    assert agg[1]["ci95"] == pytest.approx(list(t_ci95(np.array([175.0, 200.0]))))
    # the repeated final evaluation is aggregated only when every seed has it, with one R
    for s, value in zip(seeds, (100.0, 120.0), strict=True):
        s["heldout_repeated"] = {"repeats": 20, "stages": [{"mean_return": -40.0}, {"mean_return": value}]}
    both = learning.aggregate(seeds)
    assert both["heldout_repeats"] == 20 and both["heldout_repeated_stages"][1]["mean"] == 110.0
    seeds[1]["heldout_repeated"]["repeats"] = 5
    assert learning.aggregate(seeds)["heldout_repeated_stages"] is None
    del seeds[1]["heldout_repeated"]
    assert learning.aggregate(seeds)["heldout_repeats"] is None
    # success per stage over seeds, where every seed's env reports it (Meta-World): seed 0 0.2 -> 0.4, seed 1 0.3 -> 0.3
    assert "heldout_success_stages" not in learning.aggregate(seeds)
    for s, rates in zip(seeds, ((0.2, 0.4), (0.3, 0.3)), strict=True):
        for stage, rate in zip(s["heldout"]["stages"], rates, strict=True):
            stage["success_rate"] = rate
    success = learning.aggregate(seeds)["heldout_success_stages"]
    assert [x["mean"] for x in success] == pytest.approx([0.25, 0.35]) and success[1]["per_seed"] == [0.4, 0.3]
    assert success[1]["ci95"] == pytest.approx(list(t_ci95(np.array([0.4, 0.3]))))
    del seeds[1]["heldout"]["stages"][0]["success_rate"]
    assert "heldout_success_stages" not in learning.aggregate(seeds)


def test_eval_history_replaces_later_iterations(tmp_path):
    from metarl.runfolder import record_eval_history

    path = tmp_path / "history.jsonl"

    def summary(it, value):
        return {"iteration": it, "env_steps": 10 * it,
                "stages": [{"stage": 0, "adapt_episodes": 0, "mean_return": value, "ci95": [value, value]}]}

    for it, v in ((10, 1.0), (20, 2.0), (30, 3.0)):
        record_eval_history(path, summary(it, v))
    # a run resumed from iteration 15 evaluates again at 20: the lines of 20 and 30 are replaced
    record_eval_history(path, summary(20, 5.0))
    rows = read_eval_history(path)
    assert [(r["iteration"], r["stages"][0]["mean_return"]) for r in rows] == [(10, 1.0), (20, 5.0)]


def test_summary_gain_is_paired_over_tasks(tmp_path):
    """Stage k's gain is the mean over tasks of (return at k - return at stage 0), with a bootstrap CI of
    those per-task differences: here every task gains exactly 1 while the tasks' own returns spread by 100,
    so the gain's interval is [1, 1] although the two stages' intervals overlap almost entirely."""
    from metarl.evaluation import AdaptationResult, summarize
    from metarl.runfolder import record_eval_history
    from metarl.tasks import GoalTask

    pre = np.array([0.0, 100.0, 200.0, -100.0])
    returns = np.stack([pre, pre + 1.0, pre + np.array([3.0, 1.0, 2.0, 2.0])], axis=1)
    tasks = [GoalTask("PointNav2D", (0.1 * i, 0.0)) for i in range(4)]
    summary = summarize(AdaptationResult(tasks, returns, [0, 5, 10], [0.0, 50.0, 100.0]))
    stages = summary["stages"]
    assert "gain" not in stages[0]
    assert stages[1]["gain"] == pytest.approx(1.0) and stages[1]["gain_ci95"] == pytest.approx([1.0, 1.0])
    assert stages[2]["gain"] == pytest.approx(2.0)
    low, high = stages[2]["gain_ci95"]
    assert 1.0 <= low < 2.0 < high <= 3.0  # the per-task differences lie in [1, 3]
    low, high = stages[1]["ci95"]
    assert low < stages[0]["mean_return"] + 1.0 and high > stages[0]["ci95"][1]  # the stages' own CIs overlap
    # the held-out curve over training keeps the gain and its interval
    path = tmp_path / "history.jsonl"
    record_eval_history(path, {"iteration": 5, "env_steps": 50, **summary})
    row = read_eval_history(path)[0]
    assert row["stages"][2]["gain_ci95"] == pytest.approx(stages[2]["gain_ci95"])
    assert "gain" not in row["stages"][0] and "success_rate" not in row["stages"][0]  # this env reports none
    # where the env reports success (Meta-World), the curve keeps its rate and interval per stage
    success = summarize(AdaptationResult(tasks, returns, [0, 5, 10], [0.0, 50.0, 100.0],
                                         success=np.tile([0.0, 0.5, 1.0], (4, 1))))
    record_eval_history(path, {"iteration": 6, "env_steps": 60, **success})
    assert [s["success_rate"] for s in read_eval_history(path)[1]["stages"]] == [0.0, 0.5, 1.0]
    assert read_eval_history(path)[1]["stages"][1]["success_ci95"] == [0.5, 0.5]


def test_summary_by_env_hand_computed():
    """Tasks that name their env (Meta-World's ML10 and ML45) get a per-env line in the summary: count, mean
    return and success rate per stage over that env's tasks; one env only (ML1), or none named: no by_env."""
    import dataclasses

    from metarl.evaluation import AdaptationResult, summarize
    from metarl.tasks import GoalTask

    @dataclasses.dataclass(frozen=True)
    class Named:
        env_name: str
        goal: float

        def to_dict(self):
            return {"env_name": self.env_name, "goal": self.goal}

    tasks = [Named("push", 0.1), Named("door", 0.1), Named("push", 0.2), Named("push", 0.3)]
    returns = np.array([[1.0, 2.0], [10.0, 30.0], [3.0, 4.0], [5.0, 9.0]])
    success = np.array([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.5, 1.0]])
    summary = summarize(AdaptationResult(tasks, returns, [0, 10], [0.0, 5000.0], success=success))
    assert summary["by_env"] == [
        {"env": "door", "tasks": 1, "mean_return": [10.0, 30.0], "success_rate": [1.0, 1.0]},
        {"env": "push", "tasks": 3, "mean_return": [3.0, 5.0], "success_rate": [pytest.approx(0.5 / 3), pytest.approx(2 / 3)]}]
    assert "by_env" not in summarize(AdaptationResult(tasks[::2], returns[::2], [0, 10], [0.0, 5000.0]))
    twice = summarize(AdaptationResult(tasks * 2, np.vstack([returns, returns]), [0, 10], [0.0, 5000.0]))["by_env"]
    assert [(e["env"], e["tasks"], e["adaptations"]) for e in twice] == [("door", 1, 2), ("push", 3, 6)]  # --repeats 2
    # what `metarl eval` prints: success beside the return, then a line per env
    from metarl.cli import eval_table

    lines = eval_table(summary)
    assert "success  95% CI" in lines[0] and len(lines) == 1 + 2 + 2
    assert lines[2].split()[:4] == ["1", "10", "5000", "11.25"] and "75.0%" in lines[2]  # (2+30+4+9)/4, 3/4
    assert lines[3].split() == ["door", "1", "tasks", "return", "by", "stage", "10.0", "->", "30.0", "success",
                                "100%", "->", "100%"]
    assert lines[4].endswith("success 17% -> 67%")
    assert eval_table({"stages": summary["stages"], "by_env": twice})[3].split()[:5] == ["door", "1", "tasks", "x", "2"]
    plain_lines = eval_table(summarize(AdaptationResult(tasks, returns, [0, 10], [0.0, 5000.0])))
    assert "success" not in plain_lines[0] and len(plain_lines) == 1 + 2 + 2 and plain_lines[1].endswith("]")
    plain = [GoalTask("PointNav2D", (0.1 * i, 0.0)) for i in range(4)]
    assert "by_env" not in summarize(AdaptationResult(plain, returns, [0, 10], [0.0, 5000.0]))


def test_maml_ablation_variants_and_table(tmp_path, monkeypatch):
    """Every ablation variant is a valid config that differs from the shipped one in exactly what its row
    says, and a row reads the gain, its paired CI and the share of stage 0 out of a learning result."""
    import importlib.util

    from metarl.config import load_config

    spec = importlib.util.spec_from_file_location("maml_ablation", ROOT / "experiments" / "benchmarks" / "maml_ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    shipped = load_config(str(ablation.CONFIG), []).agent
    for name, (_, overrides) in ablation.VARIANTS.items():
        agent = load_config(str(ablation.CONFIG), overrides).agent
        changed = {k for k in vars(shipped) if getattr(agent, k) != getattr(shipped, k)}
        assert changed == {o.split("=")[0].split(".")[1] for o in overrides}, name
    assert load_config(str(ablation.CONFIG), ablation.VARIANTS["l2l_no_action_scale"][1]).agent.action_scale == 1.0

    monkeypatch.setattr(ablation, "OUT", tmp_path)
    stages = [{"stage": 0, "mean_return": -40.0, "ci95": [-44.0, -36.0]},
              {"stage": 1, "mean_return": -18.0, "ci95": [-21.0, -15.0], "gain": 22.0, "gain_ci95": [19.5, 24.5]},
              {"stage": 2, "mean_return": -12.0, "ci95": [-15.0, -9.0], "gain": 28.0, "gain_ci95": [25.0, 31.0]}]
    curve = [{"iteration": 50, "stages": [{"mean_return": -40.0}, {"mean_return": -20.0}]},
             {"iteration": 100, "stages": [{"mean_return": -40.0}, {"mean_return": -30.0}]}]
    (tmp_path / "mean_150.json").write_text(json.dumps(
        {"heldout": {"stages": stages}, "heldout_curve": curve, "env_steps": 12.34e6}))
    # positive returns (a family like AntDir): the share is still the gain over |stage 0|
    (tmp_path / "tasks_40_150.json").write_text(json.dumps({"heldout": {"stages": [
        {"stage": 0, "mean_return": 200.0}, {"stage": 1, "mean_return": 250.0, "gain": 50.0, "gain_ci95": [40.0, 60.0]}]},
        "heldout_curve": [], "env_steps": 1e6}))
    table = ablation.table()
    assert table.count("\n") == 4  # header, rule, two rows: variants without a file are left out
    rows = table.splitlines()[2:]
    assert "| -40.0 | **-18.0** | +22.0 [+19.5, +24.5] (55%) | 50% / 25% | -12.0 | 12.3M |" in rows[0]
    assert "| 200.0 | **250.0** | +50.0 [+40.0, +60.0] (25%) | – / – | 250.0 | 1.0M |" in rows[1]


def test_metaworld_by_env_gathers_seeds_per_env(tmp_path):
    """experiments/benchmarks/metaworld_by_env.py: per env and stage, the mean over seeds of each seed's per-env
    success and return, with each seed's value; refused in one line where a seed's evaluation is missing or its
    envs differ."""
    script = ROOT / "experiments" / "benchmarks" / "metaworld_by_env.py"

    def by_env(*argv):
        return subprocess.run([sys.executable, str(script), *argv], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
    tasks = [{"type": "MetaWorldTask", "env_name": n, "rand_vec": [float(i)]} for i, n in enumerate("aabb")]

    def run(name, returns, success, task_list=tasks):
        folder = tmp_path / name / "eval" / "test"
        folder.mkdir(parents=True)
        stages = [{"stage": k, "adapt_episodes": 10 * k, "per_task": [r[k] for r in returns],
                   "per_task_success": [s[k] for s in success]} for k in range(2)]
        (folder / "summary.json").write_text(json.dumps({"family": "ML10", "tasks": task_list, "stages": stages,
                                                         "num_tasks": len(task_list)}))
        return str(tmp_path / name)

    # seed 0: env a succeeds 0 -> 1 on both tasks, env b 0 -> 0; seed 1: a 0.5 -> 1, b 0 -> 0.5
    s0 = run("s0", [[1, 3], [3, 5], [0, 0], [2, 2]], [[0, 1], [0, 1], [0, 0], [0, 0]])
    s1 = run("s1", [[2, 2], [2, 2], [4, 4], [4, 8]], [[1, 1], [0, 1], [0, 0], [0, 1]])
    out = tmp_path / "by_env.json"
    done = by_env(s0, s1, "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    a, b = result["by_env"]
    assert (a["env"], a["tasks_per_seed"], b["env"]) == ("a", [2, 2], "b")
    assert a["success_rate"] == [0.25, 1.0] and a["success_rate_per_seed"] == [[0.0, 1.0], [0.5, 1.0]]
    assert b["success_rate"] == [0.0, 0.25] and b["mean_return"] == [2.5, 3.5]  # seed 0: 1, 1; seed 1: 4, 6
    check(result, str(out))
    assert "25.0% -> 100.0%" in done.stdout  # env a, printed
    # refused, naming what is wrong
    other = run("other", [[1, 3], [3, 5], [0, 0], [2, 2]], [[0, 1]] * 4,
                [{**t, "env_name": "c" if t["env_name"] == "b" else "a"} for t in tasks])
    for argv, says in (([s0, str(tmp_path / "none")], "no evaluation on the test split"),
                       ([s0, other], "the runs' evaluations differ")):
        refused = by_env(*argv, "--out", str(tmp_path / "x.json"))
        assert refused.returncode != 0 and says in refused.stderr and not (tmp_path / "x.json").exists()
