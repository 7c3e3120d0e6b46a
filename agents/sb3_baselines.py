"""Stable-Baselines3 baselines under metarl's one adaptation protocol.

The meta-learners are judged against what a practitioner would otherwise do, each producing the same
`AdaptationResult` on the same held-out tasks:

* ``scratch``: a fresh SB3 learner (PPO or SAC) per held-out task, trained on that task alone. Between
  measurements it gets ``episodes × horizon`` env steps of training, the most experience a meta-learner's
  stage of ``episodes`` episodes can hold (where episodes end early, as the hoppers' do, more than the
  meta-learners' episodes actually take: the comparison leans toward the baselines), and optionally a
  larger budget (``extra_episodes``) to show what it takes to get there without meta-learning.
* ``multitask``: one SB3 learner pre-trained across the *training* tasks (a new task every episode, no
  task information in the observation), then fine-tuned on each held-out task like ``scratch``.
* ``oracle``: one SB3 learner pre-trained across the training tasks with the true task parameters
  (`Task.features`) appended to its observation; evaluated zero-shot on each held-out task with its
  parameters. It needs no adaptation: an upper reference.
* ``random``: uniformly random actions, the floor.

Measurement: the return of ``episodes`` fresh episodes per task, actions *sampled* from the policy (as
the meta-learners' measured episodes are); measurement episodes are not training experience. Stage k
of a learner that adapts is measured after ``k × episodes × horizon`` training steps on the task; the
oracle and the random policy do not adapt, so their one measurement stands for every stage.

Example:
    >>> from metarl.agents.sb3_baselines import BaselineSpec, run_baseline
    >>> import metarl
    >>> fam = metarl.family_of(metarl.make_family("PointNav2D"))
    >>> tasks = fam.sample_tasks(2, "test")
    >>> result, cost = run_baseline(BaselineSpec("random"), "metarl/PointNav2D-v0", {}, tasks,
    ...                             steps=1, episodes=2, seed=0)
    >>> result.returns.shape
    (2, 2)
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

import metarl
from metarl.episodes import WITHIN_EPISODE_BINS
from metarl.evaluation import AdaptationResult
from metarl.tasks import Task, episode_limit, family_of

ALGOS = ("ppo", "sac")
KINDS = ("scratch", "multitask", "oracle", "random")


@dataclasses.dataclass(frozen=True)
class BaselineSpec:
    """One baseline.

    Args:
        kind: ``scratch``, ``multitask``, ``oracle`` or ``random``.
        algo: the SB3 learner, ``ppo`` or ``sac`` (ignored by ``random``).
        pretrain_steps: env steps of multi-task pre-training (``multitask`` and ``oracle``; > 0).
        extra_episodes: further measurements after this many adaptation episodes in total (a larger
            budget than the meta-learners get; each a multiple of the protocol's ``episodes``).
        pretrain_envs: parallel envs (each drawing its own training tasks) during pre-training.
        params: keyword arguments for the SB3 constructor (e.g. ``{learning_rate: 1e-3}``).
    """

    kind: str
    algo: str = "ppo"
    pretrain_steps: int = 0
    extra_episodes: tuple[int, ...] = ()
    pretrain_envs: int = 8
    params: dict = dataclasses.field(default_factory=dict)

    def check(self, steps: int, episodes: int) -> None:
        """Raise ValueError naming the field if this baseline cannot run under the protocol."""
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind != "random" and self.algo not in ALGOS:
            raise ValueError(f"algo: expected one of {', '.join(ALGOS)}, got {self.algo!r}")
        if self.kind in ("multitask", "oracle") and self.pretrain_steps <= 0:
            raise ValueError(f"pretrain_steps: a {self.kind} baseline needs a budget > 0, got {self.pretrain_steps}")
        if self.kind in ("scratch", "multitask"):
            if episodes < 1 or steps < 1:
                raise ValueError(f"a {self.kind} baseline needs an adaptation budget: eval.steps and eval.episodes "
                                 f"must be >= 1, got steps={steps}, episodes={episodes}")
            last = steps * episodes
            for extra in self.extra_episodes:
                if extra <= last or extra % episodes:
                    raise ValueError(f"extra_episodes: {extra} must be a multiple of eval.episodes ({episodes}) "
                                     f"above the protocol's last stage ({last} episodes)")
        if self.pretrain_envs < 1:
            raise ValueError(f"pretrain_envs: expected >= 1, got {self.pretrain_envs}")
        if self.kind != "random":
            import inspect

            accepted = set(inspect.signature(_sb3_class(self.algo).__init__).parameters) - {"self", "policy", "env"}
            unknown = sorted(set(self.params) - accepted)
            if unknown:
                raise ValueError(f"params.{unknown[0]}: not an argument of SB3's {self.algo.upper()}")
            # the protocol sets how much a learner collects between measurements; these would change it
            fixed = sorted(set(self.params) & {"n_steps", "train_freq"})
            if fixed and self.kind in ("scratch", "multitask"):
                raise ValueError(f"params.{fixed[0]}: set by the protocol (episodes x horizon env steps per stage)")


# ---- envs ---------------------------------------------------------------------------------------------
class TaskInObservation(gym.ObservationWrapper):
    """Append the current task's `Task.features` to the observation (the oracle's input)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self._family = family_of(env)
        extra = self._family.task.features().size
        box = env.observation_space
        self.observation_space = gym.spaces.Box(
            low=np.concatenate([box.low, np.full(extra, -np.inf)]).astype(box.dtype),
            high=np.concatenate([box.high, np.full(extra, np.inf)]).astype(box.dtype), dtype=box.dtype)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        features = self._family.task.features().astype(observation.dtype)
        return np.concatenate([observation, features])


class TrainingTasks(gym.Wrapper):
    """A new task from the family's training distribution at every reset (multi-task pre-training)."""

    def __init__(self, env: gym.Env, seed: int):
        super().__init__(env)
        self._family = family_of(env)
        self._rng = np.random.default_rng(seed)

    def reset(self, **kwargs: Any):
        seed = int(self._rng.integers(2**31 - 1))
        self._family.set_task(self._family.sample_tasks(1, "train", seed=seed)[0])
        return self.env.reset(**kwargs)


def make_env(env_id: str, env_kwargs: dict, task: Task | None = None, oracle: bool = False,
             training_seed: int | None = None) -> gym.Env:
    """One env of the family: set to ``task``, or drawing training tasks when ``training_seed`` is given."""
    env = metarl.make_family(env_id, **env_kwargs)
    if training_seed is not None:
        env = TrainingTasks(env, training_seed)
    elif task is not None:
        family_of(env).set_task(task)
    if oracle:
        env = TaskInObservation(env)
    return env


def measure(act: Callable[[np.ndarray], np.ndarray], env_id: str, env_kwargs: dict, task: Task, episodes: int,
            seed: int, oracle: bool = False) -> np.ndarray:
    """Returns of ``episodes`` episodes of ``task``, run side by side (one batched ``act`` per step)."""
    return measure_binned(act, env_id, env_kwargs, task, episodes, seed, oracle).sum(-1)


def measure_binned(act: Callable[[np.ndarray], np.ndarray], env_id: str, env_kwargs: dict, task: Task, episodes: int,
                   seed: int, oracle: bool = False, bins: int = WITHIN_EPISODE_BINS) -> np.ndarray:
    """``[episodes, bins]``: the reward of each episode in each of ``bins`` equal spans of the horizon (the
    binning of `EpisodeBatch.binned_returns`); the rows sum to the returns."""
    return measure_episodes(act, env_id, env_kwargs, task, episodes, seed, oracle, bins).binned


@dataclasses.dataclass
class Measured:
    """What `measure_episodes` saw: ``binned`` ``[episodes, bins]`` rewards, ``success`` ``[episodes]`` (any step
    with ``info["success"]``; None where the env reports none) and each ``info["reward_*"]`` term's episode sums."""

    binned: np.ndarray
    success: np.ndarray | None
    reward_terms: dict[str, np.ndarray]


def measure_episodes(act: Callable[[np.ndarray], np.ndarray], env_id: str, env_kwargs: dict, task: Task, episodes: int,
                     seed: int, oracle: bool = False, bins: int = WITHIN_EPISODE_BINS) -> Measured:
    """``episodes`` episodes of ``task``, run side by side (one batched ``act`` per step), as `Measured`."""
    envs = [make_env(env_id, env_kwargs, task, oracle) for _ in range(episodes)]
    try:
        horizon = episode_limit(envs[0])
        obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
        binned = np.zeros((episodes, bins))
        success, reported = np.zeros(episodes, bool), False
        terms: dict[str, np.ndarray] = {}
        running = np.ones(episodes, dtype=bool)
        low, high = envs[0].action_space.low, envs[0].action_space.high
        t = 0
        while running.any():
            actions = np.clip(act(obs), low, high)
            b = min(t * bins // horizon, bins - 1)
            for i in np.flatnonzero(running):
                o, r, terminated, truncated, info = envs[i].step(actions[i])
                obs[i] = o
                binned[i, b] += float(r)
                for key, value in info.items():
                    if key.startswith("reward_"):
                        terms.setdefault(key, np.zeros(episodes))[i] += float(value)
                if "success" in info:
                    reported = True
                    success[i] |= bool(info["success"])
                running[i] = not (terminated or truncated)
            t += 1
        return Measured(binned, success if reported else None, terms)
    finally:
        for env in envs:
            env.close()


# ---- SB3 learners ---------------------------------------------------------------------------------------
def _sb3_class(algo: str):
    from stable_baselines3 import PPO, SAC

    return {"ppo": PPO, "sac": SAC}[algo]


def _learner(spec: BaselineSpec, env: gym.Env, seed: int, rollout_steps: int, budget: int):
    """An SB3 learner on ``env``: PPO collects ``rollout_steps`` (one adaptation stage) per update; SAC's
    replay buffer holds the whole budget. ``spec.params`` override these and SB3's defaults."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    kwargs: dict[str, Any] = {}
    if spec.algo == "ppo":
        # SB3's default minibatch of 64, or the largest size from 16 to 64 that divides the rollout evenly
        # (a last, smaller minibatch otherwise: SB3 warns, and trains on it)
        divisors = [d for d in range(16, min(64, rollout_steps) + 1) if rollout_steps % d == 0]
        kwargs.update(n_steps=rollout_steps, batch_size=max(divisors) if divisors else min(64, rollout_steps))
    else:
        # a fine-tuned learner starts from a trained actor: no random warm-up steps
        warmup = 0 if spec.kind == "multitask" else min(100, max(budget // 10, 1))
        kwargs.update(buffer_size=max(budget, 1), learning_starts=warmup)
    kwargs.update(spec.params)
    venv = env if isinstance(env, DummyVecEnv) else DummyVecEnv([lambda: env])
    try:
        model = _sb3_class(spec.algo)("MlpPolicy", venv, seed=seed, verbose=0, device="cpu", **kwargs)
    except TypeError as exc:
        raise ValueError(f"params: {spec.algo.upper()} does not take these arguments: {exc}") from exc
    if "tensorboard_log" not in spec.params:
        from stable_baselines3.common.logger import Logger

        # a logger with no outputs: without one, every learn() makes an empty SB3-<time> folder in the temp dir
        model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def _sb3_act(model) -> Callable[[np.ndarray], np.ndarray]:
    return lambda obs: model.predict(obs, deterministic=False)[0]


def pretrain(spec: BaselineSpec, env_id: str, env_kwargs: dict, seed: int, log: Callable[[str], None] = print):
    """Train one SB3 learner across the family's training tasks (``spec.pretrain_steps`` env steps)."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    oracle = spec.kind == "oracle"
    venv = DummyVecEnv([
        (lambda i=i: make_env(env_id, env_kwargs, oracle=oracle, training_seed=seed * 1000 + i))
        for i in range(spec.pretrain_envs)
    ])
    kwargs = {"n_steps": 256} if spec.algo == "ppo" else {}
    model = _learner(dataclasses.replace(spec, params={**kwargs, **spec.params}), venv, seed,
                     rollout_steps=256, budget=spec.pretrain_steps)
    start = time.perf_counter()
    with _one_torch_thread():
        model.learn(total_timesteps=spec.pretrain_steps)
    log(f"    pre-trained {spec.algo.upper()} ({spec.kind}) for {model.num_timesteps:,} env steps "
        f"in {time.perf_counter() - start:.0f}s")
    return model


@dataclasses.dataclass
class Cost:
    """What a baseline consumed: pre-training env steps (shared by all tasks) and per-task training."""

    pretrain_env_steps: int = 0
    adapt_env_steps_per_task: float = 0.0
    measure_env_steps: int = 0


@contextlib.contextmanager
def _one_torch_thread():
    """SB3's small MLPs gain nothing from intra-op threads, and when another process shares the cores, two
    spinning OpenMP threads per tiny op made PPO 13x and SAC 80x slower here (measured 2026-11-30)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_baseline(spec: BaselineSpec, env_id: str, env_kwargs: dict, tasks: list[Task], steps: int, episodes: int,
                 seed: int, log: Callable[[str], None] = print) -> tuple[AdaptationResult, Cost]:
    """The adaptation curve of a baseline on ``tasks`` (stages at 0, e, 2e, ... steps·e adaptation episodes,
    then ``spec.extra_episodes``)."""
    spec.check(steps, episodes)
    with _one_torch_thread():
        return _run_baseline(spec, env_id, env_kwargs, tasks, steps, episodes, seed, log)


def _run_baseline(spec: BaselineSpec, env_id: str, env_kwargs: dict, tasks: list[Task], steps: int, episodes: int,
                  seed: int, log: Callable[[str], None]) -> tuple[AdaptationResult, Cost]:
    probe = metarl.make_family(env_id, **env_kwargs)
    horizon = episode_limit(probe)
    probe.close()
    stage_episodes = [k * episodes for k in range(steps + 1)] + list(spec.extra_episodes)
    cost = Cost()
    rng = np.random.default_rng(seed)
    seeds = [int(s) for s in rng.integers(2**31 - 1, size=len(tasks))]
    returns = np.zeros((len(tasks), len(stage_episodes)))
    within = np.zeros((len(tasks), len(stage_episodes), WITHIN_EPISODE_BINS))
    metrics = _StageMetrics(len(tasks), len(stage_episodes))

    if spec.kind in ("random", "oracle"):
        if spec.kind == "oracle":
            model = pretrain(spec, env_id, env_kwargs, seed, log)
            cost.pretrain_env_steps = int(model.num_timesteps)
            act = _sb3_act(model)
        else:
            space = probe.action_space
            act_rng = np.random.default_rng(seed)
            act = lambda obs: act_rng.uniform(space.low, space.high, size=(len(obs), *space.shape))  # noqa: E731
        for i, task in enumerate(tasks):
            seen = measure_episodes(act, env_id, env_kwargs, task, episodes, seeds[i], spec.kind == "oracle")
            within[i, :] = seen.binned.mean(0)
            returns[i, :] = within[i, 0].sum()
            metrics.add(i, slice(None), seen)
            cost.measure_env_steps += episodes * horizon
        return metrics.result(AdaptationResult(list(tasks), returns, stage_episodes, [0.0] * len(stage_episodes),
                                               within)), cost

    pretrained = None
    if spec.kind == "multitask":
        pretrained = pretrain(spec, env_id, env_kwargs, seed, log)
        cost.pretrain_env_steps = int(pretrained.num_timesteps)
    rollout = episodes * horizon
    trained = np.zeros(len(stage_episodes))
    for i, task in enumerate(tasks):
        start = time.perf_counter()
        env = make_env(env_id, env_kwargs, task)
        model = _learner(spec, env, seeds[i], rollout, stage_episodes[-1] * horizon)
        if pretrained is not None:
            model.policy.load_state_dict(pretrained.policy.state_dict())
            if hasattr(pretrained, "log_ent_coef"):  # SAC's tuned entropy coefficient lives outside the policy
                model.log_ent_coef.data.copy_(pretrained.log_ent_coef.data)
        for k, target in enumerate(stage_episodes):
            todo = target * horizon - model.num_timesteps
            if todo > 0:
                model.learn(total_timesteps=todo, reset_num_timesteps=False)
            if model.num_timesteps != target * horizon:
                raise RuntimeError(f"{spec.kind} {spec.algo}: trained {model.num_timesteps} env steps at stage {k}, "
                                   f"the protocol gives {target * horizon}")
            trained[k] = model.num_timesteps
            seen = measure_episodes(_sb3_act(model), env_id, env_kwargs, task, episodes, seeds[i] + 7919 * k)
            within[i, k] = seen.binned.mean(0)
            returns[i, k] = within[i, k].sum()
            metrics.add(i, k, seen)
            cost.measure_env_steps += episodes * horizon
        cost.adapt_env_steps_per_task += model.num_timesteps / len(tasks)
        env.close()
        log(f"    task {i + 1}/{len(tasks)}: return {returns[i, 0]:.1f} -> {returns[i, steps]:.1f}"
            + (f" -> {returns[i, -1]:.1f} after {stage_episodes[-1]} episodes" if spec.extra_episodes else "")
            + f" ({time.perf_counter() - start:.0f}s)")
    return metrics.result(AdaptationResult(list(tasks), returns, stage_episodes, [float(n) for n in trained],
                                           within)), cost


class _StageMetrics:
    """Success rates and reward terms per task and stage, filled as a baseline measures its stages."""

    def __init__(self, n_tasks: int, n_stages: int):
        self.shape = (n_tasks, n_stages)
        self.success: np.ndarray | None = None
        self.terms: dict[str, np.ndarray] = {}

    def add(self, task: int, stage: Any, seen: Measured) -> None:
        if seen.success is not None:
            if self.success is None:
                self.success = np.zeros(self.shape)
            self.success[task, stage] = seen.success.mean()
        for name, values in seen.reward_terms.items():
            self.terms.setdefault(name, np.zeros(self.shape))[task, stage] = values.mean()

    def result(self, result: AdaptationResult) -> AdaptationResult:
        return dataclasses.replace(result, success=self.success, reward_terms=self.terms)


__all__ = ["ALGOS", "KINDS", "BaselineSpec", "Cost", "TaskInObservation", "TrainingTasks", "make_env", "measure",
           "measure_binned", "measure_episodes", "pretrain", "run_baseline"]
