"""Provenance of a result file: what produced it, on what, and whether it had the machine to itself.

Every result file metarl writes (a learning run's figures, a bench suite's report and cells, an evaluation's
summary, a speed measurement, a sweep) carries a ``provenance`` record:

* ``commit``, ``dirty`` and ``changed``: the git revision of metarl's source tree, whether its code and
  configs (tracked or new; not ``experiments/results/``) differed from that revision when the work started,
  and which (the first 20); ``None`` where metarl is not a git checkout (an installed wheel: ``versions``
  then names the release);
* ``versions``: the installed versions of metarl and the packages a figure depends on, ``python``,
  ``platform``, ``cpu_model``, ``cores`` (those this process may run on) and ``memory_gib``;
* ``command``: the command line, as a shell would take it; ``started`` / ``finished`` (local ISO time);
* ``wall_s`` and ``cpu_s``: wall time, and CPU time of this process and every process it started;
* ``others_cpu_s`` and ``others_share``: the CPU time every *other* process on the machine used meanwhile
  (from ``/proc/stat``, less this process tree's), and its share of the machine's capacity over the wall
  time; ``steal_share``, the share the hypervisor gave to other machines; ``shared``: whether others used more
  than :data:`SHARED_SHARE` of the machine, so that a timing taken meanwhile is not one of the machine alone.

A result gathered from several runs (seeds trained apart, a suite's cells) carries one record per run beside
the file's own. Files written before provenance existed carry ``recovered: true`` with what could still be
known (the commit that added the file) and ``unknown``: the fields that cannot be.

:func:`check` is what the manifest (``metarl reproduce``) applies to a result it reads.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

#: Other processes using more than this share of the machine's capacity make a run "shared".
SHARED_SHARE = 0.05

#: Fields every provenance record has (``None`` where not known on this platform).
FIELDS = ("commit", "dirty", "versions", "python", "platform", "cpu_model", "cores", "command", "started",
          "finished", "wall_s", "cpu_s", "others_share", "shared")

#: Installed distributions whose versions a result records (those present).
PACKAGES = ("metarl-robotics", "torch", "numpy", "mujoco", "gymnasium", "stable-baselines3", "sb3-contrib",
            "tensorboard", "ray", "metaworld", "scipy")

#: What counts for ``dirty``: the code and configs, tracked or not; not result files a run writes meanwhile.
CODE_PATHS = ("metarl", "agents", "envs", "experiments", ":!experiments/results", "pyproject.toml", "scripts")

_SOURCE = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def recovered(note: str, **known: Any) -> dict[str, Any]:
    """The record of a result written before provenance existed: what is still known, and what is not."""
    return {"recovered": True, **known, "unknown": [f for f in FIELDS if f not in known], "note": note}


#: A part of a result (a seed, a cell) that finished before results recorded their provenance.
MISSING = recovered("finished before results recorded their provenance")


class ProvenanceError(ValueError):
    """A result file lacks provenance, or its record lacks a field."""


def git_state(source: Path = _SOURCE) -> dict[str, Any]:
    """The commit of metarl's source tree and whether its tracked files differ from it."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if not top or Path(top.strip()).resolve() != source.resolve():  # an install inside some other checkout
        return {"commit": None, "dirty": None, "changed": []}
    commit = git("rev-parse", "HEAD")
    if not commit:
        return {"commit": None, "dirty": None, "changed": []}
    status = git("status", "--porcelain", "--", *CODE_PATHS) or ""
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit.strip(), "dirty": bool(changed), "changed": changed[:20]}


_AT_START: dict[str, Any] | None = None


def git_state_at_start() -> dict[str, Any]:
    """`git_state` as this process first saw it (the ``metarl`` command asks as it starts): the code a long-running
    process loaded, where commits made while it runs would otherwise be recorded as its code."""
    global _AT_START
    if _AT_START is None:
        _AT_START = git_state()
    return dict(_AT_START)


@functools.lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    found = []
    for name in PACKAGES:
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    return tuple(found)


def versions() -> dict[str, str]:
    """Installed versions of the packages a figure depends on (those installed; read once a process: every
    evaluation of a run records them)."""
    return dict(_versions())


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def _memory_gib() -> float | None:
    from metarl.system import physical_memory

    size = physical_memory()
    return None if size is None else round(size / 2**30, 1)


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_model": _cpu_model(),
            "cores": _cores(), "memory_gib": _memory_gib()}


def _system_cpu() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat; None where absent."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


def _descendants_cpu() -> float:
    """CPU seconds of this process's live descendants (workers, Ray's processes), from /proc."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()  # fields after the command name, which may hold spaces
        parent[int(entry.name)] = int(rest[1])
        cpu[int(entry.name)] = (int(rest[11]) + int(rest[12])) / _TICK
    me, total, frontier = os.getpid(), 0.0, [os.getpid()]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child != me:
                total += cpu.get(child, 0.0)
                frontier.append(child)
    return total


def _own_cpu() -> float:
    """CPU seconds of this process, its finished (waited-for) children and its live descendants."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + _descendants_cpu()


_INVOKED_AS: list[str] = []


@contextlib.contextmanager
def invoked_as(argv: list[str]) -> Iterator[None]:
    """Within the block, results record ``argv`` as their command (the CLI's own command line, also where
    ``metarl.cli.main`` is called from Python rather than run as the program)."""
    _INVOKED_AS.append(shlex.join(argv))
    try:
        yield
    finally:
        _INVOKED_AS.pop()


def command_line(argv: list[str] | None = None) -> str:
    if argv is None and _INVOKED_AS:
        return _INVOKED_AS[-1]
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(("/metarl", "metarl/__main__.py")):
        argv[0] = "metarl"
    elif argv and argv[0].endswith(".py"):
        argv = ["python", os.path.relpath(argv[0]) if os.path.isabs(argv[0]) else argv[0], *argv[1:]]
    return shlex.join(argv)


class Recorder:
    """Started where a result's work starts; :meth:`record` gives the provenance of the work so far."""

    def __init__(self, command: str | None = None) -> None:
        self.command = command or command_line()
        self.started = _dt.datetime.now().astimezone()
        self._t0 = time.perf_counter()
        self._cpu0 = _own_cpu()
        self._sys0 = _system_cpu()
        self._static = {**git_state_at_start(), "versions": versions(), **machine()}

    def record(self, **extra: Any) -> dict[str, Any]:
        wall = time.perf_counter() - self._t0
        own = _own_cpu() - self._cpu0
        sys1, cores = _system_cpu(), self._static["cores"] or 1
        others = steal = share = None
        if self._sys0 is not None and sys1 is not None and wall > 0:
            others = max(0.0, (sys1[0] - self._sys0[0]) - own)
            steal = (sys1[1] - self._sys0[1]) / (wall * cores)
            share = others / (wall * cores)
        return {
            **self._static,
            "command": self.command,
            "started": self.started.isoformat(timespec="seconds"),
            "finished": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "wall_s": round(wall, 2),
            "cpu_s": round(own, 2),
            "others_cpu_s": None if others is None else round(others, 2),
            "others_share": None if share is None else round(share, 3),
            "steal_share": None if steal is None else round(steal, 3),
            "shared": None if share is None else bool(share > SHARED_SHARE or (steal or 0) > SHARED_SHARE),
            **self._changed_since(),
            **extra,
        }

    def _changed_since(self) -> dict[str, Any]:
        """``{"tree_at_finish": ...}`` where the source tree's commit or changed files differ now from those
        the process started with (code edited or committed while it ran), else nothing."""
        now = git_state()
        keys = ("commit", "dirty", "changed")
        if all(now.get(k) == self._static.get(k) for k in keys):
            return {}
        return {"tree_at_finish": {k: now.get(k) for k in keys}}


def check(result: Any, name: str) -> None:
    """Raise :class:`ProvenanceError` (one line) unless ``result`` carries complete provenance: a record of its
    own, or, for a report gathered from runs (a bench suite's or a sweep's ``results.json``, a list of rows),
    one per run (each bench cell, each sweep seed)."""
    if isinstance(result, list):
        for i, row in enumerate(result):
            runs = row.get("cells") if isinstance(row, dict) and "cells" in row else [
                {"provenance": p} for p in ((row.get("provenance") or {}) if isinstance(row, dict) else {}).values()]
            if not runs:
                raise ProvenanceError(f"{name}: row {i} records no run's provenance")
            for run in runs:
                check(run, f"{name} row {i}")
        return
    prov = result.get("provenance") if isinstance(result, dict) else None
    if not isinstance(prov, dict):
        raise ProvenanceError(f"{name}: no provenance record (the commit, versions, machine and command that "
                              "produced it); regenerate it with `metarl reproduce`")
    if prov.get("recovered"):
        if not isinstance(prov.get("unknown"), list):
            raise ProvenanceError(f"{name}: a recovered provenance record must list its unknown fields")
        return
    missing = [f for f in FIELDS if f not in prov]
    if missing:
        raise ProvenanceError(f"{name}: provenance lacks {', '.join(missing)}")


def write_result(path: str | os.PathLike, result: dict[str, Any], recorder: Recorder, **extra: Any) -> Path:
    """Write ``result`` as JSON to ``path`` (durably, in one rename) with the provenance of ``recorder``'s work."""
    import json

    from metarl.system import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({**result, "provenance": recorder.record(**extra)}, indent=2) + "\n")
    return path
