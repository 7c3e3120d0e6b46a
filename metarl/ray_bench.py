"""``metarl bench SUITE --ray``: a suite's cells as Ray tasks across a cluster, the report on the driver.

Each unfinished cell is one Ray task asking for ``cpus_per_cell`` CPUs. The task runs `metarl.bench.run_cell`
unchanged in a temporary folder on whichever node Ray picks, and returns the cell's folder (its run, with
checkpoints and evaluation, or a baseline's summary) as bytes; the driver writes it into ``OUT/cells/...``,
``cell.json`` last, and rewrites the report after each cell, as `run_suite` does. So the nodes need no shared
filesystem, and resuming works as without Ray: finished cells (``cell.json``) are never rerun, and a
meta-learner's run that a local ``metarl bench`` left unfinished is shipped to its task and continues from its
last checkpoint. A cell still running on the cluster when the driver stops is rerun from the state the
driver holds. A cell's numbers do not depend on where it ran (tested: the report equals the local one).
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metarl.bench import Cell, Suite, _fmt, cell_dir, plan_cells, run_cell, write_report
from metarl.provenance import command_line, invoked_as
from metarl.sampling.ray import connect
from metarl.system import atomic_write


def _pack(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"} if folder.is_dir() else {}


def _unpack(files: dict[str, bytes], folder: Path) -> None:
    """Write ``files`` under ``folder``, each atomically."""
    for name in files:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, files[name])


def _remote_cell(suite: Suite, cell: Cell, files: dict[str, bytes], command: str) -> tuple[dict[str, bytes], dict]:
    """Run one cell in a temporary copy of its folder (on a cluster node); its files and record. Its provenance
    names ``command``, the driver's (not the Ray worker's own command line)."""
    tmp = Path(tempfile.mkdtemp(prefix="metarl-cell-"))
    try:
        here = dataclasses.replace(suite, out=tmp)
        folder = cell_dir(here, cell)
        _unpack(files, folder)
        with invoked_as(shlex.split(command)):
            record = run_cell(here, cell, log=lambda _: None, verbose=False)
        return _pack(folder), record
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_suite_on_ray(suite: Suite, address: str | None = None, cpus_per_cell: float = 1.0,
                     log: Callable[[str], None] = print, only: list[str] | tuple[str, ...] | None = None) -> Path:
    """Run every unfinished cell of ``suite`` (matching ``only``, see `select_cells`) as a Ray task; returns the
    report path (as `run_suite`)."""
    if not cpus_per_cell > 0:
        raise ValueError(f"cpus_per_cell must be > 0, got {cpus_per_cell}")
    finished_cells, todo, note = plan_cells(suite, only)  # before connecting: bad patterns are config errors
    done = len(finished_cells)
    ray = connect(address)
    suite.out.mkdir(parents=True, exist_ok=True)
    cpus = ray.cluster_resources().get("CPU", 0)
    log(f"bench {suite.name} on Ray ({cpus:g} CPUs, {cpus_per_cell:g} per cell): {len(suite.cells)} cells, {note}")
    task = ray.remote(_remote_cell).options(num_cpus=cpus_per_cell, max_retries=1)
    command = command_line()
    pending: dict[Any, Cell] = {task.remote(suite, c, _pack(cell_dir(suite, c)), command): c for c in todo}
    start = time.perf_counter()
    failed: list[BaseException] = []
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        cell = pending.pop(ref)
        try:
            files, record = ray.get(ref)
        except Exception as exc:  # the other cells finish and are kept; this one is raised at the end
            log(f"{cell.key} failed: {str(exc).splitlines()[0]}")
            failed.append(exc)
            continue
        folder, finished_record = cell_dir(suite, cell), files.pop("cell.json")
        _unpack(files, folder)
        for path in [p for p in folder.rglob("*") if p.is_file()]:  # what the cell removed (a run it restarted)
            if str(path.relative_to(folder)) not in files and path.name not in (".lock", "cell.json"):
                path.unlink()
        atomic_write(folder / "cell.json", finished_record)  # finished only once cell.json is written
        done += 1
        curve = " -> ".join(f"{s['mean_return']:.1f}" for s in record["summary"]["stages"])
        counter = f"{len(todo) - len(pending) - len(failed)}/{len(todo)}" if only else f"{done}/{len(suite.cells)}"
        log(f"[{counter}] {cell.key} done in {_fmt(record['wall_time_s'])} "
            f"(elapsed {_fmt(time.perf_counter() - start)}): return by stage {curve}")
        write_report(suite)
    report = write_report(suite)
    log(f"report: {report}")
    if failed:
        raise failed[0]
    return report
