"""Meta-World's ML1, ML10 and ML45 as metarl task families (envs/meta_world.py; the ``metaworld`` extra).

Run in the extra's venv (scripts/test_metaworld.sh makes ``.venv-metaworld``: metaworld 3.1.1, which pins
mujoco 3.3.0); the base venv skips this file. What is pinned here:

* the families' tasks are Meta-World's own train and test lists (``metaworld.ML1(env, seed)``,
  ``metaworld.ML10(seed)``), seeded, fixed, disjoint; ML10's test envs are not its train envs;
* every v3 env observes 39 values and acts with 4 (so one family can switch envs), steps end at 500;
* a task changes the goal (rewards) and, in ML10, the env; episodes are a function of task and actions;
* bad tasks (a task whose reset would never end among them) are one clear line and leave the current task in place;
* ``metarl check`` passes with no ``--skip``; the gymnasium sampler backend records ``info["success"]``, the
  native one refuses in one line and ``auto`` picks gymnasium; a real ``metarl train`` run reports success
  rates per stage in summary.json.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

metaworld = pytest.importorskip("metaworld")

import metarl  # noqa: E402
from metarl.checks import check_family  # noqa: E402
from metarl.envs.meta_world import ENV_NAMES, MetaWorldTask, benchmark_tasks, family_ids  # noqa: E402
from metarl.sampling import Sampler  # noqa: E402
from metarl.tasks import Task, TaskError  # noqa: E402

REACH = "metarl/ML1-reach-v3-v0"


@pytest.fixture(scope="module")
def reach():
    env = metarl.make_family("ML1-reach-v3")
    yield env, metarl.family_of(env)
    env.close()


@pytest.fixture(scope="module")
def ml10():
    env = metarl.make_family("ML10")
    yield env, metarl.family_of(env)
    env.close()


def _episode(env, actions, seed=0):
    obs, _ = env.reset(seed=seed)
    seen, rewards, success, truncated = [obs], [], [], False
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        seen.append(obs)
        rewards.append(reward)
        success.append(info["success"])
        if terminated or truncated:
            break
    return np.stack(seen), np.array(rewards), np.array(success), truncated


def _actions(n, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 4)).astype(np.float32)


# ---- what is registered -----------------------------------------------------------------------------------
def test_the_families_cover_metaworlds_v3_envs_and_are_registered():
    assert ENV_NAMES == tuple(metaworld.ML1.ENV_NAMES)
    assert set(family_ids().values()) <= set(gym.registry)
    assert metarl.resolve_id("ML1-push-v3") == "metarl/ML1-push-v3-v0" and metarl.resolve_id("ML10") == "metarl/ML10-v0"
    assert gym.registry[REACH].max_episode_steps == 500  # Meta-World's max_path_length


def test_every_v3_env_observes_39_values_and_acts_with_4():
    """The fact that lets one family switch envs (ML10), and the rand_vec padding of task features."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    spaces = set()
    for name in ENV_NAMES:
        env = ALL_V3_ENVIRONMENTS[name]()
        obs, act = env.observation_space, env.action_space
        spaces.add((obs.shape, act.shape, obs.low.tobytes(), obs.high.tobytes(), act.low.tobytes(), act.high.tobytes()))
        assert env._random_reset_space.low.size <= 12, name
        env.close()
    (only,) = spaces
    assert only[:2] == ((39,), (4,))


# ---- ML1 --------------------------------------------------------------------------------------------------
def test_ml1_splits_are_metaworlds_seeded_lists(reach):
    _, fam = reach
    bench = metaworld.ML1("reach-v3", seed=0)
    train, test = fam._task_list("train"), fam.heldout_tasks("test")
    for ours, theirs in ((train, bench.train_tasks), (test, bench.test_tasks)):
        np.testing.assert_array_equal(np.array([t.rand_vec for t in ours]),  # bit for bit
                                      np.array([pickle.loads(t.data)["rand_vec"] for t in theirs]))
    assert len(train) == len(test) == 50 and not set(train) & set(test)
    assert fam.sample_tasks(50, "test") == list(fam.heldout_tasks("test"))
    draws = fam.sample_tasks(60, "train", seed=3)
    assert draws == fam.sample_tasks(60, "train", seed=3) != fam.sample_tasks(60, "train", seed=4)
    assert set(draws[:50]) == set(train)  # every train goal once before any twice, never a test goal
    with pytest.raises(TaskError, match="no 'ood' split"):
        fam.sample_tasks(1, "ood")


def test_the_benchmark_seed_changes_the_lists_and_nothing_else():
    a, b = benchmark_tasks("ML1", "reach-v3", 0), benchmark_tasks("ML1", "reach-v3", 1)
    assert a[0] != b[0] and a[1] != b[1]
    # Meta-World draws ML1's test goals with seed + 1: seed 1's train goals are seed 0's test goals.
    assert [t.rand_vec for t in a[1]] == [t.rand_vec for t in b[0]]
    fam = metarl.family_of(gym.make(REACH, seed=1))
    assert fam.heldout_tasks("test") == b[1]


def test_ml1_tasks_change_the_goal_and_episodes_are_deterministic(reach):
    env, fam = reach
    t0, t1 = fam.sample_tasks(2, "test")
    actions = _actions(60)
    fam.set_task(t0)
    first = _episode(env, actions, seed=0)
    again = _episode(env, actions, seed=123)  # Meta-World's reset ignores the seed and draws nothing
    fresh = metarl.make_family("ML1-reach-v3")
    metarl.family_of(fresh).set_task(t0)
    other_env = _episode(fresh, actions, seed=0)
    for a, b in zip(first[:3], again[:3], strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(first[:3], other_env[:3], strict=True):
        np.testing.assert_array_equal(a, b)
    fam.set_task(t1)
    moved = _episode(env, actions, seed=0)
    assert not np.array_equal(first[1], moved[1])  # another goal: other rewards for the same actions
    np.testing.assert_array_equal(first[0][:, 36:], 0.0)  # the ML benchmarks hide the goal


def test_reset_and_step_shapes_and_the_500_step_horizon(reach):
    env, fam = reach
    fam.set_task(fam.sample_tasks(1, "test")[0])
    obs, info = env.reset(seed=0)
    assert obs.shape == (39,) and obs.dtype == np.float64 and env.observation_space.contains(obs)
    assert env.action_space.shape == (4,)
    seen, rewards, success, truncated = _episode(env, _actions(600))
    assert len(rewards) == 500 and truncated
    assert set(np.unique(success)) <= {0.0, 1.0}


def test_bad_tasks_are_one_clear_line_and_keep_the_task(reach):
    _, fam = reach
    good = fam.sample_tasks(1, "test")[0]
    fam.set_task(good)
    bad = [
        (MetaWorldTask("ML1-reach-v3", "push-v3", good.rand_vec), "is not one of this benchmark's"),
        (MetaWorldTask("ML1-reach-v3", "reach-v3", good.rand_vec[:3]), "must hold 6 values"),
        (MetaWorldTask("ML1-reach-v3", "reach-v3", (9.0,) * 6), "must hold 6 values within"),
        (MetaWorldTask("ML1-push-v3", "push-v3", good.rand_vec), "cannot run a task of family"),
    ]
    for task, message in bad:
        with pytest.raises(TaskError, match=message) as err:
            fam.set_task(task)
        assert "\n" not in str(err.value)
        assert fam.task == good
    with pytest.raises(TaskError, match="unknown Meta-World v3 env 'reach-v9'"):
        gym.make("metarl/ML1-reach-v3-v0", env_name="reach-v9")


def test_a_task_whose_reset_would_never_end_is_one_clear_line_and_keeps_the_task():
    """Where objects and goal sit closer than an env's placing rule allows (box-close: 0.25 apart in the plane),
    Meta-World's reset redraws the positions, and a task's positions never change: without the guard, reset
    loops forever. The middle of box-close's ranges is such a task; the family's default moves off it."""
    env = metarl.make_family("ML1-box-close-v3")
    fam = metarl.family_of(env)
    try:
        default = fam.task
        space = fam._reset_space(fam._metarl_env)
        middle = tuple(float(x) for x in (space.low + space.high) / 2)
        assert default.rand_vec != middle and fam.default_task() == default
        good = fam.sample_tasks(1, "test")[0]
        fam.set_task(good)
        first = _episode(env, _actions(10))[0]
        with pytest.raises(TaskError, match=r"places objects and goal closer than box-close-v3 allows") as err:
            fam.set_task(MetaWorldTask("ML1-box-close-v3", "box-close-v3", middle))
        assert "\n" not in str(err.value) and "rand_vec [0.0, " in str(err.value)
        assert fam.task == good
        np.testing.assert_array_equal(_episode(env, _actions(10))[0], first)  # the current task, unchanged
    finally:
        env.close()


@pytest.mark.parametrize("name", ["coffee-pull-v3", "coffee-push-v3", "disassemble-v3"])
def test_a_default_task_off_the_middle_of_the_ranges_resets(name):
    """The other envs whose middle positions break their placing rule: the default task resets and steps."""
    env = metarl.make_family(f"ML1-{name}")
    try:
        obs, rewards, _, _ = _episode(env, _actions(3))
        assert obs.shape == (4, 39) and np.isfinite(rewards).all()
    finally:
        env.close()


def test_tasks_round_trip_through_json_and_pickle(reach):
    env, fam = reach
    task = fam.sample_tasks(1, "test")[0]
    assert Task.from_dict(json.loads(json.dumps(task.to_dict()))) == task
    fam.set_task(task)
    clone = pickle.loads(pickle.dumps(fam))
    assert clone.task == task
    actions = _actions(20)
    a, b = _episode(env.unwrapped, actions), _episode(clone, actions)
    np.testing.assert_array_equal(a[0], b[0])


def test_metarl_check_passes_with_no_skip():
    """The family wraps the Meta-World env, so SB3's checker sees no compute_reward (no GoalEnv, no --skip)."""
    passed = check_family(REACH, steps=20)
    assert "stable-baselines3 env checker" in passed and "gymnasium env checker" in passed


# ---- ML10 -------------------------------------------------------------------------------------------------
def test_ml10_trains_on_ten_envs_and_tests_on_five_others(ml10):
    env, fam = ml10
    from metaworld.env_dict import ML10_V3

    train, test = fam._task_list("train"), fam.heldout_tasks("test")
    assert len(train) == 500 and len(test) == 250
    assert {t.env_name for t in train} == set(ML10_V3["train"])
    assert {t.env_name for t in test} == set(ML10_V3["test"])
    assert [t.env_name for t in test[:5]] == list(ML10_V3["test"])  # interleaved: the first 5 are the 5 envs
    assert len(set(train)) == 500 and len(set(test)) == 250  # distinct goals (Meta-World's list: as ML1, above)
    assert {t.env_name for t in fam.sample_tasks(20, "train", seed=0)} <= set(ML10_V3["train"])


def test_an_ml10_task_switches_the_metaworld_env(ml10):
    env, fam = ml10
    t0, t1 = fam.sample_tasks(2, "test")  # drawer-open, door-close
    fam.set_task(t0)
    assert type(fam._metarl_env).__name__ == "SawyerDrawerOpenEnvV3"
    a = _episode(env, _actions(30))
    fam.set_task(t1)
    assert type(fam._metarl_env).__name__ == "SawyerDoorCloseEnvV3"
    b = _episode(env, _actions(30))
    assert a[0].shape == b[0].shape == (31, 39) and not np.array_equal(a[0], b[0])
    fam.set_task(t0)
    np.testing.assert_array_equal(_episode(env, _actions(30))[0], a[0])  # back again: the same episode
    assert pickle.loads(pickle.dumps(fam)).task == t0


def test_an_env_switched_away_from_is_freed_at_once(ml10):
    """A switch disposes of the previous Meta-World env: without waiting for Python's cycle collector (off here),
    it and its MuJoCo model are gone. (Left to the collector, a sampler worker of ML10 slots grew past 10 GiB.)"""
    import gc
    import weakref

    env, fam = ml10
    t0, t1 = fam.sample_tasks(2, "test")  # two different envs
    fam.set_task(t0)
    old = weakref.ref(fam._metarl_env)
    model = weakref.ref(fam._metarl_env.model)
    gc.disable()
    try:
        fam.set_task(t1)
        assert old() is None and model() is None
    finally:
        gc.enable()
    _episode(env, _actions(3))  # the new env steps


# ---- ML45 -------------------------------------------------------------------------------------------------
def test_ml45_switches_between_its_train_and_test_envs():
    """ML45: registered, its envs those of ``metaworld.env_dict`` (the 5 test envs not among the 45 train envs),
    one family stepping a task of each test env. (Its lists, built the way ML10's are, take Meta-World 2,500
    resets; the list test below replaces the benchmark rather than wait for them.)"""
    from metaworld.env_dict import ML45_V3 as envs

    assert metarl.resolve_id("ML45") == "metarl/ML45-v0" and "metarl/ML45-v0" in gym.registry
    env = metarl.make_family("ML45")
    fam = metarl.family_of(env)
    try:
        assert fam._metarl_envs == (*envs["train"], *envs["test"])
        assert len(envs["test"]) == 5 and not set(envs["test"]) & set(envs["train"])
        assert len(envs["train"]) == 45
        for env_name in envs["test"]:
            one = metarl.make_family(f"ML1-{env_name}")
            rand_vec = metarl.family_of(one).default_task().rand_vec  # placeable positions of this env
            one.close()
            fam.set_task(MetaWorldTask("ML45", env_name, rand_vec))
            assert fam._metarl_env_name == env_name
            obs, rewards, _, _ = _episode(env, _actions(5))
            assert obs.shape == (6, 39) and np.isfinite(rewards).all()
    finally:
        env.close()


def test_ml45_lists_come_from_metaworlds_ml45_with_the_family_seed(monkeypatch):
    from metarl.envs import meta_world

    made = []

    class FakeML45:  # two tasks of Meta-World's own ML10 lists in place of the 2,500-reset ML45 build
        def __init__(self, seed):
            made.append(seed)
            ml10 = metaworld.ML10(seed=seed)
            self.train_tasks, self.test_tasks = ml10.train_tasks[:2], ml10.test_tasks[:1]

    monkeypatch.setattr(metaworld, "ML45", FakeML45)
    monkeypatch.setattr(meta_world, "_LISTS", {})
    train, test = benchmark_tasks("ML45", None, 7)
    assert made == [7] and len(train) == 2 and len(test) == 1
    assert train[0].family == "ML45" and train[0].env_name == metaworld.ML10(seed=7).train_tasks[0].env_name


# ---- faster stepping, the same numbers (envs/_metaworld_fast.py) ------------------------------------------
def test_quaternions_are_scipys_bit_for_bit_and_anything_else_goes_to_scipy():
    from scipy.spatial.transform import Rotation

    from metarl.envs._metaworld_fast import quat_from_matrix

    matrices = list(Rotation.random(3000, random_state=0).as_matrix())
    # each of Shepperd's four formulas: the trace, then each diagonal entry, the largest
    matrices += [np.eye(3), np.diag([1.0, -1.0, -1.0]), np.diag([-1.0, 1.0, -1.0]), np.diag([-1.0, -1.0, 1.0])]
    for m in matrices:
        assert np.array_equal(quat_from_matrix(m), Rotation.from_matrix(m).as_quat()), m
    skewed = np.array([[1.0, 0.01, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # SciPy orthogonalises it first
    assert np.array_equal(quat_from_matrix(skewed), Rotation.from_matrix(skewed).as_quat())
    with pytest.raises(ValueError, match="determinant"):  # left-handed: SciPy's own error
        quat_from_matrix(np.diag([1.0, 1.0, -1.0]))


ML10_ENVS = [*metaworld.env_dict.ML10_V3["train"], *metaworld.env_dict.ML10_V3["test"]]


def _raw_pair(name, rand_vec, reward="v2"):
    """Two Meta-World envs of ``name`` on one task, the goal visible (so Meta-World's scripted policy can
    succeed), the second sped up."""
    from metarl.envs._metaworld_fast import speed_up

    envs = []
    for fast in (False, True):
        env = metaworld.env_dict.ALL_V3_ENVIRONMENTS[name](reward_function_version=reward)
        data = {"rand_vec": np.asarray(rand_vec), "env_cls": type(env), "partially_observable": False}
        env.set_task(metaworld.Task(env_name=name, data=pickle.dumps(data)))
        envs.append(speed_up(env) if fast else env)
    return envs


@pytest.fixture(scope="module")
def scripted_successes():
    return {}


@pytest.mark.filterwarnings("ignore:Constant")  # the scripted policies warn of their own gains
@pytest.mark.parametrize("name,reward", [(n, "v2") for n in ML10_ENVS] + [("push-v3", "v1"), ("pick-place-v3", "v1")])
def test_fast_stepping_gives_metaworlds_own_numbers_over_whole_episodes(name, reward, scripted_successes):
    """Meta-World's scripted policy (with noise) drives each ML10 env through a whole 500-step episode,
    grasping and placing where it can: observations, rewards, termination and every info value are
    identical with and without `speed_up`, at every step."""
    from metaworld.policies import ENV_POLICY_MAP

    train, test = benchmark_tasks("ML10", None, 0)
    task = next(t for t in (*train, *test) if t.env_name == name)
    slow, fast = _raw_pair(name, task.rand_vec, reward)
    policy, rng = ENV_POLICY_MAP[name](), np.random.default_rng(0)
    obs, _ = slow.reset()
    np.testing.assert_array_equal(fast.reset()[0], obs)
    success = False
    for step in range(500):
        action = np.clip(policy.get_action(obs) + rng.normal(0, 0.1, 4), -1, 1).astype(np.float32)
        a, b = slow.step(action), fast.step(action)
        assert np.array_equal(a[0], b[0]) and a[1:4] == b[1:4] and a[4] == b[4], (name, step)
        obs, success = a[0], success or bool(a[4]["success"])
    assert a[3]  # truncated at 500
    scripted_successes[name, reward] = success
    if len(scripted_successes) == len(ML10_ENVS) + 2:  # the policies do succeed: the success paths were compared
        assert sum(scripted_successes.values()) >= len(scripted_successes) // 2, scripted_successes


def test_an_env_built_from_a_compiled_model_is_the_one_its_class_builds(monkeypatch):
    """`construct` copies the scene's model compiled earlier in the process: the same model and the same episode
    as the class's own constructor, each env owning its model, and at most MODELS_KEPT compiled models kept."""
    import mujoco
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    from metarl.envs import _metaworld_fast as fast

    monkeypatch.setattr(fast, "_MODELS", type(fast._MODELS)())
    monkeypatch.setattr(fast, "MODELS_KEPT", 2)
    cls = ALL_V3_ENVIRONMENTS["pick-place-v3"]
    own, first, second = cls(), fast.construct(cls), fast.construct(cls)  # the second copies the first's compile
    assert list(fast._MODELS) == [own.fullpath]
    for env in (first, second):
        assert type(env) is cls and "_initialize_simulation" not in env.__dict__
        assert env.model is not own.model and env.model is not fast._MODELS[own.fullpath]
        for field in ("body_pos", "geom_size", "mesh_vert", "actuator_ctrlrange", "dof_damping"):
            np.testing.assert_array_equal(getattr(env.model, field), getattr(own.model, field), field)
        assert env.model.opt.timestep == own.model.opt.timestep
        assert env.model.vis.global_.offwidth == own.model.vis.global_.offwidth
    first.model.body_pos[1] += 1.0  # its own model: neither the next env nor the kept compile sees it
    np.testing.assert_array_equal(fast.construct(cls).model.body_pos, own.model.body_pos)
    task = benchmark_tasks("ML1", "pick-place-v3", 0)[1][0]
    data = {"rand_vec": np.asarray(task.rand_vec), "env_cls": cls, "partially_observable": False}
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (200, 4)).astype(np.float32)
    runs = []
    for env in (own, second):
        env.set_task(metaworld.Task(env_name="pick-place-v3", data=pickle.dumps(data)))
        obs = [env.reset()[0]]
        for action in actions:
            o, r, *_ = env.step(action)
            obs.append(np.append(o, r))
        runs.append(np.array(obs[1:]))
    np.testing.assert_array_equal(runs[0], runs[1])
    for name in ("reach-v3", "push-v3"):  # past MODELS_KEPT: the least recently used compile goes
        fast.construct(ALL_V3_ENVIRONMENTS[name])
    assert len(fast._MODELS) == 2 and own.fullpath not in fast._MODELS
    assert isinstance(fast._MODELS[next(iter(fast._MODELS))], mujoco.MjModel)


def test_the_protocols_envs_step_fast_with_metaworlds_own_numbers(ml10):
    """Meta-World's own vector env for its protocol steps its sub-envs the family's faster way, bit for bit."""
    from metarl.metaworld_eval import protocol_envs

    slow_family = metarl.make_family("ML10", fast=False)
    runs = []
    for env in (ml10[0], slow_family):
        envs = protocol_envs(metarl.family_of(env), 5)
        try:
            assert all(getattr(e.unwrapped, "_metarl_fast", False) == metarl.family_of(env)._metarl_fast
                       for e in envs.envs)
            envs.call("sample_tasks")
            rng = np.random.default_rng(0)
            steps = [envs.reset(seed=0)[0]]
            for _ in range(60):
                obs, reward, *_ = envs.step(rng.uniform(-1, 1, (5, 4)).astype(np.float32))
                steps.append(np.column_stack([obs, reward]))
            runs.append(steps)
        finally:
            envs.close()
    slow_family.close()
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_switch_benchmark_times_both_constructions(tmp_path):
    from metarl.provenance import check

    out = tmp_path / "switch.json"
    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "experiments" / "benchmarks" /
                                               "metaworld_switch.py"), "--switches", "4", "--repeats", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["family"] == "ML10" and set(result["ms_per_set_task"]) == {"fast", "metaworld"}
    assert all(v > 0 for v in result["ms_per_set_task"].values()) and result["episode_500_steps_ms"] > 0
    assert result["metaworld_over_fast"] == result["ms_per_set_task"]["metaworld"] / result["ms_per_set_task"]["fast"]
    check(result, str(out))
    assert "written to" in done.stdout


def test_the_families_step_fast_by_default_and_fast_false_is_metaworlds_own(ml10):
    """ML10 switching envs between tasks, hidden goal: the default (fast) family and ``fast=False`` give the
    same episodes; ``reward='v1'`` reaches Meta-World's env; a bad reward or fast is one line."""
    env, fam = ml10
    assert fam._metarl_env._metarl_fast and fam.reward == "v2"
    plain = metarl.make_family("ML10", fast=False)
    other = metarl.family_of(plain)
    assert not getattr(other._metarl_env, "_metarl_fast", False)
    for task in fam.sample_tasks(4, "test"):  # drawer-open, door-close, shelf-place, sweep-into
        fam.set_task(task)
        other.set_task(task)
        a, b = _episode(env, _actions(60)), _episode(plain, _actions(60))
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    plain.close()
    v1 = metarl.family_of(metarl.make_family("ML1-push-v3", reward="v1"))
    assert v1._metarl_env.reward_function_version == "v1" and v1._metarl_env._metarl_fast
    v1.close()
    with pytest.raises(TaskError, match=r"^ML1-push-v3: reward must be one of v2, v1 .*got 'v3'$"):
        metarl.make_family("ML1-push-v3", reward="v3")
    with pytest.raises(TaskError, match=r"^ML10: fast must be true or false, got 'yes'$"):
        metarl.make_family("ML10", fast="yes")


def test_another_metaworld_version_steps_its_own_methods_with_a_warning(monkeypatch):
    from metarl.envs import meta_world

    meta_world._fast_checked.cache_clear()
    real = meta_world._mujoco_versions()
    monkeypatch.setattr(meta_world, "_mujoco_versions", lambda: ("3.2.0", real[1], real[2]))
    try:
        with pytest.warns(UserWarning, match=r"metaworld 3\.2\.0 is installed; .*checked against 3\.1\.1"):
            env = metarl.make_family("ML1-reach-v3")
        assert not getattr(metarl.family_of(env)._metarl_env, "_metarl_fast", False)
        env.close()
    finally:
        meta_world._fast_checked.cache_clear()


# ---- samplers and a real run ------------------------------------------------------------------------------
class _Towards:
    """An actor that moves the hand along a fixed direction (a deterministic, task-blind policy)."""

    def start(self, task_indices, slots):
        pass

    def act(self, obs):
        out = np.zeros((*np.asarray(obs).shape[:2], 4), np.float32)
        out[..., 1] = 1.0
        return out


@pytest.mark.parametrize("workers", [0, 1])
def test_the_gymnasium_sampler_records_success(reach, workers):
    _, fam = reach
    tasks = fam.sample_tasks(2, "test")
    with Sampler(REACH, workers=workers, backend="auto") as sampler, sampler.recording() as calls:
        assert sampler.backend == "gymnasium"
        batch = sampler.sample(_Towards(), tasks, 1, seed=0)
    assert batch.success is not None and batch.success.shape == (2, 1)
    assert calls[0].success.tolist() == batch.success.tolist()
    assert np.asarray(batch.returns).shape == (2, 1)


def test_a_metaworld_sampler_is_bounded_by_the_machines_memory_by_default():
    """Meta-World's envs are large (about 45 MB): a sampler left at max_slots None holds as many as fit in half of
    the machine's memory across its workers, not a call's every slot (an ML10 evaluation's 500)."""
    from metarl.sampling import default_max_slots
    from metarl.sampling.local import _memory_bytes

    with Sampler(REACH, workers=2, backend="auto") as sampler:
        assert type(sampler.family).slot_memory_mb == 45.0
        assert sampler.max_slots == default_max_slots(sampler.family, 2)
        assert sampler.max_slots == int(0.5 * _memory_bytes() / (45 * 2**20) / 2)


def test_the_native_backend_refuses_in_one_line():
    with pytest.raises(TaskError, match="native sampler backend does not run this env") as err:
        Sampler(REACH, workers=0, backend="native")
    assert "\n" not in str(err.value)


TINY = {  # one iteration of the shipped configs, at toy sizes
    "maml_trpo": ["agent.tasks_per_batch=2", "agent.episodes_per_task=1", "eval.steps=1"],
    "rl2": ["agent.tasks_per_batch=2", "agent.episodes_per_trial=2", "agent.epochs=1", "eval.steps=1"],
}


@pytest.mark.parametrize("agent", sorted(TINY))
def test_a_real_train_run_reports_success_rates(tmp_path, agent):
    script = Path(sys.executable).parent / "metarl"
    run = tmp_path / "run"
    config = Path(__file__).parents[1] / "experiments" / agent / "ml1_reach.yaml"
    done = subprocess.run([str(script), "train", str(config), "iterations=1", *TINY[agent], "eval.tasks=2",
                           "eval.episodes=1", "eval.every=0", "sampler.workers=0", "--run-dir", str(run), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((run / "eval" / "test" / "summary.json").read_text())
    assert summary["family"] == "ML1-reach-v3" and summary["horizon"] == 500 and len(summary["stages"]) == 2
    for stage in summary["stages"]:
        assert 0.0 <= stage["success_rate"] <= 1.0 and len(stage["per_task_success"]) == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "meta/success_rate_stage0" in rows[-1]


def test_the_shipped_metaworld_suite_loads_with_the_papers_settings():
    from metarl.bench import load_suite

    root = Path(__file__).parents[1]
    suite = load_suite(root / "experiments" / "benchmarks" / "metaworld.yaml")
    assert suite.families == ["ML1-reach-v3", "ML1-push-v3", "ML1-pick-place-v3", "ML10"]
    assert suite.horizons == dict.fromkeys(suite.families, 500)
    configs = {c.key: c.spec().get("config") for c in suite.cells}
    push = configs["ML1-push-v3/maml_trpo/seed0"]
    assert push["env"] == "ML1-push-v3" and push["experiment"] == "maml_trpo/ml1_reach" and push["iterations"] == 15
    assert push["agent"]["inner_lr"] == 0.1 and push["agent"]["hidden"] == [100, 100]
    assert configs["ML10/rl2/seed0"]["experiment"] == "rl2/ml10" and configs["ML10/rl2/seed0"]["agent"]["hidden_size"] == 256


def test_a_bench_report_on_metaworld_has_success_rates(tmp_path):
    from metarl.cli import main

    path = tmp_path / "suite.yaml"
    path.write_text(json.dumps({"out": str(tmp_path / "out"), "eval": {"tasks": 2, "steps": 1, "episodes": 1},
                                "families": {"ML10": {}}, "methods": {"random": {}}}))
    assert main(["bench", str(path), "--quiet"]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## ML10" in report and "success" in report.lower()
    [result] = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["family"] == "ML10" and len(result["stages"]) == 2
    assert all(0.0 <= stage["success_rate"] <= 1.0 for stage in result["stages"])


# ---- bad input: one line each -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, nearest", [("ML1-reach-v9", "reach-v3"), ("metarl/ML1-Reach-v3-v0", "reach-v3"),
                                           ("ML1-pick-place", "pick-place-v3"), ("ML20", None)])
def test_a_metaworld_name_that_does_not_exist_is_one_clear_line(name, nearest):
    with pytest.raises(TaskError) as err:
        metarl.make_family(name)
    message = str(err.value)
    assert "\n" not in message and repr(name) in message
    assert (f"nearest: {nearest}" in message) if nearest else "ML1-<env>" in message and "ML10, ML45" in message


def test_a_mujoco_that_metaworld_refuses_is_one_clear_line(monkeypatch):
    """metaworld 3.1.1 pins mujoco==3.3.0; another MuJoCo beside it is refused before any Sawyer scene loads."""
    from metarl.envs import meta_world

    assert meta_world._mujoco_versions()[1:] == ("3.3.0", "3.3.0")  # this venv: the pin and what is installed
    monkeypatch.setattr(meta_world, "_mujoco_versions", lambda: ("3.1.1", "3.3.0", "3.5.0"))
    with pytest.raises(TaskError, match=r"metaworld 3\.1\.1 needs mujoco==3\.3\.0, this Python has mujoco 3\.5\.0: "
                                        r"give the extra a venv of its own") as err:
        metarl.make_family("ML1-reach-v3")
    assert "\n" not in str(err.value)


def test_without_the_extra_a_metaworld_family_is_named_as_one(monkeypatch):
    """The base suite checks the message end to end (tests/test_custom_env.py); here: what decides it."""
    from metarl.envs import meta_world

    monkeypatch.setattr(meta_world, "installed", lambda: False)
    assert meta_world.missing_extra("ML1-reach-v3") and meta_world.missing_extra("metarl/ML10-v0")
    assert not meta_world.missing_extra("ML1-reach-v9") and meta_world.unknown_name("ML1-reach-v9")


# ---- Meta-World's own evaluation through the adapter ------------------------------------------------------
def _learner(agent, tmp_path, *overrides):
    """An untrained learner of ``agent`` on ML1 reach (iteration 0): the adapter's plumbing needs no training."""
    from metarl.api import MetaLearner
    from metarl.config import load_config
    from metarl.training import build_agent

    root = Path(__file__).parents[1] / "experiments"
    path = root / agent / ("point_nav_2d.yaml" if agent == "pearl" else "ml1_reach.yaml")
    config = load_config(path, ["env=ML1-reach-v3", "sampler.workers=0", *overrides])
    sampler, built = build_agent(config)
    return MetaLearner(tmp_path, config, built)


def _adapt_one_round(agent, envs, episodes=1):
    from metaworld.evaluation import Timestep

    envs.call("toggle_sample_tasks_on_reset", False)
    envs.call("toggle_terminate_on_success", False)
    envs.call("sample_tasks")
    agent.init()
    obs, _ = envs.reset()
    ended = np.zeros(envs.num_envs, int)
    while (ended < episodes).any():
        actions, aux = agent.adapt_action(obs)
        nxt, rewards, terminated, truncated, _ = envs.step(actions)
        agent.step(Timestep(obs, actions, rewards, terminated, truncated, aux))
        ended += np.logical_or(terminated, truncated)
        obs = nxt
    agent.adapt()
    return obs


def test_the_adapter_carries_rl2s_hidden_state_as_adapt_on_rebuilds_it(tmp_path):
    """RL² through Meta-World's interface: one policy, a hidden state per sub-env, fed every reward; after the
    adaptation round each sub-env's state is the one `MetaLearner.adapt_on` builds from that sub-env's episode."""
    from metarl.metaworld_eval import MetaWorldAgent, protocol_envs

    with _learner("rl2", tmp_path, "agent.hidden_size=16") as learner:
        envs = protocol_envs(learner.agent.sampler.family, 2)
        agent = MetaWorldAgent(learner, deterministic=True)
        obs = _adapt_one_round(agent, envs)
        assert agent.stateful and len(agent.policies) == 1
        assert [len(rounds[0]) for rounds in agent.rounds] == [1, 1] and len(agent.rounds[0][0][0].rewards) == 500
        ours = agent.eval_action(obs)
        for i in range(2):
            again = learner.adapt_on([[episode] for episode in agent.rounds[i][0]])
            np.testing.assert_allclose(ours[i], again.predict(obs[i, :39], deterministic=True), atol=1e-5)
        envs.close()


@pytest.mark.parametrize("name", ["maml_trpo", "pearl"])
def test_the_protocol_runs_maml_and_pearl_through_the_adapter(tmp_path, name):
    """MAML-TRPO: a policy per sub-env after the gradient step (from adapt_on); PEARL: one stateful policy. Both
    variants of Meta-World's protocol run to figures in [0, 1] and finite returns."""
    from metarl.metaworld_eval import MetaWorldAgent, metalearning_evaluation_per_env, protocol_envs

    overrides = ["agent.hidden=[16, 16]"] + (["agent.encoder_hidden=[16, 16]", "agent.num_train_tasks=10"] if name == "pearl" else [])
    with _learner(name, tmp_path, *overrides) as learner:
        envs = protocol_envs(learner.agent.sampler.family, 2)
        agent = MetaWorldAgent(learner)
        returns, successes = metalearning_evaluation_per_env(agent, envs, num_evals=1, adaptation_episodes=1,
                                                             evaluation_episodes=1)
        envs.close()
        assert returns.shape == successes.shape == (1, 2) and np.isfinite(returns).all()
        assert set(successes.ravel()) <= {0.0, 1.0}
        assert agent.stateful == (name == "pearl")
        assert len(agent.policies) == (1 if name == "pearl" else 2)
        if name == "maml_trpo":  # adapted per sub-env: each its own parameters
            probe = np.zeros((1, 39), np.float32)
            a, b = (p.predict(probe[0], deterministic=True) for p in agent.policies)
            assert not np.allclose(a, b)


def test_a_protocol_that_cannot_run_is_one_line_before_anything_runs(tmp_path, capsys):
    from metarl.cli import main

    experiments = Path(__file__).parents[1] / "experiments"
    cases = [("maml_trpo/ml1_reach.yaml", ["--split", "train"], "evaluates on Meta-World's test tasks: use --split test"),
             ("maml_trpo/ml1_reach.yaml", ["--repeats", "2"], "needs N >= 1 and no --repeats"),
             ("maml_trpo/point_nav_2d.yaml", [], "on a Meta-World family (ML1-<env>, ML10, ML45); this run's env is PointNav2D")]
    for k, (config, extra, message) in enumerate(cases):
        run = tmp_path / f"run{k}"
        run.mkdir()
        (run / "config.yaml").write_text((experiments / config).read_text())
        assert main(["eval", str(run), "--metaworld-protocol", "2", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (run / "eval").exists()  # refused before metarl's own evaluation ran


def test_metaworlds_protocol_agrees_with_metarls_evaluator_on_a_trained_maml(tmp_path, monkeypatch, capsys):
    """A MAML-TRPO trained for one iteration on ML1 reach; ``metarl eval --metaworld-protocol`` runs metarl's
    evaluator (1 gradient step on E episodes, then E episodes) and Meta-World's protocol at the same settings
    (1 adaptation round of E episodes, E evaluation episodes; full episodes, success at any step in the per-env
    variant): their success rates and returns agree within their 95% intervals. Toy sizes, so the intervals are
    wide: the test pins that the two protocols measure the same quantity, not a figure."""
    import metarl.api as mrl
    from metarl import metaworld_eval
    from metarl.cli import main

    run = tmp_path / "run"
    config = Path(__file__).parents[1] / "experiments" / "maml_trpo" / "ml1_reach.yaml"
    mrl.train(config, ["iterations=1", "agent.tasks_per_batch=2", "agent.episodes_per_task=2", "agent.hidden=[32, 32]",
                       "eval.every=0", "eval.tasks=2", "eval.episodes=1", "sampler.workers=0"], run_dir=run).close()
    monkeypatch.setattr(metaworld_eval, "PROTOCOL", {"num_evals": 10, "adaptation_steps": 1, "adaptation_episodes": 1,
                                                     "evaluation_episodes": 1})
    monkeypatch.setattr(metaworld_eval, "SUB_ENVS", 5)
    capsys.readouterr()
    assert main(["eval", str(run), "--tasks", "10", "--steps", "1", "--episodes", "1", "--metaworld-protocol", "2"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((run / "eval" / "test" / "metaworld.json").read_text())
    assert result["protocol"]["num_evals"] == 2 and result["protocol"]["sub_envs"] == 5
    assert result["family"] == "ML1-reach-v3" and result["agent"] == "maml_trpo" and result["metarl_stage"] == 1
    assert result["per_env"]["n"] == 10 and result["shipped"]["n"] == 2 and "provenance" in result
    assert result["metarl"]["stage"] == 1
    assert result["per_env_agrees_with_metarl"] == {"success": True, "return": True}, result
    for name in ("metaworld, as shipped", "metaworld, per sub-env", "metarl evaluator, stage 1", "PR #577"):
        assert name in printed
    # a new evaluation of the run, without Meta-World's protocol, leaves no metaworld.json of the old one beside it
    assert main(["eval", str(run), "--tasks", "2", "--steps", "1", "--episodes", "1"]) == 0
    assert (run / "eval" / "test" / "summary.json").is_file()
    assert not (run / "eval" / "test" / "metaworld.json").exists()


def test_learning_runs_metaworlds_protocol_on_each_seeds_final_policy(tmp_path, monkeypatch, capsys):
    """``learning.py --seeds ... --metaworld-protocol N``: a seed finished by an earlier command without it (read
    back from the file) and a seed trained now both get Meta-World's own evaluation of their final policy, beside
    metarl's figure at the matching stage; the aggregate is the mean over seeds of each variant's success."""
    import importlib.util
    import sys

    from metarl import metaworld_eval

    spec = importlib.util.spec_from_file_location(
        "learning_bench_mw", Path(__file__).parents[1] / "experiments" / "benchmarks" / "learning.py")
    learning = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(learning)
    monkeypatch.setattr(metaworld_eval, "PROTOCOL", {"num_evals": 10, "adaptation_steps": 1, "adaptation_episodes": 1,
                                                     "evaluation_episodes": 1})
    monkeypatch.setattr(metaworld_eval, "SUB_ENVS", 5)
    config = Path(__file__).parents[1] / "experiments" / "maml_trpo" / "ml1_reach.yaml"
    out = tmp_path / "out.json"
    command = ["learning.py", str(config), "iterations=1", "agent.tasks_per_batch=2", "agent.episodes_per_task=1",
               "agent.hidden=[16, 16]", "eval.every=0", "eval.tasks=2", "eval.steps=1", "eval.episodes=1",
               "sampler.workers=0", f"run_root={tmp_path}", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [*command, "--seeds", "0"])
    learning.main()
    assert "metaworld_protocol" not in json.loads(out.read_text())["per_seed"][0]
    monkeypatch.setattr(sys, "argv", [*command, "--seeds", "0", "1", "--metaworld-protocol", "1"])
    learning.main()
    result = json.loads(out.read_text())
    assert [s["seed"] for s in result["per_seed"]] == [0, 1] and result["complete"]
    for seed in result["per_seed"]:
        protocol = seed["metaworld_protocol"]
        assert protocol["protocol"]["num_evals"] == 1 and protocol["iteration"] == 1
        assert protocol["per_env"]["n"] == 5 and protocol["shipped"]["n"] == 1
        stage = seed["heldout"]["stages"][1]  # one gradient step on 1 episode: the protocol's matching stage
        assert protocol["metarl"] == {"stage": 1, "success_rate": stage["success_rate"],
                                      "success_ci95": stage["success_ci95"], "mean_return": stage["mean_return"],
                                      "return_ci95": stage["ci95"]}
    agg = result["aggregate"]["metaworld_protocol_success"]
    for variant in ("shipped", "per_env", "metarl"):
        per_seed = [s["metaworld_protocol"][variant]["success_rate"] for s in result["per_seed"]]
        assert agg[variant]["per_seed"] == per_seed and agg[variant]["mean"] == pytest.approx(np.mean(per_seed))
    printed = capsys.readouterr().out
    assert "seed 0: Meta-World's own evaluation, iteration 1:" in printed
    assert "mean of 2 seeds: Meta-World's evaluation per sub-env: success" in printed


def test_the_ml10_zoo_entry_records_success_and_adapts_on_a_held_out_env(capsys):
    """The shipped MAML-TRPO ML10 entry (seed 2 of the 10M-step headline): it records success beside return, loads
    with the extra, and adapts on one held-out ML10 task (a short episode; `zoo_check.py` re-measures the figure)."""
    import metarl
    import metarl.api as mrl
    from metarl import zoo
    from metarl.cli import main

    entry = zoo.find("zoo:maml_trpo/ml10")
    assert entry.requires == ["metaworld"] and entry.missing() == []
    stages = entry.evaluation["stages"]
    assert [s["stage"] for s in stages] == [0, 1] and entry.evaluation["tasks"] == 50
    assert all(s["success_ci95"][0] <= s["success_rate"] <= s["success_ci95"][1] for s in stages)
    assert (Path(__file__).parents[1] / entry.meta["result"]).is_file()
    with mrl.load("zoo:maml_trpo/ml10") as learner:
        assert learner.agent.iteration == 50 and learner.agent.env_steps == 10_000_000
        family = metarl.make_family("ML10")
        task = metarl.family_of(family).sample_tasks(1, "test", seed=0)[0]
        metarl.family_of(family).set_task(task)
        policy = learner.adapt(family, steps=1, episodes=1, horizon=20)
        obs, _ = family.reset(seed=0)
        action = policy.predict(obs, deterministic=True)
        assert action.shape == (4,) and np.isfinite(action).all()
        family.close()
    assert main(["zoo", "maml_trpo/ml10"]) == 0
    out = capsys.readouterr().out
    assert "success 17.4%" in out and "needs the metaworld extra" in out and "not installed" not in out


def test_the_rl2_ml1_reach_zoo_entry_adapts_inside_one_trial():
    """The shipped RL² ML1 reach entry (the README's row: success 62% in a trial's first episode, 74% in its second):
    its recorded success grows from the first episode to the second; it loads and acts on a held-out goal, its
    hidden state carried from one episode to the next."""
    import metarl
    import metarl.api as mrl
    from metarl import zoo

    entry = zoo.find("zoo:rl2/ml1_reach")
    stages = entry.evaluation["stages"]
    assert entry.requires == ["metaworld"] and len(stages) == 13
    assert (stages[0]["success_rate"], stages[1]["success_rate"]) == (0.62, 0.74)
    with mrl.load("zoo:rl2/ml1_reach") as learner:
        env = metarl.make_family("ML1-reach-v3")
        family = metarl.family_of(env)
        family.set_task(family.sample_tasks(1, "test", seed=0)[0])
        policy = learner.adapt(env, steps=1, episodes=1, horizon=20)
        obs, _ = env.reset(seed=0)
        action = policy.predict(obs, deterministic=True)
        assert action.shape == (4,) and np.isfinite(action).all()
        env.close()
