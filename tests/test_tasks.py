"""The task API: tasks as records, splits, pickling, vector envs, and the errors bad input gets.

What is pinned here:

* tasks are hashable values that survive pickle and a JSON round trip exactly;
* the ``test`` split is a fixed list: the same in every instance and every process (independent of
  ``PYTHONHASHSEED``), never produced by ``train`` draws; ``train`` draws are reproducible per seed;
  ``ood`` tasks lie outside the training range;
* a family env keeps its task through pickling, and `metarl.set_tasks` gives every slot of a sync or
  async vector env its own task (checked by behaviour, not only by ``get_attr``);
* every kind of bad input raises `metarl.TaskError` (a ValueError) whose message names the problem, and
  a rejected task leaves the env in its previous task.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

import metarl
from metarl import DirectionTask, DynamicsTask, GoalTask, HeadingTask, Task, TaskError, VelocityTask
from metarl.envs import DynamicsFamily, Vary

FAMILY_NAMES = list(metarl.FAMILIES)
DISCRETE = {"HalfCheetahDir", "AntFwdBwd"}  # two tasks only: test == both, not disjoint from train
CONTINUOUS = [n for n in FAMILY_NAMES if n not in DISCRETE]
WITH_OOD = ["PointNav2D", "HalfCheetahVel", "AntGoal", "HopperRandParams", "Walker2DRandParams"]
WITHOUT_OOD = ["HalfCheetahDir", "AntDir", "AntFwdBwd"]
RAND_PARAMS = ["HopperRandParams", "Walker2DRandParams"]
LOG_BASE = {"body_mass": 1.5, "body_inertia": 1.5, "dof_damping": 1.3, "geom_friction": 1.5}


def _family(make, name):
    return metarl.family_of(make(name))


def _some_tasks(family) -> list[Task]:
    tasks = [family.default_task(), *family.sample_tasks(3, "train", seed=0), *family.sample_tasks(2, "test")]
    if family.has_ood:
        tasks += family.sample_tasks(2, "ood")
    return tasks


# --------------------------------------------------------------------------------------------------
# make_family / family_of
# --------------------------------------------------------------------------------------------------


def test_task_error_is_a_value_error():
    """Callers that catch ValueError also catch TaskError."""
    assert issubclass(TaskError, ValueError)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_make_family_by_name_or_id(make, name):
    """make_family accepts the family name or its Gymnasium id; family_of finds it inside the wrappers
    and a fresh family starts in its nominal task."""
    by_name, by_id = make(name), make(metarl.env_id(name))
    assert by_name.spec.id == by_id.spec.id == f"metarl/{name}-v0"
    family = metarl.family_of(by_name)
    assert isinstance(family, metarl.TaskFamily) and by_name is not family
    assert type(family) is type(metarl.family_of(by_id))
    assert family.task == family.default_task()


@pytest.mark.parametrize("name", ["HalfCheetahVel", "AntGoal", "HopperRandParams"])
def test_task_constructor_argument(make, name):
    """gym.make(id, task=...) starts the family in that task."""
    task = _family(make, name).sample_tasks(1, "test")[0]
    assert metarl.family_of(make(name, task=task)).task == task


def test_make_family_unknown_name():
    with pytest.raises(TaskError, match="unknown task family 'NoSuchFamily'"):
        metarl.make_family("NoSuchFamily")


def test_make_family_registered_non_family_id():
    """A registered id that is not a task family is refused by name, not silently returned."""
    with pytest.raises(TaskError, match="not a metarl task family"):
        metarl.make_family("CartPole-v1")


def test_family_of_non_family():
    with pytest.raises(TaskError, match="not a metarl task family"):
        metarl.family_of(object())


# --------------------------------------------------------------------------------------------------
# Tasks as values: pickle, hash, JSON
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_tasks_survive_pickle(make, name):
    """pickle round trip gives an equal task with an equal hash (usable as a dict key across it)."""
    for task in _some_tasks(_family(make, name)):
        copy = pickle.loads(pickle.dumps(task))
        assert copy == task and hash(copy) == hash(task) and type(copy) is type(task)
        assert {task: 1}[copy] == 1


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_tasks_survive_json(make, name):
    """to_dict -> json text -> from_dict rebuilds the identical task, which the family accepts."""
    family = _family(make, name)
    for task in _some_tasks(family):
        text = json.dumps(task.to_dict())
        copy = Task.from_dict(json.loads(text))
        assert copy == task and type(copy) is type(task) and hash(copy) == hash(task)
        assert np.array_equal(copy.vector(), task.vector())
        family.set_task(copy)
        assert family.task == task


def test_to_dict_shape():
    """The JSON form is flat and self-describing (type, family, parameters)."""
    assert VelocityTask("HalfCheetahVel", 1.25).to_dict() == {
        "type": "VelocityTask", "family": "HalfCheetahVel", "velocity": 1.25,
    }
    assert GoalTask("AntGoal", (1.0, -2.0)).to_dict()["goal"] == [1.0, -2.0]
    task = DynamicsTask("X", (("body_mass", (1.0, 2.0)), ("gravity", (0.5,))))
    assert task.to_dict()["scales"] == [["body_mass", [1.0, 2.0]], ["gravity", [0.5]]]
    assert task.scale("gravity") == (0.5,)
    assert np.array_equal(task.vector(), [1.0, 2.0, 0.5])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"type": "VelocityTask", "family": "HalfCheetahVel"}, r"needs fields \['family', 'velocity'\]"),
        ({"type": "VelocityTask", "family": "HalfCheetahVel", "velocity": 1.0, "speed": 2.0}, "speed"),
        ({"type": "NoSuchTask", "family": "X"}, "unknown task type 'NoSuchTask'"),
        ({"family": "HalfCheetahVel", "velocity": 1.0}, "needs 'type' and 'family'"),
        ([1.0], "needs 'type' and 'family'"),
    ],
    ids=["missing-field", "extra-field", "unknown-type", "no-type", "not-a-dict"],
)
def test_from_dict_rejects_malformed(data, match):
    with pytest.raises(TaskError, match=match):
        Task.from_dict(data)


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_test_split_is_fixed(make, name):
    """Two fresh envs give the same test list; a shorter request is a prefix; the seed is ignored; the
    list is as long as n_heldout, its tasks valid and (for continuous families) distinct."""
    a, b = _family(make, name), _family(make, name)
    full = a.sample_tasks(a.n_heldout, "test")
    assert len(full) == a.n_heldout
    assert b.sample_tasks(b.n_heldout, "test", seed=123) == full
    assert a.sample_tasks(2, "test") == full[:2]
    assert len(set(full)) == len(full)
    for task in full:
        a.check_task(task)


SPLITS_SCRIPT = """
import json, sys
import metarl
out = {}
for name in metarl.FAMILIES:
    family = metarl.family_of(metarl.make_family(name))
    out[name] = {s: [t.to_dict() for t in family.heldout_tasks(s)] for s in ("test", "ood") if family.has_ood or s == "test"}
with open(sys.argv[1], "w") as f:
    json.dump(out, f, sort_keys=True)
"""


def test_heldout_lists_identical_in_another_process(tmp_path):
    """The test and ood lists do not depend on the process (e.g. on str hashing): a subprocess with
    another PYTHONHASHSEED writes exactly the JSON this process computes."""
    here = {}
    for name in FAMILY_NAMES:
        family = metarl.family_of(metarl.make_family(name))
        here[name] = {s: [t.to_dict() for t in family.sample_tasks(family.n_heldout, s)]
                      for s in ("test", "ood") if family.has_ood or s == "test"}
    hash_seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    out = tmp_path / "splits.json"
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    proc = subprocess.run([sys.executable, "-c", SPLITS_SCRIPT, str(out)], env=env, timeout=120,
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text()) == json.loads(json.dumps(here, sort_keys=True))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_train_draws_reproducible_per_seed(make, name):
    """Same seed, same draws (also across instances); another seed, other draws."""
    a, b = _family(make, name), _family(make, name)
    first = a.sample_tasks(20, "train", seed=7)
    assert len(first) == 20
    assert b.sample_tasks(20, "train", seed=7) == first
    assert a.sample_tasks(20, "train", seed=8) != first


@pytest.mark.parametrize("name", CONTINUOUS)
def test_train_draws_never_hit_a_test_task(make, name):
    """2000 train draws (also with the held-out lists' own root entropy as the seed) contain no test
    task, not even one equal up to floating point."""
    family = _family(make, name)
    test = set(family.sample_tasks(family.n_heldout, "test"))
    test_vectors = np.stack([t.vector() for t in test])
    for seed in (0, metarl.tasks._HELDOUT_ENTROPY):
        draws = family.sample_tasks(2000, "train", seed=seed)
        assert len(draws) == 2000
        assert not test & set(draws)
        gaps = np.abs(np.stack([t.vector() for t in draws])[:, None, :] - test_vectors[None]).max(axis=2)
        assert gaps.min() > 0


def _unit_uniforms(task) -> list[float]:
    """Map a continuous family's task parameters to values that are U(0, 1) under its training law."""
    name = task.family
    if name == "PointNav2D":
        return [c + 0.5 for c in task.goal]
    if name == "HalfCheetahVel":
        return [task.velocity / 3.0]
    if name == "AntDir":
        return [task.angle / (2 * math.pi)]
    if name == "AntGoal":  # uniform in the disc: r^2 / 9 and the polar angle are independent U(0, 1)
        x, y = task.goal
        return [(x * x + y * y) / 9.0, (math.atan2(y, x) % (2 * math.pi)) / (2 * math.pi)]
    return [(math.log(m) / math.log(LOG_BASE[field]) + 3.0) / 6.0 for field, values in task.scales for m in values]


@pytest.mark.parametrize("name", CONTINUOUS)
def test_train_draws_follow_the_training_distribution(make, name):
    """Train draws (and the test list, drawn from the same law) are in range, and their parameters are
    distributed as documented (Kolmogorov-Smirnov against U(0, 1) after the family's transform, e.g.
    AntGoal's r^2 / 9 is uniform only if r = 3 sqrt(U))."""
    family = _family(make, name)
    for task in family.sample_tasks(family.n_heldout, "test"):
        _assert_in_training_range(family, task)
    draws = family.sample_tasks(2000, "train", seed=1)
    for task in draws[:100]:
        _assert_in_training_range(family, task)
    u = np.sort(np.concatenate([_unit_uniforms(t) for t in draws]))
    n = u.size
    ks = max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n))
    assert ks < 1.95 / math.sqrt(n), f"{name}: KS statistic {ks:.4f} over {n} values"


@pytest.mark.parametrize("name", sorted(DISCRETE))
def test_discrete_train_draws_are_balanced(make, name):
    """Both tasks of a two-task family are drawn about equally often."""
    draws = _family(make, name).sample_tasks(2000, "train", seed=1)
    share = sum(t == draws[0] for t in draws) / len(draws)
    assert 0.45 < share < 0.55


def test_train_filter_removes_test_tasks(make, monkeypatch):
    """Disjointness is a guarantee, not a likelihood: if the sampler itself produced test tasks, the
    train split would still drop them and return n fresh ones."""
    family = _family(make, "HalfCheetahVel")
    test = family.sample_tasks(5, "test")
    real = family._draw_tasks
    calls = []

    def poisoned(rng, n, split):
        calls.append(n)
        return test[:n] + real(rng, max(n - len(test), 0), split) if len(calls) == 1 else real(rng, n, split)

    monkeypatch.setattr(family, "_draw_tasks", poisoned)
    draws = family.sample_tasks(8, "train", seed=0)
    assert len(draws) == 8 and not set(draws) & set(test)
    assert len(calls) >= 2  # the filtered-out tasks were redrawn


def _assert_in_training_range(family, task):
    name = family.family
    if name == "PointNav2D":
        assert max(abs(c) for c in task.goal) <= 0.5
    elif name == "HalfCheetahVel":
        assert 0.0 <= task.velocity <= 3.0
    elif name == "AntDir":
        assert 0.0 <= task.angle < 2 * math.pi
    elif name == "AntGoal":
        assert math.hypot(*task.goal) <= 3.0 + 1e-12
    elif name in RAND_PARAMS:
        for field, values in task.scales:
            exponents = np.log(values) / np.log(LOG_BASE[field])
            assert np.all(np.abs(exponents) <= 3.0 + 1e-9), field
    else:
        raise AssertionError(f"no training range known for {name}")


@pytest.mark.parametrize("name", WITH_OOD)
def test_ood_tasks_lie_outside_the_training_range(make, name):
    """Every ood task is outside the training range and inside the documented band; ood tasks are valid
    tasks of the family."""
    family = _family(make, name)
    tasks = family.sample_tasks(family.n_heldout, "ood")
    assert len(set(tasks)) == family.n_heldout
    for task in tasks:
        family.check_task(task)
        if name == "PointNav2D":
            assert 0.5 < max(abs(c) for c in task.goal) <= 1.0
        elif name == "HalfCheetahVel":
            assert 3.0 < task.velocity <= 4.0
        elif name == "AntGoal":
            assert 3.0 < math.hypot(*task.goal) <= 4.0 + 1e-12
        else:
            for field, values in task.scales:
                exponents = np.abs(np.log(values) / np.log(LOG_BASE[field]))
                assert np.all((exponents > 3.0) & (exponents <= 4.0 + 1e-9)), (field, exponents)


@pytest.mark.parametrize("name", WITHOUT_OOD)
def test_families_without_ood_refuse_it(make, name):
    """Neither sample_tasks nor the public heldout_tasks hands out an 'ood' list for a family whose
    parameters have no range to leave (it would silently be in-distribution)."""
    family = _family(make, name)
    with pytest.raises(TaskError, match="has no 'ood' split"):
        family.sample_tasks(1, "ood")
    with pytest.raises(TaskError, match="has no 'ood' split"):
        family.heldout_tasks("ood")


@pytest.mark.parametrize("name", ["PointNav2D", "HalfCheetahDir", "AntFwdBwd", "HopperRandParams"])
def test_heldout_tasks_only_for_test_and_ood(make, name):
    """heldout_tasks is the fixed list behind sample_tasks; there is no fixed 'train' list."""
    family = _family(make, name)
    assert list(family.heldout_tasks("test")) == family.sample_tasks(family.n_heldout, "test")
    for split in ("train", "validation"):
        with pytest.raises(TaskError, match=f"not '{split}'"):
            family.heldout_tasks(split)


@pytest.mark.parametrize(
    ("name", "tasks"),
    [
        ("HalfCheetahDir", [DirectionTask("HalfCheetahDir", 1.0), DirectionTask("HalfCheetahDir", -1.0)]),
        ("AntFwdBwd", [HeadingTask("AntFwdBwd", 0.0), HeadingTask("AntFwdBwd", math.pi)]),
    ],
)
def test_discrete_families_test_split_is_both_tasks(make, name, tasks):
    """With two tasks only, the test split is both of them, and train draws are those two as well."""
    family = _family(make, name)
    assert family.sample_tasks(2, "test") == tasks
    assert set(family.sample_tasks(50, "train", seed=0)) == set(tasks)
    with pytest.raises(TaskError, match="fixed list of 2 tasks; asked for 3"):
        family.sample_tasks(3, "test")


@pytest.mark.parametrize("name", ["PointNav2D", "AntDir", "HopperRandParams"])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "n must be a positive integer, got 0"),
        ({"n": -2}, "n must be a positive integer"),
        ({"n": 2.0}, "n must be a positive integer"),
        ({"n": True}, "n must be a positive integer"),
        ({"n": 1, "split": "validation"}, "unknown split 'validation'"),
        ({"n": 1000, "split": "test"}, "'test' split is a fixed list of"),
    ],
    ids=["zero", "negative", "float", "bool", "unknown-split", "too-many-test"],
)
def test_sample_tasks_bad_arguments(make, name, kwargs, match):
    with pytest.raises(TaskError, match=match):
        _family(make, name).sample_tasks(**kwargs)


@pytest.mark.parametrize("name", WITH_OOD)
def test_sample_tasks_too_many_ood(make, name):
    family = _family(make, name)
    with pytest.raises(TaskError, match=f"'ood' split is a fixed list of {family.n_heldout}"):
        family.sample_tasks(family.n_heldout + 1, "ood")


# --------------------------------------------------------------------------------------------------
# Bad tasks
# --------------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


BAD_TASKS = [
    pytest.param("AntGoal", GoalTask("PointNav2D", (0.1, 0.1)), "AntGoal cannot run a task of family 'PointNav2D'",
                 id="PointNav2D-goal-into-AntGoal"),
    pytest.param("PointNav2D", GoalTask("AntGoal", (0.1, 0.1)), "cannot run a task of family 'AntGoal'",
                 id="AntGoal-goal-into-PointNav2D"),
    pytest.param("AntGoal", VelocityTask("AntGoal", 1.0), r"\(VelocityTask\); expected a GoalTask",
                 id="wrong-task-type"),
    pytest.param("HalfCheetahVel", DirectionTask("HalfCheetahDir", 1.0),
                 "cannot run a task of family 'HalfCheetahDir'", id="HalfCheetahDir-task-into-Vel"),
    pytest.param("HalfCheetahVel", 1.5, "expected a VelocityTask, got float", id="float-not-task"),
    pytest.param("HalfCheetahVel", {"type": "VelocityTask", "family": "HalfCheetahVel", "velocity": 1.0},
                 "got a dict, not a task", id="dict-not-task"),
    pytest.param("HalfCheetahDir", DirectionTask("HalfCheetahDir", 0.5), r"direction must be \+1 or -1, got 0.5",
                 id="direction-0.5"),
    pytest.param("AntDir", HeadingTask("AntDir", 7.0), "heading angle 7.0 is out of range", id="angle-7"),
    pytest.param("AntDir", HeadingTask("AntDir", -0.1), "heading angle -0.1 is out of range", id="angle-negative"),
    pytest.param("AntDir", HeadingTask("AntDir", 2 * math.pi), "out of range", id="angle-2pi"),
    pytest.param("AntFwdBwd", HeadingTask("AntFwdBwd", 1.0), "heading must be 0 .* or pi", id="fwdbwd-angle-1"),
    pytest.param("HalfCheetahVel", VelocityTask("HalfCheetahVel", NAN), "non-finite parameter", id="velocity-nan"),
    pytest.param("HalfCheetahVel", VelocityTask("HalfCheetahVel", INF), "non-finite parameter", id="velocity-inf"),
    pytest.param("HalfCheetahVel", VelocityTask("HalfCheetahVel", 50.0), "target velocity 50.0 is out of range",
                 id="velocity-50"),
    pytest.param("PointNav2D", GoalTask("PointNav2D", (0.1,)), "goal must have 2 coordinates", id="pointnav-1d-goal"),
    pytest.param("PointNav2D", GoalTask("PointNav2D", (20.0, 0.0)), "out of range", id="pointnav-far-goal"),
    pytest.param("PointNav2D", GoalTask("PointNav2D", (NAN, 0.0)), "non-finite parameter", id="pointnav-nan-goal"),
    pytest.param("AntGoal", GoalTask("AntGoal", (1.0, 2.0, 3.0)), "goal must have 2 coordinates", id="antgoal-3d-goal"),
    pytest.param("AntGoal", GoalTask("AntGoal", (8.0, 8.0)), "out of range", id="antgoal-far-goal"),
]


@pytest.mark.parametrize(("name", "task", "match"), BAD_TASKS)
def test_bad_task_is_refused(make, name, task, match):
    """set_task, the ``task`` setter and check_task all refuse the task with a message naming the
    problem, and the env keeps its previous task."""
    family = _family(make, name)
    before = family.sample_tasks(1, "test")[0]
    family.set_task(before)
    with pytest.raises(TaskError, match=match):
        family.set_task(task)
    with pytest.raises(TaskError, match=match):
        family.task = task
    with pytest.raises(TaskError, match=match):
        family.check_task(task)
    assert family.task == before


def _with_scales(task: DynamicsTask, field: str, values) -> DynamicsTask:
    return DynamicsTask(task.family, tuple((f, values if f == field else v) for f, v in task.scales))


@pytest.mark.parametrize("name", RAND_PARAMS)
def test_bad_rand_params_task_is_refused(make, name):
    """Non-positive or NaN multipliers, a wrong count, a missing or unexpected field and another RandParams
    family's task are refused by name; the model keeps the previous task's values."""
    env = make(name)
    family = metarl.family_of(env)
    good = family.sample_tasks(1, "test")[0]
    family.set_task(good)
    mass = env.unwrapped.model.body_mass.copy()
    n_mass = len(good.scale("body_mass"))
    other = "Walker2DRandParams" if name == "HopperRandParams" else "HopperRandParams"
    bad = [
        (_with_scales(good, "body_mass", (-1.0,) * n_mass), "body_mass multipliers must be > 0, got min -1.0"),
        (_with_scales(good, "dof_damping", (0.0,) * len(good.scale("dof_damping"))), "dof_damping multipliers must be > 0"),
        (_with_scales(good, "body_mass", (NAN,) * n_mass), "non-finite parameter"),
        (_with_scales(good, "body_mass", (1.0,) * (n_mass + 1)), f"body_mass needs {n_mass} multipliers, got {n_mass + 1}"),
        (DynamicsTask(name, good.scales[:-1]), r"missing \['geom_friction'\]"),
        (DynamicsTask(name, (*good.scales, ("gravity", (1.0,)))), r"unexpected \['gravity'\]"),
        (DynamicsTask(other, good.scales), f"cannot run a task of family '{other}'"),
    ]
    for task, match in bad:
        with pytest.raises(TaskError, match=match):
            family.set_task(task)
        assert family.task == good
        assert np.array_equal(env.unwrapped.model.body_mass, mass)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("Hopper-v5", [Vary("no_such_field")]), {}, "no float array field 'no_such_field'"),
        (("Hopper-v5", [Vary("tendon_stiffness")]), {}, "'tendon_stiffness' is empty"),
        (("NoSuchEnv-v9", [Vary("body_mass")]), {}, "unknown Gymnasium env id 'NoSuchEnv-v9'"),
        (("CartPole-v1", [Vary("body_mass")]), {}, "'CartPole-v1' is not a MuJoCo env"),
        (("Hopper-v5", []), {}, "variations must be a non-empty sequence of Vary"),
        (("Hopper-v5", ["body_mass"]), {}, "variations must be a non-empty sequence of Vary"),
        (("Hopper-v5", [Vary("body_mass"), Vary("body_mass", base=2.0)]), {}, "listed twice"),
        (("Hopper-v5", [Vary("body_mass")]), {"family": "H", "task": DynamicsTask("H", ())}, "missing"),
    ],
    ids=["no-such-field", "empty-field", "unknown-id", "not-mujoco", "no-variations", "not-vary",
         "duplicate", "bad-initial-task"],
)
def test_dynamics_family_bad_construction(args, kwargs, match):
    with pytest.raises(TaskError, match=match):
        DynamicsFamily(*args, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"field": ""}, "field must be a non-empty string"),
        ({"field": "body_mass", "low": 1.0, "high": 1.0}, "need finite low < high"),
        ({"field": "body_mass", "low": 0.0, "high": NAN}, "need finite low < high"),
        ({"field": "body_mass", "base": 1.0}, "base must be positive and != 1"),
        ({"field": "body_mass", "base": -2.0}, "base must be positive and != 1"),
        ({"field": "gravity", "low": 0.1, "high": 1.0, "base": None}, "must stay positive"),
    ],
)
def test_vary_bad_arguments(kwargs, match):
    with pytest.raises(TaskError, match=match):
        Vary(**kwargs)


# --------------------------------------------------------------------------------------------------
# Pickling envs, vector envs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_env_pickled_after_set_task_keeps_task_and_behaviour(make, rollout, assert_same_rollout,
                                                             random_actions, name):
    """pickle (what AsyncVectorEnv and checkpointing do) keeps the current task and the behaviour."""
    env = make(name)
    family = metarl.family_of(env)
    task = family.sample_tasks(2, "test")[-1]
    family.set_task(task)
    copy = pickle.loads(pickle.dumps(env))
    assert metarl.family_of(copy).task == task
    actions = random_actions(env.action_space, 25, seed=40)
    assert_same_rollout(rollout(env, actions, seed=41), rollout(copy, actions, seed=41))
    copy.close()


def test_env_pickle_keeps_constructor_arguments(make, rollout, assert_same_rollout, random_actions):
    """A non-default constructor argument survives pickling (EzPickle re-initialised with the family's
    own signature): the copy's control cost is still 0.1, not the family default 0.05."""
    env = make("HalfCheetahDir", ctrl_cost_weight=0.1)
    metarl.family_of(env).set_task(DirectionTask("HalfCheetahDir", -1.0))
    copy = pickle.loads(pickle.dumps(env))
    actions = random_actions(env.action_space, 10, seed=42)
    run = rollout(copy, actions, seed=43)
    assert_same_rollout(rollout(env, actions, seed=43), run)
    for info, action in zip(run.infos, actions, strict=True):
        assert info["reward_ctrl"] == -(0.1 * np.sum(np.square(action)))
    assert metarl.family_of(copy).task == DirectionTask("HalfCheetahDir", -1.0)
    copy.close()


_SPAWN = functools.partial(gym.vector.AsyncVectorEnv, context="spawn")
VECTOR_CASES = [
    pytest.param(gym.vector.SyncVectorEnv, "HalfCheetahVel", 3, id="sync-HalfCheetahVel"),
    pytest.param(gym.vector.SyncVectorEnv, "HopperRandParams", 3, id="sync-HopperRandParams"),
    pytest.param(gym.vector.SyncVectorEnv, "AntGoal", 2, id="sync-AntGoal"),
    pytest.param(gym.vector.AsyncVectorEnv, "HalfCheetahVel", 3, id="async-HalfCheetahVel"),
    pytest.param(gym.vector.AsyncVectorEnv, "HopperRandParams", 2, id="async-HopperRandParams"),
    pytest.param(_SPAWN, "Walker2DRandParams", 2, id="async-spawn-Walker2DRandParams"),
]


@pytest.mark.parametrize(("vector_cls", "name", "n"), VECTOR_CASES)
def test_set_tasks_gives_each_slot_its_task(make, rollout, random_actions, vector_cls, name, n):
    """set_tasks puts tasks[i] in slot i: get_attr reports it, and slot i's rollout equals a single env
    set to tasks[i] with slot i's seed and actions (until that slot's first episode ends).

    The spawn case runs workers that import metarl afresh and receive everything pickled (the default
    start method on macOS, and forkserver on Python >= 3.14)."""
    tasks = _family(make, name).sample_tasks(n, "test")
    assert len(set(tasks)) == n
    vec = vector_cls([functools.partial(metarl.make_family, name) for _ in range(n)])
    try:
        metarl.set_tasks(vec, tasks)
        assert list(vec.get_attr("task")) == tasks
        steps = 15
        actions = random_actions(vec.action_space, steps, seed=44)
        vobs, _ = vec.reset(seed=100)
        obs, rewards, dones, infos = [vobs], [], [], []
        for t in range(steps):
            o, r, term, trunc, info = vec.step(actions[t])
            obs.append(o)
            rewards.append(r)
            dones.append(term | trunc)
            infos.append(info)
    finally:
        vec.close()
    for i, task in enumerate(tasks):
        single = make(name)
        metarl.family_of(single).set_task(task)
        alone = rollout(single, actions[:, i], seed=100 + i)
        assert np.array_equal(obs[0][i], alone.reset_obs[0])
        for t in range(steps):
            assert np.array_equal(obs[t + 1][i], alone.obs[t]), (i, t)
            assert rewards[t][i] == alone.rewards[t], (i, t)
            if name == "HalfCheetahVel":
                expected = -abs(infos[t]["x_velocity"][i] - task.velocity) - 0.05 * np.sum(np.square(actions[t, i]))
                assert rewards[t][i] == pytest.approx(expected, rel=1e-6, abs=1e-9)
            if dones[t][i]:
                break


def test_set_tasks_wrong_count_or_bad_task(make):
    vec = gym.vector.SyncVectorEnv([functools.partial(metarl.make_family, "HalfCheetahVel")] * 2)
    try:
        tasks = _family(make, "HalfCheetahVel").sample_tasks(3, "test")
        with pytest.raises(TaskError, match="3 tasks for a vector env of 2 slots"):
            metarl.set_tasks(vec, tasks)
        with pytest.raises(TaskError, match="cannot run a task of family 'AntGoal'"):
            metarl.set_tasks(vec, [tasks[0], GoalTask("AntGoal", (0.0, 1.0))])
    finally:
        vec.close()
