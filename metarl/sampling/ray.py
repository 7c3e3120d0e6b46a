"""The sampler's Ray placement: the env slots of either backend on Ray actors across a cluster.

`RaySampler` is a `metarl.sampling.Sampler` whose chunks of the meta-batch run on Ray actors instead of local
worker processes. Each actor holds the env slots of one backend (`prepare_worker`, as a local worker does) and
runs the same `rollout`; the policy's parameters travel once per call through Ray's object store. Env seeds
come from (seed, task index, episode index) and actors seed their noise per task, so a batch is the same,
number for number, as the local sampler's with the same seed, on any number of actors. The learner (the
agents' updates) stays on the driver, the process that made the sampler.

Where: ``address`` follows `ray.init` (None: ``RAY_ADDRESS`` if set, else the cluster last started on this
machine with ``ray start``, else a new local instance; ``"auto"``: an existing cluster or an error;
``"ray://HOST:10001"``: Ray Client). If Ray is already initialised in this process, that connection is used.

Faults: an actor that dies while it samples (its process killed, its node lost) has its chunk rerun on a fresh
actor, up to ``retries`` times per chunk; the batch equals an unfaulted one, because a chunk's numbers depend
only on its tasks and the seed. More failures than that end in one `WorkerError`, and so does a call during
which no chunk comes back for ``timeout`` seconds (an actor that hangs, a cluster without the CPUs the actors
ask for): never a hang. ``cpus_per_actor`` is each actor's CPU request (``num_cpus``); ``workers`` the number
of actors (None: the cluster's CPUs divided by ``cpus_per_actor``).

Importing metarl never imports Ray: this module is imported only for ``placement: ray`` (``pip install
"metarl-robotics[ray]"``, ``pip install -e ".[ray]"`` in a clone).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from metarl.plugins import SHIPPED_ENV
from metarl.sampling.local import (
    NonFiniteError,
    Sampler,
    WorkerDied,
    WorkerError,
    _registering_module,
    default_max_slots,
    prepare_worker,
    rollout,
)
from metarl.tasks import TaskError

#: environment variables of the driver that reach the actors (the fault-injection tests' switches)
_FORWARDED_ENV = ("METARL_FAULT", "METARL_FAULT_ONCE")


def import_ray() -> Any:
    """The ``ray`` module, or TaskError in one line saying how to install it."""
    try:
        import ray
    except ImportError:
        import metarl

        raise TaskError(f"sampler placement ray needs Ray: {metarl.install_hint('ray')}") from None
    return ray


def user_runtime_env(imports: Sequence[str]) -> dict[str, Any] | None:
    """The Ray job ``runtime_env`` that ships the user's modules (resolved import entries) to every node:
    ``py_modules`` and the ``METARL_SHIPPED_IMPORTS`` map (`metarl.plugins.shipped`); None if nothing needs it."""
    from metarl.plugins import SHIPPED_ENV, shipped

    files, names = shipped(imports)
    if not files:
        return None
    return {"py_modules": files, "env_vars": {SHIPPED_ENV: json.dumps(names)}}


def connect(address: str | None = None, imports: Sequence[str] = ()) -> Any:
    """Connect this process to a Ray cluster (`ray.init` conventions, see the module docstring) unless it is
    already connected; returns the ``ray`` module. The job's ``runtime_env`` ships the user's modules
    ``imports`` (`user_runtime_env`). TaskError in one line if no cluster can be reached. A process that was
    connected before (by its own ``ray.init``) keeps its job's ``runtime_env``: a warning names the modules
    it does not ship (nodes reach them only where the same paths exist)."""
    from metarl.plugins import shipped_here

    ray = import_ray()
    runtime_env = user_runtime_env(imports)
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False, runtime_env=runtime_env)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = address or os.environ.get("RAY_ADDRESS") or "a local instance"
            raise TaskError(f"cannot connect to the Ray cluster at {where}: {str(exc).splitlines()[0]}") from None
        if runtime_env:  # this process (the driver) imports the entries as its job's workers do
            os.environ[SHIPPED_ENV] = runtime_env["env_vars"][SHIPPED_ENV]
    elif runtime_env:
        missing = sorted(set(json.loads(runtime_env["env_vars"][SHIPPED_ENV])) - set(shipped_here()))
        if missing:
            from metarl.system import warn

            warn(f"Ray was initialised in this process before metarl connected, so its job does not ship "
                 f"{', '.join(missing)} to the nodes (runtime_env); nodes without those paths cannot import them")
    return ray


class _SlotsActor:
    """A Ray actor holding one backend's env slots; ``sample`` runs `rollout` on them (the local worker's
    loop body). Errors inside a rollout come back as values, so that the driver can tell them from a death."""

    def __init__(self, backend: str, env_id: str, env_kwargs: dict[str, Any], sys_path: list[str],
                 imports: Sequence[str], registering_module: str | None):
        # the driver's import paths that this node also has come after its own (its packages win)
        sys.path.extend(p for p in sys_path if p not in sys.path and os.path.exists(p))
        self.slots = prepare_worker(backend, env_id, env_kwargs, imports, registering_module)

    def where(self) -> dict[str, Any]:
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def sample(self, actor: Any, *payload: Any) -> tuple[str, Any]:
        from metarl.system import fault_point

        fault_point("ray_actor")  # the fault-injection tests kill an actor here, mid-call
        try:
            return "ok", rollout(self.slots, actor, *payload)
        except NonFiniteError as exc:
            return "non_finite", str(exc)
        except Exception:
            import traceback

            return "error", traceback.format_exc()


class RaySampler(Sampler):
    """A `Sampler` whose chunks run on Ray actors (see the module docstring for the arguments beyond
    `Sampler`'s). ``restarts`` counts the actors replaced after a death, over the sampler's life."""

    def __init__(self, env_id: str, env_kwargs: dict[str, Any] | None = None, workers: int | None = None,
                 backend: str = "gymnasium", address: str | None = None, cpus_per_actor: float = 1.0,
                 retries: int = 2, timeout: float = 600.0, max_slots: int | None = None):
        if cpus_per_actor <= 0:
            raise ValueError(f"cpus_per_actor must be > 0, got {cpus_per_actor}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        super().__init__(env_id, env_kwargs, 1 if workers is None else workers, backend=backend, max_slots=max_slots)
        if max_slots is None:  # an actor's share of memory, as if its node were this machine holding as many
            # actors as its cores fit at cpus_per_actor each
            self.max_slots = default_max_slots(self.family, max(1, int((os.cpu_count() or 1) // cpus_per_actor)))
        from metarl.plugins import loaded

        module = _registering_module(env_id)  # the user's modules travel with the job (runtime_env)
        self._ray = connect(address, imports=[*loaded(), *([module] if module else [])])
        if workers is None:
            cpus = self._ray.cluster_resources().get("CPU", 1.0)
            self.workers = max(1, int(cpus // cpus_per_actor))
        elif self.workers < 1:
            raise ValueError(f"the Ray placement needs workers >= 1 actors, got {workers}")
        self.cpus_per_actor, self.retries, self.timeout = float(cpus_per_actor), int(retries), float(timeout)
        self.restarts = 0
        self._actors: list[Any] = []

    def _new_actor(self) -> Any:
        from metarl.plugins import loaded

        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        options: dict[str, Any] = {"num_cpus": self.cpus_per_actor, "max_restarts": 0, "max_task_retries": 0,
                                   "scheduling_strategy": "SPREAD"}  # over the nodes, not packed on the first
        if env:
            options["runtime_env"] = {"env_vars": env}
        cls = self._ray.remote(_SlotsActor).options(**options)
        return cls.remote(self.backend, self.env_id, self.env_kwargs, list(sys.path), loaded(),
                          _registering_module(self.env_id))

    def _start(self, count: int) -> None:
        while len(self._actors) < count:
            self._actors.append(self._new_actor())

    def placement(self) -> list[dict[str, Any]]:
        """Where the actors run (started if needed), in chunk order: ``{"pid": ..., "node": node id}``."""
        self._start(self.workers)
        return self._ray.get([a.where.remote() for a in self._actors], timeout=self.timeout)

    def _collect(self, payloads: list[tuple]) -> list[dict[str, Any]]:
        ray = self._ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        self._start(len(payloads))
        policy = ray.put(payloads[0][0])  # the same actor for every chunk: shipped once
        pending = {self._actors[i].sample.remote(policy, *p[1:]): i for i, p in enumerate(payloads)}
        failures = [0] * len(payloads)
        parts: list[Any] = [None] * len(payloads)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.timeout)
            if not ready:
                stuck = sorted(pending.values())
                raise self._fail(WorkerDied(
                    f"Ray sampler: {len(stuck)} of {len(payloads)} chunks (chunks {stuck}) did not come back within "
                    f"sampler.timeout = {self.timeout:g} s; each actor asks for {self.cpus_per_actor:g} CPUs "
                    f"(sampler.cpus_per_actor) and the cluster has {ray.cluster_resources().get('CPU', 0):g}"))
            i = pending.pop(ready[0])
            try:
                status, result = ray.get(ready[0], timeout=self.timeout)
            except RayTaskError as exc:  # the actor's method raised outside the rollout (e.g. making its slots)
                raise self._fail(WorkerError(f"a Ray sampler actor failed:\n{exc}")) from None
            except (RayActorError, GetTimeoutError) as exc:  # the actor died (killed, its node lost, OOM)
                failures[i] += 1
                if failures[i] > self.retries:
                    tasks = payloads[i][2]
                    raise self._fail(WorkerDied(
                        f"Ray sampler: chunk {i} (tasks {tasks[0]}..{tasks[-1]}) failed on {failures[i]} actors in a row "
                        f"(sampler.retries = {self.retries}); last: {str(exc).splitlines()[0]}")) from None
                self._kill(self._actors[i])
                self.restarts += 1
                self._actors[i] = self._new_actor()
                pending[self._actors[i].sample.remote(policy, *payloads[i][1:])] = i
                continue
            if status == "non_finite":
                raise self._fail(NonFiniteError(result))
            if status != "ok":
                raise self._fail(WorkerError("a Ray sampler actor failed:\n" + result))
            parts[i] = result
        return parts

    def _kill(self, actor: Any) -> None:
        try:
            self._ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass

    def _fail(self, error: Exception) -> Exception:
        """Kill every actor (replies still in flight must not reach a later call, which starts fresh ones)."""
        for actor in self._actors:
            self._kill(actor)
        self._actors = []
        return error

    def close(self) -> None:
        if getattr(self, "_actors", None):
            self._fail(WorkerError("closed"))
        super().close()
