"""Typed, frozen run configurations loaded from YAML with ``key=value`` overrides.

A config file (see ``experiments/``) looks like::

    experiment: maml_trpo/point_nav_2d     # run folder: runs/<experiment>/<timestamp>-<seed>/
    env: PointNav2D                         # family name or Gymnasium id (module:Id-v0 imports module)
    imports: [my_families]                  # optional: modules or .py files that register your families
    seed: 0
    iterations: 100
    agent: {name: maml_trpo, tasks_per_batch: 40, inner_lr: 0.1, ...}
    sampler: {backend: auto, workers: 2}     # auto: native for the MuJoCo families
    eval: {every: 10, split: test, tasks: 40, steps: 3, episodes: 20}
    quick: {iterations: 10, agent.tasks_per_batch: 10}   # applied by the override quick=true

Everything is validated before anything runs; an error names the field and what was expected. Files a
config names (``imports``, the module of ``env: module:Id``) are found relative to the config file, whatever
the current directory (`metarl.plugins`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A malformed config: the message names the field and what was expected."""


#: The largest float32: a config number beyond it becomes inf in the first tensor it enters.
FLOAT32_MAX = 3.4028234663852886e38


def check_ranges(config: Any, ranges: dict[str, tuple[float, float, str]], where: str = "agent") -> None:
    """ValueError naming the first field of ``config`` outside its accepted range. ``ranges`` maps a field to
    ``(low, high, bounds)``, ``bounds`` one of ``"()"``, ``"(]"``, ``"[)"``, ``"[]"`` (open or closed ends). The
    upper ends are far beyond any setting that trains: they catch typos (``1e300``) before they overflow inside
    an update."""
    for name, (low, high, bounds) in ranges.items():
        value = getattr(config, name)
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (value >= low if bounds[0] == "[" else value > low)
              and (value <= high if bounds[1] == "]" else value < high))
        if not ok:
            raise ValueError(f"{where}.{name} must be in {bounds[0]}{low:g}, {high:g}{bounds[1]}, got {value!r}")


def agent_class(name: str) -> Any:
    """The agent class registered as ``name`` (`metarl.agent.get_agent`); ConfigError naming ``agent.name``."""
    from metarl.agent import AgentError, get_agent

    try:
        return get_agent(name)
    except AgentError as exc:
        raise ConfigError(f"agent.name: {exc}") from None


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    backend: str = "auto"  # auto: native where the family supports it, else gymnasium
    workers: int | None = None  # None: one per core (placement ray: actors, None: the cluster's CPUs)
    # where the env slots run: local worker processes, or the actors of a Ray cluster (metarl.sampling.ray)
    placement: str = "local"
    address: str | None = None  # ray: as ray.init takes it (None: RAY_ADDRESS, else the cluster on this machine)
    cpus_per_actor: float = 1.0  # ray: each actor's CPU request
    retries: int = 2  # ray: fresh actors a chunk may use after its actor died
    timeout: float = 600.0  # ray: seconds a call may go without a chunk coming back before it fails
    # env slots one worker (or this process, with workers 0) holds at once: a call needing more runs its tasks in
    # rounds (the same episodes); None: no limit. For envs whose slots are large (a Meta-World env: ~45 MB)
    max_slots: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "native", "gymnasium"):
            raise ConfigError(f"sampler.backend: expected 'auto', 'native' or 'gymnasium', got {self.backend!r}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"sampler.workers: expected >= 0 or null, got {self.workers}")
        if self.placement not in ("local", "ray"):
            raise ConfigError(f"sampler.placement: expected 'local' or 'ray', got {self.placement!r}")
        if self.placement == "ray" and self.workers == 0:
            raise ConfigError("sampler.workers: placement ray needs at least one actor (>= 1 or null), got 0")
        for name in ("cpus_per_actor", "timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"sampler.{name}: expected a number > 0, got {getattr(self, name)}")
        if self.retries < 0:
            raise ConfigError(f"sampler.retries: expected an integer >= 0, got {self.retries}")
        if self.max_slots is not None and (isinstance(self.max_slots, bool) or not isinstance(self.max_slots, int)
                                           or self.max_slots < 1):
            raise ConfigError(f"sampler.max_slots: expected an integer >= 1 or null, got {self.max_slots!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields; for the local placement only backend, workers and max_slots, and max_slots only where
        set, so that configs and checkpoints written before the Ray placement or max_slots existed still match."""
        out = dataclasses.asdict(self)
        if self.placement == "local":
            out = {"backend": self.backend, "workers": self.workers, "max_slots": self.max_slots}
        if self.max_slots is None:
            del out["max_slots"]  # as configs written before the option existed
        return out

    def ray_options(self) -> dict[str, Any]:
        return {"address": self.address, "cpus_per_actor": self.cpus_per_actor, "retries": self.retries,
                "timeout": self.timeout}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 10          # iterations between held-out evaluations (0: only at the end)
    split: str = "test"
    tasks: int = 20
    steps: int = 3           # adaptation stages after stage 0
    episodes: int = 20       # episodes per adaptation stage

    def __post_init__(self) -> None:
        if self.split not in ("train", "test", "ood"):
            raise ConfigError(f"eval.split: expected one of train, test, ood, got {self.split!r}")
        for name in ("tasks", "episodes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("every", "steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"eval.{name}: expected an integer >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    experiment: str
    env: str
    agent: Any                      # the agent's own frozen config dataclass (its name is agent_name)
    agent_name: str = "maml_trpo"
    seed: int = 0
    iterations: int = 100
    env_kwargs: dict = dataclasses.field(default_factory=dict)
    sampler: SamplerConfig = SamplerConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint_every: int = 1
    run_root: str = "runs"
    imports: tuple[str, ...] = ()   # the user's modules, as `metarl.plugins.resolve` stores them
    # the torch device of the agent's update: auto (CUDA where torch sees a GPU and the agent supports it, else
    # the CPU), cpu, cuda or cuda:N; sampling stays on the CPU workers either way (`resolve_device`)
    device: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        agent = {"name": self.agent_name, **_plain(dataclasses.asdict(self.agent))}
        out = {
            "experiment": self.experiment, "env": self.env, "env_kwargs": dict(self.env_kwargs),
            "seed": self.seed, "iterations": self.iterations, "agent": agent,
            "sampler": self.sampler.to_dict(), "eval": dataclasses.asdict(self.eval),
            "checkpoint_every": self.checkpoint_every, "run_root": self.run_root,
        }
        if self.imports:  # only when there are any, so configs and checkpoints of earlier runs still match
            out = {"experiment": out.pop("experiment"), "env": out.pop("env"), "imports": list(self.imports), **out}
        if self.device != "auto":  # likewise
            out["device"] = self.device
        return out


def resolve_device(device: str, agent_cls: Any = None) -> Any:
    """The ``torch.device`` a config's ``device`` names for ``agent_cls`` (whose ``devices`` says which kinds its
    update runs on): ``auto`` is CUDA where torch sees a GPU and the agent supports it, else the CPU. ConfigError
    in one line for CUDA where torch has none, or an agent that runs on the CPU only."""
    import torch

    supported = tuple(getattr(agent_cls, "devices", ("cpu",)))
    if device == "auto":
        return torch.device("cuda" if "cuda" in supported and torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "torch sees no GPU here"
            raise ConfigError(f"device: {device} asked for, but CUDA is not available ({why}, torch "
                              f"{torch.__version__}); use device=cpu or device=auto")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {device} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    if chosen.type not in supported:
        name = getattr(agent_cls, "name", "?")
        raise ConfigError(f"device: agent {name!r} runs its update on {' or '.join(supported)} only, not {device}; "
                          "use device=cpu or device=auto")
    return chosen


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---- typed construction -------------------------------------------------------------------------------
def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return build(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        if abs(value) > FLOAT32_MAX:  # no tensor can hold it: it would overflow inside the first update
            raise ConfigError(f"{where}: expected a number of magnitude at most {FLOAT32_MAX:.3g}, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item, *_rest) = typing.get_args(hint)
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    return value


def build(cls: Any, data: dict[str, Any], where: str = "") -> Any:
    """Construct the frozen dataclass ``cls`` from ``data``, checking names and types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field; expected one of {', '.join(fields)}")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: required field is missing")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        message = str(exc)
        if prefix and message.startswith(prefix):
            raise ConfigError(message) from exc
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {message}") from exc


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, plus: ``1e-3`` is a float (YAML 1.1 wants ``1.0e-3``; users mean the number)
    and a mapping that repeats a key is an error (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: PyYAML's own error follows
                break
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


class _Dumper(yaml.SafeDumper):
    """Quotes the strings `_Loader` would read back as floats (``'1e5'``)."""


_Dumper.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeDumper.yaml_implicit_resolvers.items()}
_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _Loader.yaml_implicit_resolvers["1"][-1][1], list("-+0123456789"))


def yaml_dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def yaml_load(text: str) -> Any:
    """Parse YAML text with metarl's loader (see `_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def parse_value(text: str) -> Any:
    """Parse an override's value as YAML (``3`` -> int, ``0.1`` or ``1e-3`` -> float, ``[64, 64]`` -> list, ...)."""
    try:
        return yaml_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse override value {text!r}: {' '.join(str(exc).split())}") from exc


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is not a mapping in this config")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML file ``path``; ConfigError naming it (as ``what``) if missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        return yaml_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None


def shipped() -> Path:
    """The ``experiments/`` folder shipped with metarl (configs and suites), wherever metarl is installed:
    the installed package data ``metarl.experiments``, else the source checkout's folder."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("metarl.experiments")
    except ImportError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "experiments"


def locate(path: str | Path, base: str | Path | None = None) -> Path:
    """A config or suite file named by the user: ``path`` relative to ``base`` (the folder of the file that
    names it; the current directory if None), else, for a relative path, the file of that name among the
    shipped ones (``experiments/maml_trpo/point_nav_2d.yaml`` or ``maml_trpo/point_nav_2d.yaml``, from any
    folder). A path found nowhere is returned as given, so the error names it."""
    path = Path(path).expanduser()
    here = path if path.is_absolute() or base is None else Path(base) / path
    if here.is_file() or path.is_absolute():
        return here
    parts = path.parts[1:] if path.parts[:1] == ("experiments",) else path.parts
    candidate = shipped().joinpath(*parts) if parts else None
    return candidate if candidate is not None and candidate.is_file() else here


def load_config(path: str | Path | None, overrides: list[str] = (), data: dict[str, Any] | None = None) -> RunConfig:
    """Load and validate a run config; ``overrides`` are ``key=value`` strings (dotted keys)."""
    if data is None:
        path = locate(path)
        data = read_yaml(path, "config file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    data = _plain(data)
    quick = data.pop("quick", None) or {}
    if not isinstance(quick, dict):
        raise ConfigError("quick: expected a mapping of overrides")
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        parsed.append((key.strip(), parse_value(text)))
    quick_on = False
    for key, value in parsed:
        if key == "quick":
            if not isinstance(value, bool):
                raise ConfigError(f"quick: expected true or false, got {value!r}")
            quick_on = value  # the last quick=... wins
    if quick_on:
        for key, value in quick.items():
            apply_override(data, key, value)
    for key, value in parsed:
        if key != "quick":
            apply_override(data, key, value)

    agent = data.pop("agent", None)
    if not isinstance(agent, dict) or "name" not in agent:
        raise ConfigError("agent: expected a mapping with a 'name' (e.g. agent: {name: maml_trpo, ...})")
    agent = dict(agent)
    name = agent.pop("name")
    base = Path(path).resolve().parent if path is not None else None
    cls = _agent_class_after_imports(name, data, base)
    for option, (neutral, why) in cls.retired_options.items():
        if option in agent:
            if agent[option] != neutral:
                raise ConfigError(f"agent.{option}: retired ({why}); this version runs only its neutral value "
                                  f"{neutral!r}, got {agent[option]!r}")
            del agent[option]  # a config or run recorded while it existed, at the value that changes nothing
    agent_config = build(cls.config_class, agent, "agent")
    for required in ("experiment", "env"):
        if required not in data:
            raise ConfigError(f"{required}: required field is missing")
    config = build(RunConfig, {**data, "agent": {}, "agent_name": name}, "")
    config = dataclasses.replace(config, agent=agent_config)
    if not 0 <= config.seed < 2**32:
        raise ConfigError(f"seed: expected an integer in [0, 2**32), got {config.seed}")
    if config.iterations < 1:
        raise ConfigError(f"iterations: expected a positive integer, got {config.iterations}")
    if config.checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every: expected a positive integer, got {config.checkpoint_every}")
    experiment = Path(config.experiment)
    if not config.experiment.strip() or experiment.is_absolute() or ".." in experiment.parts:
        raise ConfigError(f"experiment: expected a relative name inside run_root (e.g. maml_trpo/point_nav_2d), "
                          f"got {config.experiment!r}")
    return dataclasses.replace(config, imports=resolve_imports(config.imports, base, config.env))


def _agent_class_after_imports(name: Any, data: dict[str, Any], base: Path | None) -> Any:
    """The agent class of ``agent.name``; an agent not registered yet may be registered by the config's own
    ``imports`` (a user's agent module), which are then imported first."""
    from metarl.agent import agent_names

    if not isinstance(name, str):
        raise ConfigError(f"agent.name: expected a string, got {name!r}")
    imports = data.get("imports") or []
    if name not in agent_names() and isinstance(imports, (list, tuple)) and imports:
        from metarl.plugins import load
        from metarl.tasks import TaskError

        try:
            load(resolve_imports(tuple(imports), base, data.get("env") if isinstance(data.get("env"), str) else None))
        except TaskError as exc:
            raise ConfigError(f"imports: {exc}") from exc
    return agent_class(name)


def resolve_imports(imports: Any, base: Path | None, env: str | None = None, where: str = "imports") -> tuple[str, ...]:
    """``imports`` (and the module of an ``env`` ``module:Id``) as `metarl.plugins.resolve` stores them, found
    relative to ``base`` (the folder of the file naming them); ConfigError naming the entry otherwise."""
    from metarl.plugins import module_name, module_of, resolve
    from metarl.tasks import TaskError

    if not isinstance(imports, (list, tuple)):
        raise ConfigError(f"{where}: expected a list of module names or .py files, got {imports!r}")
    out: list[str] = []
    for i, entry in enumerate(imports):
        try:
            resolved = resolve(entry, base)
        except TaskError as exc:
            raise ConfigError(f"{where}[{i}]: {exc}") from None
        if resolved not in out:
            out.append(resolved)
    module = module_of(env) if env else None
    if module is not None and module not in {module_name(entry) for entry in out}:
        try:
            resolved = resolve(module, base)
        except TaskError as exc:
            raise ConfigError(f"env: {exc}") from None
        if resolved != module and resolved not in out:  # found beside the config: recorded as a path
            out.insert(0, resolved)
    return tuple(out)
