"""User code for every command: the modules that register a user's own task families.

Three ways to name them, all resolved here:

* an env id ``module:Id`` (Gymnasium's own syntax: import ``module``, then make ``Id``), as ``env:`` of a
  config, a family of a suite, or the argument of ``metarl check`` / ``rollout``;
* ``imports: [module_or_file, ...]`` in a config or a suite;
* ``--import MODULE_OR_FILE`` (repeatable) on the command line of every command.

An entry is a module name (``my_families``, ``pkg.families``) or a path to a ``.py`` file or a package folder,
imported as a top-level module named after it (``other/file.py`` as ``file``). A relative path is relative to
the config or suite file that names it (the current directory on the command line). A module name is looked
up on the Python path first; a single name not found there (``my_families``: ``my_families.py`` or a package
folder ``my_families/``) is then looked up beside the config or suite file, then in the current directory,
and its folder is appended to the Python path, after everything installed, so that it never shadows a
package. `resolve` returns the form a run folder records: a name importable from the Python path stays a
name, anything else becomes an absolute path, so ``metarl eval`` and ``--resume`` find it from any folder.

`load` imports entries in this process and remembers them (`loaded`); the sampler's worker processes
(spawned, so they start from a fresh interpreter) import the same entries before they make an env, so a
registration made by a user's module exists there too.

Ray nodes get the user's code through the Ray job's ``runtime_env`` (`shipped`, used by
`metarl.sampling.ray.connect`): each path entry's file or package folder, and each module name whose code is
not installed (found outside the interpreter's library folders), go in ``py_modules``; the environment
variable ``METARL_SHIPPED_IMPORTS`` tells every process of the job the module name each entry's shipped copy
imports under, so that a path entry that does not exist on a node (another machine) loads that copy.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path

from metarl.agent import AgentError
from metarl.tasks import TaskError

_LOADED: list[str] = []  # resolved entries imported in this process, in order (the workers import them too)
_FROM_PATH: dict[str, str] = {}  # module name -> the path entry it was imported from
SHIPPED_ENV = "METARL_SHIPPED_IMPORTS"  # JSON {entry: module name} of the entries a Ray job's runtime_env ships


def _is_path(entry: str) -> bool:
    return entry.endswith(".py") or "/" in entry or os.sep in entry or entry.startswith(".") or entry.startswith("~")


def module_of(env_id: str) -> str | None:
    """The module part of a ``module:Id`` env id (None for a plain id)."""
    return env_id.split(":", 1)[0] if ":" in env_id else None


def resolve(entry: str, base: str | Path | None = None) -> str:
    """The stored form of an import entry (see the module docstring); TaskError naming it if it is not found.

    ``base``: the folder of the config or suite file that names it (None: the current directory only)."""
    if not isinstance(entry, str) or not entry.strip():
        raise TaskError(f"expected a module name or a .py file, got {entry!r}")
    entry = entry.strip()
    here = Path.cwd()
    if _is_path(entry):
        path = Path(entry).expanduser()
        if not path.is_absolute():
            path = Path(base or here) / path
        if path.is_file() and path.suffix == ".py" or path.is_dir() and (path / "__init__.py").is_file():
            return str(path.resolve())
        if str(path) in shipped_here():  # on a Ray node without the file: its copy came with the job
            return str(path)
        raise TaskError(f"{entry!r}: no such .py file or package folder ({path})")
    if not all(part.isidentifier() for part in entry.split(".")):
        raise TaskError(f"{entry!r} is neither a module name nor a path to a .py file")
    if entry in _FROM_PATH:  # importable now only because a path entry put its folder on the Python path
        return _FROM_PATH[entry]
    if entry in sys.modules or _on_path(entry):
        return entry
    if "." in entry:
        raise TaskError(f"cannot find module {entry!r} on the Python path (a dotted name is not looked up beside "
                        "the file that names it; install its package, or name the .py file)")
    folders = [Path(base)] if base is not None else []
    folders += [here] if here not in folders else []
    for folder in folders:
        for candidate in (folder / f"{entry}.py", folder / entry / "__init__.py"):
            if candidate.is_file():
                return str((candidate if candidate.name != "__init__.py" else candidate.parent).resolve())
    where = " and ".join(str(f) for f in folders)
    raise TaskError(f"cannot find module {entry!r} (looked on the Python path and in {where})")


def _on_path(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that does not exist or does not import
        return False


def load(entries: Iterable[str]) -> list[str]:
    """Import resolved entries (module names or absolute paths) in this process; returns their module names.
    Raises TaskError in one line for a module that cannot be found or imported (a module that raises anything
    else while it runs keeps its traceback: that is a bug in it, not bad input)."""
    names = []
    for entry in entries:
        names.append(_load_one(entry))
        if entry not in _LOADED:
            _LOADED.append(entry)
    return names


def loaded() -> list[str]:
    """The entries `load` imported in this process, in order (what a sampler worker imports)."""
    return list(_LOADED)


def module_name(entry: str) -> str:
    """The name an entry is imported under (a path: its file's name, with the packages around it)."""
    return _locate(entry)[0] if _is_path(entry) else entry


def _locate(entry: str) -> tuple[str, Path]:
    """(module name, the folder to put on the Python path) of a path entry: a top-level module named after the
    file or folder, the name Gymnasium's ``module:Id`` imports (even where the folder is itself a package)."""
    path = Path(entry)
    return (path.stem if path.suffix == ".py" else path.name), path.parent


def _load_one(entry: str) -> str:
    file: Path | None = None
    if _is_path(entry):
        path = Path(entry)
        if not path.exists() and entry in shipped_here():  # a Ray node without the file: the job's copy
            name = shipped_here()[entry]
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as exc:
                raise TaskError(f"cannot import the shipped copy of {entry!r}: {exc}") from exc
            _FROM_PATH[name] = entry
            return name
        if not path.exists():
            raise TaskError(f"{entry} does not exist (moved since the run was started?)")
        file = path / "__init__.py" if path.is_dir() else path
        name, root = _locate(entry)
        if str(root) not in sys.path:
            sys.path.append(str(root))  # after everything installed: it cannot shadow a package
    else:
        name = entry
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise TaskError(f"cannot import {entry!r}: {exc}") from exc
    except SyntaxError as exc:
        raise TaskError(f"cannot import {entry!r}: {exc.filename}:{exc.lineno}: {exc.msg}") from exc
    except (ImportError, TaskError, AgentError) as exc:  # e.g. a task class or an agent under a name already taken
        raise TaskError(f"cannot import {entry!r}: {' '.join(str(exc).split())}") from exc
    got = getattr(module, "__file__", None)
    if file is not None and (got is None or os.path.realpath(got) != os.path.realpath(file)):
        raise TaskError(f"cannot import {entry}: a module named {name!r} is already importable from {got}; "
                        "rename the file")
    if file is not None:
        _FROM_PATH[name] = entry
    return name


def shipped_here() -> dict[str, str]:
    """{entry: module name} of the entries this process's Ray job shipped ({} outside one)."""
    try:
        data = json.loads(os.environ.get(SHIPPED_ENV) or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _installed(location: str) -> bool:
    """Whether code at ``location`` is part of the interpreter or of an installed distribution (every node of a
    cluster is expected to have those), not a user's own file."""
    here = os.path.realpath(location)
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return any(here == os.path.realpath(r) or here.startswith(os.path.realpath(r) + os.sep) for r in roots)


def shipped(entries: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """What a Ray job ships so that its nodes import resolved ``entries``: (the files and package folders for
    ``runtime_env["py_modules"]``, {entry: the module name its copy imports under}). A path entry ships its
    file or folder; a module name ships its top-level module or package unless that is installed."""
    files: list[str] = []
    names: dict[str, str] = {}
    for entry in entries:
        if _is_path(entry):
            files.append(entry)
            names[entry] = module_name(entry)
            continue
        top = entry.split(".")[0]
        if top == "metarl":  # installed on every node, editable or not
            continue
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            spec = None
        if spec is None or spec.origin in (None, "built-in", "frozen"):
            location = None
        else:
            location = spec.submodule_search_locations[0] if spec.submodule_search_locations else spec.origin
        if location is None or _installed(location):
            continue
        files.append(location)
        names[entry] = entry
    return list(dict.fromkeys(files)), names


__all__ = ["load", "loaded", "module_name", "module_of", "resolve", "shipped", "shipped_here"]
