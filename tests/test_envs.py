"""Behaviour of the built-in task families and of the generic `DynamicsFamily`.

What is pinned here:

* every family is a well-formed Gymnasium env (Gymnasium's and Stable-Baselines3's env checkers);
* every reward is the sum of the ``reward_*`` terms reported in ``info`` (the documented contract);
* each MuJoCo family *is* Gymnasium's v5 env where the reference says it is (same seed and actions give
  bit-identical observations, rewards and episode ends, across a reset), and elsewhere differs from v5
  only by its documented reward, recomputed here from v5's own ``info``;
* ``set_task`` really changes the dynamics or the reward, writes ``nominal * multipliers`` into the
  compiled model, re-derives the model constants (``mj_setConst``), and the nominal task restores the
  original model bit for bit.
"""

from __future__ import annotations

import math

import gymnasium as gym
import mujoco
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import metarl
from metarl import DirectionTask, DynamicsTask, GoalTask, HeadingTask, VelocityTask
from metarl.envs import DynamicsFamily, Vary

FAMILY_NAMES = list(metarl.FAMILIES)
RAND_PARAMS = {"HopperRandParams": "Hopper-v5", "Walker2DRandParams": "Walker2d-v5"}
# Compiled-model fields the RandParams tasks vary, and constants mj_setConst derives from them.
VARIED_FIELDS = ("body_mass", "body_inertia", "dof_damping", "geom_friction")
DERIVED_FIELDS = ("body_subtreemass", "body_invweight0", "dof_invweight0", "dof_M0", "actuator_acc0")

# Rewards mix float64 terms with float32 control costs (the actions are float32); the reward and the
# sum of its terms are associated differently, so compare them to a tight relative tolerance.
REL = 1e-6
ABS = 1e-9


def _v5(env_id: str, horizon: int, **kwargs) -> gym.Env:
    """Gymnasium's own env with the family's time limit, so episode ends are comparable."""
    return gym.make(env_id, max_episode_steps=horizon, **kwargs)


def _ctrl(action: np.ndarray, weight: float) -> float:
    """Control cost computed as v5 computes it (in the action's dtype)."""
    return weight * np.sum(np.square(action))


# --------------------------------------------------------------------------------------------------
# API conformance
# --------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")  # infinite obs bounds, PointNav's +-0.1 action box
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_env_checkers_pass(make, name):
    """Both env checkers accept every family, at the nominal task and at a held-out task.

    Warnings (infinite observation bounds, an unnormalised action box, the family being a wrapper) are
    allowed; any failed check raises.
    """
    family = metarl.family_of(make(name))
    gym_check_env(family, skip_render_check=True)
    sb3_check_env(family)
    family.set_task(family.sample_tasks(1, "test")[0])
    gym_check_env(family, skip_render_check=True)
    sb3_check_env(family)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_registered_horizon_is_the_family_horizon(make, name):
    """The Gymnasium time limit is the family's ``horizon`` (the table in metarl.envs)."""
    env = make(name)
    family = metarl.family_of(env)
    assert family.horizon == metarl.FAMILIES[name][1]
    assert env.spec.max_episode_steps == family.horizon
    assert family.family == name


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_reward_is_sum_of_reward_terms(make, rollout, random_actions, name):
    """reward == sum of info["reward_*"], for train, test and (where it exists) ood tasks.

    Also checks each observation lies in the observation space and every term is finite.
    """
    env = make(name)
    family = metarl.family_of(env)
    tasks = family.sample_tasks(2, "train", seed=1) + family.sample_tasks(2, "test")
    if family.has_ood:
        tasks += family.sample_tasks(1, "ood")
    actions = random_actions(env.action_space, 30, seed=2)
    for k, task in enumerate(tasks):
        family.set_task(task)
        run = rollout(env, actions, seed=10 + k)
        for obs in run.reset_obs + run.obs:
            assert env.observation_space.contains(obs)
        for t, (reward, info) in enumerate(zip(run.rewards, run.infos, strict=True)):
            terms = {key: value for key, value in info.items() if key.startswith("reward_")}
            assert terms, f"{name}: step {t} reports no reward_* terms"
            assert all(np.isfinite(v) for v in terms.values()), terms
            assert np.isfinite(reward)
            assert reward == pytest.approx(sum(terms.values()), rel=REL, abs=ABS), (task, t, terms)


# --------------------------------------------------------------------------------------------------
# Reproduction of Gymnasium v5
# --------------------------------------------------------------------------------------------------


def test_halfcheetah_dir_forward_with_v5_ctrl_weight_is_halfcheetah_v5(rollout, assert_same_rollout,
                                                                      random_actions):
    """HalfCheetahDir(ctrl_cost_weight=0.1) at d=+1 is exactly HalfCheetah-v5, over a whole episode
    (truncated at the horizon) and on into the next one."""
    env = gym.make("metarl/HalfCheetahDir-v0", ctrl_cost_weight=0.1)
    family = metarl.family_of(env)
    family.set_task(DirectionTask("HalfCheetahDir", 1.0))
    ref = _v5("HalfCheetah-v5", family.horizon)
    actions = random_actions(env.action_space, family.horizon + 40, seed=3)
    ours, theirs = rollout(env, actions, seed=5), rollout(ref, actions, seed=5)
    assert_same_rollout(ours, theirs)
    assert ours.truncated[family.horizon - 1] and ours.resets == [0, family.horizon]
    assert not any(ours.terminated)
    env.close()
    ref.close()


def test_halfcheetah_vel_is_v5_dynamics_with_velocity_reward(make, rollout, random_actions):
    """HalfCheetahVel observes exactly what HalfCheetah-v5 does, and its reward is
    -|v_x - v*| - 0.05 ||a||^2 with v_x taken from v5's own info."""
    env = make("HalfCheetahVel")
    family = metarl.family_of(env)
    task = family.sample_tasks(1, "test")[0]
    family.set_task(task)
    ref = _v5("HalfCheetah-v5", family.horizon)
    actions = random_actions(env.action_space, 60, seed=4)
    ours, theirs = rollout(env, actions, seed=6), rollout(ref, actions, seed=6)
    for x, y in zip(ours.reset_obs + ours.obs, theirs.reset_obs + theirs.obs, strict=True):
        assert np.array_equal(x, y)
    for reward, info, action in zip(ours.rewards, theirs.infos, actions, strict=True):
        expected = -abs(info["x_velocity"] - task.velocity) - _ctrl(action, 0.05)
        assert reward == pytest.approx(expected, rel=REL, abs=ABS)
    ref.close()


@pytest.mark.parametrize("name", ["AntDir", "AntFwdBwd"])
def test_ant_heading_zero_is_ant_v5(rollout, assert_same_rollout, random_actions, name):
    """At heading 0 the Ant heading families are exactly Ant-v5 (observations, rewards, terminations)
    over a whole episode and after a reset."""
    env = gym.make(metarl.env_id(name))
    family = metarl.family_of(env)
    family.set_task(HeadingTask(name, 0.0))
    ref = _v5("Ant-v5", family.horizon)
    actions = random_actions(env.action_space, family.horizon + 30, seed=7)
    ours, theirs = rollout(env, actions, seed=8), rollout(ref, actions, seed=8)
    assert_same_rollout(ours, theirs)
    assert ours.n_episode_ends >= 1 and len(ours.resets) >= 2  # a reset really happened
    env.close()
    ref.close()


def test_ant_dir_reward_follows_heading(make, rollout, random_actions):
    """At a held-out heading AntDir still observes exactly Ant-v5, and its reward is
    <(cos t, sin t), v_xy> + survive - ctrl - contact with every term taken from v5's info."""
    env = make("AntDir")
    family = metarl.family_of(env)
    task = family.sample_tasks(1, "test")[0]
    family.set_task(task)
    ref = _v5("Ant-v5", family.horizon)
    actions = random_actions(env.action_space, 50, seed=9)
    ours, theirs = rollout(env, actions, seed=11), rollout(ref, actions, seed=11)
    assert ours.resets == theirs.resets and ours.terminated == theirs.terminated
    for x, y in zip(ours.reset_obs + ours.obs, theirs.reset_obs + theirs.obs, strict=True):
        assert np.array_equal(x, y)
    c, s = math.cos(task.angle), math.sin(task.angle)
    for reward, mine, info in zip(ours.rewards, ours.infos, theirs.infos, strict=True):
        forward = c * info["x_velocity"] + s * info["y_velocity"]
        assert mine["reward_forward"] == pytest.approx(forward, rel=REL, abs=ABS)
        expected = forward + info["reward_survive"] + info["reward_ctrl"] + info["reward_contact"]
        assert reward == pytest.approx(expected, rel=REL, abs=ABS)
    ref.close()


def test_ant_fwd_bwd_backward_rewards_minus_vx_exactly(make, rollout, random_actions):
    """AntFwdBwd at pi rewards exactly -v_x (no sin(pi) ~ 1e-16 leak of v_y), same dynamics as at 0."""
    env = make("AntFwdBwd")
    family = metarl.family_of(env)
    actions = random_actions(env.action_space, 30, seed=12)
    family.set_task(HeadingTask("AntFwdBwd", 0.0))
    fwd = rollout(env, actions, seed=13)
    family.set_task(HeadingTask("AntFwdBwd", math.pi))
    bwd = rollout(env, actions, seed=13)
    for x, y in zip(fwd.obs, bwd.obs, strict=True):
        assert np.array_equal(x, y)
    for a, b in zip(fwd.infos, bwd.infos, strict=True):
        assert b["reward_forward"] == -b["x_velocity"]
        assert a["reward_forward"] == a["x_velocity"]
    assert fwd.rewards != bwd.rewards


def test_halfcheetah_dir_backward_negates_forward_term(make, rollout, random_actions):
    """d = -1 keeps the dynamics and the control cost, and negates the forward term exactly."""
    env = make("HalfCheetahDir")
    family = metarl.family_of(env)
    actions = random_actions(env.action_space, 30, seed=14)
    family.set_task(DirectionTask("HalfCheetahDir", 1.0))
    fwd = rollout(env, actions, seed=15)
    family.set_task(DirectionTask("HalfCheetahDir", -1.0))
    bwd = rollout(env, actions, seed=15)
    for x, y in zip(fwd.obs, bwd.obs, strict=True):
        assert np.array_equal(x, y)
    for a, b, action in zip(fwd.infos, bwd.infos, actions, strict=True):
        assert b["reward_forward"] == -a["reward_forward"] == -a["x_velocity"]
        assert a["reward_ctrl"] == b["reward_ctrl"] == -_ctrl(action, 0.05)


def test_ant_goal_is_v5_dynamics_with_goal_reward(make, rollout, random_actions):
    """AntGoal observes exactly Ant-v5 with x, y included and no termination; its reward is
    -||xy - g||_1 - 0.1 ||a||^2 + v5's contact term, with xy = obs[:2]."""
    env = make("AntGoal")
    family = metarl.family_of(env)
    task = family.sample_tasks(1, "test")[0]
    family.set_task(task)
    ref = _v5("Ant-v5", family.horizon, exclude_current_positions_from_observation=False,
              terminate_when_unhealthy=False)
    actions = random_actions(env.action_space, 60, seed=16)
    ours, theirs = rollout(env, actions, seed=17), rollout(ref, actions, seed=17)
    assert env.observation_space.shape == ref.observation_space.shape == (107,)
    assert not any(ours.terminated)
    for x, y in zip(ours.reset_obs + ours.obs, theirs.reset_obs + theirs.obs, strict=True):
        assert np.array_equal(x, y)
    goal = np.asarray(task.goal)
    for reward, obs, info, action in zip(ours.rewards, theirs.obs, theirs.infos, actions, strict=True):
        expected = -np.sum(np.abs(obs[:2] - goal)) - _ctrl(action, 0.1) + info["reward_contact"]
        assert reward == pytest.approx(expected, rel=REL, abs=ABS)
    ref.close()


@pytest.mark.parametrize("name", list(RAND_PARAMS))
def test_rand_params_nominal_task_is_v5(make, rollout, assert_same_rollout, random_actions, name):
    """At the all-ones task Hopper/Walker2d RandParams are exactly their v5 env, across several
    (terminated) episodes."""
    env = make(name)
    family = metarl.family_of(env)
    assert family.task == family.default_task()
    assert all(set(values) == {1.0} for _, values in family.task.scales)
    ref = _v5(RAND_PARAMS[name], family.horizon)
    actions = random_actions(env.action_space, 120, seed=18)
    ours = rollout(env, actions, seed=19)
    assert_same_rollout(ours, rollout(ref, actions, seed=19))
    assert any(ours.terminated)  # random actions topple the robot: the reset path is exercised
    ref.close()


@pytest.mark.parametrize("name", list(RAND_PARAMS))
def test_rand_params_nominal_task_restores_model_bit_for_bit(make, rollout, assert_same_rollout,
                                                            random_actions, name):
    """A random task and then the nominal one leave the compiled model (varied fields *and* the
    constants mj_setConst derives) bit-identical to a fresh v5 model, and v5 behaviour returns."""
    env = make(name)
    family = metarl.family_of(env)
    model = env.unwrapped.model
    ref = _v5(RAND_PARAMS[name], family.horizon)
    fresh = ref.unwrapped.model
    family.set_task(family.sample_tasks(1, "train", seed=20)[0])
    actions = random_actions(env.action_space, 40, seed=21)
    rollout(env, actions, seed=22)  # run in the perturbed task so the MjData is dirty too
    for field in VARIED_FIELDS + ("body_subtreemass",):
        assert not np.array_equal(getattr(model, field), getattr(fresh, field)), field
    family.set_task(family.default_task())
    for field in VARIED_FIELDS + DERIVED_FIELDS:
        assert np.array_equal(getattr(model, field), getattr(fresh, field)), field
    assert model.stat.meanmass == fresh.stat.meanmass
    assert_same_rollout(rollout(env, actions, seed=23), rollout(ref, actions, seed=23))
    ref.close()


# --------------------------------------------------------------------------------------------------
# set_task changes behaviour
# --------------------------------------------------------------------------------------------------


def _subtree_mass(model: mujoco.MjModel, masses: np.ndarray) -> np.ndarray:
    """Mass of each body's subtree, summed from ``masses`` and the body tree (children after parents)."""
    total = np.array(masses, dtype=np.float64, copy=True)
    for body in range(model.nbody - 1, 0, -1):
        total[model.body_parentid[body]] += total[body]
    return total


def test_hopper_heavier_bodies_change_model_and_trajectory(make, rollout, random_actions):
    """Heavier Hopper bodies: body_mass == nominal * multipliers, subtree masses are re-derived from
    the scaled masses (mj_setConst ran), and the same seed and actions give another trajectory."""
    env = make("HopperRandParams")
    family = metarl.family_of(env)
    model = env.unwrapped.model
    nominal_mass = model.body_mass.copy()
    nominal_subtree = model.body_subtreemass.copy()
    actions = random_actions(env.action_space, 15, seed=24)
    nominal_run = rollout(env, actions, seed=25)

    multipliers = np.linspace(1.5, 2.5, model.nbody)
    scales = tuple((f, tuple(multipliers) if f == "body_mass" else v) for f, v in family.default_task().scales)
    family.set_task(DynamicsTask("HopperRandParams", scales))
    assert np.array_equal(model.body_mass, nominal_mass * multipliers)
    expected_subtree = _subtree_mass(model, nominal_mass * multipliers)
    np.testing.assert_allclose(model.body_subtreemass, expected_subtree, rtol=1e-12)
    assert not np.allclose(model.body_subtreemass, nominal_subtree)

    heavy_run = rollout(env, actions, seed=25)
    assert np.array_equal(heavy_run.reset_obs[0], nominal_run.reset_obs[0])  # same start state
    assert not np.allclose(heavy_run.obs[5], nominal_run.obs[5])


@pytest.mark.parametrize("name", list(RAND_PARAMS))
def test_rand_params_task_scales_every_field(make, name):
    """Every varied field is nominal * the task's per-element multipliers (reshaped to the field)."""
    env = make(name)
    family = metarl.family_of(env)
    model = env.unwrapped.model
    nominal = {f: getattr(model, f).copy() for f in VARIED_FIELDS}
    task = family.sample_tasks(1, "test")[0]
    family.set_task(task)
    assert sorted(f for f, _ in task.scales) == sorted(VARIED_FIELDS)
    for field in VARIED_FIELDS:
        scale = np.asarray(task.scale(field)).reshape(nominal[field].shape)
        assert np.array_equal(getattr(model, field), nominal[field] * scale), field
    np.testing.assert_allclose(model.body_subtreemass, _subtree_mass(model, model.body_mass), rtol=1e-12)


def test_halfcheetah_vel_target_changes_reward_not_dynamics(make, rollout, random_actions):
    """Two target velocities, same seed and actions: same trajectory, rewards differ by exactly the
    change in the velocity term."""
    env = make("HalfCheetahVel")
    family = metarl.family_of(env)
    actions = random_actions(env.action_space, 30, seed=26)
    family.set_task(VelocityTask("HalfCheetahVel", 0.5))
    slow = rollout(env, actions, seed=27)
    family.set_task(VelocityTask("HalfCheetahVel", 2.5))
    fast = rollout(env, actions, seed=27)
    for x, y in zip(slow.obs, fast.obs, strict=True):
        assert np.array_equal(x, y)
    assert slow.rewards != fast.rewards
    for r_slow, r_fast, info in zip(slow.rewards, fast.rewards, slow.infos, strict=True):
        v = info["x_velocity"]
        assert r_fast - r_slow == pytest.approx(abs(v - 0.5) - abs(v - 2.5), rel=REL, abs=ABS)


def test_set_task_takes_effect_mid_episode(make, random_actions):
    """set_task is immediate: the very next step of the running episode uses the new target."""
    env = make("HalfCheetahVel")
    family = metarl.family_of(env)
    env.reset(seed=0)
    actions = random_actions(env.action_space, 2, seed=28)
    env.step(actions[0])
    family.set_task(VelocityTask("HalfCheetahVel", 3.0))
    _, reward, _, _, info = env.step(actions[1])
    assert reward == pytest.approx(-abs(info["x_velocity"] - 3.0) - _ctrl(actions[1], 0.05), rel=REL)


def test_ant_goal_goal_changes_reward(make, rollout, random_actions):
    """Moving the goal changes only the goal term: -||xy - g||_1 with the new goal."""
    env = make("AntGoal")
    family = metarl.family_of(env)
    actions = random_actions(env.action_space, 30, seed=29)
    family.set_task(GoalTask("AntGoal", (2.0, 1.0)))
    a = rollout(env, actions, seed=30)
    family.set_task(GoalTask("AntGoal", (-1.0, -2.5)))
    b = rollout(env, actions, seed=30)
    for x, y in zip(a.obs, b.obs, strict=True):
        assert np.array_equal(x, y)
    assert a.rewards != b.rewards
    for obs, info_a, info_b in zip(a.obs, a.infos, b.infos, strict=True):
        assert info_a["reward_goal"] == pytest.approx(-np.sum(np.abs(obs[:2] - [2.0, 1.0])), rel=REL)
        assert info_b["reward_goal"] == pytest.approx(-np.sum(np.abs(obs[:2] - [-1.0, -2.5])), rel=REL)
        assert info_a["reward_ctrl"] == info_b["reward_ctrl"]
        assert info_a["reward_contact"] == info_b["reward_contact"]


def test_point_nav_dynamics_and_reward():
    """PointNav2D starts at the origin, moves by the action clipped to +-0.1 and is rewarded by the
    negative distance to the goal after the move; it never terminates and truncates at the horizon."""
    env = gym.make("metarl/PointNav2D-v0")
    family = metarl.family_of(env)
    family.set_task(GoalTask("PointNav2D", (0.3, -0.2)))
    obs, _ = env.reset(seed=0)
    assert np.array_equal(obs, [0.0, 0.0])
    raw = family  # step the family itself: the oversized action below is deliberate
    obs, reward, terminated, truncated, info = raw.step(np.array([1.0, -0.05]))
    np.testing.assert_allclose(obs, [0.1, -0.05], atol=1e-7)
    assert reward == pytest.approx(-math.hypot(0.3 - 0.1, -0.2 + 0.05))
    assert info["reward_goal"] == reward and not terminated and not truncated
    env.reset(seed=0)
    for t in range(family.horizon):
        _, _, terminated, truncated, _ = env.step(np.array([0.01, 0.0], dtype=np.float32))
        assert not terminated
        assert truncated == (t == family.horizon - 1)
    env.close()


# --------------------------------------------------------------------------------------------------
# Generic DynamicsFamily
# --------------------------------------------------------------------------------------------------

GENERIC_IDS = ["Swimmer-v5", "InvertedPendulum-v5"]


def _generic(env_id: str) -> DynamicsFamily:
    return DynamicsFamily(
        env_id, [Vary("gravity", low=0.5, high=1.5, base=None, shared=True), Vary("body_mass")]
    )


@pytest.mark.parametrize("env_id", GENERIC_IDS)
def test_generic_family_nominal_task_is_v5(rollout, assert_same_rollout, random_actions, env_id):
    """A DynamicsFamily built on any MuJoCo id behaves exactly like that id at the nominal task, also
    after a random task has been set and the nominal one set back."""
    family = _generic(env_id)
    assert family.family == env_id.split("-v")[0] + "Dynamics"
    assert family.horizon == gym.spec(env_id).max_episode_steps
    ref = gym.make(env_id).unwrapped
    actions = random_actions(family.action_space, 40, seed=31)
    assert_same_rollout(rollout(family, actions, seed=32), rollout(ref, actions, seed=32))
    family.set_task(family.sample_tasks(1, "train", seed=0)[0])
    family.set_task(family.default_task())
    assert_same_rollout(rollout(family, actions, seed=33), rollout(ref, actions, seed=33))
    family.close()
    ref.close()


@pytest.mark.parametrize("env_id", GENERIC_IDS)
def test_generic_family_gravity_and_mass_follow_the_task(env_id):
    """A shared uniform gravity multiplier scales model.opt.gravity; body_mass is per element; train
    multipliers lie in [0.5, 1.5] and ood ones in the band outside it."""
    family = _generic(env_id)
    model = family.unwrapped.model
    gravity, mass = model.opt.gravity.copy(), model.body_mass.copy()
    for task in family.sample_tasks(3, "train", seed=1):
        family.set_task(task)
        (g,) = task.scale("gravity")
        assert 0.5 <= g <= 1.5
        assert np.array_equal(model.opt.gravity, gravity * g)
        assert len(task.scale("body_mass")) == model.nbody
        assert np.array_equal(model.body_mass, mass * np.asarray(task.scale("body_mass")))
    for task in family.sample_tasks(5, "ood"):
        (g,) = task.scale("gravity")
        assert 0.5 - 1 / 6 - 1e-12 <= g < 0.5 or 1.5 < g <= 1.5 + 1 / 6 + 1e-12
    family.close()


def test_generic_family_gravity_changes_pendulum_motion(rollout):
    """Gravity x1.5 vs x0.5 makes an unactuated inverted pendulum fall at another rate."""
    family = _generic("InvertedPendulum-v5")
    nominal = family.default_task()
    zero = np.zeros((10, 1), dtype=np.float32)
    runs = []
    for g in (0.5, 1.5):
        scales = tuple((f, (g,) if f == "gravity" else v) for f, v in nominal.scales)
        family.set_task(DynamicsTask(family.family, scales))
        runs.append(rollout(family, zero, seed=34))
    assert np.array_equal(runs[0].reset_obs[0], runs[1].reset_obs[0])
    # The pole's angular speed (obs[3]) grows faster under stronger gravity.
    assert abs(runs[1].obs[-1][3]) > abs(runs[0].obs[-1][3])
    family.close()


def test_generic_family_from_env_instance():
    """A DynamicsFamily can wrap an env instance; its name and default horizon follow the env class."""
    family = DynamicsFamily(gym.make("Hopper-v5"), [Vary("dof_damping", base=1.3)])
    assert family.family == "HopperDynamics" and family.horizon == 1000
    damping = family.unwrapped.model.dof_damping.copy()
    task = family.sample_tasks(1, "test")[0]
    family.set_task(task)
    assert np.array_equal(family.unwrapped.model.dof_damping, damping * np.asarray(task.scale("dof_damping")))
    family.close()
