"""Stepping Meta-World v3 envs faster with the same numbers (`speed_up`, used by `MetaWorldFamily` by default).

A metaworld 3.1.1 ``env.step`` spends more time assembling its observation than MuJoCo spends simulating: the
object's orientation goes through ``scipy.spatial.transform.Rotation.from_matrix(xmat).as_quat()`` (about 0.2 ms
of a 0.7 ms step on this kind of machine, for a single 3x3 matrix), and the observation is put together from
named lookups, ``np.split`` and nested ``np.hstack``; the grasp test walks every contact in Python. `speed_up`
replaces three methods on one env instance, leaving its class, every other env and the rest of the process
alone:

* ``_get_quat_objects`` runs the env's own code with ``Rotation`` bound to `_Rotation`, whose ``from_matrix``
  converts one matrix with the same arithmetic, in the same order, as SciPy's (Shepperd's method: the largest of
  the diagonal and the trace picks the formula, then the quaternion is divided by its norm; scalar last), so the
  values are bit-for-bit SciPy's. Anything that is not a plain right-handed orthonormal 3x3 matrix (SciPy
  orthogonalises those first, or refuses them) goes to SciPy itself.
* ``touching_object`` (the grasp terms of the rewards of push, pick-place and most others) finds the pads'
  contacts with the object in MuJoCo's contact arrays instead of a Python list of every contact, and sums the
  same constraint forces (``efc_force`` at each contact's ``efc_address``) in the same order;
* ``_get_curr_obs_combined_no_goal`` fills the 18 values (hand position, finger opening scaled to [0, 1], then
  each object's position and quaternion, zero-padded to 14) into one array, with the bodies' indices looked up
  once instead of by name at every step.

The simulation is untouched, and ``step``, ``evaluate_state``, ``reset`` and the reward functions (V2 or V1)
run Meta-World's own code.

`construct` builds a Meta-World env the way its class does, but copies its MuJoCo model from one compiled earlier
in the process for the same scene file instead of compiling the XML again (Gymnasium's ``MujocoEnv`` compiles it
in every constructor: about 0.1-0.3 s for a Sawyer scene, where a copy takes a few hundredths). An ML10 or ML45
slot builds a new env whenever its task moves to another env, every iteration for most slots; the copy is
MuJoCo's own (``mj_copyModel``) of a model nobody has touched, so each env still owns its model. The 16 most
recently used compiles are kept (about 20 MB each): all of ML10's 15 scenes; of ML45's 50, a third.

tests/test_metaworld.py drives a whole episode of each of the 15 ML10 envs (V2 rewards; push and pick-place with
V1 too) with Meta-World's scripted policies, side by side with and without `speed_up`, and asserts identical
observations, rewards, termination and infos at every step, and checks an env that `construct` built against the
class's own constructor; experiments/benchmarks/metaworld_speed.py measures the rates.
"""

from __future__ import annotations

import copy
import math
import types
from collections import OrderedDict
from typing import Any

import numpy as np

#: The metaworld version whose env methods `speed_up` was checked against.
CHECKED_VERSION = "3.1.1"


def quat_from_matrix(m: np.ndarray) -> np.ndarray:
    """The unit quaternion (x, y, z, w) of a rotation matrix, as ``Rotation.from_matrix(m).as_quat()`` of
    SciPy gives it, for one 3x3 matrix; SciPy itself for anything but a right-handed orthonormal one."""
    m = np.asarray(m, dtype=np.float64)
    if m.shape != (3, 3):
        return _scipy_quat(m)
    (a, b, c), (d, e, f), (g, h, i) = m.tolist()
    # SciPy's checks: the Gram matrix within 1e-12 of the identity (numpy.isclose, rtol 1e-5) and det > 0;
    # otherwise it orthogonalises (SVD) or raises, which SciPy does better than a copy would.
    rows = ((a, b, c), (d, e, f), (g, h, i))
    for r in range(3):
        for s in range(r, 3):
            dot = rows[r][0] * rows[s][0] + rows[r][1] * rows[s][1] + rows[r][2] * rows[s][2]
            if not abs(dot - (r == s)) <= 1e-12 + 1e-5 * (r == s):
                return _scipy_quat(m)
    if a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g) <= 0:
        return _scipy_quat(m)
    trace = a + e + i
    decision = (a, e, i, trace)
    choice = decision.index(max(decision))  # numpy.argmax: the first of equal values
    q = [0.0, 0.0, 0.0, 0.0]
    if choice == 3:
        q[0], q[1], q[2], q[3] = h - f, c - g, d - b, 1 + trace
    else:
        j, k = (choice + 1) % 3, (choice + 2) % 3
        q[choice] = 1 - trace + 2 * rows[choice][choice]
        q[j] = rows[j][choice] + rows[choice][j]
        q[k] = rows[k][choice] + rows[choice][k]
        q[3] = rows[k][j] - rows[j][k]
    norm = math.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3])
    return np.array([q[0] / norm, q[1] / norm, q[2] / norm, q[3] / norm])


def _scipy_quat(m: Any) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(m).as_quat()


class _Quat:
    __slots__ = ("_quat",)

    def __init__(self, quat: np.ndarray):
        self._quat = quat

    def as_quat(self, canonical: bool = False, **kwargs: Any) -> np.ndarray:
        if canonical or kwargs:
            from scipy.spatial.transform import Rotation

            return Rotation.from_quat(self._quat).as_quat(canonical=canonical, **kwargs)
        return self._quat.copy()


class _Rotation:
    """What the Meta-World envs' ``_get_quat_objects`` see as ``Rotation``: ``from_matrix(m).as_quat()``
    by `quat_from_matrix`; every other attribute is SciPy's ``Rotation``'s."""

    @staticmethod
    def from_matrix(matrix: Any, **kwargs: Any) -> Any:
        if kwargs:
            from scipy.spatial.transform import Rotation

            return Rotation.from_matrix(matrix, **kwargs)
        return _Quat(quat_from_matrix(matrix))

    def __getattr__(self, name: str) -> Any:  # pragma: no cover - the envs use from_matrix only
        from scipy.spatial.transform import Rotation

        return getattr(Rotation, name)


_ROTATION = _Rotation()


def _with_fast_rotation(function: types.FunctionType) -> types.FunctionType:
    """``function`` (a method of a Meta-World env class) with ``Rotation`` bound to `_Rotation` in a copy of its
    globals; the module's own globals are not touched."""
    if "Rotation" not in function.__code__.co_names:
        return function
    scope = {**function.__globals__, "Rotation": _ROTATION}
    copy = types.FunctionType(function.__code__, scope, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy


def _observation(env: Any) -> np.ndarray:
    """The 18 values of ``_get_curr_obs_combined_no_goal``: hand position, finger opening / 0.1 clipped to
    [0, 1], then (position, quaternion) of each object, zero-padded to ``_obs_obj_max_len``."""
    xpos = env.data.xpos
    hand, right, left = env._metarl_fast_bodies
    out = np.zeros(4 + env._obs_obj_max_len)
    out[0:3] = xpos[hand]
    out[3] = min(max(np.linalg.norm(xpos[right] - xpos[left]) / 0.1, 0.0), 1.0)
    pos = np.asarray(env._get_pos_objects()).reshape(-1, 3)
    quat = np.asarray(env._get_quat_objects()).reshape(-1, 4)
    if len(pos) != len(quat):  # what metaworld's own assembly would accept is left to it
        return env._metarl_fast_fallback()
    n = 7 * len(pos)
    out[4:4 + n] = np.concatenate([pos, quat], axis=1).reshape(-1)
    return out


def _touching_object(env: Any, object_geom_id: int) -> bool:
    """Whether both finger pads touch the geom ``object_geom_id`` with a positive summed contact force."""
    contact, force = env.data.contact, env.data.efc_force
    g1, g2, address = contact.geom1, contact.geom2, contact.efc_address
    on_object = (g1 == object_geom_id) | (g2 == object_geom_id)
    totals = []
    for pad in env._metarl_fast_pads:
        # summed one by one from 0 in the contacts' order, as metaworld does
        totals.append(sum(force[a] for a in address[on_object & ((g1 == pad) | (g2 == pad))]))
    return 0 < totals[0] and 0 < totals[1]


def speed_up(env: Any) -> Any:
    """Give one Meta-World v3 env the faster ``_get_quat_objects`` and observation assembly (see the module's
    docstring); returns ``env``. Idempotent."""
    if getattr(env, "_metarl_fast", False):
        return env
    cls = type(env)
    env._get_quat_objects = types.MethodType(_with_fast_rotation(cls._get_quat_objects), env)
    model = env.model
    env._metarl_fast_bodies = tuple(model.body(name).id for name in ("hand", "rightclaw", "leftclaw"))
    env._metarl_fast_pads = tuple(model.geom(name).id for name in ("leftpad_geom", "rightpad_geom"))
    env.touching_object = types.MethodType(_touching_object, env)
    env._metarl_fast_fallback = types.MethodType(cls._get_curr_obs_combined_no_goal, env)
    env._get_curr_obs_combined_no_goal = types.MethodType(_observation, env)
    env._metarl_fast = True
    return env


#: Compiled scene models by file (as MuJoCo compiled them, never handed out), the most recently used first kept:
#: one per env class of ML10 (15, about 20 MB each); ML45's 50 classes would hold a gigabyte
_MODELS: OrderedDict[str, Any] = OrderedDict()
MODELS_KEPT = 16


def construct(cls: type, **kwargs: Any) -> Any:
    """``cls(**kwargs)`` for a Meta-World v3 env class, with the MuJoCo model copied from `_MODELS` rather than
    compiled from its XML (see the module's docstring). Under a Gymnasium other than 1.x (whose
    ``MujocoEnv._initialize_simulation`` this follows) it is ``cls(**kwargs)``."""
    import gymnasium

    if not gymnasium.__version__.startswith("1."):
        return cls(**kwargs)
    env = cls.__new__(cls)
    env._initialize_simulation = types.MethodType(_initialize_from_compiled, env)  # found before the class's
    try:
        cls.__init__(env, **kwargs)
    finally:
        env.__dict__.pop("_initialize_simulation", None)
    return env


def _initialize_from_compiled(env: Any) -> tuple[Any, Any]:
    """Gymnasium 1.x's ``MujocoEnv._initialize_simulation`` with the compiled model reused: the model (a copy),
    its offscreen buffer grown to the env's render size, and its data."""
    import mujoco

    compiled = _MODELS.get(env.fullpath)
    if compiled is None:
        compiled = mujoco.MjModel.from_xml_path(env.fullpath)
        _MODELS[env.fullpath] = compiled
        while len(_MODELS) > MODELS_KEPT:
            _MODELS.popitem(last=False)
    _MODELS.move_to_end(env.fullpath)
    model = copy.copy(compiled)
    model.vis.global_.offwidth = max(model.vis.global_.offwidth, env.width)
    model.vis.global_.offheight = max(model.vis.global_.offheight, env.height)
    return model, mujoco.MjData(model)
