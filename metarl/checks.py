"""`check_family`: everything metarl relies on in a task family, checked in one call.

Run it on your own family before training on it (``metarl check ID`` does the same from the shell).
It raises `FamilyCheckError` naming the first contract that fails.
"""

from __future__ import annotations

import json
import pickle
import warnings
from typing import Any

import gymnasium as gym
import numpy as np

import metarl
from metarl.tasks import SPLITS, GoalTask, Task, TaskError, TaskFamily, VelocityTask, family_of, set_tasks


class FamilyCheckError(AssertionError):
    """A task family breaks a contract that metarl's samplers, agents or evaluator rely on."""


def _make(env_or_id: Any) -> gym.Env:
    if isinstance(env_or_id, str):
        if env_or_id not in gym.registry and ":" not in env_or_id:
            from metarl.envs.meta_world import missing_extra, unknown_name

            near_meta_world = unknown_name(env_or_id)  # ML20, ML1-reach-v9: Meta-World's names, not this one
            if near_meta_world is not None:
                raise TaskError(near_meta_world)
            extra = f" (a Meta-World family: {metarl.install_hint('metaworld')})" if missing_extra(env_or_id) else ""
            raise TaskError(f"unknown Gymnasium id {env_or_id!r}{extra}")
        if ":" in env_or_id:  # import the module (found as metarl.plugins says), as every command does
            metarl.make_family(env_or_id).close()
        return gym.make(env_or_id)
    return env_or_id


#: Checks that may be left out where they do not apply (``skip=`` / ``metarl check --skip NAME``).
SKIPPABLE = {
    "gymnasium": "gymnasium env checker",
    "sb3": "stable-baselines3 env checker",  # e.g. an env with a compute_reward method it takes for a GoalEnv
    "task-effect": "two different tasks give different observations or rewards",
    "vector": "per-slot tasks in a vector env",
}


def check_family(env_or_id: Any, steps: int = 50, vector: bool = True, skip: tuple[str, ...] = ()) -> list[str]:
    """Check a task family; return the list of checks passed (raises on the first failure).

    Checks: Gymnasium's and Stable-Baselines3's env checkers; ``sample_tasks`` on every split the
    family offers (types, family name, reproducibility, test list fixed, train disjoint from test);
    tasks survive pickling and a JSON round trip; ``set_task`` rejects a foreign task; rewards equal
    the sum of ``info["reward_*"]`` terms where the family reports any; two different tasks change the
    observations or the rewards (same seed, same actions); a pickled env keeps its task; and
    (``vector=True``) per-slot tasks in a ``SyncVectorEnv``.

    ``skip`` names checks of `SKIPPABLE` that do not apply to this family: ``sb3`` for an env that SB3's
    checker mistakes for a GoalEnv (it has a ``compute_reward`` method), ``task-effect`` for a family whose
    tasks differ only where random actions do not reach within ``steps`` steps, ...
    """
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    unknown = sorted(set(skip) - set(SKIPPABLE))
    if unknown:
        raise TaskError(f"--skip: unknown check {unknown[0]!r}; the checks that can be skipped: {', '.join(SKIPPABLE)}")
    env = _make(env_or_id)
    fam = family_of(env)
    passed: list[str] = []

    def ok(cond: bool, what: str) -> None:
        if not cond:
            raise FamilyCheckError(f"{fam.family}: {what}")
        passed.append(what)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "gymnasium" not in skip:
            try:
                gym_check_env(fam, skip_render_check=True)
            except Exception as exc:  # report which checker failed, with its own message
                raise FamilyCheckError(f"{fam.family}: Gymnasium's env checker failed: {_one_line(exc)} "
                                       "(--skip gymnasium leaves it out where it does not apply)") from exc
            passed.append(SKIPPABLE["gymnasium"])
        if "sb3" not in skip:
            try:
                sb3_check_env(fam, warn=False)
            except Exception as exc:
                why = (" It takes any env with a compute_reward method for a GoalEnv."
                       if callable(getattr(fam, "compute_reward", None)) else "")
                raise FamilyCheckError(f"{fam.family}: Stable-Baselines3's env checker failed: {_one_line(exc)}{why} "
                                       "(--skip sb3 leaves it out where it does not apply)") from exc
            passed.append(SKIPPABLE["sb3"])

    ok(isinstance(fam.horizon, int) and fam.horizon > 0, "declares a positive integer horizon")
    train = fam.sample_tasks(4, "train", seed=0)
    ok(all(isinstance(t, Task) and t.family == fam.family for t in train), "train tasks are Tasks of this family")
    ok(train == fam.sample_tasks(4, "train", seed=0), "train draws are reproducible for a seed")
    n_test = min(4, len(fam.heldout_tasks("test")))  # n_heldout, or the length of a given list (_task_list)
    test = fam.sample_tasks(n_test, "test")
    ok(test == fam.sample_tasks(n_test, "test", seed=123), "the test list is fixed")
    if fam.disjoint_heldout:
        many = fam.sample_tasks(200, "train", seed=1)
        ok(not set(many) & set(fam.heldout_tasks("test")), "train draws never equal a test task")
    if fam.has_ood:
        ood = fam.sample_tasks(min(4, len(fam.heldout_tasks("ood"))), "ood")
        ok(not set(ood) & set(fam.heldout_tasks("test")), "ood tasks differ from test tasks")
    for task in train[:2] + test[:1]:
        ok(pickle.loads(pickle.dumps(task)) == task, "tasks survive pickling")
        ok(Task.from_dict(json.loads(json.dumps(task.to_dict()))) == task, "tasks survive a JSON round trip")

    foreign = GoalTask("NotThisFamily", (0.0, 0.0)) if fam.task_type is not GoalTask else VelocityTask("NotThisFamily", 1.0)
    try:
        fam.set_task(foreign)
    except TaskError:
        passed.append("set_task rejects a task of another family")
    else:
        raise FamilyCheckError(f"{fam.family}: set_task accepted a task of another family")

    for task in train[:2]:
        fam.set_task(task)
        ok(fam.task == task, "set_task sets the task")
        env.reset(seed=0)
        env.action_space.seed(0)
        for _ in range(steps):
            _, reward, terminated, truncated, info = env.step(env.action_space.sample())
            terms = [float(v) for k, v in info.items() if k.startswith("reward_")]
            if terms:
                ok(bool(np.isclose(sum(terms), float(reward), rtol=1e-5, atol=1e-6)),
                   "reward equals the sum of info['reward_*'] terms")
            if terminated or truncated:
                env.reset()
    if "task-effect" not in skip:
        _check_tasks_matter(env, fam, [*train, *test], steps)
        passed.append(SKIPPABLE["task-effect"])

    clone = pickle.loads(pickle.dumps(fam))
    ok(clone.task == fam.task, "a pickled env keeps its task")

    if vector and isinstance(env_or_id, str) and "vector" not in skip:
        vec = gym.vector.SyncVectorEnv([lambda: gym.make(env_or_id) for _ in range(2)])
        try:
            set_tasks(vec, train[:2])
            ok(list(vec.get_attr("task")) == train[:2], "per-slot tasks in a vector env")
        finally:
            vec.close()
    return sorted(set(passed), key=passed.index)


def _check_tasks_matter(env: gym.Env, fam: TaskFamily, tasks: list[Task], steps: int) -> None:
    """FamilyCheckError unless two different tasks, run from the same reset seed with the same actions, give
    different observations or rewards (an ``_apply_task`` that changes nothing passes every other check)."""
    pair = next(((a, b) for i, a in enumerate(tasks) for b in tasks[i + 1:] if a != b), None)
    if pair is None:
        raise FamilyCheckError(f"{fam.family}: sample_tasks gave one task only ({tasks[0]}); a family needs tasks "
                               "that differ")
    env.action_space.seed(0)
    actions = [env.action_space.sample() for _ in range(steps)]
    runs = []
    for task in pair:
        fam.set_task(task)
        obs, _ = env.reset(seed=0)
        seen, rewards = [np.asarray(obs, np.float64).ravel()], []
        for action in actions:
            obs, reward, terminated, truncated, _ = env.step(action)
            seen.append(np.asarray(obs, np.float64).ravel())
            rewards.append(float(reward))
            if terminated or truncated:
                break
        runs.append((np.concatenate(seen), np.asarray(rewards)))
    (obs_a, rew_a), (obs_b, rew_b) = runs
    if obs_a.shape == obs_b.shape and np.array_equal(obs_a, obs_b) and np.array_equal(rew_a, rew_b):
        raise FamilyCheckError(
            f"{fam.family}: tasks {pair[0]} and {pair[1]} give the same observations and rewards over {len(rew_a)} "
            "steps from the same reset seed with the same actions: does _apply_task change the dynamics or the "
            "reward? (--skip task-effect if they differ only where random actions do not reach)")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


__all__ = ["SKIPPABLE", "FamilyCheckError", "check_family", "SPLITS", "TaskFamily"]
