"""Local placement: the rollout loop, and the sampler on worker processes of this machine.

See the package docstring (`metarl.sampling`) for what a sampler does, the actor protocol and the backends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from metarl.episodes import EpisodeBatch
from metarl.sampling.slots import ABANDONED, Abandoned, GymSlots, check_abandoned, slot_seed
from metarl.tasks import Task, TaskError, episode_limit, family_of


def _make_slots(backend: str, env_id: str, env_kwargs: dict[str, Any]) -> Any:
    if backend == "native":
        from metarl.envs.native import NativeSlots

        return NativeSlots(env_id, env_kwargs)
    return GymSlots(env_id, env_kwargs)


def rollout(slots: Any, actor: Any, tasks: Sequence[Task], task_indices: Sequence[int], episodes: int,
            seed: int, episodes_per_trial: int = 1) -> dict[str, Any]:
    """Roll out ``episodes`` episodes of each task on ``slots`` (a backend's env slots), batched: one
    ``actor.act`` per step for all slots, one ``slots.step`` for the active ones, recorded with array
    indexing. Returns the padded arrays of an `EpisodeBatch` (``success`` None where the env reports none)."""
    K = episodes_per_trial
    n, E = len(tasks), episodes
    M = E // K  # slots (trials) per task
    S = n * M
    slots.configure(tasks, M)
    horizon = slots.horizon
    # Episode (j, m*K + k) is the k-th episode of slot m of task j; its env seed depends only on that.
    first = [slots.reset(j * M + m, slot_seed(seed, task_indices[j], m * K)) for j in range(n) for m in range(M)]
    obs = np.stack(first).astype(np.float32)
    obs_dim = obs.shape[1]
    act_dim = slots.low.size

    observations = np.zeros((n, E, horizon, obs_dim), np.float32)
    actions = np.zeros((n, E, horizon, act_dim), np.float32)
    rewards = np.zeros((n, E, horizon), np.float32)
    mask = np.zeros((n, E, horizon), np.float32)
    terminated = np.zeros((n, E), bool)
    truncated = np.zeros((n, E), bool)
    last_obs = np.zeros((n, E, obs_dim), np.float32)
    terms: dict[str, np.ndarray] = {}
    success = np.zeros((n, E), bool)  # an episode succeeds if any of its steps reports info["success"]
    success_reported = False
    step_in_episode = np.zeros(S, int)
    # Row j * E + e of the padded arrays: the episode a slot is running (slot j*M + m runs episodes
    # m*K .. m*K + K-1 of task j); the arrays are written through flat views, one index per slot.
    slot = np.arange(S)
    episode_row = (slot // M) * E + (slot % M) * K
    flat_obs, flat_act = observations.reshape(-1, obs_dim), actions.reshape(-1, act_dim)
    flat_rewards, flat_mask = rewards.reshape(-1), mask.reshape(-1)
    observe = getattr(actor, "observe", None)
    action_scale = float(getattr(actor, "action_scale", 1.0))  # env action: clip(scale * a); `a` is recorded

    actor.start(list(task_indices), M)
    idx = slot  # the slots still running, ascending
    t = 0
    while len(idx):
        check_abandoned()
        act = np.asarray(actor.act(obs.reshape(n, M, obs_dim)), dtype=np.float32).reshape(S, act_dim)
        if not np.all(np.isfinite(act)):
            raise FloatingPointError(f"the policy produced non-finite actions at step {t}")
        env_act = act[idx] if action_scale == 1.0 else act[idx] * action_scale
        new_obs, r, term, trunc, step_terms = slots.step(idx, np.clip(env_act, slots.low, slots.high))
        step_success = step_terms.pop("success", None)
        if not (np.isfinite(new_obs).all() and np.isfinite(r).all() and all(np.isfinite(v).all() for v in step_terms.values())):
            _non_finite(slots, tasks, task_indices, idx, episode_row, step_in_episode, E, new_obs, r, step_terms)
        row = episode_row[idx]
        at = row * horizon + step_in_episode[idx]
        flat_obs[at] = obs[idx]
        flat_act[at] = act[idx]
        flat_rewards[at] = r
        flat_mask[at] = 1.0
        for key, value in step_terms.items():
            if key not in terms:
                terms[key] = np.zeros((n, E), np.float32)
            terms[key].reshape(-1)[row] += value  # accumulated in float32, each step rounded once
        if step_success is not None:
            success_reported = True
            success.reshape(-1)[row] |= np.asarray(step_success) > 0
        obs[idx] = new_obs
        step_in_episode[idx] += 1
        term = np.asarray(term, bool)
        trunc = np.asarray(trunc, bool) | (~term & (step_in_episode[idx] >= horizon))
        done = term | trunc
        finished = []
        for b in np.flatnonzero(done).tolist():
            s = int(idx[b])
            jb, eb = divmod(int(row[b]), E)
            terminated[jb, eb], truncated[jb, eb] = bool(term[b]), not term[b]
            last_obs[jb, eb] = new_obs[b]
            if eb % K + 1 < K:  # next episode of the same trial, same task
                episode_row[s] += 1
                step_in_episode[s] = 0
                obs[s] = slots.reset(s, slot_seed(seed, task_indices[jb], eb + 1))
            else:
                finished.append(b)
        if observe is not None:
            step_rewards = np.zeros(S, np.float32)
            step_rewards[idx] = r
            step_dones = np.zeros(S, bool)
            step_dones[idx] = done
            observe(step_rewards.reshape(n, M), step_dones.reshape(n, M))
        if finished:
            idx = np.delete(idx, finished)
        t += 1

    return {
        "observations": observations, "actions": actions, "rewards": rewards, "mask": mask,
        "terminated": terminated, "truncated": truncated, "last_observations": last_obs,
        "reward_terms": terms, "success": success if success_reported else None,
    }


class NonFiniteError(FloatingPointError):
    """An env returned a NaN or infinite reward, reward term or observation (the message says where)."""


def _non_finite(slots: Any, tasks: Sequence[Task], task_indices: Sequence[int], idx: np.ndarray,
                episode_row: np.ndarray, step_in_episode: np.ndarray, E: int, obs: np.ndarray, rewards: np.ndarray,
                terms: dict[str, np.ndarray]) -> None:
    """Raise NonFiniteError naming the env, task, episode and step of the first non-finite value of a step."""
    values = [("reward", np.asarray(rewards, np.float64).reshape(len(idx), 1))]
    values += [(f"{key} term", np.asarray(v, np.float64).reshape(len(idx), 1)) for key, v in terms.items()]
    values.append(("observation", np.asarray(obs, np.float64).reshape(len(idx), -1)))
    for what, array in values:
        rows, cols = np.nonzero(~np.isfinite(array))
        if len(rows):
            b, d = int(rows[0]), int(cols[0])
            s = int(idx[b])
            j, e = divmod(int(episode_row[s]), E)
            raise NonFiniteError(
                f"env {getattr(slots, 'env_id', '?')} returned a non-finite "
                f"{what + f'[{d}]' if what == 'observation' else what} ({array[b, d]}) on task {task_indices[j]} "
                f"({tasks[j]}), episode {e}, step {int(step_in_episode[s])}; stopped before it reached any "
                "statistics or update")
    raise NonFiniteError(f"env {getattr(slots, 'env_id', '?')} returned a non-finite value")


def _registering_module(env_id: str) -> str | None:
    """The module of a registered id's entry point (None for ``__main__`` or an unknown id): a worker imports
    it if the id is not registered there, so a family registered by a module the user imported in Python
    (not through `metarl.plugins`) reaches the workers too."""
    spec = gym.registry.get(env_id.split(":", 1)[-1])
    entry = getattr(spec, "entry_point", None)
    module = entry.split(":", 1)[0] if isinstance(entry, str) else getattr(entry, "__module__", None)
    return None if module in (None, "__main__", "__mp_main__") else module


def prepare_worker(backend: str, env_id: str, env_kwargs: dict[str, Any], imports: Sequence[str] = (),
                   registering_module: str | None = None) -> Any:
    """Set up a process that rolls out for a sampler (a local worker or a Ray actor) and make its env slots:
    one torch thread and one OpenBLAS thread (the workers are the parallelism), the families registered, the user's modules imported."""
    import torch

    torch.set_num_threads(1)
    from metarl.system import keep_freed_memory, single_threaded_blas_for_process, skip_mujoco_timers

    single_threaded_blas_for_process()
    keep_freed_memory()
    skip_mujoco_timers()  # this process never reads mjData.timer
    import metarl  # noqa: F401  (registers the families)
    from metarl.plugins import load

    load(imports)  # the user's modules imported in the main process register their families here too
    if registering_module is not None and env_id.split(":", 1)[-1] not in gym.registry:
        import importlib

        importlib.import_module(registering_module)
    return _make_slots(backend, env_id, env_kwargs)


#: Where a Linux container's or job's memory limit is written (cgroup v2, then v1); "max" or a huge number: none
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _memory_bytes() -> int | None:
    """The memory this process may use: the machine's physical memory, or the limit of its container or job
    (cgroup) where that is lower (None where the OS says neither)."""
    from metarl.system import physical_memory

    sizes = [size for size in (physical_memory(),) if size is not None]
    for path in CGROUP_LIMITS:
        try:
            with open(path) as limit:
                sizes.append(int(limit.read().strip()))
        except (OSError, ValueError):  # absent, or "max"
            continue
    return min(sizes) if sizes else None


def default_max_slots(family: Any, workers: int, memory_bytes: int | None = None, share: float = 0.5) -> int | None:
    """The ``max_slots`` of a sampler left at None: for a family that declares its envs large
    (``slot_memory_mb``), the most slots per worker (or for this process, ``workers=0``) whose envs take at most
    ``share`` of ``memory_bytes`` (default: this machine's memory) together; None (no bound) for any other family.
    The bound changes no episode, only how many tasks a worker runs at once."""
    size = getattr(family, "slot_memory_mb", None)
    memory = _memory_bytes() if memory_bytes is None else memory_bytes
    if not size or memory is None:
        return None
    return max(1, int(share * memory / (float(size) * 2**20) / max(int(workers), 1)))


def _leave_with_parent(parent: int, poll_s: float = 0.5, grace_s: float = 5.0) -> None:
    """End this worker process within about ``poll_s`` of the death of its main process (pid ``parent``, passed
    by it: a death before this worker got here counts too). Without it a worker whose main process was killed
    mid-call finishes its rollout before it finds the pipe closed: minutes of both cores and gigabytes of env slots
    on a large call (a Meta-World evaluation's hundreds of slots). The rollout and the slots' construction stop at
    their next step (`ABANDONED`), so the worker leaves through `_worker`'s cleanup (its envs closed); if it has
    not left ``grace_s`` later, the process ends there. (Not an interrupt of the main thread: a KeyboardInterrupt
    inside MuJoCo's model compiler aborts the process.) POSIX: a dead process's children are handed to init (or a
    subreaper), which changes ``getppid``."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        ABANDONED.set()
        time.sleep(grace_s)
        os._exit(0)

    threading.Thread(target=watch, name="metarl-leave-with-parent", daemon=True).start()


def _worker(conn: Any, backend: str, env_id: str, env_kwargs: dict[str, Any], sys_path: list[str],
            imports: Sequence[str] = (), registering_module: str | None = None, parent: int | None = None) -> None:
    import sys

    if parent is not None:
        _leave_with_parent(parent)
    sys.path[:] = sys_path
    from metarl.system import fault_point

    slots, failure = None, None
    try:
        try:
            slots = prepare_worker(backend, env_id, env_kwargs, imports, registering_module)
        except Exception:  # reported in reply to every request, so the main process raises it with its traceback
            failure = traceback.format_exc()
        while True:
            command, payload = conn.recv()
            if command == "close":
                break
            if failure is not None:
                conn.send(("error", failure))
                continue
            fault_point("worker")  # the fault-injection tests kill a worker here
            try:
                conn.send(("ok", rollout(slots, *payload)))
            except (BrokenPipeError, ConnectionResetError):
                raise  # the main process has gone: nobody to report to (below)
            except NonFiniteError as exc:  # one line, raised again as itself in the main process
                conn.send(("non_finite", str(exc)))
            except Exception:  # sent to the main process, which raises it there
                conn.send(("error", traceback.format_exc()))
    except (EOFError, BrokenPipeError, ConnectionResetError, KeyboardInterrupt, Abandoned):
        pass  # the main process has gone (killed, interrupted): leave quietly, without a traceback per worker
    finally:
        if slots is not None:
            slots.close()
        conn.close()


class _Notifying(list):
    """A list that calls ``callback(item, len)`` after each append."""

    def __init__(self, callback: Callable[[Any, int], None]) -> None:
        super().__init__()
        self._callback = callback

    def append(self, item: Any) -> None:
        super().append(item)
        self._callback(item, len(self))


@dataclasses.dataclass(frozen=True)
class SampleRecord:
    """Per-episode statistics of one `Sampler.sample` call (``[tasks, episodes]`` arrays; episode ``m * K + k``
    is episode k of trial m, ``K = episodes_per_trial``)."""

    episodes_per_trial: int
    returns: np.ndarray
    success: np.ndarray | None  # bool; None where the env reports no info["success"]
    reward_terms: dict[str, np.ndarray]  # episode sums of each info["reward_*"] term

    @staticmethod
    def of(batch: EpisodeBatch, episodes_per_trial: int) -> SampleRecord:
        return SampleRecord(episodes_per_trial, batch.returns.numpy().astype(np.float64),
                            None if batch.success is None else batch.success.numpy().copy(),
                            {k: v.numpy().astype(np.float64) for k, v in batch.reward_terms.items()})


class WorkerError(RuntimeError):
    """An exception raised inside a sampler worker (its traceback is in the message)."""


class WorkerDied(WorkerError):
    """A sampler worker that is gone (killed, out of memory, its Ray node lost): the message is one line naming
    it. Nothing of the call it was serving is kept; the sampler's workers are stopped."""


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "no exit code yet"
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Sampler:
    """Collects a meta-batch in ``workers`` processes (0: in this process) with one backend's env slots.

    Args:
        env_id: a registered task family id (``metarl/HalfCheetahVel-v0``, ``module:me/Mine-v0``).
        env_kwargs: passed to ``gymnasium.make``.
        workers: processes to use (default: one per core); capped at the number of tasks per call.
        backend: ``gymnasium`` (any family; the reference), ``native`` (the built-in MuJoCo families,
            stepped in batches by `metarl.envs.native`; same numbers, about twice as fast), or ``auto``
            (native where it reproduces the env, else gymnasium); ``self.backend`` is the one used.
        max_slots: the env slots one worker (or this process) holds at once; a call that needs more runs its
            tasks in rounds, with the same episodes (an episode depends on its task index, not on the tasks
            beside it). Slots are never freed during a sampler's life, so this bounds its memory where slots
            are large. None (the default): `default_max_slots`, which is every task of a worker's share at once
            unless the family declares its envs large (``slot_memory_mb``: Meta-World, ~45 MB each), in which
            case as many as fit in half of this machine's memory.
    """

    def __init__(self, env_id: str, env_kwargs: dict[str, Any] | None = None, workers: int | None = None,
                 backend: str = "gymnasium", max_slots: int | None = None):
        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"unknown sampler backend {backend!r}; available: auto, {', '.join(BACKENDS)}")
        self.env_id, self.env_kwargs = env_id, dict(env_kwargs or {})
        probe = gym.make(env_id, **self.env_kwargs)
        try:
            self.family = family_of(probe)
            self.observation_space, self.action_space = probe.observation_space, probe.action_space
            self.horizon = episode_limit(probe)  # the episode limit the slots use
            if backend != "gymnasium":
                from metarl.envs.native import unsupported_reason

                reason = unsupported_reason(probe)
                if backend == "auto":
                    backend = "gymnasium" if reason is not None else "native"
                elif reason is not None:
                    raise TaskError(f"{env_id}: the native sampler backend does not run this env: {reason}; "
                                    "use sampler.backend gymnasium or auto")
            self.backend = backend
        finally:
            probe.close()
        if not isinstance(self.action_space, gym.spaces.Box) or not isinstance(self.observation_space, gym.spaces.Box):
            raise TaskError(f"{env_id}: metarl's agents need Box observation and action spaces")
        self.workers = (os.cpu_count() or 1) if workers is None else int(workers)
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if max_slots is not None and (isinstance(max_slots, bool) or not isinstance(max_slots, int) or max_slots < 1):
            raise ValueError(f"max_slots must be an integer >= 1 or None, got {max_slots!r}")
        self.max_slots = default_max_slots(self.family, self.workers) if max_slots is None else max_slots
        self._local: Any = None
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._recorders: list[list[SampleRecord]] = []

    @contextlib.contextmanager
    def recording(self, on_sample: Callable[[SampleRecord, int], None] | None = None) -> Iterator[list[SampleRecord]]:
        """Within the block, every `sample` call appends its episode statistics (`SampleRecord`) to the list
        yielded: how the training loop and the evaluator see success and reward terms of the episodes an
        agent collects, without the agent's help. ``on_sample(record, calls so far)`` is called after each
        (progress reports)."""
        records: list[SampleRecord] = _Notifying(on_sample) if on_sample is not None else []
        self._recorders.append(records)
        try:
            yield records
        finally:
            self._recorders.remove(records)

    def _start(self, count: int) -> None:
        if len(self._procs) >= count:
            return
        import sys

        from metarl.plugins import loaded

        ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock workers
        while len(self._procs) < count:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, daemon=True,
                               args=(child, self.backend, self.env_id, self.env_kwargs, list(sys.path), loaded(),
                                     _registering_module(self.env_id), os.getpid()))
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)

    def sample(self, actor: Any, tasks: Sequence[Task], episodes_per_task: int, seed: int,
               episodes_per_trial: int = 1) -> EpisodeBatch:
        """Roll out ``episodes_per_task`` episodes of every task with ``actor``; returns an `EpisodeBatch`.

        With ``episodes_per_trial = K > 1`` each slot runs K consecutive episodes of its task (a trial),
        and the actor is not restarted in between (recurrent actors keep their state; ``observe`` gets
        ``dones`` at every episode end). Episode ``m * K + k`` of a task is episode k of its trial m.
        """
        tasks = list(tasks)
        if not tasks:
            raise ValueError("sample: no tasks given")
        if episodes_per_task < 1:
            raise ValueError(f"sample: episodes_per_task must be >= 1, got {episodes_per_task}")
        if episodes_per_trial < 1 or episodes_per_task % episodes_per_trial:
            raise ValueError(f"sample: episodes_per_trial ({episodes_per_trial}) must be >= 1 and divide "
                             f"episodes_per_task ({episodes_per_task})")
        for task in tasks:
            self.family.check_task(task)
        places = max(1, min(self.workers, len(tasks)))  # chunks that run at once (one per worker)
        count = places
        if self.max_slots is not None:  # more, smaller chunks, run in rounds of `places`
            tasks_per_chunk = max(1, self.max_slots // (episodes_per_task // episodes_per_trial))
            count = max(places, -(-len(tasks) // tasks_per_chunk))
            count = -(-count // places) * places  # whole rounds: each worker as many chunks
        chunks = [c for c in np.array_split(np.arange(len(tasks)), count) if len(c)]
        # one payload per chunk: the worker's rollout arguments after its slots
        payloads = [(actor, [tasks[i] for i in chunk], chunk.tolist(), episodes_per_task, seed, episodes_per_trial)
                    for chunk in chunks]
        parts = []
        for start in range(0, len(payloads), places):
            parts += self._collect(payloads[start:start + places])
        batch = EpisodeBatch.from_numpy(tasks, _concat(parts))
        if self._recorders:
            record = SampleRecord.of(batch, episodes_per_trial)
            for records in self._recorders:
                records.append(record)
        return batch

    def _collect(self, payloads: list[tuple]) -> list[dict[str, Any]]:
        """The rollouts of the chunks (in order): where they run is the placement's business (here: this
        process with ``workers=0``, else the local worker processes; `metarl.sampling.ray`: Ray actors)."""
        if self.workers == 0:
            if self._local is None:
                self._local = _make_slots(self.backend, self.env_id, self.env_kwargs)
            return [rollout(self._local, *payloads[0])]  # one chunk: every task
        self._start(len(payloads))
        parts, errors = [], []
        index = 0
        try:
            for index in range(len(payloads)):
                self._conns[index].send(("sample", payloads[index]))
            for index in range(len(payloads)):
                status, result = self._conns[index].recv()
                if status == "ok":
                    parts.append(result)
                else:
                    errors.append((status, result))
        except (EOFError, OSError) as exc:  # a worker died (killed, out of memory, crashed)
            proc = self._procs[index]
            proc.join(timeout=2)  # its exit code, once the kernel has reaped it
            what = f"sampler worker {index} (of {len(self._procs)}, pid {proc.pid}) died ({_exit_reason(proc.exitcode)})"
            self.close()  # no stale replies can be read by a later call
            raise WorkerDied(f"{what} while sampling tasks {payloads[index][2][0]}..{payloads[index][2][-1]}") from exc
        if errors:
            if errors[0][0] == "non_finite":
                raise NonFiniteError(errors[0][1])
            raise WorkerError("a sampler worker failed:\n" + errors[0][1])
        return parts

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        self._procs, self._conns = [], []
        if self._local is not None:
            self._local.close()
            self._local = None

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _concat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' rollouts joined along the task axis (every part is padded to the same horizon)."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {key: np.concatenate([p[key] for p in parts]) for key in (
        "observations", "actions", "rewards", "mask", "terminated", "truncated", "last_observations")}
    names = sorted({k for p in parts for k in p["reward_terms"]})
    out["reward_terms"] = {
        k: np.concatenate([p["reward_terms"].get(k, np.zeros(p["rewards"].shape[:2], np.float32)) for p in parts])
        for k in names
    }
    reported = any(p.get("success") is not None for p in parts)
    out["success"] = np.concatenate([p["success"] if p.get("success") is not None
                                     else np.zeros(p["rewards"].shape[:2], bool) for p in parts]) if reported else None
    return out


class GymnasiumSampler(Sampler):
    """The ``gymnasium`` backend: any registered family, one Gymnasium env per slot."""

    def __init__(self, env_id: str, env_kwargs: dict[str, Any] | None = None, workers: int | None = None):
        super().__init__(env_id, env_kwargs, workers, backend="gymnasium")


class NativeSampler(Sampler):
    """The ``native`` backend: the built-in MuJoCo families stepped in batches (`metarl.envs.native`)."""

    def __init__(self, env_id: str, env_kwargs: dict[str, Any] | None = None, workers: int | None = None):
        super().__init__(env_id, env_kwargs, workers, backend="native")


BACKENDS = ("gymnasium", "native")
