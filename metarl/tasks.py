"""The task API: tasks, task families and splits.

A *task* is a small frozen record of the parameters that distinguish one member of a family from
another (a goal, a target speed, a set of mass multipliers). It is hashable, picklable and
JSON-serialisable (`Task.to_dict` / `Task.from_dict`).

A *task family* is a Gymnasium env that also offers

* ``sample_tasks(n, split="train", seed=None)``: ``train`` draws fresh tasks from the training
  distribution (reproducible for a given ``seed``); ``test`` returns the first ``n`` tasks of a fixed,
  seeded, held-out list that training draws never produce; ``ood`` returns the first ``n`` tasks of a
  fixed list whose parameters lie outside the training range (only for families that have a range).
* ``set_task(task)`` and the ``task`` property (settable, which is what
  ``VectorEnv.set_attr("task", [...])`` uses to give every slot of a vector env its own task).
* ``horizon``: the episode length the family is registered with.

`set_task` takes effect immediately; call ``reset()`` to begin an episode in the new task.

Example:
    >>> import gymnasium as gym, metarl
    >>> env = gym.make("metarl/HalfCheetahVel-v0")
    >>> family = metarl.family_of(env)
    >>> task = family.sample_tasks(1, split="test")[0]
    >>> family.set_task(task)
    >>> obs, info = env.reset(seed=0)
"""

from __future__ import annotations

import dataclasses
import os
import sys
import zlib
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

SPLITS = ("train", "test", "ood")

# Root entropy of every fixed held-out list. Changing it changes every published test split: don't.
_HELDOUT_ENTROPY = 20_261_122


class TaskError(ValueError):
    """A task, split or family request that cannot be honoured (the message names what was wrong)."""


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------

_TASK_TYPES: dict[str, type[Task]] = {}


@dataclasses.dataclass(frozen=True)
class Task:
    """Base class of all tasks. Subclasses are frozen dataclasses whose fields are plain floats/tuples.

    ``family`` names the family the task belongs to; a family refuses tasks of any other family.
    """

    family: str

    def __post_init__(self) -> None:
        # Lists (e.g. from YAML or JSON) become tuples so every task stays hashable and frozen.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, _from_json(value))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register_task_type(cls)

    def params(self) -> dict[str, Any]:
        """The task parameters (every field but ``family``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "family"}

    def vector(self) -> np.ndarray:
        """All parameters flattened into one float vector (used for distances between tasks)."""
        parts: list[float] = []
        for value in self.params().values():
            parts.extend(np.asarray(_flatten(value), dtype=np.float64).ravel().tolist())
        return np.asarray(parts, dtype=np.float64)

    def features(self) -> np.ndarray:
        """The task as a policy input (what an oracle baseline sees): `vector` unless a task type knows
        a better encoding (an angle as its cosine and sine, a multiplier as its logarithm)."""
        return self.vector()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; `Task.from_dict` inverts it exactly."""
        out: dict[str, Any] = {"type": type(self).__name__, "family": self.family}
        out.update(_to_json(self.params()))
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Task:
        """Rebuild a task written by `to_dict`."""
        if not isinstance(data, dict) or "type" not in data or "family" not in data:
            raise TaskError(f"a task dict needs 'type' and 'family' keys, got {data!r}")
        kind = _TASK_TYPES.get(data["type"])
        if kind is None:
            raise TaskError(f"unknown task type {data['type']!r}; known: {sorted(_TASK_TYPES)}")
        fields = {f.name for f in dataclasses.fields(kind)}
        given = set(data) - {"type"}
        if given != fields:
            raise TaskError(
                f"{data['type']} needs fields {sorted(fields)}, got {sorted(given)}"
            )
        kwargs = {k: _from_json(v) for k, v in data.items() if k != "type"}
        return kind(**kwargs)


def _register_task_type(cls: type[Task]) -> None:
    """Enter ``cls`` in the registry `Task.from_dict` reads, by class name. A second class under a taken name
    is refused (it would silently replace the first, whose saved tasks would then load as the wrong type).
    The same definition run again (a module reloaded, or imported once more) is no collision; the first
    class stays registered, as Gymnasium's first registration of an id stays, so the family made from
    that registration accepts the tasks `Task.from_dict` builds."""
    name = cls.__name__
    other = _TASK_TYPES.get(name)
    if other is None:
        _TASK_TYPES[name] = cls
    elif other is not cls and _definition(other) != _definition(cls):
        raise TaskError(
            f"task type name {name!r} is taken by {other.__module__}.{other.__qualname__}; rename "
            f"{cls.__module__}.{cls.__qualname__} (Task.from_dict finds a task's class by its name alone)")


def _definition(cls: type) -> tuple[str, str]:
    """Where a class is defined: its qualified name and its module's file (its module's name if none)."""
    path = getattr(sys.modules.get(cls.__module__), "__file__", None)
    return cls.__qualname__, os.path.realpath(path) if path else cls.__module__


def _flatten(value: Any) -> list[float]:
    if isinstance(value, (tuple, list)):
        out: list[float] = []
        for v in value:
            out.extend(_flatten(v))
        return out
    if isinstance(value, str):
        return []
    return [float(value)]


def _to_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


def _check_finite(task: Task) -> None:
    try:
        vec = task.vector()
    except (TypeError, ValueError) as exc:
        raise TaskError(f"{type(task).__name__} for {task.family} has a non-numeric parameter: {task!r}") from exc
    if not np.all(np.isfinite(vec)):
        raise TaskError(f"{type(task).__name__} for {task.family} has a non-finite parameter: {task!r}")


@dataclasses.dataclass(frozen=True)
class VelocityTask(Task):
    """Track a target forward velocity (m/s)."""

    velocity: float


@dataclasses.dataclass(frozen=True)
class DirectionTask(Task):
    """Run along ``direction`` (+1 forward, -1 backward)."""

    direction: float


@dataclasses.dataclass(frozen=True)
class HeadingTask(Task):
    """Move along the planar heading ``angle`` (radians, in [0, 2*pi))."""

    angle: float

    def features(self) -> np.ndarray:
        return np.array([np.cos(self.angle), np.sin(self.angle)])


@dataclasses.dataclass(frozen=True)
class GoalTask(Task):
    """Reach the planar goal position ``goal = (x, y)``."""

    goal: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class DynamicsTask(Task):
    """Multiply model fields by per-element factors: ``scales = ((field, (s0, s1, ...)), ...)``."""

    scales: tuple[tuple[str, tuple[float, ...]], ...]

    def scale(self, field: str) -> tuple[float, ...]:
        for name, values in self.scales:
            if name == field:
                return values
        raise KeyError(field)

    def features(self) -> np.ndarray:
        # Multipliers are usually log-uniform (base**U(low, high)); their logarithm is the natural input.
        vec = self.vector()
        return np.log(vec) if np.all(vec > 0) else vec


# --------------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------------


class TaskFamily:
    """Mixin that turns a Gymnasium env into a task family.

    A subclass sets ``family`` (name), ``task_type``, ``horizon``, ``n_heldout`` (size of the fixed
    test/ood lists) and implements:

    * ``default_task()``: the nominal task; the env's ``__init__`` must set a task (``self.set_task(
      self.default_task())``), so that a fresh env runs one;
    * ``_draw_tasks(rng, n, split)``: ``n`` tasks drawn with the numpy Generator ``rng``. It is called with
      ``split="train"`` for training draws *and* (once, with a fixed seed and ``n = n_heldout``) to build the
      held-out ``test`` list from the training distribution; training draws equal to a test task are then
      dropped. With ``split="ood"`` it draws outside the training range (raise `TaskError`, or set
      ``has_ood = False``, if the family has no range);
    * or, for a family whose tasks are given lists rather than drawn (fixed train and test goals),
      ``_task_list(split)``: the list of a split (``None`` for a split drawn by ``_draw_tasks``); training
      draws then pick from the train list with the seed, ``test`` and ``ood`` are their lists;
    * ``_validate_task(task)``: raise `TaskError` naming any parameter that is missing or out of range;
    * ``_apply_task(task)``: make the env behave as ``task``.

    ``disjoint_heldout`` is False for families with finitely many tasks (e.g. two directions), whose
    test list necessarily repeats training tasks.

    ``slot_memory_mb`` (optional, default None): about how much memory one env of the family takes, for a family
    whose envs are large (a Meta-World env: about 45 MB). Samplers left at ``max_slots`` None then hold at most as
    many envs as fit in half of the machine's memory (`metarl.sampling.default_max_slots`).

    Reserved names: a family's own state lives in attributes named ``_metarl_*``, so the env may use any
    other name (``_task`` included); the public ``task``, ``set_task``, ``check_task``, ``sample_tasks``,
    ``heldout_tasks`` and the class attributes above are the family's API and must not be reused.
    """

    family: ClassVar[str]
    task_type: ClassVar[type[Task]]
    horizon: ClassVar[int]
    n_heldout: ClassVar[int] = 30
    disjoint_heldout: ClassVar[bool] = True
    has_ood: ClassVar[bool] = True
    slot_memory_mb: ClassVar[float | None] = None

    _metarl_task: Task | None = None

    # ---- to implement ----------------------------------------------------------------------------
    def default_task(self) -> Task:
        raise NotImplementedError

    def _draw_tasks(self, rng: np.random.Generator, n: int, split: str) -> list[Task]:
        raise TaskError(f"{self.family} has no {split!r} tasks to draw: it implements neither _draw_tasks nor "
                        f"a list for the split in _task_list")

    def _validate_task(self, task: Task) -> None:
        """Raise TaskError if a parameter is out of range (finite-ness is already checked)."""

    def _apply_task(self, task: Task) -> None:
        raise NotImplementedError

    def _task_list(self, split: str) -> Sequence[Task] | None:
        """The given list of ``split``'s tasks, for families whose tasks are enumerated rather than drawn;
        None (the default) for a split drawn by ``_draw_tasks``."""
        return None

    # ---- public API -------------------------------------------------------------------------------
    @property
    def task(self) -> Task:
        if self._metarl_task is None:
            self.set_task(self.default_task())
        assert self._metarl_task is not None
        return self._metarl_task

    @task.setter
    def task(self, task: Task) -> None:
        self.set_task(task)

    def set_task(self, task: Task) -> None:
        """Switch the env to ``task`` (immediately; reset to start an episode in it)."""
        self.check_task(task)
        self._apply_task(task)
        self._metarl_task = task

    def __getstate__(self) -> dict[str, Any]:
        # EzPickle-based MuJoCo envs pickle only their constructor arguments; carry the current task
        # along so an unpickled copy (e.g. in AsyncVectorEnv) runs the same task.
        parent = getattr(super(), "__getstate__", None)
        state = dict(parent() if parent is not None else self.__dict__)
        state["_metarl_task"] = self._metarl_task
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        task = state.pop("_metarl_task", None)
        parent = getattr(super(), "__setstate__", None)
        if parent is not None:
            parent(state)
        else:
            self.__dict__.update(state)
        if task is not None:
            self.set_task(task)

    def check_task(self, task: Any) -> None:
        """Raise `TaskError` unless ``task`` is a valid task of this family."""
        if isinstance(task, dict):
            raise TaskError(f"{self.family}: got a dict, not a task; use Task.from_dict(...) first")
        if not isinstance(task, Task):
            raise TaskError(f"{self.family}: expected a {self.task_type.__name__}, got {type(task).__name__} "
                            "('task' is TaskFamily's attribute for the current task; give yours another name)")
        if task.family != self.family or not isinstance(task, self.task_type):
            raise TaskError(
                f"{self.family} cannot run a task of family {task.family!r} "
                f"({type(task).__name__}); expected a {self.task_type.__name__} of {self.family!r}"
            )
        _check_finite(task)
        try:
            self._validate_task(task)
        except TypeError as exc:
            raise TaskError(f"{self.family}: a parameter of {task!r} has the wrong type ({exc})") from exc

    def sample_tasks(self, n: int, split: str = "train", seed: int | None = None) -> list[Task]:
        """Return ``n`` tasks of ``split``.

        Args:
            n: number of tasks (>= 1; for ``test``/``ood`` at most ``n_heldout``).
            split: ``train`` (fresh draws, never equal to a test task), ``test`` (fixed held-out list)
                or ``ood`` (fixed list outside the training range).
            seed: seeds ``train`` draws; the fixed lists ignore it.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise TaskError(f"{self.family}.sample_tasks: n must be a positive integer, got {n!r}")
        n = int(n)
        if split not in SPLITS:
            raise TaskError(f"{self.family}.sample_tasks: unknown split {split!r}; expected one of {SPLITS}")
        if split == "train":
            return self._train_tasks(n, seed)
        if split == "ood" and not self.has_ood:
            raise TaskError(f"{self.family} has no 'ood' split: its task parameters have no range to leave")
        fixed = self.heldout_tasks(split)
        if n > len(fixed):
            raise TaskError(f"{self.family}: the {split!r} split is a fixed list of {len(fixed)} tasks; asked for {n}")
        return list(fixed[:n])

    def heldout_tasks(self, split: str) -> tuple[Task, ...]:
        """The whole fixed list of the ``test`` or ``ood`` split (same in every process and run)."""
        self._check_heldout_split(split)
        cache = self.__dict__.setdefault("_metarl_heldout_cache", {})
        if split not in cache and (given := self._given_list(split)) is not None:
            cache[split] = given
        if split not in cache:
            spawn_key = (zlib.crc32(self.family.encode()), SPLITS.index(split))
            rng = np.random.default_rng(np.random.SeedSequence(_HELDOUT_ENTROPY, spawn_key=spawn_key))
            tasks = self._draw_tasks(rng, self.n_heldout, "train" if split == "test" else "ood")
            cache[split] = tuple(tasks)
        return cache[split]

    def _check_heldout_split(self, split: str) -> None:
        # Without this, heldout_tasks("ood") of a family with no range would return in-range tasks.
        if split not in ("test", "ood"):
            raise TaskError(f"{self.family}: fixed lists exist for the 'test' and 'ood' splits, not {split!r}")
        if split == "ood" and not self.has_ood:
            raise TaskError(f"{self.family} has no 'ood' split: its task parameters have no range to leave")

    def _given_list(self, split: str) -> tuple[Task, ...] | None:
        given = self._task_list(split)
        if given is None:
            return None
        given = tuple(given)
        if not given:
            raise TaskError(f"{self.family}: _task_list({split!r}) is empty")
        for task in given:
            self.check_task(task)
        return given

    def _train_tasks(self, n: int, seed: int | None) -> list[Task]:
        rng = np.random.default_rng(seed)
        given = self._given_list("train")
        if given is not None:
            if self.disjoint_heldout:
                shared = set(given) & set(self.heldout_tasks("test"))
                if shared:
                    raise TaskError(f"{self.family}: its train list holds {len(shared)} task"
                                    f"{'s' if len(shared) > 1 else ''} of the test list (e.g. {next(iter(shared))}); "
                                    "set disjoint_heldout = False if the splits are meant to share tasks")
            # Every task of the list once (in a seeded order) before any task twice.
            order = np.concatenate([rng.permutation(len(given)) for _ in range(-(-n // len(given)))])
            return [given[i] for i in order[:n]]
        if not self.disjoint_heldout:
            return self._draw_tasks(rng, n, "train")
        test = np.stack([t.vector() for t in self.heldout_tasks("test")])
        out: list[Task] = []
        while len(out) < n:
            for task in self._draw_tasks(rng, n - len(out), "train"):
                # A continuous draw equal to a test task has probability ~0; the check makes
                # "disjoint" a guarantee rather than a likelihood.
                if np.min(np.max(np.abs(test - task.vector()), axis=1)) > 1e-12:
                    out.append(task)
        return out


def episode_limit(env: Any) -> int:
    """Steps after which an episode of ``env`` is cut: its time limit (``max_episode_steps`` from the
    registration or ``gymnasium.make``), else its family's horizon."""
    spec = getattr(env, "spec", None)
    return int((spec.max_episode_steps if spec is not None else None) or family_of(env).horizon)


def family_of(env: Any) -> TaskFamily:
    """Find the `TaskFamily` inside ``env`` (which may be wrapped, e.g. by ``gymnasium.make``)."""
    current = env
    while current is not None:
        if isinstance(current, TaskFamily):
            return current
        current = getattr(current, "env", None)
    raise TaskError(f"{env!r} is not a metarl task family (no TaskFamily found among its wrappers)")


def set_tasks(vector_env: Any, tasks: Sequence[Task]) -> None:
    """Give slot ``i`` of a Gymnasium vector env the task ``tasks[i]`` (sync or async)."""
    tasks = list(tasks)
    if len(tasks) != vector_env.num_envs:
        raise TaskError(f"set_tasks: {len(tasks)} tasks for a vector env of {vector_env.num_envs} slots")
    vector_env.set_attr("task", tasks)


def uniform(rng: np.random.Generator, low: float, high: float, size: Any = None) -> Any:
    """``rng.uniform`` returning Python floats (so tasks are plain, JSON-exact records)."""
    value = rng.uniform(low, high, size=size)
    return float(value) if size is None else value


def uniform_outside(
    rng: np.random.Generator, low: float, high: float, outer_low: float, outer_high: float, size: int
) -> np.ndarray:
    """Uniform draws over ``[outer_low, low) U (high, outer_high]`` (the out-of-range band)."""
    width_low, width_high = low - outer_low, outer_high - high
    if width_low < 0 or width_high < 0 or width_low + width_high <= 0:
        raise TaskError(f"empty out-of-range band around [{low}, {high}] within [{outer_low}, {outer_high}]")
    u = rng.uniform(0.0, width_low + width_high, size=size)
    # [0, width_low) -> [outer_low, low);  [width_low, total) -> (high, outer_high]
    return np.where(u < width_low, outer_low + u, outer_high - (u - width_low))
