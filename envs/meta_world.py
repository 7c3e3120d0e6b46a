"""Meta-World's ML1, ML10 and ML45 benchmarks as metarl task families (``pip install -e ".[metaworld]"``).

=========================  ============================================================  =======
id                         tasks                                                          horizon
=========================  ============================================================  =======
metarl/ML1-<env>-v0        one Meta-World v3 env (``reach-v3``, ``push-v3``, ... 50 of      500
                           them), its 50 train and 50 test goals
metarl/ML10-v0             train: 10 envs x 50 goals; test: 5 held-out envs x 50 goals      500
metarl/ML45-v0             train: 45 envs x 50 goals; test: 5 held-out envs x 50 goals      500
=========================  ============================================================  =======

The ids are registered only where ``metaworld`` is importable; this module itself never imports it at
load time, so the base install of metarl does not need it. metaworld 3.1.1 pins ``mujoco==3.3.0``.

A task is a `MetaWorldTask`: the Meta-World env's name and its ``rand_vec`` (the object and goal positions
that Meta-World's ``Task.data`` pickles), so it is a plain, JSON-exact record. The splits are Meta-World's
own lists (``metaworld.ML1(env, seed)``, ``metaworld.ML10(seed)``, ``ML45``: the protocol of the
Meta-World paper and of Meta-World+): ``train`` draws go through the benchmark's train tasks, ``test`` is its
test list, and there is no ``ood`` split. ``seed`` (an env kwarg, default 0) seeds the lists, which Meta-World
draws from numpy's global generator otherwise (unseeded: different lists in every process). ML1's test goals
come from ``seed + 1`` (Meta-World's own rule), so no train goal is a test goal; the test envs of ML10 and ML45
are not among their train envs.
The registered ``Meta-World/ML1-train`` vector env of metaworld 3.1.1 uses the *test* goals (Metaworld PR
#573); these families never build it.

The multi-env benchmarks' test lists interleave their five envs (ML10: drawer-open goal 0, door-close goal 0, ...,
drawer-open goal 1, ...), so the first ``n`` test tasks cover the held-out envs evenly. Building ML45's lists takes
Meta-World 2,500 env resets (about half a minute); a process builds them once, the first time it needs them.

Every v3 env observes 39 values (hand, gripper and object poses of this step and the last, then the goal,
zeroed because the ML benchmarks hide it) and takes 4 actions in [-1, 1]; one family can therefore switch
the underlying env with its task (ML10 and ML45 do). ``info["success"]`` (0 or 1 at every step) flows into
metarl's success rates. Meta-World's ``reset`` ignores its seed, and a v3 env with its task set has no
randomness left in ``reset``: an episode is a function of its task and its actions.

Bad input is one line each: a task name that is not one of the 50 v3 envs (``ML1-reach-v9``: `unknown_name`, with
the nearest names), the extra not installed (`missing_extra`), and a MuJoCo other than the one metaworld pins
(metaworld 3.1.1 requires ``mujoco==3.3.0``; `check_mujoco` compares the installed version with that pin before any
Meta-World env is built, since another MuJoCo fails later and obscurely, in the Sawyer scenes' XML or in stepping).

Rewards are Meta-World's V2 functions by default; ``reward="v1"`` (an env kwarg) asks for V1. The envs step
through `metarl.envs._metaworld_fast` (``fast=True``, the default): the same observations, rewards and success
as metaworld 3.1.1's own methods, bit for bit (tests/test_metaworld.py), a step about 1.8 times as fast
(docs/speed.md); ``fast=False`` runs Meta-World's methods unchanged.

`metarl.metaworld_eval` runs Meta-World's own evaluation protocol on these families (``metarl eval RUN_DIR
--metaworld-protocol``), on Meta-World's vector env built from the same seeded lists (`MetaWorldFamily.benchmark_args`).

The family wraps the Meta-World env rather than inheriting from it, so it has no ``compute_reward``
method and Stable-Baselines3's env checker does not take it for a goal-based env.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import pickle
import re
import warnings
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from metarl.tasks import Task, TaskError, TaskFamily

HORIZON = 500  # Meta-World's max_path_length

#: The 50 Meta-World v3 envs (``metaworld.env_dict.ALL_V3_ENVIRONMENTS``, checked by tests/test_metaworld.py).
ENV_NAMES = (
    "assembly-v3", "basketball-v3", "bin-picking-v3", "box-close-v3", "button-press-topdown-v3",
    "button-press-topdown-wall-v3", "button-press-v3", "button-press-wall-v3", "coffee-button-v3",
    "coffee-pull-v3", "coffee-push-v3", "dial-turn-v3", "disassemble-v3", "door-close-v3", "door-lock-v3",
    "door-open-v3", "door-unlock-v3", "hand-insert-v3", "drawer-close-v3", "drawer-open-v3", "faucet-open-v3",
    "faucet-close-v3", "hammer-v3", "handle-press-side-v3", "handle-press-v3", "handle-pull-side-v3",
    "handle-pull-v3", "lever-pull-v3", "pick-place-wall-v3", "pick-out-of-hole-v3", "pick-place-v3",
    "plate-slide-v3", "plate-slide-side-v3", "plate-slide-back-v3", "plate-slide-back-side-v3",
    "peg-insert-side-v3", "peg-unplug-side-v3", "soccer-v3", "stick-push-v3", "stick-pull-v3", "push-v3",
    "push-wall-v3", "push-back-v3", "reach-v3", "reach-wall-v3", "shelf-place-v3", "sweep-into-v3",
    "sweep-v3", "window-open-v3", "window-close-v3",
)
#: The multi-env benchmarks: name -> the attribute of ``metaworld.env_dict`` holding their train and test envs.
MULTI_ENV = {"ML10": "ML10_V3", "ML45": "ML45_V3"}
REWARD_VERSIONS = ("v2", "v1")  # Meta-World's reward_function_version; v2 is its default
_MAX_RAND_VEC = 12  # the longest rand_vec of a v3 env is shorter (tests check); task features pad to it
# A v3 env's reset asks for its positions twice. Many envs redraw them until objects and goal are far enough apart
# (box-close: 0.25 in the plane; push: 0.15, ...), and with a task set they get the same positions back every
# time: a task that fails the rule would make reset loop forever. More requests than this in one reset: refused.
_MAX_DRAWS = 8


def _dispose(env: Any) -> None:
    """Close a Meta-World env this family is done with and free its MuJoCo model and data now. The env's methods
    replaced per instance (`_guard_draws`, `speed_up`) and Meta-World's own attributes hold references back to
    it, so a closed env is cyclic garbage that waits for Python's collector, which counts objects, not bytes: a
    sampler worker of ML10 slots switching envs grew past 10 GiB. Emptying its ``__dict__`` breaks the cycles."""
    env.close()
    env.__dict__.clear()


class _Unplaceable(Exception):
    """A task's positions fail its env's rule for placing objects and goal (see _MAX_DRAWS)."""


def _guard_draws(env: Any) -> None:
    """Count the position requests of ``env``'s resets (per instance), raising `_Unplaceable` past _MAX_DRAWS."""
    draw = env._get_state_rand_vec
    env._metarl_draws = 0

    def guarded() -> Any:
        env._metarl_draws += 1
        if env._freeze_rand_vec and env._metarl_draws > _MAX_DRAWS:
            raise _Unplaceable
        return draw()

    env._get_state_rand_vec = guarded


@dataclasses.dataclass(frozen=True)
class MetaWorldTask(Task):
    """One Meta-World task: the env ``env_name`` with the object and goal positions ``rand_vec``."""

    env_name: str
    rand_vec: tuple[float, ...]

    def features(self) -> np.ndarray:
        # What an oracle sees: which env (one-hot over the 50), then its positions, padded to one length.
        onehot = np.zeros(len(ENV_NAMES))
        if self.env_name in ENV_NAMES:
            onehot[ENV_NAMES.index(self.env_name)] = 1.0
        positions = np.zeros(_MAX_RAND_VEC)
        positions[: len(self.rand_vec)] = self.rand_vec
        return np.concatenate([onehot, positions])


def family_name(benchmark: str, env_name: str | None = None) -> str:
    """``ML1-reach-v3``, ``ML10`` or ``ML45``: the family's name (its id is ``metarl/<name>-v0``)."""
    return f"ML1-{env_name}" if benchmark == "ML1" else benchmark


# The benchmark's lists per (benchmark, env, seed), built once per process: Meta-World makes them by
# resetting each env 50 times.
_LISTS: dict[tuple[str, str | None, int], tuple[tuple[MetaWorldTask, ...], tuple[MetaWorldTask, ...]]] = {}


def benchmark_tasks(benchmark: str, env_name: str | None, seed: int) -> tuple[tuple[MetaWorldTask, ...],
                                                                              tuple[MetaWorldTask, ...]]:
    """(train, test) tasks of ``metaworld.ML1(env_name, seed)`` or ``metaworld.ML10(seed)`` (``ML45``) as
    metarl tasks."""
    key = (benchmark, env_name, seed)
    if key not in _LISTS:
        import metaworld

        bench = metaworld.ML1(env_name, seed=seed) if benchmark == "ML1" else getattr(metaworld, benchmark)(seed=seed)
        name = family_name(benchmark, env_name)
        train = tuple(_from_metaworld(name, t) for t in bench.train_tasks)
        test = [_from_metaworld(name, t) for t in bench.test_tasks]
        by_env: dict[str, list[MetaWorldTask]] = {}
        for task in test:
            by_env.setdefault(task.env_name, []).append(task)
        # Round robin over the test envs, so that the first n test tasks cover them evenly.
        interleaved = tuple(t for group in zip(*by_env.values(), strict=True) for t in group)
        _LISTS[key] = (train, interleaved)
    return _LISTS[key]


def _from_metaworld(family: str, task: Any) -> MetaWorldTask:
    data = pickle.loads(task.data)
    return MetaWorldTask(family, task.env_name, tuple(float(x) for x in np.asarray(data["rand_vec"]).ravel()))


class MetaWorldFamily(TaskFamily, gym.Env):
    """A Meta-World benchmark (ML1 of one env, ML10 or ML45) as one task family; see the module docstring.

    Args:
        benchmark: ``"ML1"``, ``"ML10"`` or ``"ML45"``.
        env_name: the v3 env of ML1 (e.g. ``"reach-v3"``); None for the others.
        seed: seeds Meta-World's train and test lists (the same lists in every process and run).
        render_mode: passed to the Meta-World env (``"rgb_array"`` for videos).
        reward: Meta-World's reward functions, ``"v2"`` (the default, Meta-World's) or ``"v1"`` (the
            original paper's; ``reward_function_version``).
        fast: step through `metarl.envs._metaworld_fast.speed_up` (the default): the same observations,
            rewards and success bit for bit, about 1.8 times as many steps per second, and build the envs a
            switch needs from a model compiled once per process (`metarl.envs._metaworld_fast.construct`);
            ``False`` runs Meta-World's own methods and constructors unchanged. Where a metaworld other than
            the version it was checked against is installed, ``fast`` is ignored, with a warning.
    """

    task_type = MetaWorldTask
    horizon = HORIZON
    has_ood = False  # the benchmark's tasks are its lists; there is no range to leave
    slot_memory_mb = 45.0  # an env's MjModel (21 MB of meshes) and arena (15 MB), with its Python objects
    metadata = {"render_modes": ["rgb_array"], "render_fps": 80}

    def __init__(self, benchmark: str = "ML1", env_name: str | None = None, seed: int = 0,
                 render_mode: str | None = None, reward: str = "v2", fast: bool = True):
        check_mujoco()
        if benchmark == "ML1":
            if env_name not in ENV_NAMES:
                raise TaskError(f"ML1: unknown Meta-World v3 env {env_name!r}; known: {', '.join(ENV_NAMES)}")
            self._metarl_envs: tuple[str, ...] = (env_name,)
        elif benchmark in MULTI_ENV:
            from metaworld import env_dict

            env_name = None
            envs = getattr(env_dict, MULTI_ENV[benchmark])
            self._metarl_envs = tuple(envs["train"]) + tuple(envs["test"])
        else:
            raise TaskError(f"unknown Meta-World benchmark {benchmark!r}; expected ML1, {', '.join(MULTI_ENV)}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TaskError(f"{family_name(benchmark, env_name)}: seed must be an integer, got {seed!r}")
        if reward not in REWARD_VERSIONS:
            raise TaskError(f"{family_name(benchmark, env_name)}: reward must be one of "
                            f"{', '.join(REWARD_VERSIONS)} (Meta-World's reward_function_version), got {reward!r}")
        if not isinstance(fast, bool):
            raise TaskError(f"{family_name(benchmark, env_name)}: fast must be true or false, got {fast!r}")
        self._metarl_args = {"benchmark": benchmark, "env_name": env_name, "seed": int(seed),
                             "render_mode": render_mode, "reward": reward, "fast": fast}
        self.reward = reward
        self._metarl_fast = fast and _fast_checked()
        self.family = family_name(benchmark, env_name)
        self.render_mode = render_mode
        self._metarl_env: Any = None  # the Meta-World env of the current task
        self._metarl_env_name: str | None = None
        first = self._make(self._metarl_envs[0])
        self.observation_space, self.action_space = first.observation_space, first.action_space
        self._metarl_env, self._metarl_env_name = first, self._metarl_envs[0]
        self._metarl_placeable: set[MetaWorldTask] = set()  # tasks whose reset has been seen to end
        self._metarl_default = self._placeable_default()
        self.set_task(self._metarl_default)

    # ---- the family ---------------------------------------------------------------------------------
    def benchmark_args(self) -> tuple[str, str | None, int]:
        """``(benchmark, env_name, seed)``: what Meta-World's own constructors of this benchmark take
        (``metaworld.ML1(env_name, seed)``, ``gym.make_vec("Meta-World/ML1-test", env_name=..., seed=...)``)."""
        args = self._metarl_args
        return args["benchmark"], args["env_name"], args["seed"]

    def default_task(self) -> MetaWorldTask:
        """The middle of the first env's position ranges, or where that breaks the env's placing rule
        (box-close, coffee-pull, coffee-push, disassemble) the first placeable draw of a generator seeded 0: in
        neither of the benchmark's lists (a fresh env runs a task without building the lists, which takes
        Meta-World 50 resets per env)."""
        return self._metarl_default

    def _placeable_default(self) -> MetaWorldTask:
        env, name = self._metarl_env, self._metarl_envs[0]
        space = self._reset_space(env)
        low, high = np.asarray(space.low, np.float64), np.asarray(space.high, np.float64)
        rng, vec = np.random.default_rng(0), (low + high) / 2
        for _ in range(1000):
            task = MetaWorldTask(self.family, name, tuple(float(x) for x in vec))
            if self._try_reset(env, task):
                return task
            vec = rng.uniform(low, high)
        raise TaskError(f"{self.family}: found no placeable positions for {name} in 1000 draws")  # not seen

    def _try_reset(self, env: Any, task: MetaWorldTask) -> bool:
        """Set ``task`` on ``env`` and reset it once: whether the reset ends (the task is then set on ``env``).
        Each task is tried once per family; a task seen to end is set without a trial."""
        import metaworld

        data = {"rand_vec": np.asarray(task.rand_vec, np.float64), "env_cls": type(env),
                "partially_observable": True}  # the ML benchmarks hide the goal
        env.set_task(metaworld.Task(env_name=task.env_name, data=pickle.dumps(data)))
        if task in self._metarl_placeable:
            return True
        env._metarl_draws = 0
        try:
            env.reset()
        except _Unplaceable:
            return False
        self._metarl_placeable.add(task)
        return True

    def _task_list(self, split: str) -> Sequence[MetaWorldTask] | None:
        if split not in ("train", "test"):
            return None
        args = self._metarl_args
        train, test = benchmark_tasks(args["benchmark"], args["env_name"], args["seed"])
        return train if split == "train" else test

    def _validate_task(self, task: MetaWorldTask) -> None:
        if task.env_name not in self._metarl_envs:
            raise TaskError(f"{self.family}: env {task.env_name!r} is not one of this benchmark's "
                            f"({', '.join(self._metarl_envs)})")

    def _apply_task(self, task: MetaWorldTask) -> None:
        env = self._metarl_env if task.env_name == self._metarl_env_name else self._make(task.env_name)
        space = self._reset_space(env)
        vec = np.asarray(task.rand_vec, np.float64)
        if vec.shape != space.low.shape or np.any(vec < space.low - 1e-9) or np.any(vec > space.high + 1e-9):
            if env is not self._metarl_env:
                _dispose(env)
            raise TaskError(f"{self.family}: rand_vec of {task.env_name} must hold {space.low.size} values within "
                            f"{np.round(space.low, 3).tolist()} .. {np.round(space.high, 3).tolist()}, got "
                            f"{list(task.rand_vec)}")
        if not self._try_reset(env, task):
            if env is not self._metarl_env:
                _dispose(env)
            elif self._metarl_task is not None:
                self._try_reset(env, self._metarl_task)  # the current task stays in place
            raise TaskError(f"{self.family}: this {task.env_name} task places objects and goal closer than "
                            f"{task.env_name} allows (Meta-World would redraw them, and a task's positions are "
                            f"fixed: its reset would never end); rand_vec {[float(x) for x in task.rand_vec]}")
        if env is not self._metarl_env:
            # Keep one Meta-World env per family: ML10/ML45 slots switch envs, and 15-50 MuJoCo models per slot add up.
            _dispose(self._metarl_env)
            self._metarl_env, self._metarl_env_name = env, task.env_name

    def _make(self, env_name: str) -> Any:
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        cls, kwargs = ALL_V3_ENVIRONMENTS[env_name], {"render_mode": self.render_mode,
                                                      "reward_function_version": self.reward}
        if self._metarl_fast:
            from metarl.envs._metaworld_fast import construct, speed_up

            env = speed_up(construct(cls, **kwargs))  # the model copied from one compiled before
        else:
            env = cls(**kwargs)
        _guard_draws(env)
        if self._metarl_env is not None and (env.observation_space != self.observation_space
                                             or env.action_space != self.action_space):
            _dispose(env)
            raise TaskError(f"{self.family}: {env_name} has other observation or action spaces than "
                            f"{self._metarl_envs[0]}; one family cannot switch between them")
        return env

    @staticmethod
    def _reset_space(env: Any) -> Any:
        return env._random_reset_space  # the box Meta-World draws each env's rand_vec from

    # ---- the env ------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)  # Meta-World's reset ignores seeds; with its task set it draws nothing
        self._metarl_env._metarl_draws = 0
        obs, info = self._metarl_env.reset()
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self._metarl_env.step(np.asarray(action, np.float32))
        return obs, float(reward), bool(terminated), bool(truncated), info

    def render(self):
        return self._metarl_env.render()

    def close(self) -> None:
        if self._metarl_env is not None:
            _dispose(self._metarl_env)
            self._metarl_env, self._metarl_env_name = None, None

    # Pickled as its constructor's arguments and its task (the Meta-World env pickles its MuJoCo model path).
    def __getstate__(self) -> dict[str, Any]:
        return {"args": dict(self._metarl_args), "_metarl_task": self._metarl_task}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state["args"])
        if state.get("_metarl_task") is not None:
            self.set_task(state["_metarl_task"])


def ML1(env_name: str, seed: int = 0, render_mode: str | None = None, reward: str = "v2",
        fast: bool = True) -> MetaWorldFamily:
    """The ML1 family of one Meta-World v3 env (entry point of ``metarl/ML1-<env>-v0``)."""
    return MetaWorldFamily("ML1", env_name, seed=seed, render_mode=render_mode, reward=reward, fast=fast)


def ML10(seed: int = 0, render_mode: str | None = None, reward: str = "v2", fast: bool = True) -> MetaWorldFamily:
    """The ML10 family (entry point of ``metarl/ML10-v0``)."""
    return MetaWorldFamily("ML10", None, seed=seed, render_mode=render_mode, reward=reward, fast=fast)


def ML45(seed: int = 0, render_mode: str | None = None, reward: str = "v2", fast: bool = True) -> MetaWorldFamily:
    """The ML45 family (entry point of ``metarl/ML45-v0``)."""
    return MetaWorldFamily("ML45", None, seed=seed, render_mode=render_mode, reward=reward, fast=fast)


@functools.cache
def _fast_checked() -> bool:
    """Whether the installed metaworld is the version `speed_up` was checked against (warns once if not)."""
    from metarl.envs._metaworld_fast import CHECKED_VERSION

    version = _mujoco_versions()[0]
    if version == CHECKED_VERSION:
        return True
    warnings.warn(f"metaworld {version} is installed; metarl's faster Meta-World stepping was checked against "
                  f"{CHECKED_VERSION}, so these families step Meta-World's own methods (fast=False)", stacklevel=3)
    return False


def installed() -> bool:
    """Whether metaworld is importable (found without importing it)."""
    return importlib.util.find_spec("metaworld") is not None


@functools.cache
def _mujoco_versions() -> tuple[str | None, str | None, str | None]:
    """(metaworld's version, the mujoco version it pins, the installed mujoco's version); None where unknown."""
    from importlib import metadata

    try:
        version, requires = metadata.version("metaworld"), metadata.requires("metaworld") or []
        installed = metadata.version("mujoco")
    except metadata.PackageNotFoundError:
        return None, None, None
    pins = [r.split(";")[0].replace(" ", "")[len("mujoco=="):] for r in requires
            if r.replace(" ", "").startswith("mujoco==") and "extra" not in r]
    return version, (pins[0] if pins else None), installed


def check_mujoco() -> None:
    """TaskError in one line if the installed mujoco is not the version metaworld pins (metaworld 3.1.1:
    ``mujoco==3.3.0``): pip refuses to install the two together, and a MuJoCo put beside it anyway fails later
    and obscurely (the Sawyer scenes' XML, or stepping)."""
    version, pinned, installed = _mujoco_versions()
    if pinned is not None and installed is not None and installed != pinned:
        from metarl import install_hint

        raise TaskError(f"metaworld {version} needs mujoco=={pinned}, this Python has mujoco {installed}: give the "
                        f"extra a venv of its own (bash scripts/test_metaworld.sh makes .venv-metaworld; "
                        f"{install_hint('metaworld')})")


def unknown_name(name_or_id: str) -> str | None:
    """The one-line error for a name that looks like a Meta-World family but is none (``ML1-reach-v9``,
    ``metarl/ML1-Reach-v3-v0``, ``ML20``), with the nearest names; None for any other name."""
    name = name_or_id.removeprefix("metarl/")
    name = name.removesuffix("-v0") if name_or_id.startswith("metarl/") else name
    if name in family_ids() or not re.match(r"ML\d+([-_]|$)", name):
        return None
    if name.startswith(("ML1-", "ML1_")):
        env = name[len("ML1-"):]
        near = difflib.get_close_matches(env.lower(), ENV_NAMES, n=3)
        return (f"unknown Meta-World v3 env {env!r} in {name_or_id!r}" + (f"; nearest: {', '.join(near)}" if near else "")
                + f" (ML1-<env> takes one of the {len(ENV_NAMES)} v3 envs; `metarl families` lists them)")
    return (f"{name_or_id!r} is not a Meta-World family of metarl: it has ML1-<env> (one v3 env, e.g. ML1-reach-v3), "
            f"{', '.join(MULTI_ENV)}")


def missing_extra(name_or_id: str) -> bool:
    """Whether ``name_or_id`` names a Meta-World family (``ML1-reach-v3``, ``metarl/ML10-v0``) that is not
    registered because metaworld is not installed."""
    if installed():
        return False
    ids = family_ids()
    return name_or_id in ids or name_or_id in ids.values()


def family_ids() -> dict[str, str]:
    """Family name -> Gymnasium id of every Meta-World family (``ML1-reach-v3`` -> ``metarl/ML1-reach-v3-v0``)."""
    names = [family_name("ML1", name) for name in ENV_NAMES] + list(MULTI_ENV)
    return {name: f"metarl/{name}-v0" for name in names}


def register() -> None:
    """Register the Meta-World families with Gymnasium (idempotent); called by `metarl.envs.register_envs`
    where metaworld is importable.

    Gymnasium's passive checker is off for them: it warns on every ``make`` that the (hidden, always zero)
    goal's bounds are equal; ``metarl check`` runs Gymnasium's full checker on them instead."""
    for name, gid in family_ids().items():
        if gid in gym.registry:
            continue
        entry = "metarl.envs.meta_world:" + (name if name in MULTI_ENV else "ML1")
        kwargs = {} if name in MULTI_ENV else {"env_name": name[len("ML1-"):]}
        gym.register(gid, entry_point=entry, max_episode_steps=HORIZON, kwargs=kwargs, disable_env_checker=True)
