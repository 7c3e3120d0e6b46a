"""What keeps a run folder trustworthy: verified checkpoints, one writer at a time, and a record of the
evaluations a run has finished.

* **Checkpoints** (``checkpoints/latest.pt``) are ordinary ``torch.save`` files (``torch.load(...,
  weights_only=True)`` reads them) holding ``agent``, ``iteration``, ``env_steps``, the run's resolved
  config (``config``, JSON) and ``sha256``: a digest of everything else in the file, computed over the
  tensors' bytes and the plain values in order. A load recomputes it, so a bit flip, a truncation or a
  hand edit is found instead of trained on. Each save first keeps the checkpoint it replaces as
  ``checkpoints/previous.pt`` (a hard link, then an atomic rename), so a damaged latest checkpoint falls
  back to the one before it, with a warning.
* **One writer**: `run_lock` takes an advisory lock (``fcntl.flock``) on ``.lock`` in a folder for as
  long as a command writes there; a second ``train``/``eval``/``bench`` on the same folder stops with one
  line. The kernel drops the lock when its process dies, so a killed run never blocks its resume.
* **Evaluations done**: ``checkpoints/evals.json`` lists the iterations whose scheduled held-out
  evaluation (the config's ``eval``) finished, files and TensorBoard points included; a resume redoes one
  that a kill interrupted, so ``eval/<split>/`` always belongs to the iteration it names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from metarl.config import ConfigError, RunConfig, load_config, read_yaml, yaml_dump
from metarl.system import atomic_write, fault_point, fsync_dir, warn

LATEST, PREVIOUS = "latest.pt", "previous.pt"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be trusted (missing, unreadable, or failing its checksum)."""


# ---- checksums ------------------------------------------------------------------------------------------
def _digest(obj: Any, h: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for key, value in obj.items():
            _digest(key, h)
            _digest(value, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)}:".encode())
        for value in obj:
            _digest(value, h)
    else:  # None, bool, int, float (repr round-trips exactly), str, bytes
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def checksum(payload: dict[str, Any]) -> str:
    """sha256 over a checkpoint's content except its ``sha256`` entry."""
    h = hashlib.sha256()
    _digest({k: v for k, v in payload.items() if k != "sha256"}, h)
    return h.hexdigest()


# ---- checkpoints ----------------------------------------------------------------------------------------
def save_checkpoint(folder: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus its checksum) as ``folder/latest.pt``, keeping the checkpoint it replaces as
    ``previous.pt``. The new file is written beside them and fsynced; then latest.pt is renamed to previous.pt and
    the new file to latest.pt, the folder fsynced after each rename. So the two checkpoints are always two
    distinct files, and a kill or a power cut at any moment leaves the last complete checkpoint: as latest.pt,
    or, between the renames, as previous.pt (which `latest_checkpoint` falls back to)."""
    folder.mkdir(parents=True, exist_ok=True)
    latest, previous = folder / LATEST, folder / PREVIOUS
    tmp = folder / f".{LATEST}.tmp"
    with open(tmp, "wb") as handle:
        torch.save({**payload, "sha256": checksum(payload)}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    if latest.is_file():
        os.replace(latest, previous)
        fsync_dir(folder)
    fault_point("checkpoint")
    os.replace(tmp, latest)
    fsync_dir(folder)
    return latest


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The verified content of one checkpoint file; CheckpointError (naming the file) if it cannot be used."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: damaged checkpoint (empty file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to parse an untrusted file means it is damaged
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: damaged checkpoint (cannot be read: {type(exc).__name__}: {reason})") from None
    if not isinstance(state, dict) or not {"agent", "iteration", "env_steps"} <= set(state):
        raise CheckpointError(f"{path}: damaged checkpoint (not a metarl checkpoint: missing agent/iteration/env_steps)")
    if "sha256" not in state:
        warn(f"{path} has no checksum (written by an older metarl); loaded unverified")
    elif state["sha256"] != checksum(state):
        raise CheckpointError(f"{path}: damaged checkpoint (checksum mismatch: its content changed after it was written)")
    if not isinstance(state["iteration"], int) or state["iteration"] < 0:
        raise CheckpointError(f"{path}: damaged checkpoint (iteration {state['iteration']!r})")
    return state


def latest_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The newest usable checkpoint in ``folder``: latest.pt, or previous.pt with a warning when latest.pt
    is damaged or missing; None when neither exists (a run killed before its first checkpoint).
    CheckpointError if no usable checkpoint is left."""
    latest, previous = folder / LATEST, folder / PREVIOUS
    if not latest.exists() and not previous.exists():
        return None
    try:
        return read_checkpoint(latest)
    except CheckpointError as exc:
        first = exc
    if not previous.is_file():
        raise first
    try:
        state = read_checkpoint(previous)
    except CheckpointError as exc:
        raise CheckpointError(f"{first}; the fallback {exc}") from None
    warn(f"{first}; using {previous} (iteration {state['iteration']}) instead")
    return state


def set_aside_damaged(folder: Path) -> None:
    """Rename a damaged latest.pt to ``latest.damaged.pt`` (kept for inspection), so that the next save
    does not keep it as the fallback ``previous.pt``. For a resume that continues from previous.pt."""
    latest = folder / LATEST
    if not latest.exists():
        return
    try:
        read_checkpoint(latest)
    except CheckpointError:
        os.replace(latest, folder / "latest.damaged.pt")


def config_record(config_dict: dict[str, Any]) -> str:
    """What a checkpoint stores of its run's config: everything but ``iterations`` (which a resume may
    extend), as JSON."""
    return json.dumps({k: v for k, v in config_dict.items() if k != "iterations"}, sort_keys=True)


#: Fields a resume may change by hand: results do not depend on them (sampler.workers and the placement on
#: a Ray cluster are tested so), so a run started on one machine may continue on a cluster and back.
MAY_CHANGE = frozenset({"device", "sampler.workers", "sampler.placement", "sampler.address", "sampler.cpus_per_actor",
                        "sampler.retries", "sampler.timeout", "sampler.max_slots"})


def _registered(agent_name: Any) -> Any:
    """The registered agent class of that name, or None (not a name, or no such agent)."""
    from metarl.agent import AgentError, get_agent

    if not isinstance(agent_name, str):
        return None
    try:
        return get_agent(agent_name)
    except AgentError:
        return None


def added_options(agent_name: Any) -> dict[str, Any]:
    """Options added to an agent after runs were recorded (its class's ``added_options``, as ``agent.<option>``
    keys), with the value that keeps the behaviour those runs had: a record without the field matches a config of
    that agent holding that value, so older run folders still resume. Scoped by agent: another agent's option of
    the same name may have another old value. An agent that is not registered has none."""
    cls = _registered(agent_name)
    return {} if cls is None else {f"agent.{k}": v for k, v in cls.added_options.items()}


def retired_options(agent_name: Any) -> dict[str, Any]:
    """The options an agent retired (its class's ``retired_options``, as ``agent.<option>`` keys) with their
    neutral value: a record holding one at that value matches a config without it."""
    cls = _registered(agent_name)
    return {} if cls is None else {f"agent.{k}": neutral for k, (neutral, _) in cls.retired_options.items()}


def with_added_options(config_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of a stored run config with the `added_options` of its agent that it lacks at their old behaviour's
    value, and without its `retired_options` at their neutral value: a record written before an option existed
    ran with that value (to compare two such records
    symmetrically; `record_changes` forgives them in its ``old`` record only)."""
    filled = json.loads(json.dumps(config_dict))
    agent = filled.get("agent")
    if isinstance(agent, dict):
        for option, value in added_options(agent.get("name")).items():
            agent.setdefault(option.split(".", 1)[1], value)
        for option, neutral in retired_options(agent.get("name")).items():  # and without retired ones at neutral
            if option.split(".", 1)[1] in agent and agent[option.split(".", 1)[1]] == neutral:
                del agent[option.split(".", 1)[1]]
    return filled


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()  # a field one record lacks: it differs from any value, None included


def record_changes(old: Any, new: Any, may_change: frozenset[str] = frozenset(), config_at: str = "") -> list[str]:
    """The dotted fields whose value differs between two records of JSON values, as ``"field old -> new"``,
    but the fields in ``may_change``, `added_options` (a run config's fields, found under ``config_at``) absent from
    ``old`` and at their old behaviour's value in ``new``, and `retired_options` at their neutral value in ``old``
    and absent from ``new`` (for the agent ``new`` names)."""
    out: list[str] = []
    config = new
    for part in config_at.split(".")[:-1]:
        config = config.get(part) if isinstance(config, dict) else None
    agent = config.get("agent") if isinstance(config, dict) else None
    added = added_options(agent.get("name")) if isinstance(agent, dict) else {}
    retired = retired_options(agent.get("name")) if isinstance(agent, dict) else {}

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                name = f"{where}.{key}" if where else key
                option = name[len(config_at):] if name.startswith(config_at) else None
                if key not in a and option in added and b[key] == added[option]:
                    continue
                if key not in b and option in retired and a[key] == retired[option]:
                    continue
                walk(a.get(key, _ABSENT), b.get(key, _ABSENT), name)
        elif (a is _ABSENT or b is _ABSENT or a != b) and where not in may_change:
            out.append(f"{where} {a!r} -> {b!r}")

    walk(old, new, "")
    return out


def config_changes(stored: str, config_dict: dict[str, Any]) -> list[str]:
    """The dotted fields whose value differs between a checkpoint's config record and ``config_dict``
    (but `MAY_CHANGE`, and `added_options` absent from the record and at their old behaviour's value)."""
    return record_changes(json.loads(stored), json.loads(config_record(config_dict)), MAY_CHANGE)


# ---- one writer -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def run_lock(folder: Path, what: str = "run folder") -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder/.lock`` (created with the folder if needed).
    ConfigError in one line if another process holds it or the folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".lock", "a+")  # noqa: SIM115 (held for the whole block)
    except OSError as exc:
        raise ConfigError(f"cannot write to {what} {folder}: {exc.strerror or exc}") from None
    try:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise ConfigError(f"{what} {folder} is in use by {holder}; wait for it to finish "
                                  "(only one metarl command may write to a folder at a time)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} ({' '.join(sys.argv[:3])[:200]})\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def check_writable(*folders: Path) -> None:
    """ConfigError if any existing folder of ``folders`` cannot be written (checked before any work)."""
    for folder in folders:
        if not folder.exists():
            continue
        probe = folder / f".write-test-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"cannot write to {folder}: {exc.strerror or exc}") from None


# ---- evaluations done -------------------------------------------------------------------------------------
def evals_done(run_dir: Path) -> list[int] | None:
    """Iterations whose scheduled evaluation finished (None: the run predates this record)."""
    path = run_dir / "checkpoints" / "evals.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return sorted({int(k) for k in data["done"]})
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        warn(f"{path} is damaged; the evaluation at the checkpoint's iteration will be redone")
        return []


def record_eval_done(run_dir: Path, done: list[int]) -> None:
    """Record the iterations whose evaluation finished (the last write of an evaluation)."""
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "checkpoints" / "evals.json", json.dumps({"done": sorted(set(done))}))


# ---- the run folder's files ------------------------------------------------------------------------------
def no_config_error(run_dir: Path) -> ConfigError:
    """The error for a folder without config.yaml: a run killed before writing it says how to start again."""
    started = any((run_dir / name).exists() for name in (".lock", "checkpoints", ".config.yaml.tmp"))
    if started and unstarted(run_dir):
        return ConfigError(f"{run_dir}: killed before its config.yaml was written, so there is nothing to resume; "
                           f"start it again in place: metarl train CONFIG --run-dir {run_dir}")
    return ConfigError(f"{run_dir}: not a run folder (no config.yaml)")


def load_run_config(run_dir: Path, trust_code: bool = False) -> RunConfig:
    """The run's config.yaml, validated. The code it names (``imports:``, ``env: module:Id``) is imported only
    where the user trusts it: found outside the run folder, or with ``trust_code`` (`check_run_code`)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise no_config_error(run_dir)
    data = read_yaml(path, "run config")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: damaged run config (expected a mapping, got {type(data).__name__})")
    data.pop("meta", None)
    if not trust_code:
        check_run_code(run_dir, data)  # before anything of it is imported (a config's agent may be in its imports)
    try:
        return load_config(None, data=data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def check_run_code(run_dir: Path, data: dict[str, Any]) -> None:
    """ConfigError if the run config ``data`` names code that would be imported from inside ``run_dir`` (a
    ``payload.py`` beside config.yaml, found from the current directory when it is the run folder): a run folder
    someone shared would run their code. Nothing is imported here."""
    from metarl.config import resolve_imports

    env = data.get("env") if isinstance(data.get("env"), str) else None
    try:
        entries = resolve_imports(data.get("imports") or [], None, env)
    except ConfigError:
        return  # not found: load_config says so, and there is nothing inside the folder to import
    folder = run_dir.resolve()
    for entry in entries:
        where = _code_location(entry)
        if where is not None and (where == folder or folder in where.parents):
            raise ConfigError(f"{run_dir / 'config.yaml'} names code inside the run folder ({entry}), which metarl "
                              "imports only if you trust whoever wrote the folder: add --trust-run-code (in Python, "
                              "trust_code=True)")


def _code_location(entry: str) -> Path | None:
    """The file or package folder an import entry would be imported from (None: not found), without importing."""
    import importlib.util

    if Path(entry).is_absolute():  # `metarl.plugins.resolve` stores every path entry as an absolute path
        return Path(entry).resolve()
    try:
        spec = importlib.util.find_spec(entry.split(".")[0])  # a top-level name: found without running code
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    origin = spec.origin if spec.origin not in (None, "built-in", "frozen") else None
    places = [origin, *(spec.submodule_search_locations or [])]
    return next((Path(p).resolve() for p in places if p), None)


def load_checkpoint(run_dir: Path, agent: Any, config: RunConfig | None = None) -> dict[str, Any]:
    """Load the run's newest usable checkpoint into ``agent`` (falling back to ``previous.pt``, with a
    warning, when ``latest.pt`` is damaged); with ``config``, refuse a config.yaml edited since it was
    written. ConfigError in one line naming the file otherwise."""
    folder = run_dir / "checkpoints"
    state = latest_checkpoint(folder)
    if state is None:
        raise ConfigError(f"{run_dir}: no checkpoint at {folder / 'latest.pt'}")
    load_agent_state(run_dir, state, agent, config)
    return state


def load_agent_state(run_dir: Path, state: dict[str, Any], agent: Any, config: RunConfig | None = None) -> None:
    """Load a verified checkpoint's agent state into ``agent``, built from the run's config.yaml. ConfigError in one
    line if the checkpoint is not of this run: of another agent, of another network shape (a checkpoint swapped
    in from another run), or written with other settings than config.yaml holds now (config.yaml edited)."""
    where = f"{run_dir / 'checkpoints'}: the checkpoint at iteration {state['iteration']}"
    record = _record(state)
    name = getattr(config, "agent_name", None)
    theirs = record.get("agent", {}).get("name") if isinstance(record.get("agent"), dict) else None
    if name is not None and theirs is not None and theirs != name:
        raise ConfigError(f"{where} is a checkpoint of another agent ({theirs}), not of this run's {name} "
                          f"({run_dir / 'config.yaml'}); put this run's own checkpoint back")
    try:
        agent.load_state_dict(state["agent"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:  # networks of another shape than config.yaml makes
        mine, stored = _shapes(agent.state_dict()), _shapes(state["agent"])
        differ = [f"{key}: {list(stored[key])} in the checkpoint, {list(mine[key])} here" for key in sorted(set(mine) & set(stored))
                  if mine[key] != stored[key] and 0 not in mine[key] and 0 not in stored[key]]  # (not empty buffers)
        what = differ[0] if differ else " ".join(str(exc).split())[:160]
        raise ConfigError(f"{where} holds networks of another shape than {run_dir / 'config.yaml'} makes ({what}): a "
                          "checkpoint of another run, or config.yaml edited; put back this run's own") from exc
    check_config_unchanged(run_dir, state, config)


def _record(state: dict[str, Any]) -> dict[str, Any]:
    try:
        record = json.loads(state.get("config") or "{}")
    except (TypeError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _shapes(obj: Any, where: str = "") -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a (nested) state, by dotted path (other values are left out)."""
    if isinstance(obj, torch.Tensor):
        return {where: tuple(obj.shape)}
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(_shapes(value, f"{where}.{key}" if where else str(key)))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            out.update(_shapes(value, f"{where}[{i}]"))
    return out


def check_config_unchanged(run_dir: Path, state: dict[str, Any], config: RunConfig | None) -> None:
    if config is None or "config" not in state:
        return
    changes = config_changes(state["config"], config.to_dict())
    if changes:
        raise ConfigError(f"{run_dir / 'config.yaml'} was edited after the checkpoint at iteration "
                          f"{state['iteration']} was written ({'; '.join(changes[:3])}); restore it, or start "
                          "a new run with the new settings")


def truncate_jsonl(path: Path, iteration: int) -> dict[str, Any] | None:
    """Keep the lines of iterations up to the checkpoint's; drop later ones (the work a resume redoes).
    A damaged line (cut by a kill, garbled) is dropped with a warning naming it, the original file kept
    beside as ``metrics.jsonl.damaged``; missing or repeated iterations are reported. Returns the row of
    ``iteration`` (None if absent)."""
    if not path.is_file():
        if iteration > 0:
            warn(f"{path} is missing: the training metrics of iterations 1-{iteration} are lost (a checkpoint keeps "
                 "only the agent; TensorBoard keeps their scalars); later iterations are written to a new one")
        return None
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    keep, rows, damaged = [], [], []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("iteration"), int):
                raise ValueError("no integer 'iteration'")
        except ValueError as exc:
            damaged.append(number)
            warn(f"{path} line {number} is damaged ({str(exc)[:60]}); dropped")
            continue
        if row["iteration"] <= iteration:
            keep.append(line)
            rows.append(row)
    seen = [r["iteration"] for r in rows]
    if seen != list(range(1, iteration + 1)):
        missing = sorted(set(range(1, iteration + 1)) - set(seen))
        repeated = sorted({i for i in seen if seen.count(i) > 1})
        warn(f"{path} does not hold exactly one line per iteration up to the checkpoint's {iteration} "
             f"(missing: {missing[:10] or 'none'}, repeated: {repeated[:10] or 'none'}); the metrics of the missing "
             "iterations are lost (a checkpoint keeps only the agent; TensorBoard keeps their scalars)")
    if damaged:
        atomic_write(path.with_name(path.name + ".damaged"), "".join(line + "\n" for line in lines))
    if len(keep) != len(lines):
        atomic_write(path, "".join(line + "\n" for line in keep))
    return next((r for r in reversed(rows) if r["iteration"] == iteration), None)


def record_eval_history(path: Path, summary: dict[str, Any]) -> None:
    """Add one training-time evaluation to ``eval/<split>/history.jsonl`` (the held-out curve over
    iterations, so that a reported number is never one phase of an oscillation). Lines of the same or
    later iterations (left by a run that was killed and resumed from an earlier checkpoint) are replaced."""
    rows = read_eval_history(path)
    rows = [r for r in rows if r["iteration"] < summary["iteration"]]
    rows.append({
        "iteration": summary["iteration"], "env_steps": summary["env_steps"],
        "stages": [{k: s[k] for k in ("stage", "adapt_episodes", "mean_return", "ci95", "gain", "gain_ci95",
                                      "success_rate", "success_ci95") if k in s}  # success: Meta-World's envs
                   for s in summary["stages"]],
    })
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_eval_history(path: Path) -> list[dict[str, Any]]:
    """The evaluations ``record_eval_history`` wrote, in iteration order ([] if none yet)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_dir(run_dir: Path, split: str, repeats: int = 1) -> Path:
    """Where an evaluation of ``split`` writes: ``eval/<split>/``, or ``eval/<split>-repeats<R>/`` for a
    repeated one (so it never replaces the training-time evaluation the held-out curve continues)."""
    return run_dir / "eval" / (split if repeats == 1 else f"{split}-repeats{repeats}")


def eval_target(run_dir: Path, split: str, repeats: int, iteration: int) -> Path:
    """Where ``metarl eval`` writes its evaluation of the checkpoint at ``iteration``: `eval_dir`, unless that
    folder holds an evaluation of a later iteration (its summary.json or its history.jsonl says so: the command
    fell back to previous.pt because latest.pt is damaged); then ``eval/<split>-iteration<N>/`` beside it, with a
    warning, so that a newer result is never replaced by an older one."""
    out = eval_dir(run_dir, split, repeats)
    held = [_summary_iteration(out / "summary.json")]
    if (out / "history.jsonl").is_file():
        try:
            held += [row.get("iteration") for row in read_eval_history(out / "history.jsonl")]
        except (ValueError, AttributeError):
            pass
    later = max((k for k in held if isinstance(k, int) and k > iteration), default=None)
    if later is None:
        return out
    aside = out.with_name(f"{out.name}-iteration{iteration}")
    warn(f"{out} holds the evaluation of iteration {later}, later than the checkpoint evaluated (iteration "
         f"{iteration}); writing this one to {aside} instead")
    return aside


def _summary_iteration(path: Path) -> Any:
    try:
        return json.loads(path.read_text()).get("iteration")
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return None


def write_run_config(run_dir: Path, config: RunConfig, meta: dict[str, Any]) -> None:
    atomic_write(run_dir / "config.yaml", yaml_dump({**config.to_dict(), "meta": meta}))


def legacy_eval_done(run_dir: Path, config: RunConfig, iteration: int) -> bool:
    """For a run folder without ``checkpoints/evals.json``: its summary files are complete and of ``iteration``."""
    out = run_dir / "eval" / config.eval.split
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    files = ("summary.csv", "per_task.csv", "adaptation_curve.png")
    return summary.get("iteration") == iteration and all((out / f).is_file() for f in files)


def unstarted(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds only what a run killed before its config.yaml was in place leaves: a lock file,
    an empty checkpoints/ and the config's temporary file."""
    return run_dir.is_dir() and not [
        p.name for p in run_dir.iterdir() if p.name not in (".lock", ".config.yaml.tmp")
        and not (p.name == "checkpoints" and p.is_dir() and not any(p.iterdir()))]


def check_new_run_folder(run_dir: Path) -> None:
    """A new run starts in a missing or empty folder (what a run killed before its config.yaml was in place
    leaves counts as empty: it starts again in place)."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} is a file")
    if not unstarted(run_dir):
        raise ConfigError(f"run folder {run_dir} already exists and is not empty (use --resume to continue it)")
# ---- TensorBoard event files -------------------------------------------------------------------------------
def read_event_files(run_dir: Path) -> tuple[set[tuple[str, int]], list[str]]:
    """The (tag, step) of every scalar point TensorBoard can read from the run's event files, and one line for
    each damaged file (a record cut short or failing its checksum): where, and the last env step read before it.
    TensorBoard stops reading a file at its first bad record, so nothing after it is read: here neither."""
    import struct

    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    points: set[tuple[str, int]] = set()
    damaged: list[str] = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at, last, problem = 0, None, None
        while at < len(data) and problem is None:
            if len(data) - at < 12:
                problem = "a record cut short"
                break
            header = data[at:at + 8]
            (length,) = struct.unpack("<Q", header)
            if struct.unpack("<I", data[at + 8:at + 12])[0] != masked_crc32c(header):
                problem = "a record failing its checksum"
            elif at + 16 + length > len(data):
                problem = "a record cut short"
            else:
                body = data[at + 12:at + 12 + length]
                if struct.unpack("<I", data[at + 12 + length:at + 16 + length])[0] != masked_crc32c(body):
                    problem = "a record failing its checksum"
                else:
                    event = event_pb2.Event()
                    try:
                        event.ParseFromString(body)
                    except Exception:  # a record whose checksum holds but whose content is no event
                        problem = "a record that is no event"
                        break
                    for value in event.summary.value:
                        if value.HasField("simple_value") or value.metadata.plugin_data.plugin_name == "scalars":
                            points.add((value.tag, int(event.step)))
                    last = int(event.step) if event.HasField("summary") else last
                    at += 16 + length
                    continue
        if problem is not None:
            damaged.append(f"{path} is damaged ({problem} at byte {at} of {len(data)}; nothing after it can be read"
                           + (f", the last point read is at env step {last:,})" if last is not None else ")"))
    return points, damaged


def rebuild_event_points(run_dir: Path, split: str, readable: set[tuple[str, int]], before_step: int,
                         writer: Any) -> int:
    """Write again, with ``writer``, the scalar points below env step ``before_step`` that no event file holds
    readably and that the run's records keep: every metric of ``metrics.jsonl`` (logged with these values) and
    the return, adaptation gain and its interval of each evaluation in ``eval/<split>/history.jsonl``. Returns
    how many were written."""
    wanted: list[tuple[str, int, float]] = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("env_steps"), (int, float)):  # (a float: as logged)
                wanted += [(k, int(row["env_steps"]), v) for k, v in row.items()
                           if "/" in k and isinstance(v, (int, float))]
    try:
        history = read_eval_history(run_dir / "eval" / split / "history.jsonl")
    except (ValueError, OSError):
        history = []
    for row in history:
        stages, step = row.get("stages") or [], row.get("env_steps")
        if not stages or not isinstance(step, (int, float)):
            continue
        step = int(step)
        wanted += [(f"eval/{split}/return_stage{s['stage']}", step, s["mean_return"]) for s in stages]
        wanted.append((f"eval/{split}/adaptation_gain", step, stages[-1]["mean_return"] - stages[0]["mean_return"]))
        if "gain_ci95" in stages[-1]:
            wanted += [(f"eval/{split}/adaptation_gain_ci95_low", step, stages[-1]["gain_ci95"][0]),
                       (f"eval/{split}/adaptation_gain_ci95_high", step, stages[-1]["gain_ci95"][1])]
    written = 0
    for tag, step, value in wanted:
        if step < before_step and (tag, step) not in readable:
            writer.add_scalar(tag, value, step)
            readable.add((tag, step))
            written += 1
    return written


def eval_files_problem(run_dir: Path, split: str, iteration: int) -> str | None:
    """What is wrong with ``eval/<split>/`` as the record of the evaluation at ``iteration`` (None: complete)."""
    out = run_dir / "eval" / split
    path = out / "summary.json"
    if not path.is_file():
        return f"{path} is missing"
    try:
        held = json.loads(path.read_text()).get("iteration")
    except (OSError, ValueError, AttributeError, UnicodeDecodeError) as exc:
        return f"{path} is damaged ({type(exc).__name__})"
    if held != iteration:
        return f"{path} is of iteration {held!r}, not {iteration}"
    missing = [name for name in ("summary.csv", "per_task.csv", "adaptation_curve.png") if not (out / name).is_file()]
    return f"{out / missing[0]} is missing" if missing else None
