"""Parallel episode collection for a meta-batch: ``N`` tasks x ``E`` episodes, one env per episode slot.

The sampler owns worker processes (one per core by default), each holding the env slots of a contiguous
chunk of tasks. A call ships an *actor* (a small picklable object with the policy's parameters for
every task) to the workers; each worker rolls out all its slots to the end of their episodes, running
batched policy inference for its slots every step, and sends the padded arrays back. There is no
per-step traffic between processes, and the main process is idle while the workers use the cores.

Actor protocol (`metarl.agent.Actor`; e.g. `metarl.policies.GaussianActor`):

* ``actor.start(task_indices, slots_per_task)``: called in the worker before a rollout, with the
  global indices of the worker's tasks (to pick per-task parameters and seed per-task noise);
* ``actor.act(obs) -> actions``: ``obs`` is ``[n_tasks, slots, obs_dim]``, returns ``[n_tasks, slots, act_dim]``;
* optional ``actor.action_scale`` (default 1): the env is stepped with ``clip(action_scale * a, low,
  high)``; the episode records the actor's own ``a``;
* optional ``actor.observe(rewards, dones)``: ``[n_tasks, slots]`` after every step, ``dones`` marking
  episode ends (recurrent actors; a slot runs ``episodes_per_trial`` episodes without a restart).

Results do not depend on the number of workers: env seeds are derived from (seed, task index, episode
index) and actors seed their noise per task. Each slot runs exactly one trial (``episodes_per_trial`` episodes, default 1) per call; no autoreset.

Backends differ only in their *env slots* (``configure`` / ``reset`` / ``step`` for a set of slots, see
`GymSlots`); the rollout loop, the workers and the batch are shared. ``gymnasium`` (one
``gymnasium.make`` env per slot) is the reference and works with any registered task family; ``native``
(`metarl.envs.native`) steps the built-in MuJoCo families' ``MjData`` directly and computes observations
and rewards for the whole batch at once, producing the same numbers. ``make_sampler(backend="auto")``
picks native where it is supported.

The package: `metarl.sampling.slots` (the env slots the loop steps: Gymnasium envs, a user's env instance,
recorded episodes), `metarl.sampling.local` (the rollout loop, `Sampler` on local worker processes),
`metarl.sampling.ray` (`RaySampler`: the same slots and loop on Ray actors; imported only for ``placement:
ray``); `make_sampler` picks one.
"""

from __future__ import annotations

from typing import Any

from metarl.sampling.local import (
    BACKENDS,
    GymnasiumSampler,
    NativeSampler,
    NonFiniteError,
    Sampler,
    SampleRecord,
    WorkerDied,
    WorkerError,
    default_max_slots,
    prepare_worker,
    rollout,
)
from metarl.sampling.slots import GymSlots, slot_seed

PLACEMENTS = ("local", "ray")


def make_sampler(env_id: str, env_kwargs: dict[str, Any] | None = None, backend: str = "auto",
                 workers: int | None = None, placement: str = "local", max_slots: int | None = None,
                 **ray_options: Any) -> Sampler:
    """The sampler for ``backend``: ``native``, ``gymnasium``, or ``auto`` (native where supported), placed
    on local worker processes (``placement="local"``) or on the actors of a Ray cluster (``"ray"``,
    `metarl.sampling.ray.RaySampler`, which takes ``ray_options``: address, cpus_per_actor, retries, timeout);
    ``max_slots``: the env slots a worker holds at once (`Sampler`; None: `default_max_slots`)."""
    if placement == "ray":
        from metarl.sampling.ray import RaySampler

        return RaySampler(env_id, env_kwargs, workers, backend=backend, max_slots=max_slots, **ray_options)
    if placement != "local":
        raise ValueError(f"unknown sampler placement {placement!r}; available: {', '.join(PLACEMENTS)}")
    return Sampler(env_id, env_kwargs, workers, backend=backend, max_slots=max_slots)


__all__ = ["BACKENDS", "PLACEMENTS", "GymSlots", "GymnasiumSampler", "NativeSampler", "NonFiniteError", "SampleRecord",
           "Sampler", "WorkerDied", "WorkerError", "default_max_slots", "make_sampler", "prepare_worker", "rollout", "slot_seed"]
