"""The agent protocol and the agent registry: what metarl's harness asks of a meta-learner, and how it finds one.

An agent is a subclass of `Agent` registered under a name. The training loop, the evaluator, videos,
``metarl bench``, the Ray placement and the Python API (`metarl.api`) use nothing else of it, so an agent in a
user's own file gets all of them by implementing five members:

* ``config_class``: its frozen dataclass of options (with ``tasks_per_batch``), built from a config's
  ``agent:`` section; ``name``: the name a config's ``agent.name`` gives;
* ``__init__(config, sampler, seed)``, setting ``config``, ``sampler``, ``iteration`` and ``env_steps``;
* ``train_step(tasks) -> metrics``: one meta-training iteration on a meta-batch of training tasks, collecting
  its episodes through ``self.sampler`` and adding them to ``env_steps``; metrics are ``{key: float}``,
  TensorBoard-namespaced (``meta/``, ``loss/``, ``time/``);
* ``state_dict()`` / ``load_state_dict(state)``: everything a resume needs to continue exactly, tensors,
  numbers, strings, lists and dicts only (checkpoints load with ``torch.load(weights_only=True)``);
  ``policy_state()`` / ``load_policy_state(state)`` (optional): only what adapting and acting need, for a zoo
  entry (`metarl.zoo`); by default the whole ``state_dict``;
* ``devices`` (optional, default ``("cpu",)``) and ``to(device)``: the torch device kinds its update runs on,
  and the call (once, right after ``__init__``, before any checkpoint is loaded) that moves its modules and
  optimisers to the ``torch.device`` a config's ``device`` resolved to (`metarl.config.resolve_device`); its
  actors stay numpy on the CPU, where the sampler runs them;
* ``adaptation(tasks, steps, episodes, seed, collect, final=True) -> actor``: **the adaptation primitive**,
  the evaluation protocol's adaptation of the meta-learned policy to each of ``tasks``. It collects every
  episode it needs by calling ``collect(actor, tasks, episodes_per_task, seed, episodes_per_trial=1)``
  (an `EpisodeBatch` comes back) and adapts on them: stage 0 is the policy before adaptation, stage k after
  k adaptation steps (gradient steps, episodes of context). A call with K episodes per trial holds the next
  K stages (episode ``m * K + k`` of a task is stage ``offset + k``): one call per stage for an agent that
  adapts between calls (MAML), one call of ``steps + 1`` episodes per trial for one that adapts inside a
  trial (RL², PEARL). With ``final`` the last stage's episodes are collected too (evaluation); without it
  (deployment on one env) the agent collects only what it needs to adapt and returns the adapted actor,
  started on one slot (``actor.start([0], 1)`` or mid-trial), ready to act.

From that primitive the base class derives held-out evaluation (`Agent.evaluate_adaptation`), the episodes
a video replays (`Agent.adaptation_rollouts`) and deployment (`Agent.adapt_with`): they differ only in
``collect`` (the agent's sampler, or a user's env). An *actor* is the sampling-side policy (`Actor`), the
picklable object the sampler ships to its worker processes and Ray actors. ``save_actor`` / ``load_actor``
(optional) let `metarl.api.AdaptedPolicy` save an adapted policy; ``set_total_iterations(n)`` (optional) tells
an agent the run's length before training (for schedules); ``added_options`` maps options added after runs
were recorded to the value that keeps those runs' behaviour, so their folders still resume; ``retired_options``
maps options the agent no longer has to ``(neutral value, why)``: a run or config that gave one its neutral value
still resumes and loads, any other value is refused in one line saying why.

Registry: built-in agents are entry points of the group ``metarl.agents`` (pyproject.toml), and a
third-party package declares its own the same way; an agent in a module or file of the user's registers with
`register_agent` (a class decorator) and is loaded by ``imports: [module]`` in a config or suite, or
``--import module`` on the command line, like a user's task family. Every command and the API find agents
through `get_agent` only; a class with a member missing or malformed is refused in one line naming it.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import numpy as np

from metarl.evaluation import AdaptationResult
from metarl.tasks import Task

ENTRY_POINT_GROUP = "metarl.agents"

#: ``collect(actor, tasks, episodes_per_task, seed, episodes_per_trial=1) -> EpisodeBatch``: where the
#: adaptation primitive's episodes come from (a `metarl.sampling.Sampler`'s ``sample``, or a user's env).
Collect = Callable[..., Any]


class AgentError(ValueError):
    """An agent that cannot be registered or found; the message is one line naming what is wrong."""


class Actor(Protocol):
    """The sampling-side policy the sampler runs (``metarl.sampling.rollout``) and the API acts with.

    ``start(task_indices, slots_per_task)`` before a rollout, with the global indices of the tasks it runs
    (to pick per-task parameters and seed per-task noise); ``act(obs)`` maps ``[n_tasks, slots, obs_dim]`` to
    ``[n_tasks, slots, act_dim]``. Optional: ``observe(rewards, dones)`` after every step (``[n_tasks, slots]``;
    recurrent and context-based actors), ``action_scale`` (the env steps with ``clip(action_scale * a)``),
    ``deterministic`` (act with the mean), ``last_log_prob()`` (``[n_tasks, slots]``: the log-density of the last
    `act`'s actions, for `metarl.api.AdaptedPolicy.sample`). A task's actions must not depend on which other tasks share the
    call (see `metarl.policies.GaussianActor`), so batches are the same on any placement.
    """

    def start(self, task_indices: list[int], slots_per_task: int) -> None: ...

    def act(self, obs: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class StageRollout:
    """One ``collect`` call of an adaptation, so a renderer can replay it (`metarl.video`).

    The agent called ``collect(actor, tasks, episodes, seed, episodes_per_trial=len(stages))``; episode ``k``
    of each trial (slot) shows adaptation stage ``stages[k]``."""

    actor: Any
    stages: tuple[int, ...]
    episodes: int
    seed: int


class Agent(abc.ABC):
    """The contract between metarl's harness and a meta-learner (see the module docstring)."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type]
    added_options: ClassVar[dict[str, Any]] = {}
    retired_options: ClassVar[dict[str, tuple[Any, str]]] = {}

    #: the torch device kinds the update runs on (a config's ``device``); see `to`
    devices: ClassVar[tuple[str, ...]] = ("cpu",)

    config: Any
    sampler: Any
    iteration: int
    env_steps: int

    @abc.abstractmethod
    def __init__(self, config: Any, sampler: Any, seed: int) -> None:
        """Build the agent for ``sampler``'s spaces; set ``config``, ``sampler``, ``iteration`` and ``env_steps``."""

    @abc.abstractmethod
    def train_step(self, tasks: list[Task]) -> dict[str, float]:
        """One meta-training iteration on ``tasks`` (a meta-batch of training tasks); returns its metrics."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs to continue exactly (plain containers of tensors and numbers)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    @abc.abstractmethod
    def adaptation(self, tasks: list[Task], steps: int, episodes: int, seed: int, collect: Collect,
                   final: bool = True) -> Any:
        """The adaptation primitive (see the module docstring); returns the actor after ``steps`` stages."""

    def policy_state(self) -> dict[str, Any]:
        """What adapting and acting need, for a zoo entry (`metarl.zoo`): an agent loaded with it through
        `load_policy_state` evaluates and adapts exactly as this one (it need not be able to train on). By
        default the whole `state_dict`; an agent overrides both to leave out optimisers and replay buffers."""
        return self.state_dict()

    def load_policy_state(self, state: dict[str, Any]) -> None:
        """Restore what `policy_state` returned (default: `load_state_dict`)."""
        self.load_state_dict(state)

    def to(self, device: Any) -> None:
        """Run the update on ``device`` (a ``torch.device`` of a kind in ``devices``), called once after
        ``__init__``; by default the CPU, the only device an agent that does not override this supports."""
        if getattr(device, "type", device) != "cpu":
            raise AgentError(f"agent {self.name!r} runs on the CPU only (it overrides no Agent.to)")

    def set_total_iterations(self, iterations: int) -> None:  # noqa: B027 (an optional hook)
        """The run's total number of iterations, before training starts (for schedules); by default unused."""

    @classmethod
    def save_actor(cls, actor: Any) -> dict[str, Any]:
        """An adapted actor as plain tensors and numbers (`metarl.api.AdaptedPolicy.save`)."""
        raise AgentError(f"agent {cls.name!r} cannot save an adapted policy (it defines no save_actor/load_actor)")

    @classmethod
    def load_actor(cls, state: dict[str, Any]) -> Any:
        """The actor `save_actor` wrote, started on one slot with its adapted state restored."""
        raise AgentError(f"agent {cls.name!r} cannot load an adapted policy (it defines no save_actor/load_actor)")

    # ---- derived from the primitive: evaluation, videos, deployment ------------------------------------
    def evaluate_adaptation(self, tasks: list[Task], steps: int, episodes: int, seed: int) -> AdaptationResult:
        """The evaluation protocol on ``tasks``: the primitive with the agent's sampler, every stage collected;
        returns the mean return per task and stage and the experience consumed before each stage."""
        _, calls = self._recorded_adaptation(tasks, steps, episodes, seed)
        result = adaptation_result(list(tasks), calls)
        if result.returns.shape[1] != steps + 1:
            raise AgentError(f"agent {self.name!r}: its adaptation collected {result.returns.shape[1]} stages, "
                             f"the evaluation asked for {steps + 1} (steps={steps})")
        return result

    def adaptation_rollouts(self, tasks: list[Task], steps: int, episodes: int, seed: int) -> list[StageRollout]:
        """How `evaluate_adaptation` with the same arguments collected each stage (actor, stages, episodes,
        seed of every call), for `metarl.video` to replay. Runs the adaptation."""
        return self._recorded_adaptation(tasks, steps, episodes, seed)[0]

    def _recorded_adaptation(self, tasks: list[Task], steps: int, episodes: int, seed: int
                             ) -> tuple[list[StageRollout], list[tuple[Any, int]]]:
        """The primitive with the agent's sampler, every stage collected; each ``collect`` call recorded as a
        `StageRollout` and as ``(batch, episodes_per_trial)``."""
        plans: list[StageRollout] = []
        calls: list[tuple[Any, int]] = []

        def collect(actor: Any, tasks_: list[Task], count: int, sample_seed: int, episodes_per_trial: int = 1) -> Any:
            offset = sum(len(p.stages) for p in plans)
            plans.append(StageRollout(actor, tuple(range(offset, offset + episodes_per_trial)), count, sample_seed))
            batch = self.sampler.sample(actor, tasks_, count, sample_seed, episodes_per_trial=episodes_per_trial)
            calls.append((batch, episodes_per_trial))
            return batch

        self.adaptation(list(tasks), steps, episodes, seed, collect, final=True)
        return plans, calls

    def adapt_with(self, collect: Collect, task: Any, steps: int, episodes: int, seed: int) -> Any:
        """Deployment (`metarl.api`): the primitive on one task whose episodes ``collect`` gathers (a user's
        env), without the last stage's episodes; returns the adapted actor, started on one slot."""
        return self.adaptation([task], steps, episodes, seed, collect, final=False)


def adaptation_result(tasks: list[Task], calls: list[tuple[Any, int]]) -> AdaptationResult:
    """An `AdaptationResult` from the ``collect`` calls of an adaptation, in order: ``(batch, episodes_per_trial)``.

    A call with K episodes per trial holds the next K stages; stage k's return is the mean over the trials of
    their episode k. The experience before a stage is everything the earlier calls collected (per task) plus
    the earlier episodes of its own trial."""
    import torch

    n = len(tasks)
    returns, within, adapt_episodes, adapt_env_steps = [], [], [], []
    episodes_before, steps_before = 0, 0.0
    for batch, K in calls:
        count = batch.returns.shape[1]
        trials = count // K
        lengths = batch.lengths.reshape(n, trials, K)
        inside = torch.cat([torch.zeros(n, trials, 1), torch.cumsum(lengths, -1)[..., :-1]], -1).mean((0, 1))
        per_trial = batch.returns.reshape(n, trials, K).mean(1).numpy()
        binned = batch.binned_returns()
        binned = binned.reshape(n, trials, K, binned.shape[-1]).mean(1).numpy()
        for k in range(K):
            returns.append(per_trial[:, k])
            within.append(binned[:, k])
            adapt_episodes.append(episodes_before + k)
            adapt_env_steps.append(steps_before + float(inside[k]))
        episodes_before += count
        steps_before += batch.env_steps / n
    return AdaptationResult(tasks=list(tasks), returns=np.stack(returns, axis=1), adapt_episodes=adapt_episodes,
                            adapt_env_steps=adapt_env_steps, within_episode=np.stack(within, axis=1))


# ---- the registry ---------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Agent]] = {}

#: the members every agent defines, with the parameters each takes after ``self``
_MEMBERS = {"__init__": ("config", "sampler", "seed"), "train_step": ("tasks",), "state_dict": (),
            "load_state_dict": ("state",), "adaptation": ("tasks", "steps", "episodes", "seed", "collect", "final")}


def check_agent(cls: Any) -> None:
    """AgentError in one line naming the first member of the protocol that ``cls`` lacks or gets wrong."""
    what = getattr(cls, "__qualname__", repr(cls))
    if not inspect.isclass(cls) or not issubclass(cls, Agent):
        raise AgentError(f"{what}: an agent must be a subclass of metarl.agent.Agent")
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name.isidentifier():
        raise AgentError(f"agent {what}: name must be an identifier (a config's agent.name), got {name!r}")
    config_class = getattr(cls, "config_class", None)
    if not (inspect.isclass(config_class) and dataclasses.is_dataclass(config_class)):
        raise AgentError(f"agent {name}: config_class must be a dataclass of its options, got {config_class!r}")
    if "tasks_per_batch" not in {f.name for f in dataclasses.fields(config_class)}:
        raise AgentError(f"agent {name}: config_class {config_class.__name__} has no tasks_per_batch field "
                         "(the meta-batch size the training loop draws)")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise AgentError(f"agent {name}: missing {', '.join(missing)} (the Agent protocol, metarl.agent.Agent)")
    for member, params in _MEMBERS.items():
        fn = inspect.getattr_static(cls, member, None)
        if not callable(fn):
            raise AgentError(f"agent {name}: {member} must be a method taking ({', '.join(params)})")
        try:
            inspect.signature(fn).bind(None, *params)
        except TypeError:
            raise AgentError(f"agent {name}: {member}{inspect.signature(fn)} must take "
                             f"(self, {', '.join(params)})") from None
    if not isinstance(cls.added_options, dict):
        raise AgentError(f"agent {name}: added_options must be a dict of option -> old value")
    if not isinstance(cls.retired_options, dict) or not all(
            isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], str) for v in cls.retired_options.values()):
        raise AgentError(f"agent {name}: retired_options must be a dict of option -> (neutral value, why)")


def register_agent(cls: type[Agent]) -> type[Agent]:
    """Register an agent class under its ``name`` (usable as a class decorator); AgentError in one line if it
    breaks the protocol or its name belongs to another class. Registering a class again (a module imported
    twice) replaces it."""
    check_agent(cls)
    old = _REGISTRY.get(cls.name)
    if old is not None and old is not cls and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise AgentError(f"agent name {cls.name!r} is taken by {old.__module__}.{old.__qualname__}; "
                         f"give {cls.__module__}.{cls.__qualname__} another name")
    _REGISTRY[cls.name] = cls
    return cls


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def agent_names() -> list[str]:
    """Every agent name known: the registered ones and the entry points not loaded yet."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def get_agent(name: str) -> type[Agent]:
    """The agent class registered as ``name``, loading its entry point if it has one; AgentError otherwise."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    points = _entry_points()
    ep = points.get(name)
    if ep is None and not points:
        raise AgentError(f"unknown agent {name!r}: no agent entry points are installed (group {ENTRY_POINT_GROUP}); "
                         "metarl's install is stale or incomplete: reinstall it (bash scripts/setup.sh, or pip "
                         "install -e . in a clone)")
    if ep is None:
        raise AgentError(f"unknown agent {name!r}; available: {', '.join(agent_names()) or 'none'} (for your own, "
                         "register it with metarl.agent.register_agent in a module named by imports: or --import)")
    try:
        cls = ep.load()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AgentError(f"agent {name!r}: its entry point {ep.value} does not load ({first})") from None
    if getattr(cls, "name", None) != name:
        raise AgentError(f"agent {name!r}: its entry point {ep.value} is a class named {getattr(cls, 'name', None)!r}")
    return register_agent(cls)
