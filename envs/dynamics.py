"""Dynamics task families: any Gymnasium MuJoCo env whose model parameters vary by task.

`DynamicsFamily` wraps an env (given by id, e.g. ``"Hopper-v5"``, or as an instance) and declares which
compiled-model fields vary and how. A task is a `DynamicsTask` holding one multiplier per element (or one
per field with ``shared=True``); setting it writes ``nominal * multiplier`` into the compiled model in
place and calls ``mujoco.mj_setConst`` so derived constants (subtree masses, inverse weights, ...) follow.
The nominal arrays are copied once at construction, so the default task (all multipliers 1) restores
the original model bit for bit. Multipliers apply to the *compiled* model: scaling densities through
the XML/spec would be undone by ``settotalmass`` in models such as HalfCheetah's.

``HopperRandParams`` and ``Walker2DRandParams`` are the rand_param_envs families of PEARL/ProMP built this
way: body_mass and body_inertia x1.5^U(-3,3), dof_damping x1.3^U(-3,3), geom_friction x1.5^U(-3,3), per
element; the v5 reward and termination; horizon 200; ``ood`` exponents with magnitude in (3, 4].

Example (a family out of an env metarl has never heard of)::

    >>> from metarl.envs import DynamicsFamily, Vary
    >>> fam = DynamicsFamily("Swimmer-v5", [Vary("body_mass"), Vary("gravity", low=0.5, high=1.5,
    ...                      base=None, shared=True)], family="SwimmerHeavy")
    >>> fam.set_task(fam.sample_tasks(1, "train", seed=0)[0])
    >>> obs, info = fam.reset(seed=0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

from metarl.envs._mujoco import quiet_settotalmass
from metarl.tasks import DynamicsTask, TaskError, TaskFamily, uniform_outside


@dataclasses.dataclass(frozen=True)
class Vary:
    """How one model field varies across tasks.

    Args:
        field: an ``mujoco.MjModel`` float array (``body_mass``, ``body_inertia``, ``dof_damping``,
            ``dof_armature``, ``dof_frictionloss``, ``geom_friction``, ``actuator_gear``,
            ``jnt_stiffness``, ...) or ``gravity`` (``model.opt.gravity``).
        low, high: the training range. With ``base`` the multiplier is ``base ** U(low, high)``
            (log-uniform); with ``base=None`` it is ``U(low, high)``.
        base: see above; ``None`` for a uniform multiplier.
        shared: one multiplier for the whole field instead of one per element.
        ood_margin: width of the out-of-distribution band on each side of ``[low, high]`` (default:
            a sixth of the range, e.g. exponents in (3, 4] for U(-3, 3)).
    """

    field: str
    low: float = -3.0
    high: float = 3.0
    base: float | None = 1.5
    shared: bool = False
    ood_margin: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.field, str) or not self.field:
            raise TaskError(f"Vary: field must be a non-empty string, got {self.field!r}")
        if not (np.isfinite(self.low) and np.isfinite(self.high) and self.low < self.high):
            raise TaskError(f"Vary({self.field!r}): need finite low < high, got [{self.low}, {self.high}]")
        if self.base is not None and not (np.isfinite(self.base) and self.base > 0 and self.base != 1):
            raise TaskError(f"Vary({self.field!r}): base must be positive and != 1, got {self.base}")
        if self.base is None and self.low - self.margin <= 0:
            raise TaskError(
                f"Vary({self.field!r}): a uniform multiplier range (with its ood band) must stay positive, "
                f"got [{self.low - self.margin}, {self.high}]"
            )

    @property
    def margin(self) -> float:
        return (self.high - self.low) / 6 if self.ood_margin is None else float(self.ood_margin)

    def draw(self, rng: np.random.Generator, size: int, split: str) -> np.ndarray:
        if split == "train":
            u = rng.uniform(self.low, self.high, size=size)
        else:
            u = uniform_outside(rng, self.low, self.high, self.low - self.margin, self.high + self.margin, size)
        return u if self.base is None else self.base**u


def _model_array(model: mujoco.MjModel, field: str) -> np.ndarray:
    if field == "gravity":
        return model.opt.gravity
    value = getattr(model, field, None)
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
        raise TaskError(
            f"the model has no float array field {field!r}; vary one of e.g. body_mass, body_inertia, "
            "dof_damping, dof_armature, dof_frictionloss, geom_friction, actuator_gear, jnt_stiffness, gravity"
        )
    return value


class DynamicsFamily(TaskFamily, gym.Wrapper):
    """A task family over the dynamics of a MuJoCo env (see the module docstring).

    Args:
        env: a Gymnasium id (made with ``gymnasium.make(env, **make_kwargs).unwrapped``) or a MuJoCo env.
        variations: the fields that vary, one `Vary` each.
        family: the family's name (default: ``<EnvName>Dynamics``); tasks carry it.
        horizon: episode length (default: the id's registered ``max_episode_steps``, else 1000).
        n_heldout: size of the fixed ``test``/``ood`` lists.
        task: the initial task (default: nominal).
    """

    task_type = DynamicsTask

    def __init__(
        self,
        env: str | gym.Env,
        variations: Sequence[Vary],
        *,
        family: str | None = None,
        horizon: int | None = None,
        n_heldout: int = 10,
        task: DynamicsTask | None = None,
        **make_kwargs: Any,
    ):
        self._init_args = (env, tuple(variations), family, horizon, n_heldout, make_kwargs)
        if isinstance(env, str):
            if env not in gym.registry:
                raise TaskError(f"DynamicsFamily: unknown Gymnasium env id {env!r}")
            spec = gym.spec(env)
            with quiet_settotalmass():
                inner = gym.make(env, **make_kwargs).unwrapped
            default_horizon = spec.max_episode_steps or 1000
            name = env.split("/")[-1].split("-v")[0]
        else:
            inner = env.unwrapped
            default_horizon = 1000
            name = type(inner).__name__.removesuffix("Env")
        if not isinstance(getattr(inner, "model", None), mujoco.MjModel):
            raise TaskError(f"DynamicsFamily: {env!r} is not a MuJoCo env (it has no mujoco.MjModel `model`)")
        super().__init__(inner)
        self.family = family or f"{name}Dynamics"
        self.horizon = int(horizon or default_horizon)
        self.n_heldout = int(n_heldout)
        variations = tuple(variations)
        if not variations or not all(isinstance(v, Vary) for v in variations):
            raise TaskError(f"{self.family}: variations must be a non-empty sequence of Vary, got {variations!r}")
        names = [v.field for v in variations]
        if len(set(names)) != len(names):
            raise TaskError(f"{self.family}: a field is listed twice in variations: {names}")
        self.variations = variations
        model = inner.model
        self._nominal: dict[str, np.ndarray] = {}
        for v in variations:
            array = _model_array(model, v.field)
            if array.size == 0:
                raise TaskError(f"{self.family}: the model's {v.field!r} is empty; there is nothing to vary")
            self._nominal[v.field] = array.copy()
        self._scratch = mujoco.MjData(model)  # mj_setConst works in an MjData; keep the episode's intact
        self.set_task(task if task is not None else self.default_task())

    # ---- pickling: rebuild from the constructor arguments, then re-apply the task ----------------
    def __getstate__(self) -> dict[str, Any]:
        return {"init_args": self._init_args, "task": self._metarl_task}

    def __setstate__(self, state: dict[str, Any]) -> None:
        env, variations, family, horizon, n_heldout, make_kwargs = state["init_args"]
        self.__init__(env, variations, family=family, horizon=horizon, n_heldout=n_heldout,
                      task=state["task"], **make_kwargs)

    # ---- TaskFamily ----------------------------------------------------------------------------------
    def _sizes(self) -> dict[str, int]:
        return {v.field: 1 if v.shared else self._nominal[v.field].size for v in self.variations}

    def default_task(self) -> DynamicsTask:
        return DynamicsTask(self.family, tuple((f, (1.0,) * n) for f, n in self._sizes().items()))

    def _draw_tasks(self, rng, n, split):
        sizes = self._sizes()
        tasks = []
        for _ in range(n):
            scales = tuple((v.field, tuple(float(x) for x in v.draw(rng, sizes[v.field], split)))
                           for v in self.variations)
            tasks.append(DynamicsTask(self.family, scales))
        return tasks

    def _validate_task(self, task: DynamicsTask) -> None:
        sizes = self._sizes()
        given = [f for f, _ in task.scales]
        if sorted(given) != sorted(sizes):
            missing, extra = sorted(set(sizes) - set(given)), sorted(set(given) - set(sizes))
            raise TaskError(
                f"{self.family}: task fields {given} do not match the family's {list(sizes)}"
                f" (missing {missing}, unexpected {extra})"
            )
        for field, values in task.scales:
            if len(values) != sizes[field]:
                raise TaskError(f"{self.family}: {field} needs {sizes[field]} multipliers, got {len(values)}")
            if min(values) <= 0:
                raise TaskError(f"{self.family}: {field} multipliers must be > 0, got min {min(values)}")

    def _apply_task(self, task: DynamicsTask) -> None:
        model = self.env.unwrapped.model
        for field, values in task.scales:
            nominal = self._nominal[field]
            scale = np.asarray(values, dtype=np.float64)
            _model_array(model, field)[...] = nominal * (scale[0] if scale.size == 1 else scale.reshape(nominal.shape))
        mujoco.mj_setConst(model, self._scratch)


def _rand_params(env_id: str, family: str, **kwargs: Any) -> DynamicsFamily:
    variations = [
        Vary("body_mass", -3.0, 3.0, base=1.5),
        Vary("body_inertia", -3.0, 3.0, base=1.5),
        Vary("dof_damping", -3.0, 3.0, base=1.3),
        Vary("geom_friction", -3.0, 3.0, base=1.5),
    ]
    task = kwargs.pop("task", None)
    return DynamicsFamily(env_id, variations, family=family, horizon=200, n_heldout=10, task=task, **kwargs)


def HopperRandParams(**kwargs: Any) -> DynamicsFamily:  # noqa: N802 - named like the env it makes
    """Hopper-v5 with random body mass/inertia, joint damping and friction (rand_param_envs)."""
    return _rand_params("Hopper-v5", "HopperRandParams", **kwargs)


def Walker2DRandParams(**kwargs: Any) -> DynamicsFamily:  # noqa: N802
    """Walker2d-v5 with random body mass/inertia, joint damping and friction (rand_param_envs)."""
    return _rand_params("Walker2d-v5", "Walker2DRandParams", **kwargs)
