"""Process-level settings that make metarl's large tensor work fast on Linux.

glibc's ``malloc`` serves every allocation above its mmap threshold (at most 32 MiB, even after its
dynamic adjustment) with a fresh ``mmap`` and returns it with ``munmap`` when freed. A MAML-TRPO update at
the standard batch (40 tasks x 20 episodes x 200 steps) allocates and frees tensors of 40 MiB and more
hundreds of times (every Hessian-vector product of conjugate gradient), so each one is zero-filled page by
page again by the kernel: measured here, 18 s of a 26 s update was system time in page faults. Raising the
mmap threshold (and the heap trim threshold) lets freed blocks be reused: the same update took 8 s.

`keep_freed_memory` applies that with ``mallopt``. It is process-wide and only affects speed (the heap keeps
up to its peak size instead of shrinking back); it is a no-op outside glibc. The agents and the sampler
workers call it; set ``METARL_MALLOC_TUNING=0`` to leave ``malloc`` alone.

`sleeping_openmp_threads` and `work_threads` are metarl's thread settings, applied where metarl runs work (the
``metarl`` command, training, evaluation, the sampler's workers), never by importing metarl.

`skip_mujoco_timers` stops MuJoCo 4 from reading a clock around every stage of every step (12-15% of a
HalfCheetah ``mj_step`` here). The sampler workers call it; the simulation never reads those timers.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_applied: bool | None = None


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Serve allocations below ``threshold`` bytes from the reusable heap; returns whether it applied."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("METARL_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Older glibc caps M_MMAP_THRESHOLD at 32 MiB (too low for these tensors) and rejects larger values;
    # there, stop using mmap for allocations altogether (M_MMAP_MAX 0), which has the same effect.
    heap_only = bool(mallopt(_M_MMAP_THRESHOLD, int(threshold))) or bool(mallopt(_M_MMAP_MAX, 0))
    keep = bool(mallopt(_M_TRIM_THRESHOLD, int(threshold)))
    _applied = heap_only and keep
    return _applied


_CONSTANT_CLOCK = ctypes.pythonapi.PyFloat_GetMax  # double (void), returns DBL_MAX: every duration is 0


def _mujoco_times_itself() -> bool:
    """Whether this MuJoCo fills ``mjData.timer`` with no ``mjcb_time`` installed (MuJoCo 4 does, 3.x does not)."""
    import mujoco

    model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><body><freejoint/><geom size='0.1'/></body>"
                                           "</worldbody></mujoco>")
    data = mujoco.MjData(model)
    mujoco.mj_step(model, data)
    return data.timer[mujoco.mjtTimer.mjTIMER_STEP].duration > 0


_times_by_default: bool | None = None


def _install_constant_clock() -> bool:
    """Install `_CONSTANT_CLOCK` where no clock is installed and MuJoCo would time itself; returns whether it did.
    (Whether MuJoCo times itself is probed once, while no clock is installed.)"""
    global _times_by_default
    import mujoco

    if mujoco.get_mjcb_time() is not None:
        return False
    if _times_by_default is None:
        _times_by_default = _mujoco_times_itself()
    if _times_by_default:
        mujoco.set_mjcb_time(_CONSTANT_CLOCK)
    return _times_by_default


def skip_mujoco_timers() -> bool:
    """Stop MuJoCo from timing every pipeline stage of every step, in a process that never reads
    ``mjData.timer`` (the sampler workers); returns whether it changed anything.

    MuJoCo 3 measures the stages only when a clock is installed as ``mjcb_time``; MuJoCo 4 reads its own
    clock about 30 times per ``mj_step`` when none is, which is 12-15% of a HalfCheetah step on this
    machine. Installing a native function that returns a constant (CPython's ``PyFloat_GetMax``, called
    without Python's overhead) makes every duration 0, as in MuJoCo 3. Nothing in the simulation reads the
    timers, so its results are unchanged (tests/test_native.py compares them bit for bit). A clock already
    installed (ours included) is left alone; ``METARL_MUJOCO_TIMERS=1`` keeps MuJoCo's own.
    """
    if os.environ.get("METARL_MUJOCO_TIMERS", "0") == "1":
        return False
    return _install_constant_clock()


@contextlib.contextmanager
def mujoco_timers_skipped() -> Iterator[None]:
    """Within the block, MuJoCo's stage timers are skipped as in the sampler workers (where MuJoCo times
    itself); the previous ``mjcb_time`` is restored after. For measurements (``metarl speed``)."""
    import mujoco

    previous = mujoco.get_mjcb_time()
    _install_constant_clock()
    try:
        yield
    finally:
        mujoco.set_mjcb_time(previous)


def sleeping_openmp_threads() -> bool:
    """Make PyTorch's OpenMP threads sleep while they wait (``OMP_WAIT_POLICY=PASSIVE``) in a process that metarl
    runs (the ``metarl`` command calls it first); returns whether the process gets sleeping threads.

    They spin by default, and when another process shares the cores the spinning steals its time slices: measured
    with three processes on two cores, a PointNav2D MAML-TRPO update took 40 s with spinning threads and 9-11 s
    with sleeping ones (docs/reliability.md). libgomp reads the variable once, when torch loads it, so this only
    acts before ``import torch``; a value the user set wins. From Python, set it yourself before importing torch.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return os.environ["OMP_WAIT_POLICY"].upper() == "PASSIVE"
    if "torch" in sys.modules:  # too late: libgomp has read its settings
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def _openblas() -> Any:
    """threadpoolctl's handle on the OpenBLAS libraries loaded in this process (numpy's)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(internal_api="openblas")


def single_threaded_blas_for_process() -> None:
    """One OpenBLAS thread for the rest of this process (a sampler worker or Ray actor: the workers, one per core,
    are the parallelism; a second BLAS thread each would only oversubscribe the cores). An
    ``OPENBLAS_NUM_THREADS`` the user set wins."""
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        _openblas().limit(limits=1)


@contextlib.contextmanager
def work_threads() -> Iterator[None]:
    """Within the block, numpy's OpenBLAS runs on one thread; the previous setting is restored after.

    OpenBLAS wakes a second thread for matrices as small as RL²'s GRU step ([16, 128] x [128, 384]), and the
    handoff costs more than it saves (RL²'s update measured 1.7x slower with it); beside the sampler's workers
    it only oversubscribes the cores. Training, evaluation and every ``metarl`` command run inside it. An
    ``OPENBLAS_NUM_THREADS`` the user set wins (nothing is changed)."""
    if "OPENBLAS_NUM_THREADS" in os.environ:
        yield
        return
    with _openblas().limit(limits=1):
        yield


def physical_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def warn(message: str) -> None:
    """One line on stderr: something was lost, damaged or done otherwise than asked, and the command goes on."""
    print(f"metarl: warning: {message}", file=sys.stderr, flush=True)


_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """A named moment at which the fault-injection tests kill the process: with ``METARL_FAULT=name`` (or
    ``name:N``, the N-th time it is reached) this process sends itself SIGKILL there. Without the variable
    it costs one dictionary lookup. Points: ``iteration`` (start of an iteration), ``metrics`` (metrics
    appended, checkpoint not yet written), ``checkpoint`` (new checkpoint written beside the old one, not
    yet renamed), ``eval`` (held-out evaluation computed, nothing written), ``eval_files`` (the previous
    evaluation's files removed, summary.csv written, the rest and summary.json not yet), ``eval_history`` (files and TensorBoard written, not yet its line in
    history.jsonl), ``eval_logged`` (files, TensorBoard and history written, not yet recorded as done), ``worker`` (a sampler worker process, before a rollout; the count is per worker), ``ray_actor``
    (a Ray sampler actor, before a rollout; the count is per actor). With ``METARL_FAULT_ONCE=PATH`` as well,
    only the first process to create PATH is killed (one fault across all the processes that see PATH)."""
    target = os.environ.get("METARL_FAULT")
    if not target:
        return
    want, _, nth = target.partition(":")
    if want != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(nth or 1):
        import signal

        once = os.environ.get("METARL_FAULT_ONCE")
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return  # another process took the fault
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (the renames into it) to disk, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot sync a folder: the rename is as durable as it gets
        pass
    finally:
        os.close(fd)


def durable_replace(write: Callable[[Any], None], path: str | os.PathLike) -> None:
    """Replace ``path`` so that a kill or a power cut leaves the old file or the new one, never half of one:
    ``write(file)`` fills a temporary file beside it, which is flushed and fsynced, then renamed over ``path``,
    and the folder is fsynced after the rename."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(folder or ".")


def atomic_write(path: str | os.PathLike, content: str | bytes) -> None:
    """Write ``content`` to ``path`` through a temporary file beside it, fsynced before its rename and the folder
    after it, so that neither a kill nor a power cut mid-write leaves half a file (`durable_replace`)."""
    data = content if isinstance(content, bytes) else content.encode()
    durable_replace(lambda handle: handle.write(data), path)
