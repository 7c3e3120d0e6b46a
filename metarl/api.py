"""metarl's Python API: meta-train, load a run, adapt to a new env, act.

The moment meta-learning is for comes after training: a new task appears (a robot with another payload,
a new target) and the agent adapts from a few episodes of it. Here that task is any Gymnasium env instance
with the spaces the agent was trained on, not only a task drawn from the family's lists (runnable in full: docs/deploy.md):

    import metarl.api as mrl

    learner = mrl.train("experiments/maml_trpo/point_nav_2d.yaml", ["quick=true"])   # or mrl.load(RUN_DIR)
    env = gym.make("metarl/PointNav2D-v0")
    metarl.family_of(env).set_task(metarl.GoalTask("PointNav2D", goal=(0.3, -0.2)))  # a goal of your own
    policy = learner.adapt(env)            # MAML-TRPO: gradient steps on episodes collected in env;
                                           # RL²: a trial of episodes, its hidden state carried on
    obs, _ = env.reset(seed=0)
    action = policy.predict(obs, deterministic=True)
    obs, reward, terminated, truncated, _ = env.step(action)
    policy.observe(reward, terminated or truncated)   # RL² reads the reward in context; MAML ignores it
    policy.save("adapted.pt")                          # AdaptedPolicy.load("adapted.pt") acts the same

Adaptation runs through the same code as the evaluator: the agent's evaluation stages (its inner steps, or
its recurrent trial) and `metarl.sampling.rollout`, driven on the given env instead of the sampler's. The
command line's ``train`` and ``eval`` are `train` and `load` + `MetaLearner.evaluate`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch

from metarl.config import ConfigError, RunConfig, load_config
from metarl.episodes import EpisodeBatch
from metarl.sampling import rollout
from metarl.sampling.slots import EnvSlots, Replayed, ReplaySlots
from metarl.tasks import TaskError, family_of

__all__ = ["AdaptedPolicy", "Episode", "MetaLearner", "Sample", "load", "train"]


class Sample(NamedTuple):
    """What `AdaptedPolicy.sample` returns: the env's action, the policy's raw output, its log-density."""

    action: np.ndarray
    raw: np.ndarray
    log_prob: float | np.ndarray | None


@dataclasses.dataclass
class Episode:
    """One episode collected anywhere (a robot, another simulator, a plain Gymnasium loop), for
    `MetaLearner.adapt_on`.

    ``observations`` ``[T, obs_dim]``: the observation each action was taken in; ``actions`` ``[T, act_dim]``: the
    actions as the policy produced them, before the env's scaling and clipping (the ``raw`` of
    `AdaptedPolicy.sample`; for PEARL, whose actions are in the env's box already, the action itself);
    ``rewards`` ``[T]``; ``terminated``: the episode ended in a terminal state (else a time limit cut it);
    ``last_observation``: the observation after the last step (default: the last observation)."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: bool = False
    last_observation: np.ndarray | None = None

    def checked(self, obs_dim: int, act_dim: int, where: str) -> Episode:
        """This episode as float32 arrays; ValueError in one line naming what is malformed."""
        obs = np.asarray(self.observations, np.float32)
        act = np.asarray(self.actions, np.float32)
        rew = np.asarray(self.rewards, np.float32).reshape(-1)
        t = len(rew)
        if t < 1 or obs.shape != (t, obs_dim) or act.shape != (t, act_dim):
            raise ValueError(f"{where}: expected observations [T, {obs_dim}], actions [T, {act_dim}] and rewards [T] "
                             f"with T >= 1, got {obs.shape}, {act.shape}, {rew.shape}")
        last = obs[-1] if self.last_observation is None else np.asarray(self.last_observation, np.float32).reshape(-1)
        if last.shape != (obs_dim,):
            raise ValueError(f"{where}: last_observation must have shape ({obs_dim},), got {last.shape}")
        if not all(np.isfinite(x).all() for x in (obs, act, rew, last)):
            raise ValueError(f"{where}: non-finite values")
        return Episode(obs, act, rew, bool(self.terminated), last)


def train(config: str | Path | RunConfig, overrides: list[str] | tuple[str, ...] = (),
          run_dir: str | Path | None = None, verbose: bool = False, resume: bool = False) -> MetaLearner:
    """Meta-train from a config file (with ``key=value`` overrides, as on the command line) or a
    `RunConfig`; returns the trained run, loaded. The run folder is ``run_dir`` or
    ``runs/<experiment>/<timestamp>-<seed>`` as for ``metarl train``; with ``resume``, ``run_dir`` is an
    existing run continued from its newest checkpoint (``config``: its config, e.g. `load_run_config`)."""
    from metarl.training import build_agent, train_agent

    if not isinstance(config, RunConfig):
        config = load_config(config, list(overrides))
    elif overrides:
        config = load_config(None, list(overrides), data=config.to_dict())
    if resume and run_dir is None:
        raise ConfigError("train: resume needs the run_dir of the run to continue")
    sampler, agent = build_agent(config)
    try:  # the trained agent is the run's last checkpoint: kept as it is, not loaded again
        folder = train_agent(config, sampler, agent, None if run_dir is None else Path(run_dir), resume, verbose)
    except BaseException:
        sampler.close()
        raise
    return MetaLearner(folder, config, agent)


def load(run_dir: str | Path, device: str | None = None, trust_code: bool = False) -> MetaLearner:
    """A trained run (its config.yaml and newest usable checkpoint) as a `MetaLearner`; or a zoo entry:
    ``"zoo:NAME"`` (``metarl zoo`` lists them) or an exported entry's folder (`metarl.zoo`; its evaluations go
    to ``runs/zoo/NAME/``). ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``; default: the run's own
    ``device``) is where adaptation's gradient steps run; a checkpoint written on any device loads on any
    other. Acting stays numpy on the CPU. Code its config names from inside the run folder (an env module beside
    config.yaml) is imported only with ``trust_code``: a run folder someone shared could run anything that way."""
    from metarl import zoo
    from metarl.runfolder import load_checkpoint, load_run_config
    from metarl.training import build_agent

    if zoo.is_reference(run_dir):  # its evaluations go to runs/zoo/NAME of the current folder
        entry, config, agent = zoo.load_agent(run_dir, device=device, trust_code=trust_code)
        learner = MetaLearner(Path("runs") / "zoo" / entry.name, config, agent)
        learner.zoo = entry
        return learner
    run_dir = Path(run_dir)
    config = load_run_config(run_dir, trust_code=trust_code)
    if device is not None:
        import dataclasses

        config = dataclasses.replace(config, device=device)  # checked by RunConfig, resolved by build_agent
    if config.sampler.placement != "local":  # a run trained on a Ray cluster evaluates and deploys anywhere
        import dataclasses

        config = dataclasses.replace(config, sampler=dataclasses.replace(config.sampler, placement="local"))
    sampler, agent = build_agent(config)  # the sampler starts no worker until something samples
    try:
        load_checkpoint(run_dir, agent, config)
    except BaseException:
        sampler.close()
        raise
    return MetaLearner(run_dir, config, agent)


class MetaLearner:
    """A meta-trained agent and its run: adapt it to new envs (`adapt`), evaluate it on its family's
    held-out tasks (`evaluate`). Close it (or use ``with``) to stop the sampler's workers."""

    def __init__(self, run_dir: Path, config: RunConfig, agent: Any):
        self.run_dir, self.config, self.agent = Path(run_dir), config, agent
        self.zoo: Any = None  # the `metarl.zoo.Entry` it was loaded from; run_dir is then where its evaluations go

    @property
    def name(self) -> str:
        return self.config.agent_name

    def adapt(self, env: gym.Env, steps: int | None = None, episodes: int | None = None, seed: int = 0,
              horizon: int | None = None) -> AdaptedPolicy:
        """Adapt to ``env`` (any env instance with the trained spaces) from episodes collected in it.

        MAML-TRPO: ``steps`` gradient steps, each on ``episodes`` fresh episodes of the policy so far
        (defaults: the run's ``eval.steps`` and ``eval.episodes``). RL²: one trial of ``steps`` episodes; the
        returned policy carries the hidden state on from its end (``episodes`` is not used). PEARL: ``steps``
        context episodes, z drawn from their posterior; the policy keeps adding context and re-inferring z
        after each episode while it acts. ``steps=0``
        gives the unadapted policy. Episodes are cut at ``horizon`` (default: the env's time limit, else its
        family's horizon). ``env`` is reset with seeds derived from ``seed`` and is not closed."""
        e = self.config.eval
        steps = e.steps if steps is None else int(steps)
        episodes = e.episodes if episodes is None else int(episodes)
        if steps < 0 or episodes < 1:
            raise ValueError(f"adapt: steps must be >= 0 and episodes >= 1, got steps={steps}, episodes={episodes}")
        slots = EnvSlots(env, self._spaces(env), horizon)
        task = _task_of(env)

        def sample(actor: Any, tasks: list[Any], count: int, sample_seed: int, episodes_per_trial: int = 1) -> EpisodeBatch:
            # one env: the episodes run one after another, as one trial of `count` episodes (a stateless
            # actor is indifferent; a recurrent one is meant to carry its state through them)
            return EpisodeBatch.from_numpy(tasks, rollout(slots, actor, tasks, [0], count, sample_seed,
                                                          episodes_per_trial=count))

        actor = self.agent.adapt_with(sample, task, steps, episodes, seed)
        return AdaptedPolicy(actor, slots.low, slots.high, self.name, steps)

    def adapt_on(self, stages: list[list[Episode]], seed: int = 0, task: Any = None) -> AdaptedPolicy:
        """Adapt on episodes collected outside metarl: ``stages[k]`` are the episodes of adaptation stage k, in
        the order the agent's adaptation consumes them, replayed through its own actor (its actions replaced
        by the recorded ones). MAML-TRPO: one gradient step per stage on its episodes, which the policy of that
        stage collected (stage 0: ``learner.adapt(env, steps=0)``; stage k: the policy ``adapt_on(stages[:k])``
        returned). RL² and PEARL: one trial of all the episodes, one episode per stage, carried into the
        returned policy (hidden state; context and z). ``seed`` seeds what the adaptation draws (PEARL's z);
        ``task`` is recorded with the episodes (for envs that are task families). Given the episodes that
        `adapt` collected, it returns the policy `adapt` returned. No stages (``[]``): the unadapted policy,
        stage 0, as ``adapt(env, steps=0)`` gives it without an env."""
        if any(not stage for stage in stages):
            raise ValueError("adapt_on: every stage must be a non-empty list of episodes")
        if len({len(stage) for stage in stages}) > 1:
            raise ValueError(f"adapt_on: every stage must hold as many episodes as the first, got "
                             f"{[len(stage) for stage in stages]}")
        sampler = self.agent.sampler
        obs_dim, act_dim = sampler.observation_space.shape[0], sampler.action_space.shape[0]
        queue = [ep.checked(obs_dim, act_dim, f"adapt_on: stage {k} episode {i}")
                 for k, stage in enumerate(stages) for i, ep in enumerate(stage)]
        total = len(queue)
        low = sampler.action_space.low.astype(np.float64)
        high = sampler.action_space.high.astype(np.float64)

        def collect(actor: Any, tasks: list[Any], count: int, sample_seed: int, episodes_per_trial: int = 1) -> EpisodeBatch:
            if count > len(queue):
                raise ValueError(f"adapt_on: the {self.name} adaptation asked for {count} more episodes, "
                                 f"{len(queue)} of the {total} given are left")
            slots = ReplaySlots([queue.pop(0) for _ in range(count)], low, high)
            return EpisodeBatch.from_numpy(tasks, rollout(slots, Replayed(actor, slots), tasks, [0], count,
                                                          sample_seed, episodes_per_trial=count))

        actor = self.agent.adapt_with(collect, task, len(stages), len(stages[0]) if stages else 1, seed)
        if queue:
            raise ValueError(f"adapt_on: the {self.name} adaptation used {total - len(queue)} of the {total} episodes "
                             "given (RL² and PEARL take one episode per stage)")
        return AdaptedPolicy(actor, low, high, self.name, len(stages))

    def evaluate(self, split: str | None = None, tasks: int | None = None, steps: int | None = None,
                 episodes: int | None = None, lock: bool = True, repeats: int = 1) -> dict[str, Any]:
        """The evaluation protocol on the family's held-out tasks (defaults: the run's ``eval`` settings);
        writes ``RUN_DIR/eval/<split>/`` (summary.json, CSVs, PNGs) and returns the summary. ``metarl eval``
        is this call. ``repeats`` R > 1: R independent adaptations per task, pooled, written to
        ``RUN_DIR/eval/<split>-repeats<R>/`` (for families with few tasks). ``lock=False``: the caller
        already holds the run folder's lock (`run_lock`)."""
        from metarl.runfolder import check_writable, eval_dir, eval_target, run_lock
        from metarl.training import evaluate_run

        e = self.config.eval
        split, tasks = split or e.split, tasks or e.tasks
        steps, episodes = e.steps if steps is None else steps, episodes or e.episodes
        if repeats < 1:
            raise ValueError(f"evaluate: repeats must be >= 1, got {repeats}")
        check_writable(self.run_dir, self.run_dir / "eval", eval_dir(self.run_dir, split, repeats))
        self.run_dir.mkdir(parents=True, exist_ok=True)  # a zoo entry's evaluation folder is made on first use

        def evaluate() -> dict[str, Any]:
            out = eval_target(self.run_dir, split, repeats, self.agent.iteration)  # never over a later iteration's
            check_writable(out)
            return evaluate_run(self.agent, self.config, self.run_dir, split, tasks, steps, episodes, repeats=repeats,
                                out=out)

        if not lock:
            return evaluate()
        with run_lock(self.run_dir):
            return evaluate()

    def _spaces(self, env: gym.Env) -> tuple[tuple[int, ...], tuple[int, ...]]:
        sampler = self.agent.sampler
        want = (sampler.observation_space.shape, sampler.action_space.shape)
        got = (getattr(env.observation_space, "shape", None), getattr(env.action_space, "shape", None))
        if got != want:
            raise ValueError(f"adapt: the env's observation and action shapes {got} differ from the ones "
                             f"{self.name} was trained on ({self.config.env}: {want})")
        return want

    def close(self) -> None:
        self.agent.sampler.close()

    def __enter__(self) -> MetaLearner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        source = f"zoo entry {self.zoo.name}" if self.zoo is not None else f"run {self.run_dir}"
        return (f"MetaLearner({self.name} on {self.config.env}, iteration {self.agent.iteration}, "
                f"{self.agent.env_steps:,} env steps, {source})")


class AdaptedPolicy:
    """A policy adapted to one env: ``predict(obs)`` gives the action to step the env with (in the env's
    units, clipped to its bounds); call ``observe(reward, done)`` after each step (RL² reads it, as its
    input carries the last reward and the end of an episode; for MAML-TRPO it is a no-op). ``save`` /
    `AdaptedPolicy.load` keep it, adapted state included."""

    def __init__(self, actor: Any, low: np.ndarray, high: np.ndarray, agent: str, adapted_steps: int):
        self._actor = actor
        self.low, self.high = np.asarray(low, np.float64), np.asarray(high, np.float64)
        self.agent, self.adapted_steps = agent, int(adapted_steps)
        self._scale = float(getattr(actor, "action_scale", 1.0))
        self._observe = getattr(actor, "observe", None)  # ``actor`` is started on one env slot (`adapt_with`)
        self.envs = 1  # the envs a stateful actor runs (`sample` on a batch widens it)

    @property
    def stateful(self) -> bool:
        """Whether the policy keeps a state that `observe` feeds (RL²'s hidden state, PEARL's context): it adapts
        while it acts. False for a policy that adapts only between stages (MAML-TRPO's gradient steps)."""
        return self._observe is not None

    def predict(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """The action for one observation, as the env takes it: ``clip(action_scale * a, low, high)``."""
        obs = np.asarray(obs, np.float32)
        if not np.all(np.isfinite(obs)):
            raise ValueError(f"predict: the observation has non-finite values: {obs}")
        return self._act(obs.reshape(-1), deterministic)[0]

    def sample(self, obs: np.ndarray, deterministic: bool = False) -> Sample:
        """``(action, raw, log_prob)`` for one observation ``[obs_dim]``, or for a batch ``[B, obs_dim]`` of B envs
        of the adapted task. ``action`` is what the env takes, ``clip(action_scale * raw, low, high)``; ``raw`` is
        the policy's own output, what an `Episode` records for `MetaLearner.adapt_on`; ``log_prob`` its
        log-density under the policy, summed over the action dimensions (at the mean when ``deterministic``; None
        for an agent whose actor gives none). RL² and PEARL keep a state per env: the first batch continues the
        adapted state in each of its B envs, which from then on are the policy's (the same B every call; `observe`
        takes B rewards and ends)."""
        action, raw = self._act(obs, deterministic)
        density = getattr(self._actor, "last_log_prob", None)
        if density is None:
            return Sample(action, raw, None)
        log_prob = np.asarray(density(), np.float64).reshape(-1)
        return Sample(action, raw, log_prob if raw.ndim == 2 else float(log_prob[0]))

    def _act(self, obs: np.ndarray, deterministic: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(action, raw)`` for one observation or a batch (see `sample`)."""
        obs = np.asarray(obs, np.float32)
        batch = obs.ndim == 2
        if obs.ndim not in (1, 2) or not np.all(np.isfinite(obs)):
            raise ValueError(f"sample: expected a finite observation [obs_dim] or batch [B, obs_dim], got shape {obs.shape}")
        envs = len(obs) if batch else 1
        if self._observe is not None and envs != self.envs:  # a policy with a state per env
            if self.envs != 1 or not hasattr(self._actor, "widen"):
                raise ValueError(f"sample: this {self.agent} policy runs {self.envs} envs (a state for each), got "
                                 f"{envs} observations")
            self._actor.widen(envs)  # every env continues from the adapted state
            self.envs = envs
        saved, self._actor.deterministic = self._actor.deterministic, bool(deterministic)
        try:
            raw = np.asarray(self._actor.act(obs.reshape(1, -1 if batch else 1, obs.shape[-1])), np.float32)
        finally:
            self._actor.deterministic = saved
        raw = raw.reshape(len(obs), -1) if batch else raw.reshape(-1)
        return np.clip(raw.astype(np.float64) * self._scale, self.low, self.high).astype(np.float32), raw

    def observe(self, reward: float | np.ndarray, done: bool | np.ndarray) -> None:
        """What the env (or each of the batch's B envs) returned for the last action: its reward, and whether the
        episode ended there."""
        if self._observe is not None:
            rewards, dones = np.asarray(reward, np.float32).reshape(-1), np.asarray(done, bool).reshape(-1)
            if len(rewards) != self.envs or len(dones) != self.envs:
                raise ValueError(f"observe: this policy runs {self.envs} env(s), got {len(rewards)} rewards and "
                                 f"{len(dones)} ends")
            self._observe(rewards.reshape(1, -1), dones.reshape(1, -1))

    def run_episodes(self, env: gym.Env, episodes: int = 1, seed: int | None = None,
                     deterministic: bool = False) -> list[float]:
        """Roll out ``episodes`` episodes in ``env`` with `predict` / `observe`; returns their returns (the
        time limit of ``env`` ends an episode; wrap it in one if it has none)."""
        returns = []
        for k in range(episodes):
            obs, _ = env.reset(seed=None if seed is None else seed + k)
            total, done = 0.0, False
            while not done:
                obs, reward, terminated, truncated, _ = env.step(self.predict(obs, deterministic))
                done = bool(terminated or truncated)
                self.observe(float(reward), done)
                total += float(reward)
            returns.append(total)
        return returns

    def save(self, path: str | Path) -> Path:
        """Write the adapted policy (parameters and, for RL², its hidden state) to ``path`` (a torch file
        loadable with ``weights_only=True``), atomically."""
        import io

        from metarl.system import atomic_write

        buffer = io.BytesIO()
        torch.save({"format": 1, "agent": self.agent, "adapted_steps": self.adapted_steps,
                    "low": torch.from_numpy(self.low), "high": torch.from_numpy(self.high),
                    "actor": _agent(self.agent).save_actor(self._actor)}, buffer)
        atomic_write(Path(path), buffer.getvalue())
        return Path(path)

    @staticmethod
    def load(path: str | Path) -> AdaptedPolicy:
        """An adapted policy written by `save` (deterministic actions are the same; the exploration noise
        starts again from its seed)."""
        try:
            state = torch.load(Path(path), map_location="cpu", weights_only=True)
            actor = _agent(state["agent"]).load_actor(state["actor"])
            return AdaptedPolicy(actor, state["low"].numpy(), state["high"].numpy(), state["agent"],
                                 state["adapted_steps"])
        except Exception as exc:  # a file that is not one fails in many ways (zip, pickle, index, key errors)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"{path}: not an adapted policy written by AdaptedPolicy.save ({first})") from None

    def __repr__(self) -> str:
        return f"AdaptedPolicy({self.agent}, adapted with {self.adapted_steps} step(s))"


def _task_of(env: gym.Env) -> Any:
    try:
        return family_of(env).task
    except (TaskError, AttributeError):
        return None  # any env will do; episodes of an env that is not a family carry no task


def _agent(name: str) -> Any:
    from metarl.agent import get_agent

    return get_agent(name)
