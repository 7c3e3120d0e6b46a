"""Bringing your own env: the recipe of docs/custom-envs.md without traps, and a family defined in a user's own file
(outside the repository) run from the shell through ``metarl check``, ``train``, ``eval --video`` and ``bench``."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import yaml

import metarl
from metarl.tasks import GoalTask, Task, TaskError, TaskFamily

# A tiny family of the kind a user writes: a point on a line that must reach a per-task goal. Its base env
# keeps its own ``_task`` attribute (the name TaskFamily once used for its current task), reports a reward
# term and ``info["success"]``, and renders (so ``eval --video`` works on it). Written into a temporary
# folder by the end-to-end test; imported from there by the unit tests.
LINE_GOAL = '''
"""A user's own task family: a point on a line, a goal per task."""
import dataclasses

import gymnasium as gym
import numpy as np

import metarl


@dataclasses.dataclass(frozen=True)
class LineGoalTask(metarl.Task):
    goal: float


class LineBase(gym.Env):
    """An env written without metarl in mind: its own ``_task`` holds its speed."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode=None):
        self.observation_space = gym.spaces.Box(-5.0, 5.0, (1,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.render_mode = render_mode
        self._task = {"speed": 0.5}
        self.goal, self.x = 0.0, 0.0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = float(self.np_random.uniform(-0.05, 0.05))
        return np.array([self.x], np.float32), {}

    def step(self, action):
        self.x = float(np.clip(self.x + self._task["speed"] * float(action[0]), -5.0, 5.0))
        dist = abs(self.x - self.goal)
        return np.array([self.x], np.float32), -dist, False, False, {"reward_dist": -dist, "success": dist < 0.2}

    def render(self):
        frame = np.zeros((24, 48, 3), np.uint8)
        frame[:, int(np.clip((self.x + 2.0) / 4.0 * 47, 0, 47))] = 255
        return frame


class LineGoal(metarl.TaskFamily, LineBase):
    family = "LineGoal"
    task_type = LineGoalTask
    horizon = 10
    n_heldout = 6

    def __init__(self, render_mode=None):
        super().__init__(render_mode=render_mode)
        self.set_task(self.default_task())

    def default_task(self):
        return LineGoalTask(self.family, 0.5)

    def _draw_tasks(self, rng, n, split):
        low, high = (-1.0, 1.0) if split == "train" else (1.0, 2.0)
        return [LineGoalTask(self.family, float(g)) for g in rng.uniform(low, high, size=n)]

    def _validate_task(self, task):
        if abs(task.goal) > 3.0:
            raise metarl.TaskError(f"{self.family}: goal must be within [-3, 3], got {task.goal}")

    def _apply_task(self, task):
        self.goal = task.goal


if "me/LineGoal-v0" not in gym.registry:
    gym.register("me/LineGoal-v0", entry_point=LineGoal, max_episode_steps=LineGoal.horizon)
'''


@pytest.fixture(scope="module")
def line_goal(tmp_path_factory):
    """The user's module, imported from a folder outside the repository."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "line_goal_unit.py").write_text(LINE_GOAL)
    sys.path.append(str(folder))
    try:
        yield importlib.import_module("line_goal_unit")
    finally:
        sys.path.remove(str(folder))


# ---- reserved names ----------------------------------------------------------------------------------------
def test_a_family_keeps_its_own_task_attribute(line_goal):
    """TaskFamily used to keep its current task in ``self._task`` and silently overwrote the env's own
    attribute of that name (then ``step`` failed with "'LineGoalTask' object is not subscriptable")."""
    env = gym.make("me/LineGoal-v0")
    family = metarl.family_of(env)
    assert family._task == {"speed": 0.5}
    family.set_task(line_goal.LineGoalTask("LineGoal", -0.7))
    assert family.task == line_goal.LineGoalTask("LineGoal", -0.7) and family._task == {"speed": 0.5}
    env.reset(seed=0)
    obs, reward, *_ = env.step(np.array([1.0], np.float32))
    assert abs(float(obs[0]) - 0.5) < 0.06 and reward < -1.0


def test_assigning_a_non_task_to_the_reserved_task_attribute_names_it():
    class Env(TaskFamily, gym.Env):
        family, task_type, horizon = "Reserved", GoalTask, 5

        def __init__(self):
            self.task = "reach"  # the user's own meaning of `task`

    with pytest.raises(TaskError, match="'task' is TaskFamily's"):
        Env()


# ---- the task registry -------------------------------------------------------------------------------------
def test_a_second_task_class_under_a_taken_name_is_refused():
    """A user class named like a built-in one silently replaced it in Task.from_dict (PointNav2D's tasks then
    failed to load)."""
    with pytest.raises(TaskError, match="'GoalTask' is taken by metarl.tasks.GoalTask"):
        @dataclasses.dataclass(frozen=True)
        class GoalTask(Task):  # noqa: F811
            target: float
    task = metarl.GoalTask("PointNav2D", (0.1, 0.2))
    assert Task.from_dict(task.to_dict()) == task


def test_the_same_task_class_imported_again_is_accepted(tmp_path, monkeypatch):
    """Running the same definition again (a module reloaded, or imported anew) is no collision; the first
    class stays the one Task.from_dict builds, as the first registration of a Gymnasium id stays."""
    (tmp_path / "reloaded_task.py").write_text(
        "import dataclasses, metarl\n\n@dataclasses.dataclass(frozen=True)\n"
        "class ReloadedTask(metarl.Task):\n    goal: float\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = importlib.import_module("reloaded_task")
    original = first.ReloadedTask
    importlib.reload(first)
    assert first.ReloadedTask is not original
    data = first.ReloadedTask("Mine", 0.3).to_dict()
    assert type(Task.from_dict(data)) is original and Task.from_dict(data).to_dict() == data


# ---- given task lists --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ListedTask(Task):
    index: float


class Listed(TaskFamily, gym.Env):
    """A family whose tasks are given lists (as Meta-World's 50 train and 50 test goals are)."""

    family, task_type, horizon, has_ood = "Listed", ListedTask, 5, False
    TRAIN = [ListedTask("Listed", float(i)) for i in range(7)]
    TEST = [ListedTask("Listed", float(100 + i)) for i in range(4)]

    def __init__(self):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.set_task(self.TRAIN[0])

    def default_task(self):
        return self.TRAIN[0]

    def _task_list(self, split):
        return {"train": self.TRAIN, "test": self.TEST}.get(split)

    def _apply_task(self, task):
        pass


def test_a_family_of_given_task_lists_needs_only_the_hook():
    fam = Listed()
    assert fam.sample_tasks(4, "test") == Listed.TEST and fam.heldout_tasks("test") == tuple(Listed.TEST)
    with pytest.raises(TaskError, match="fixed list of 4 tasks"):
        fam.sample_tasks(5, "test")
    draws = fam.sample_tasks(7, "train", seed=3)
    assert sorted(draws, key=lambda t: t.index) == Listed.TRAIN  # a permutation while the list lasts
    assert draws == fam.sample_tasks(7, "train", seed=3) and draws != fam.sample_tasks(7, "train", seed=4)
    many = fam.sample_tasks(20, "train", seed=0)
    assert set(many) == set(Listed.TRAIN) and max(many.count(t) for t in Listed.TRAIN) == 3
    with pytest.raises(TaskError, match="no 'ood' split"):
        fam.sample_tasks(1, "ood")
    Listed.has_ood = True  # declared, but neither drawn nor listed: one clear error
    try:
        with pytest.raises(TaskError, match="Listed has no 'ood' tasks to draw"):
            Listed().sample_tasks(1, "ood")
    finally:
        Listed.has_ood = False


def test_given_lists_that_overlap_are_refused_unless_declared():
    class Overlapping(Listed):
        TEST = [*Listed.TEST, Listed.TRAIN[2]]

    with pytest.raises(TaskError, match="train list holds 1 task of the test list"):
        Overlapping().sample_tasks(2, "train", seed=0)
    Overlapping.disjoint_heldout = False
    assert len(Overlapping().sample_tasks(2, "train", seed=0)) == 2


# ---- metarl check ------------------------------------------------------------------------------------------
def _register(line_goal, name, **attrs):
    """A variant of the user's family, registered as me/<name>-v0 (and picklable, as the checks need)."""
    cls = type(name, (line_goal.LineGoal,), attrs)
    cls.__module__ = line_goal.__name__
    setattr(line_goal, name, cls)
    if f"me/{name}-v0" not in gym.registry:
        gym.register(f"me/{name}-v0", entry_point=cls, max_episode_steps=cls.horizon)
    return f"me/{name}-v0"


def test_check_passes_the_user_family(line_goal):
    from metarl.checks import check_family

    passed = check_family("me/LineGoal-v0")
    assert "two different tasks give different observations or rewards" in passed


def test_check_fails_a_family_whose_tasks_change_nothing(line_goal):
    """A family whose _apply_task changes nothing passed every check."""
    from metarl.checks import FamilyCheckError, check_family

    gid = _register(line_goal, "LineInert", _apply_task=lambda self, task: None)
    with pytest.raises(FamilyCheckError, match="the same observations and rewards"):
        check_family(gid)


def test_check_can_skip_the_sb3_checker_for_a_compute_reward_env(line_goal, capsys):
    """SB3's checker takes any env with a compute_reward method for a GoalEnv; `--skip sb3` leaves it out."""
    from metarl.checks import FamilyCheckError, check_family
    from metarl.cli import main

    gid = _register(line_goal, "LineWithComputeReward", compute_reward=lambda self, achieved, desired, info: 0.0)
    with pytest.raises(FamilyCheckError, match="--skip sb3"):
        check_family(gid)
    passed = check_family(gid, skip=("sb3",))
    assert "gymnasium env checker" in passed and "stable-baselines3 env checker" not in passed
    assert main(["check", gid, "--skip", "sb3"]) == 0
    out = capsys.readouterr().out
    assert "skipped stable-baselines3 env checker" in out and "checks passed" in out
    assert main(["check", gid, "--skip", "nonsense"]) == 2
    assert "--skip: unknown check 'nonsense'" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(metarl.FAMILIES))
def test_every_builtin_family_passes_every_check(name):
    from metarl.checks import SKIPPABLE, check_family

    passed = check_family(metarl.env_id(name), steps=20)
    assert {SKIPPABLE["sb3"], SKIPPABLE["gymnasium"], SKIPPABLE["task-effect"]} <= set(passed)


# ---- files named relative to the file that names them ------------------------------------------------------
def test_shipped_suites_and_configs_work_from_any_folder(tmp_path, monkeypatch):
    """`metarl bench experiments/benchmarks/smoke.yaml` from another folder failed: the default config was
    looked up relative to the working directory (and under a mis-cased name)."""
    from metarl.bench import load_suite
    from metarl.config import load_config, shipped

    suite_file = shipped() / "benchmarks" / "smoke.yaml"
    monkeypatch.chdir(tmp_path)
    suite = load_suite(str(suite_file))
    meta = [c for c in suite.cells if c.method == "maml_trpo"]
    assert meta and meta[0].resolved["agent"]["name"] == "maml_trpo"
    assert load_suite("experiments/benchmarks/smoke.yaml").cells == suite.cells  # the shipped one, by name
    assert load_config("experiments/maml_trpo/point_nav_2d.yaml").env == "PointNav2D"


def test_a_suite_finds_its_configs_and_modules_beside_itself(tmp_path, monkeypatch):
    proj, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    proj.mkdir()
    elsewhere.mkdir()
    (proj / "line_goal_beside.py").write_text(LINE_GOAL.replace("LineGoalTask", "BesideTask")
                                              .replace("me/LineGoal-v0", "me/Beside-v0"))
    (proj / "maml.yaml").write_text(yaml.safe_dump({**MAML_CONFIG, "env": "line_goal_beside:me/Beside-v0"}))
    (proj / "suite.yaml").write_text(yaml.safe_dump({
        "imports": ["line_goal_beside"], "families": {"me/Beside-v0": {}},
        "eval": {"tasks": 2, "steps": 1, "episodes": 2}, "methods": {"maml_trpo": {"config": "maml.yaml"}}}))
    monkeypatch.chdir(elsewhere)
    from metarl.bench import cell_dir, load_suite

    suite = load_suite(str(proj / "suite.yaml"), out=tmp_path / "out")
    (cell,) = suite.cells
    assert cell.resolved["imports"] == [str((proj / "line_goal_beside.py").resolve())]
    assert cell_dir(suite, cell).parent.parent.name.startswith("me_Beside-v0-")


def test_a_module_beside_a_config_in_a_package_folder_is_imported_under_its_own_name(tmp_path, monkeypatch):
    """`env: module:Id` makes Gymnasium import `module`: found beside the config, it must be importable under
    that very name, even where the folder is a package (as experiments/custom_env is)."""
    from metarl.config import load_config
    from metarl.plugins import load

    folder = tmp_path / "pkg" / "families"
    folder.mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (folder / "__init__.py").write_text("")
    (folder / "pkg_line.py").write_text(LINE_GOAL.replace("LineGoalTask", "PkgTask").replace("me/LineGoal-v0",
                                                                                             "me/PkgLine-v0"))
    (folder / "c.yaml").write_text(yaml.safe_dump({**MAML_CONFIG, "env": "pkg_line:me/PkgLine-v0"}))
    monkeypatch.chdir(tmp_path.parent)
    config = load_config(folder / "c.yaml")
    assert config.imports == (str(folder / "pkg_line.py"),) and load(config.imports) == ["pkg_line"]
    assert metarl.family_of(metarl.make_family(config.env)).family == "LineGoal"


def test_a_namespaced_id_gets_safe_file_names_and_cells_written_before_are_kept(line_goal, tmp_path):
    """`metarl bench` crashed on a namespaced id (curves_holdout/.PendulumML-v0.png.tmp.png); a cell finished
    under the former folder (cells/me/LineGoal-v0/...) is still found, not run again."""
    from metarl.bench import cell_dir, file_name, load_suite, run_suite

    assert file_name("PointNav2D") == "PointNav2D" and file_name("me/LineGoal-v0") != file_name("me_LineGoal-v0")
    assert file_name("mod:me/X-v0").startswith("mod_me_X-v0-") and file_name("..").startswith("_-")
    suite = load_suite(None, data={"families": {"me/LineGoal-v0": {}}, "methods": {"random": {}},
                                   "eval": {"tasks": 2, "steps": 1, "episodes": 2}}, out=tmp_path / "out")
    run_suite(suite, log=lambda m: None)
    (cell,) = suite.cells
    assert cell_dir(suite, cell).parent.parent.name.startswith("me_LineGoal-v0-")
    assert len(list((tmp_path / "out").glob("curves_me_LineGoal-v0-*.png"))) == 1
    legacy = tmp_path / "out" / "cells" / "me" / "LineGoal-v0"
    legacy.parent.mkdir(parents=True)
    cell_dir(suite, cell).parent.parent.rename(legacy)
    assert cell_dir(suite, cell) == legacy / "random" / "seed0" and (cell_dir(suite, cell) / "cell.json").is_file()


def test_a_meta_learner_without_a_config_for_a_users_family_is_one_clear_line(line_goal):
    from metarl.bench import load_suite
    from metarl.config import ConfigError

    with pytest.raises(ConfigError, match=r"methods.rl2.config: metarl ships no rl2 config for 'me/LineGoal-v0' "
                                          r"\(in .*experiments/rl2\); name one"):
        load_suite(None, data={"families": {"me/LineGoal-v0": {}}, "methods": {"rl2": {}}, "eval": {"tasks": 2}})


def test_a_module_not_found_is_one_clear_line(tmp_path, capsys):
    from metarl.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**MAML_CONFIG, "env": "no_such_module_here:me/X-v0"}))
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "env: cannot find module 'no_such_module_here'" in err
    assert main(["check", "x", "--import", "no_such_file.py"]) == 2
    assert "--import no_such_file.py: 'no_such_file.py': no such .py file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_rollout_and_check_take_import(tmp_path, capsys):
    """--import FILE on the command line registers the family for a command that names it by its plain id."""
    from metarl.cli import main

    (tmp_path / "line_goal_cli.py").write_text(LINE_GOAL.replace("LineGoalTask", "CliTask")
                                               .replace("me/LineGoal-v0", "me/CliLine-v0"))
    assert main(["rollout", "me/CliLine-v0", "--import", str(tmp_path / "line_goal_cli.py"), "--episodes", "2"]) == 0
    assert "random-policy return" in capsys.readouterr().out
    assert main(["check", "me/CliLine-v0", "--import", "line_goal_cli"]) == 0  # now importable by name
    assert "checks passed" in capsys.readouterr().out


# ---- the end-to-end test -----------------------------------------------------------------------------------
MAML_CONFIG = {
    "experiment": "line_goal/maml", "env": "line_goal:me/LineGoal-v0", "seed": 0, "iterations": 2,
    "agent": {"name": "maml_trpo", "tasks_per_batch": 3, "episodes_per_task": 2, "hidden": [8]},
    "sampler": {"backend": "auto", "workers": 1},  # one worker process, which must import the module too
    "eval": {"every": 0, "split": "test", "tasks": 2, "steps": 1, "episodes": 2},
}


def _metarl(*args, cwd) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "metarl"
    done = subprocess.run([str(script), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"metarl {' '.join(map(str, args))}:\n{done.stdout}\n{done.stderr}"
    return done


def test_a_family_in_a_users_own_file_runs_through_every_command(tmp_path):
    """A family in a file outside the repository, from the shell, with no script of the user's: check,
    train (a sampler worker process), eval --video and bench (a namespaced id), each from another folder."""
    proj, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    proj.mkdir()
    elsewhere.mkdir()
    (proj / "line_goal.py").write_text(LINE_GOAL)
    (proj / "maml.yaml").write_text(yaml.safe_dump(MAML_CONFIG))
    (proj / "suite.yaml").write_text(yaml.safe_dump({
        "imports": ["line_goal.py"], "families": {"me/LineGoal-v0": {}},
        "eval": {"tasks": 2, "steps": 1, "episodes": 2},
        "methods": {"maml_trpo": {"config": "maml.yaml"}, "random": {}}}))

    done = _metarl("check", "line_goal:me/LineGoal-v0", cwd=proj)  # the module in the current folder
    assert "checks passed" in done.stdout

    run = tmp_path / "run"
    _metarl("train", proj / "maml.yaml", "--run-dir", run, "--quiet", cwd=elsewhere)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["imports"] == [str((proj / "line_goal.py").resolve())]  # so eval finds it from anywhere
    summary = json.loads((run / "eval" / "test" / "summary.json").read_text())
    assert summary["family"] == "LineGoal" and len(summary["stages"]) == 2
    for stage in summary["stages"]:  # the episode metrics of a user's env, with no help from the agent
        assert 0 <= stage["success_rate"] <= 1 and set(stage["reward_terms"]) == {"reward_dist"}
        assert stage["reward_terms"]["reward_dist"] == pytest.approx(stage["mean_return"], abs=1e-3)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"meta/success_rate_stage0", "meta/success_rate_stage1", "meta/reward_dist_stage1"} <= set(rows[-1])
    for row in rows:  # stage 0: the episodes before MAML's inner step, stage 1: after it
        assert row["meta/reward_dist_stage0"] == pytest.approx(row["meta/return_pre_adaptation"], abs=1e-3)
        assert row["meta/reward_dist_stage1"] == pytest.approx(row["meta/return_post_adaptation"], abs=1e-3)

    _metarl("eval", run, "--video", "--video-size", "48x24", cwd=tmp_path)
    assert (run / "eval" / "test" / "video" / "task0_before_after.gif").stat().st_size > 100

    out = tmp_path / "bench"
    _metarl("bench", proj / "suite.yaml", "--out", out, "--quiet", cwd=elsewhere)
    report = (out / "report.md").read_text()
    assert "## me/LineGoal-v0" in report
    assert re.search(r"\| maml_trpo \| [01]\.\d\d \| [01]\.\d\d \[", report.split("Success rate")[1])
    assert len(list(out.glob("curves_me_LineGoal-v0-*.png"))) == 1


# ---- episode metrics: success and reward terms --------------------------------------------------------------
class _Push:
    """An actor that always pushes right (+1 on every action dimension)."""

    def __init__(self, act_dim: int = 1):
        self.act_dim = act_dim

    def start(self, task_indices, slots):
        pass

    def act(self, obs):
        return np.ones((*np.asarray(obs).shape[:2], self.act_dim), np.float32)


@pytest.mark.parametrize("workers", [0, 1])
def test_the_sampler_records_success_and_reward_terms_per_episode(line_goal, workers):
    """The goal at 0.5 is reached (x moves 0.5 a step), the one at -2.5 never: success is per episode, any step."""
    from metarl.sampling import Sampler

    tasks = [line_goal.LineGoalTask("LineGoal", 0.5), line_goal.LineGoalTask("LineGoal", -2.5)]
    with Sampler("me/LineGoal-v0", workers=workers) as sampler, sampler.recording() as calls:
        batch = sampler.sample(_Push(), tasks, 3, seed=0)
    assert batch.success.tolist() == [[True] * 3, [False] * 3]
    assert _close(batch.reward_terms["reward_dist"], batch.returns)
    (call,) = calls
    assert call.episodes_per_trial == 1 and call.success.tolist() == batch.success.tolist()


def _close(a, b) -> bool:
    return bool(np.allclose(np.asarray(a), np.asarray(b), atol=1e-4))


def test_a_family_without_success_reports_none():
    from metarl.sampling import Sampler

    for backend in ("gymnasium", "native"):
        with Sampler("metarl/HalfCheetahVel-v0", workers=0, backend=backend) as sampler:
            fam = sampler.family
            batch = sampler.sample(_Push(6), fam.sample_tasks(1, "test"), 1, seed=0)
        assert batch.success is None and set(batch.reward_terms) == {"reward_velocity", "reward_ctrl"}


def _record(K, returns, success, dist):
    from metarl.sampling import SampleRecord

    return SampleRecord(K, np.asarray(returns, float), None if success is None else np.asarray(success, bool),
                        {"reward_dist": np.asarray(dist, float)})


def test_stage_metrics_follow_the_stages_of_the_sampler_calls():
    """Two tasks, two stages: MAML samples one call per stage, RL² one call of 2-episode trials (episode
    m * 2 + k of a task is stage k of trial m); both give the same per-stage means, computed by hand."""
    from metarl.evaluation import episode_scalars, stage_metrics

    maml = [_record(1, [[1, 3], [5, 7]], [[1, 0], [0, 0]], [[1, 3], [5, 7]]),
            _record(1, [[2, 4], [6, 8]], [[1, 1], [1, 0]], [[2, 4], [6, 8]])]
    rl2 = [_record(2, [[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 1, 0, 1], [0, 1, 0, 0]], [[1, 2, 3, 4], [5, 6, 7, 8]])]
    returns = np.array([[2.0, 3.0], [6.0, 7.0]])
    for calls in (maml, rl2):
        success, terms = stage_metrics(calls, 2, returns)
        assert success.tolist() == [[0.5, 1.0], [0.0, 0.5]] and terms["reward_dist"].tolist() == returns.tolist()
    assert stage_metrics(maml, 3) is None and stage_metrics(maml, 2, returns + 1) is None
    assert episode_scalars(rl2) == {"meta/success_rate_stage0": 0.25, "meta/success_rate_stage1": 0.75,
                                    "meta/reward_dist_stage0": 4.0, "meta/reward_dist_stage1": 5.0}


def test_summary_has_success_rates_with_intervals_and_reward_terms(tmp_path):
    from metarl.evaluation import AdaptationResult, write_summary

    tasks = [GoalTask("PointNav2D", (0.0, float(i))) for i in range(4)]
    result = AdaptationResult(tasks, np.array([[1.0, 2.0]] * 4), [0, 2], [0.0, 20.0],
                              success=np.array([[0.0, 1.0], [0.0, 0.5], [0.5, 1.0], [0.0, 1.0]]),
                              reward_terms={"reward_goal": np.array([[1.0, 2.0]] * 4)})
    summary = write_summary(result, tmp_path)
    first, last = summary["stages"]
    assert first["success_rate"] == 0.125 and last["success_rate"] == 0.875
    assert last["success_ci95"][0] <= 0.875 <= last["success_ci95"][1] and last["per_task_success"] == [1.0, 0.5, 1.0, 1.0]
    assert last["reward_terms"] == {"reward_goal": 2.0}
    header, row0, _ = (tmp_path / "summary.csv").read_text().splitlines()
    assert header.endswith("success_rate,success_ci95_low,success_ci95_high,reward_goal") and ",0.125," in row0
    assert (tmp_path / "per_task.csv").read_text().splitlines()[0].endswith("success_stage0,success_stage1")


def test_a_baseline_reports_success_and_reward_terms(line_goal):
    from metarl.agents.sb3_baselines import BaselineSpec, run_baseline

    tasks = [line_goal.LineGoalTask("LineGoal", 0.1), line_goal.LineGoalTask("LineGoal", -2.9)]
    result, _ = run_baseline(BaselineSpec("random", "none"), "me/LineGoal-v0", {}, tasks, 1, 3, seed=0, log=lambda m: None)
    assert result.success.shape == (2, 2) and result.success[1].tolist() == [0.0, 0.0] and result.success[0, 0] > 0
    assert np.allclose(result.reward_terms["reward_dist"], result.returns)


# ---- bad input: one clear line, nothing written ----------------------------------------------------------------
@pytest.mark.parametrize("source, message", [
    ("import dataclasses, metarl\n@dataclasses.dataclass(frozen=True)\nclass GoalTask(metarl.Task):\n    x: float\n",
     "cannot import .*bad_family_{i}(.py)?': task type name 'GoalTask' is taken by metarl.tasks.GoalTask"),
    ("x = 1\n", "importing 'bad_family_{i}' registered no Gymnasium id 'me/Nothing-v0'"),
    ("def broken(:\n", "cannot import .*bad_family_{i}(.py)?': .*bad_family_{i}.py:1: invalid syntax"),
])
def test_a_bad_user_module_is_one_clear_line_and_nothing_is_written(tmp_path, monkeypatch, capsys, source, message):
    from metarl.cli import main

    i = len(source)  # a module name of its own per case (a module that failed to import is not cached)
    (tmp_path / f"bad_family_{i}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**MAML_CONFIG, "env": f"bad_family_{i}:me/Nothing-v0"}))
    for argv in (["train", str(config), "--run-dir", str(tmp_path / "run")], ["check", f"bad_family_{i}:me/Nothing-v0"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message.format(i=i), err), err
    assert not (tmp_path / "run").exists()


def test_rl2_training_metrics_per_episode_of_the_trial(line_goal, tmp_path):
    """RL²'s stage k in training is episode k of its trials: the reward term of each equals its return."""
    from metarl.cli import main

    run = tmp_path / "run"
    assert main(["train", "experiments/rl2/point_nav_2d.yaml", "env=me/LineGoal-v0", "iterations=2",
                 "agent.tasks_per_batch=2", "agent.hidden_size=8", "sampler.workers=0", "eval.tasks=2",
                 "eval.steps=1", "eval.episodes=2", "eval.every=0", "--run-dir", str(run), "--quiet"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for k in (0, 1):
            assert row[f"meta/reward_dist_stage{k}"] == pytest.approx(row[f"meta/return_episode{k}"], abs=1e-3)
        assert 0 <= row["meta/success_rate_stage1"] <= 1
    stages = json.loads((run / "eval" / "test" / "summary.json").read_text())["stages"]
    assert [set(s["reward_terms"]) for s in stages] == [{"reward_dist"}] * 2 and "success_ci95" in stages[1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"meta/success_rate_stage1", "meta/reward_dist_stage0", "eval/test/success_rate_stage1",
            "eval/test/reward_dist_stage0"} <= tags
    (last,) = events.Scalars("eval/test/success_rate_stage1")
    assert last.value == pytest.approx(stages[1]["success_rate"])


@pytest.mark.skipif(importlib.util.find_spec("metaworld") is not None, reason="the base install, without the extra")
def test_a_metaworld_family_without_the_extra_is_one_clear_line(capsys):
    """Meta-World's families are registered only with the extra; without it, their names say what to install."""
    from metarl.cli import main

    for name in ("ML1-reach-v3", "metarl/ML10-v0"):
        with pytest.raises(TaskError, match=r'Meta-World family: install the extra, pip install -e "\.\[metaworld\]" in a '
                                            r'clone of metarl \(a wheel or the index: "metarl-robotics\[metaworld\]"\)'):
            metarl.make_family(name)
    assert main(["check", "ML1-push-v3"]) == 2
    assert 'pip install -e ".[metaworld]" in a clone of metarl (a wheel or the index: "metarl-robotics[metaworld]")' in capsys.readouterr().err


@pytest.mark.parametrize("name, says", [("ML20", "is not a Meta-World family of metarl: it has ML1-<env>"),
                                        ("ML1-rech-v3", "unknown Meta-World v3 env 'rech-v3' in 'ML1-rech-v3'; "
                                                        "nearest: reach-v3")])
def test_metarl_check_of_a_metaworld_like_name_that_does_not_exist_names_metaworld(name, says, capsys):
    """`metarl check` gives the same line as `make_family` for a name shaped like Meta-World's, not Gymnasium's."""
    from metarl.cli import main

    with pytest.raises(TaskError) as err:
        metarl.make_family(name)
    assert says in str(err.value)
    assert main(["check", name]) == 2
    err_out = capsys.readouterr().err
    assert says in err_out and "unknown Gymnasium id" not in err_out and len(err_out.strip().splitlines()) == 1
