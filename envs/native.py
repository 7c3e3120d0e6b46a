"""Batched stepping of the built-in MuJoCo families without Gymnasium's per-step machinery.

The ``native`` sampler backend (`metarl.sampling`) uses this module. It holds every env slot's simulation
state in one array and, each step, runs ``mj_step`` for every active slot in a tight loop (in one hot
``MjData`` per model, see `NativeSlots`), then computes the observations, rewards, terminations and reward
terms of the whole batch at once with array operations.
Gymnasium's ``step`` spends most of its time outside the simulator (wrapper checks, ``data.body(...)``
lookups, per-step dicts, scalar numpy calls); here that per-step cost is paid once per batch.

The result is the same as Gymnasium's, step for step: the same ``mj_step(model, data, nstep=frame_skip)``
from the same integration state (the solver's warm start included, so it carries over exactly as in
Gymnasium's persistent ``MjData``), the same reset
(``mj_resetData``, then the v5 reset noise drawn from ``gymnasium.utils.seeding.np_random(seed)``, then
``mj_forward``), and the v5 formulas for observations and rewards written with the same operation order.
``tests/test_native.py`` checks every MuJoCo family against its Gymnasium env over full episodes.

A *kernel* describes one family's observation and reward; `native_kernel` finds the kernel for an env
(``None`` where there is none: PointNav2D, a custom env, a subclass that changes ``step``, a wrapper
other than Gymnasium's bookkeeping ones, an env with a render mode; `unsupported_reason` says which), so
the sampler can fall back to Gymnasium.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from gymnasium.envs.mujoco.hopper_v5 import HopperEnv
from gymnasium.envs.mujoco.walker2d_v5 import Walker2dEnv
from gymnasium.utils import seeding
from gymnasium.wrappers import OrderEnforcing, PassiveEnvChecker, TimeLimit

from metarl.envs.ant import AntDir, AntFwdBwd, AntGoal
from metarl.envs.dynamics import DynamicsFamily
from metarl.envs.half_cheetah import HalfCheetahDir, HalfCheetahVel
from metarl.tasks import TaskError, episode_limit, family_of

__all__ = ["Kernel", "NativeSlots", "native_kernel", "skip_island_search", "supported_families", "unsupported_reason"]


class Kernel:
    """Observation, reward and reset of one family, computed for a batch of slots.

    Subclasses read every weight and range from the Gymnasium env they were built from, so an env made
    with non-default arguments (``ctrl_cost_weight=...``) is reproduced too.
    """

    needs_contacts = False  # call mj_rnePostConstraint after each step (cfrc_ext is observed or costed)
    uses_body_xy = False    # the forward displacement is the main body's xpos (Ant), not qpos[0]
    uniform_qvel_noise = False

    def __init__(self, env: Any):
        u = env.unwrapped
        self.frame_skip = int(u.frame_skip)
        self.dt = float(u.dt)
        self.init_qpos = u.init_qpos.copy()
        self.init_qvel = u.init_qvel.copy()
        self.noise = float(u._reset_noise_scale)
        self.ctrl_cost_weight = float(u._ctrl_cost_weight)
        self.exclude_positions = bool(u._exclude_current_positions_from_observation)
        self.main_body = 0

    def task_params(self, env: Any) -> np.ndarray:
        """The per-task numbers the reward needs, read from a family env set to that task."""
        return np.zeros(0)

    def reset(self, model: mujoco.MjModel, data: mujoco.MjData, seed: int) -> None:
        """Gymnasium v5's ``reset(seed=seed)`` on ``data``."""
        rng, _ = seeding.np_random(seed)
        mujoco.mj_resetData(model, data)
        qpos = self.init_qpos + rng.uniform(low=-self.noise, high=self.noise, size=model.nq)
        if self.uniform_qvel_noise:
            qvel = self.init_qvel + rng.uniform(low=-self.noise, high=self.noise, size=model.nv)
        else:
            qvel = self.init_qvel + self.noise * rng.standard_normal(model.nv)
        data.qpos[:] = qpos
        data.qvel[:] = qvel
        mujoco.mj_forward(model, data)

    def observe(self, qpos: np.ndarray, qvel: np.ndarray, cfrc: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def step_result(self, x_before: np.ndarray, x_after: np.ndarray, qpos: np.ndarray, qvel: np.ndarray,
                    cfrc: np.ndarray | None, action: np.ndarray, params: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """``(reward [B], terminated [B], {info reward term: [B]})`` for a batch of steps."""
        raise NotImplementedError

    def control_cost(self, action: np.ndarray) -> np.ndarray:
        return self.ctrl_cost_weight * np.sum(np.square(action), axis=1)


# ---- HalfCheetah ------------------------------------------------------------------------------------

class _HalfCheetah(Kernel):
    def __init__(self, env: Any):
        super().__init__(env)
        self.forward_weight = float(env.unwrapped._forward_reward_weight)

    def observe(self, qpos, qvel, cfrc):
        position = qpos[:, 1:] if self.exclude_positions else qpos
        return np.concatenate((position, qvel), axis=1)


class _HalfCheetahVel(_HalfCheetah):
    def task_params(self, env):
        return np.array([family_of(env)._target_velocity])

    def step_result(self, x_before, x_after, qpos, qvel, cfrc, action, params):
        x_velocity = (x_after[:, 0] - x_before[:, 0]) / self.dt
        velocity_reward = -np.abs(x_velocity - params[:, 0])
        ctrl_cost = self.control_cost(action)
        reward = velocity_reward - ctrl_cost
        return reward, np.zeros(len(reward), bool), {"reward_velocity": velocity_reward, "reward_ctrl": -ctrl_cost}


class _HalfCheetahDir(_HalfCheetah):
    def task_params(self, env):
        return np.array([family_of(env)._direction])

    def step_result(self, x_before, x_after, qpos, qvel, cfrc, action, params):
        x_velocity = (x_after[:, 0] - x_before[:, 0]) / self.dt
        forward_reward = params[:, 0] * x_velocity * self.forward_weight
        ctrl_cost = self.control_cost(action)
        reward = forward_reward - ctrl_cost
        return reward, np.zeros(len(reward), bool), {"reward_forward": forward_reward, "reward_ctrl": -ctrl_cost}


# ---- Ant -----------------------------------------------------------------------------------------------

class _Ant(Kernel):
    needs_contacts = True
    uses_body_xy = True

    def __init__(self, env: Any):
        super().__init__(env)
        u = env.unwrapped
        self.main_body = u._main_body if isinstance(u._main_body, int) else u.model.body(u._main_body).id
        self.forward_weight = float(u._forward_reward_weight)
        self.healthy_reward = float(u._healthy_reward)
        self.healthy_z = tuple(float(z) for z in u._healthy_z_range)
        self.terminate_when_unhealthy = bool(u._terminate_when_unhealthy)
        self.contact_cost_weight = float(u._contact_cost_weight)
        self.contact_range = tuple(float(c) for c in u._contact_force_range)
        self.include_cfrc = bool(u._include_cfrc_ext_in_observation)

    def contact_forces(self, cfrc: np.ndarray) -> np.ndarray:
        return np.clip(cfrc, *self.contact_range)

    def observe(self, qpos, qvel, cfrc):
        position = qpos[:, 2:] if self.exclude_positions else qpos
        parts = [position, qvel]
        if self.include_cfrc:
            parts.append(self.contact_forces(cfrc)[:, 1:].reshape(len(qpos), -1))
        return np.concatenate(parts, axis=1)

    def is_healthy(self, qpos, qvel):
        finite = np.isfinite(qpos).all(axis=1) & np.isfinite(qvel).all(axis=1)
        return finite & (self.healthy_z[0] <= qpos[:, 2]) & (qpos[:, 2] <= self.healthy_z[1])

    def costs(self, cfrc, action):
        ctrl_cost = self.control_cost(action)
        contact_cost = self.contact_cost_weight * np.sum(
            np.square(self.contact_forces(cfrc)).reshape(len(cfrc), -1), axis=1)
        return ctrl_cost, contact_cost


class _AntDir(_Ant):
    def task_params(self, env):
        return np.array(family_of(env)._heading, dtype=np.float64)

    def step_result(self, x_before, x_after, qpos, qvel, cfrc, action, params):
        xy_velocity = (x_after - x_before) / self.dt
        forward = (params[:, 0] * xy_velocity[:, 0] + params[:, 1] * xy_velocity[:, 1]) * self.forward_weight
        healthy = self.is_healthy(qpos, qvel)
        survive = healthy * self.healthy_reward
        ctrl_cost, contact_cost = self.costs(cfrc, action)
        reward = (forward + survive) - (ctrl_cost + contact_cost)
        terminated = ~healthy & self.terminate_when_unhealthy
        return reward, terminated, {"reward_forward": forward, "reward_ctrl": -ctrl_cost,
                                    "reward_contact": -contact_cost, "reward_survive": survive}


class _AntGoal(_Ant):
    def task_params(self, env):
        return np.asarray(family_of(env)._goal, dtype=np.float64)

    def step_result(self, x_before, x_after, qpos, qvel, cfrc, action, params):
        goal_reward = -np.sum(np.abs(qpos[:, :2] - params), axis=1)
        healthy = self.is_healthy(qpos, qvel)
        ctrl_cost, contact_cost = self.costs(cfrc, action)
        reward = (goal_reward + -ctrl_cost) + -contact_cost
        terminated = ~healthy & self.terminate_when_unhealthy
        return reward, terminated, {"reward_ctrl": -ctrl_cost, "reward_contact": -contact_cost,
                                    "reward_goal": goal_reward}


# ---- Hopper / Walker2d (v5 reward; the dynamics families change only the model) ----------------------

class _Planar(Kernel):
    uniform_qvel_noise = True

    def __init__(self, env: Any):
        super().__init__(env)
        u = env.unwrapped
        self.forward_weight = float(u._forward_reward_weight)
        self.healthy_reward = float(u._healthy_reward)
        self.terminate_when_unhealthy = bool(u._terminate_when_unhealthy)
        self.healthy_z = tuple(float(z) for z in u._healthy_z_range)
        self.healthy_angle = tuple(float(a) for a in u._healthy_angle_range)

    def observe(self, qpos, qvel, cfrc):
        position = qpos[:, 1:] if self.exclude_positions else qpos
        return np.concatenate((position, np.clip(qvel, -10, 10)), axis=1)

    def is_healthy(self, qpos, qvel):
        z, angle = qpos[:, 1], qpos[:, 2]
        return ((self.healthy_z[0] < z) & (z < self.healthy_z[1])
                & (self.healthy_angle[0] < angle) & (angle < self.healthy_angle[1]))

    def step_result(self, x_before, x_after, qpos, qvel, cfrc, action, params):
        x_velocity = (x_after[:, 0] - x_before[:, 0]) / self.dt
        forward = self.forward_weight * x_velocity
        healthy = self.is_healthy(qpos, qvel)
        survive = healthy * self.healthy_reward
        ctrl_cost = self.control_cost(action)
        reward = (forward + survive) - ctrl_cost
        terminated = ~healthy & self.terminate_when_unhealthy
        return reward, terminated, {"reward_forward": forward, "reward_ctrl": -ctrl_cost, "reward_survive": survive}


class _Hopper(_Planar):
    def __init__(self, env: Any):
        super().__init__(env)
        self.healthy_state = tuple(float(s) for s in env.unwrapped._healthy_state_range)

    def is_healthy(self, qpos, qvel):
        state = np.concatenate((qpos, qvel), axis=1)[:, 2:]
        healthy_state = np.all((self.healthy_state[0] < state) & (state < self.healthy_state[1]), axis=1)
        return healthy_state & super().is_healthy(qpos, qvel)


_FAMILY_KERNELS: dict[type, type[Kernel]] = {
    HalfCheetahVel: _HalfCheetahVel,
    HalfCheetahDir: _HalfCheetahDir,
    AntDir: _AntDir,
    AntFwdBwd: _AntDir,
    AntGoal: _AntGoal,
}
_DYNAMICS_KERNELS: dict[type, type[Kernel]] = {HopperEnv: _Hopper, Walker2dEnv: _Planar}
# v5 envs whose step the kernels above reproduce; a family built on anything else is not native.
_V5 = (HalfCheetahEnv, AntEnv, HopperEnv, Walker2dEnv)
_BOOKKEEPING = (TimeLimit, OrderEnforcing, PassiveEnvChecker)


def supported_families() -> list[str]:
    """The built-in families the native backend runs."""
    return ["HalfCheetahVel", "HalfCheetahDir", "AntDir", "AntFwdBwd", "AntGoal", "HopperRandParams",
            "Walker2DRandParams"]


def unsupported_reason(env: gym.Env) -> str | None:
    """Why the native backend cannot reproduce ``env`` (``None`` if it can)."""
    try:
        family = family_of(env)
    except TaskError:
        return "it is not a metarl task family"
    # Only Gymnasium's bookkeeping wrappers may sit above the family: any other wrapper could change
    # observations or rewards, which the kernels would not see.
    e = env
    while isinstance(e, gym.Wrapper) and e is not family:
        if not isinstance(e, _BOOKKEEPING):
            return f"the wrapper {type(e).__name__} may change its observations or rewards"
        e = e.env
    u = env.unwrapped
    if getattr(u, "render_mode", None) is not None:
        return f"it renders (render_mode={u.render_mode!r}); native slots have no renderer"
    if not isinstance(u, _V5):
        return f"{type(u).__name__} is not one of Gymnasium's v5 HalfCheetah, Ant, Hopper or Walker2d envs"
    if type(family) in _FAMILY_KERNELS:
        return None
    # A dynamics family over an unmodified v5 Hopper/Walker2d: the v5 reward with a per-task model.
    if type(family) is DynamicsFamily and type(u) in _DYNAMICS_KERNELS:
        return None
    return (f"the family class {type(family).__name__} has no native kernel (native runs "
            f"{', '.join(supported_families())}; subclasses that change step are not reproduced)")


def native_kernel(env: gym.Env) -> Kernel | None:
    """The kernel that reproduces ``env``'s steps, or ``None`` if there is none (use Gymnasium then)."""
    if unsupported_reason(env) is not None:
        return None
    family = family_of(env)
    if type(family) in _FAMILY_KERNELS:
        return _FAMILY_KERNELS[type(family)](env)
    return _DYNAMICS_KERNELS[type(env.unwrapped)](env)


# MuJoCo >= 3.3.6 finds the constraint islands of every step by default (mjDSBL_ISLAND turns it off; older
# versions only do it when asked). A model with one kinematic tree (every family here) has at most one
# island, all of its degrees of freedom, so the search is pure cost: 4% of HalfCheetah's mj_step here.
_ISLAND_FLAG = getattr(mujoco.mjtDisableBit, "mjDSBL_ISLAND", None)


def skip_island_search(model: mujoco.MjModel) -> None:
    """Turn off the island search in a model where it cannot find more than one island. That the results
    stay the same is shown by testing, not promised by MuJoCo: tests/test_native.py compares every family
    bit for bit with its Gymnasium env (island search on) on MuJoCo 4.0; a new single-tree family needs
    the same test."""
    if _ISLAND_FLAG is not None and getattr(model, "ntree", 2) <= 1:
        model.opt.disableflags |= int(_ISLAND_FLAG)


class NativeSlots:
    """The env slots of one process for the native backend (the sampler's slot protocol).

    `step` returns the ``reward_*`` terms of the families it runs and no ``success``: none of them (nor the v5
    envs they reproduce) reports ``info["success"]``; a family that does runs on the gymnasium backend.

    A Gymnasium env provides each task's reward parameters and model (one env per task for the dynamics
    families, whose tasks change the model; one env for all tasks otherwise). Each slot's simulation
    state is a row of one array (the part of MuJoCo's *integration state* that changes: time, ``qpos``,
    ``qvel``, actuator activations, the solver's warm start, controls, ...), and each model has one
    ``MjData`` that every slot of that model
    is stepped in: `step` loads a slot's row into it (``mj_setState``), runs ``mj_step``, and stores the row
    back (``mj_getState``). The integration state is all that ``mj_step`` reads from one step to the next,
    so this is bit for bit the same as a persistent ``MjData`` per slot (tested), and much faster: one
    ``MjData`` stays in the cache, where hundreds were fetched from memory in turn (7% of the step rate on
    HalfCheetah), and ``qpos``/``qvel`` of the whole batch are array views instead of per-slot copies.

    A row leaves out the parts of the integration state that no step or reset of these envs writes
    (applied forces, mocap poses, equality activations, user data): they keep their ``mj_resetData``
    values in the shared ``MjData``, the same for every slot, so copying them in and out each step
    (57 of HalfCheetah's 91 numbers) would change nothing. A row includes the controls, so the actions
    of the whole batch are written into the rows with one array assignment.
    """

    _S = mujoco.mjtState
    _SPEC = _S.mjSTATE_INTEGRATION.value & ~int(
        _S.mjSTATE_QFRC_APPLIED | _S.mjSTATE_XFRC_APPLIED | _S.mjSTATE_MOCAP_POS | _S.mjSTATE_MOCAP_QUAT
        | _S.mjSTATE_EQ_ACTIVE | _S.mjSTATE_USERDATA)

    def __init__(self, env_id: str, env_kwargs: dict[str, Any]):
        self.env_id, self.env_kwargs = env_id, dict(env_kwargs)
        self.task_envs: list[gym.Env] = [gym.make(env_id, **self.env_kwargs)]
        reason = unsupported_reason(self.task_envs[0])
        if reason is not None:
            raise ValueError(f"{env_id}: the native backend does not support this env: {reason}")
        self.kernel = native_kernel(self.task_envs[0])
        probe = self.task_envs[0]
        self.horizon = episode_limit(probe)
        space = probe.action_space
        self.low, self.high = space.low.astype(np.float64), space.high.astype(np.float64)
        self._q0, self._c0 = self._layout(probe.unwrapped.model)
        self.models: list[mujoco.MjModel] = []
        self._data_of: dict[int, mujoco.MjData] = {}  # id(model) -> the MjData its slots are stepped in

    def configure(self, tasks: Sequence[Any], slots_per_task: int) -> None:
        """Give slot ``j * slots_per_task + m`` task ``j``."""
        n, M = len(tasks), slots_per_task
        # A task that changes the dynamics needs its own model (one env per task); otherwise one env
        # serves every task and only the reward parameters differ.
        per_task_model = isinstance(family_of(self.task_envs[0]), DynamicsFamily)
        while per_task_model and len(self.task_envs) < n:
            self.task_envs.append(gym.make(self.env_id, **self.env_kwargs))
        params, task_models = [], []
        for j, task in enumerate(tasks):
            env = self.task_envs[j if per_task_model else 0]
            family_of(env).set_task(task)
            params.append(self.kernel.task_params(env))
            task_models.append(env.unwrapped.model)
        self._data_of = {}
        for model in task_models:
            if id(model) not in self._data_of:
                skip_island_search(model)
                self._data_of[id(model)] = mujoco.MjData(model)
        self.models = [task_models[j] for j in range(n) for _ in range(M)]
        self._datas = [self._data_of[id(model)] for model in self.models]
        self.params = np.repeat(np.stack(params), M, axis=0)
        model0 = task_models[0]
        S, nq, nv = n * M, model0.nq, model0.nv
        self.full = np.zeros((S, mujoco.mj_stateSize(model0, self._SPEC)))
        q0, c0 = self._q0, self._c0
        self.qpos, self.qvel = self.full[:, q0:q0 + nq], self.full[:, q0 + nq:q0 + nq + nv]
        self.ctrl = self.full[:, c0:c0 + model0.nu]
        self._rows = list(self.full)  # one view per slot, made once
        # HalfCheetah and Ant: every slot runs in one model and one MjData (the hot loop skips the lookups).
        self._one = (model0, self._datas[0]) if len(self._data_of) == 1 else None
        self.xy = np.zeros((S, 2))
        self.cfrc = np.zeros((S, model0.nbody, 6)) if self.kernel.needs_contacts else None

    def _layout(self, model: mujoco.MjModel) -> tuple[int, int]:
        """Where ``qpos`` and ``ctrl`` start in a row. A state is its components in the order of their
        mjtState bits (time, qpos, qvel, ..., ctrl, ...); checked once against ``mj_getState`` itself."""
        S = self._S
        q0 = mujoco.mj_stateSize(model, S.mjSTATE_TIME)
        c0 = mujoco.mj_stateSize(model, self._SPEC & (S.mjSTATE_CTRL.value - 1))
        d = mujoco.MjData(model)
        d.qpos[:], d.qvel[:], d.ctrl[:] = np.arange(1, model.nq + 1), -np.arange(1, model.nv + 1), 0.5
        row = np.zeros(mujoco.mj_stateSize(model, self._SPEC))
        mujoco.mj_getState(model, d, row, self._SPEC)
        if not (np.array_equal(row[q0:q0 + model.nq + model.nv], np.concatenate((d.qpos, d.qvel)))
                and np.array_equal(row[c0:c0 + model.nu], d.ctrl)):
            raise RuntimeError(f"mujoco {mujoco.__version__} lays out mj_getState differently from what the native "
                               "backend expects; use sampler.backend gymnasium")
        return q0, c0

    def _read_extra(self, s: int, d: mujoco.MjData) -> None:
        if self.kernel.uses_body_xy:
            self.xy[s] = d.xpos[self.kernel.main_body, :2]
        if self.cfrc is not None:
            self.cfrc[s] = d.cfrc_ext

    def reset(self, s: int, seed: int) -> np.ndarray:
        model, d = self.models[s], self._datas[s]
        self.kernel.reset(model, d, seed)
        mujoco.mj_getState(model, d, self._rows[s], self._SPEC)
        self._read_extra(s, d)
        idx = [s]
        cfrc = None if self.cfrc is None else self.cfrc[idx]
        return self.kernel.observe(self.qpos[idx], self.qvel[idx], cfrc)[0]

    def step(self, idx: np.ndarray, actions: np.ndarray):
        """Step slots ``idx`` with (already clipped) ``actions [B, act_dim]``; returns ``(obs, reward,
        terminated, truncated, terms)`` for those slots (``truncated`` only by the env: always False)."""
        k = self.kernel
        before = (self.xy[idx] if k.uses_body_xy else self.qpos[idx, :1]).copy()
        if len(actions) != len(idx):
            raise ValueError(f"step: {len(actions)} actions for {len(idx)} slots")
        self.ctrl[idx] = actions
        frame_skip, rows, spec = k.frame_skip, self._rows, self._SPEC
        step, load, store = mujoco.mj_step, mujoco.mj_setState, mujoco.mj_getState
        # The hot loops: nothing but the simulator.
        extra = k.needs_contacts or k.uses_body_xy
        if self._one is not None and not extra:  # HalfCheetah
            m, d = self._one
            for s in idx.tolist():
                row = rows[s]
                load(m, d, row, spec)
                step(m, d, frame_skip)
                store(m, d, row, spec)
        else:
            models, datas = self.models, self._datas
            for s in idx.tolist():
                m, d, row = models[s], datas[s], rows[s]
                load(m, d, row, spec)
                step(m, d, frame_skip)
                if extra:
                    if k.needs_contacts:
                        mujoco.mj_rnePostConstraint(m, d)
                    self._read_extra(s, d)
                store(m, d, row, spec)
        qpos, qvel = self.qpos[idx], self.qvel[idx]
        cfrc = None if self.cfrc is None else self.cfrc[idx]
        after = self.xy[idx] if k.uses_body_xy else qpos[:, :1]
        reward, terminated, terms = k.step_result(before, after, qpos, qvel, cfrc, actions, self.params[idx])
        return k.observe(qpos, qvel, cfrc), reward, terminated, np.zeros(len(idx), bool), terms

    def close(self) -> None:
        for env in self.task_envs:
            env.close()
        self.task_envs, self.models, self._datas, self._data_of = [], [], [], {}
