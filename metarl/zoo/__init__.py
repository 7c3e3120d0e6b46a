"""The zoo: meta-trained policies shipped with metarl, loadable by name, so that re-evaluating a headline figure
or adapting a trained MAML-TRPO, RL² or PEARL policy to an env of one's own takes minutes, not a training run.

An entry is a folder (``metarl/zoo/<agent>/<experiment>/`` for the shipped ones; any folder for one a user
exported) holding three files:

* ``config.yaml``: the run's resolved config (the agent, its networks, the family, the evaluation protocol);
* ``policy.pt``: ``{"format", "agent", "state"}`` where ``state`` is the agent's `Agent.policy_state` (only
  what adapting and acting need: no optimisers, critics or replay buffers), a ``torch.save`` file that loads
  with ``weights_only=True``;
* ``entry.json``: its name, agent and family, the iteration and env steps it was trained for, its final
  held-out evaluation (protocol and per-stage mean return with its 95% interval), the committed result file it
  belongs to, the command that trained it, the provenance of that evaluation, the metarl version and zoo
  format that wrote it, and the sha256 of policy.pt.

``metarl zoo`` lists the entries, ``metarl zoo NAME`` shows one, ``metarl eval zoo:NAME`` re-runs its evaluation
(into ``runs/zoo/NAME/``) and says whether each stage lands inside the recorded interval, and ``metarl zoo
--export RUN_DIR AGENT/NAME --to FOLDER`` makes an entry from a run of one's own. In Python,
``metarl.api.load("zoo:NAME")`` (or an entry folder's path) gives a `metarl.api.MetaLearner` that adapts and
evaluates like the run it came from (it cannot train on: ``policy.pt`` holds no optimiser state); its evaluations
are written under ``runs/zoo/NAME/`` of the current folder (its ``run_dir``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from metarl.config import ConfigError, RunConfig, load_config, read_yaml, yaml_dump
from metarl.system import atomic_write

#: the zoo format this metarl writes and the newest it reads
FORMAT = 1
#: where the shipped entries live
ROOT = Path(__file__).resolve().parent
PREFIX = "zoo:"
FILES = ("entry.json", "config.yaml", "policy.pt")


class ZooError(ConfigError):
    """A zoo entry that cannot be found or used; the message is one line saying what to do."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One zoo entry: its folder and what entry.json records."""

    name: str
    folder: Path
    meta: dict[str, Any]

    @property
    def agent(self) -> str:
        return str(self.meta.get("agent"))

    @property
    def family(self) -> str:
        return str(self.meta.get("family"))

    @property
    def evaluation(self) -> dict[str, Any]:
        return self.meta.get("evaluation") or {}

    @property
    def shipped(self) -> bool:
        return self.folder.resolve().is_relative_to(ROOT)

    @property
    def requires(self) -> list[str]:
        """The extras its family needs beyond the base install (e.g. ``["metaworld"]``)."""
        return list(self.meta.get("requires") or [])

    def missing(self) -> list[str]:
        """The extras of `requires` that are not installed here."""
        import importlib.util

        return [extra for extra in self.requires if importlib.util.find_spec(extra) is None]

    def where(self) -> str:
        return f"zoo entry {self.name!r}" + ("" if self.shipped else f" ({self.folder})")

    def remedy(self) -> str:
        return ("reinstall metarl (pip install --force-reinstall of its wheel, or git checkout -- metarl/zoo in a "
                "clone)" if self.shipped else "export it again from its run (metarl zoo --export)")

    def headline(self) -> str:
        """The entry's figure in one line: the mean return per stage, the adapted stage with its interval."""
        e = self.evaluation
        stages = e.get("stages") or []
        if not stages:
            return "no evaluation recorded"
        parts = [f"{s['mean_return']:.1f}" for s in stages]
        last = stages[min(1, len(stages) - 1)]  # after one adaptation stage
        lo, hi = last["ci95"]
        what = f"{e.get('tasks')} {e.get('split')} tasks" + (f" x {e['repeats']}" if e.get("repeats", 1) > 1 else "")
        success = ("; success " + " -> ".join(f"{s['success_rate']:.1%}" for s in stages)
                   if all("success_rate" in s for s in stages) else "")
        return (f"stages {' -> '.join(parts)} (stage {last['stage']}: {last['mean_return']:.1f} "
                f"[{lo:.1f}, {hi:.1f}]){success} on {what}")


def _read_meta(folder: Path, name: str | None) -> Entry:
    path = folder / "entry.json"
    label = f"zoo entry {name!r}" if name else f"zoo entry at {folder}"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ZooError(f"{label}: no entry.json in {folder}") from None
    except (OSError, ValueError) as exc:
        raise ZooError(f"{label}: entry.json is damaged ({type(exc).__name__}: {str(exc)[:80]}); reinstall metarl, "
                       "or export the entry again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int) or not isinstance(meta.get("name"), str):
        raise ZooError(f"{label}: entry.json is damaged (not a zoo entry: no format or name); reinstall metarl, or "
                       "export the entry again")
    if meta["format"] > FORMAT:
        from metarl import __version__

        raise ZooError(f"{label} was written by metarl {meta.get('metarl', '?')} in zoo format {meta['format']}; this "
                       f"metarl ({__version__}) reads formats up to {FORMAT}: upgrade metarl to use it")
    return Entry(meta["name"], folder, meta)


def entries(root: Path = ROOT) -> list[Entry]:
    """The entries under ``root`` (default: the shipped zoo), by name."""
    return [_read_meta(root / name, name) for name in names(root)]


def names(root: Path = ROOT) -> list[str]:
    return [f"{p.parent.parent.name}/{p.parent.name}" for p in sorted(root.glob("*/*/entry.json"))]


def is_reference(ref: str | Path) -> bool:
    """Whether ``ref`` names a zoo entry: ``zoo:NAME``, or a folder holding entry.json."""
    text = str(ref)
    return text.startswith(PREFIX) or (Path(text) / "entry.json").is_file()


def find(ref: str | Path) -> Entry:
    """The entry ``ref`` names: ``zoo:NAME`` (or a bare NAME) of the shipped zoo, or an entry folder's path."""
    text = str(ref)
    name = text[len(PREFIX):] if text.startswith(PREFIX) else text
    if not text.startswith(PREFIX) and (Path(text) / "entry.json").is_file():
        return _read_meta(Path(text), None)
    known = names()
    if name not in known:
        hint = f"; entries: {', '.join(known)}" if known else "; the shipped zoo is empty (a broken install?)"
        raise ZooError(f"unknown zoo entry {name!r}{hint} (metarl zoo lists them)")
    return _read_meta(ROOT / name, name)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def entry_config(entry: Entry, trust_code: bool = False) -> RunConfig:
    """The entry's config, validated by this metarl; ZooError in one line if it no longer loads. Code it names
    from inside the entry's folder is imported only with ``trust_code`` (as for a run folder someone shared)."""
    from metarl.runfolder import check_run_code

    path = entry.folder / "config.yaml"
    if not path.is_file():
        raise ZooError(f"{entry.where()}: config.yaml is missing; {entry.remedy()}")
    try:
        data = read_yaml(path, "zoo entry config")
        if not isinstance(data, dict):
            raise ConfigError(f"expected a mapping, got {type(data).__name__}")
        data.pop("meta", None)
    except ConfigError as exc:
        raise ZooError(f"{entry.where()}: config.yaml is damaged ({exc}); {entry.remedy()}") from None
    if not trust_code:  # before anything of it is imported
        try:
            check_run_code(entry.folder, data)
        except ConfigError as exc:
            raise ZooError(f"{entry.where()}: {exc}") from None
    try:
        return load_config(None, data=data)
    except ConfigError as exc:
        raise ZooError(f"{entry.where()}: its config.yaml does not load in this metarl ({exc}); it was written by "
                       f"metarl {entry.meta.get('metarl', '?')}: use that version, or {entry.remedy()}") from None


def policy_state(entry: Entry) -> dict[str, Any]:
    """The entry's verified policy state; ZooError in one line if policy.pt is missing, damaged or foreign."""
    import torch

    path = entry.folder / "policy.pt"
    if not path.is_file():
        raise ZooError(f"{entry.where()}: policy.pt is missing; {entry.remedy()}")
    if _sha256(path) != entry.meta.get("policy_sha256"):
        raise ZooError(f"{entry.where()}: policy.pt is damaged (its sha256 differs from the one entry.json "
                       f"records); {entry.remedy()}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an untrusted file that does not parse
        raise ZooError(f"{entry.where()}: policy.pt cannot be read ({type(exc).__name__}); {entry.remedy()}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("state"), dict):
        raise ZooError(f"{entry.where()}: policy.pt is not a zoo policy (no state); {entry.remedy()}")
    if payload.get("agent") != entry.agent:
        raise ZooError(f"{entry.where()}: policy.pt holds a {payload.get('agent')} policy, entry.json says "
                       f"{entry.agent}; {entry.remedy()}")
    return payload["state"]


def load_agent(ref: str | Path, device: str | None = None, trust_code: bool = False) -> tuple[Entry, RunConfig, Any]:
    """The entry ``ref`` names, its config and the agent built from it with the entry's policy state loaded (its
    sampler starts no worker until something samples); `metarl.api.load` makes a `metarl.api.MetaLearner` of
    them. ``device`` and ``trust_code`` as for `metarl.api.load`."""
    from metarl.training import build_agent

    entry = find(ref)
    config = entry_config(entry, trust_code)
    if device is not None:
        config = dataclasses.replace(config, device=device)
    if config.agent_name != entry.agent:
        raise ZooError(f"{entry.where()}: config.yaml is of agent {config.agent_name}, entry.json says {entry.agent}; "
                       f"{entry.remedy()}")
    state = policy_state(entry)
    sampler, agent = build_agent(config)
    try:
        agent.load_policy_state(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        sampler.close()
        first = " ".join(str(exc).split())[:160]
        raise ZooError(f"{entry.where()}: its policy does not fit the networks this metarl builds from its config "
                       f"({first}); it was written by metarl {entry.meta.get('metarl', '?')}: use that version, or "
                       f"{entry.remedy()}") from None
    return entry, config, agent


def final_summary(run_dir: Path, iteration: int) -> Path:
    """The run's final held-out evaluation of ``iteration``: the one with the most adaptations per task."""
    best: tuple[int, Path] | None = None
    for path in sorted((run_dir / "eval").glob("*/summary.json")):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if summary.get("iteration") != iteration:
            continue
        repeats = int(summary.get("repeats", 1))
        if best is None or repeats > best[0]:
            best = (repeats, path)
    if best is None:
        raise ZooError(f"{run_dir}: no held-out evaluation of its checkpoint (iteration {iteration}); run metarl eval "
                       f"{run_dir} first")
    return best[1]


def evaluation_record(summary: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    """What entry.json keeps of an evaluation summary: the protocol and each stage's mean and interval."""
    return {"split": summary.get("split"), "tasks": summary.get("distinct_tasks", summary.get("num_tasks")),
            "steps": len(summary["stages"]) - 1, "episodes": config.eval.episodes,
            "repeats": int(summary.get("repeats", 1)), "horizon": summary.get("horizon"),
            "stages": [{"stage": s["stage"], "adapt_episodes": s.get("adapt_episodes"),
                        "mean_return": s["mean_return"], "ci95": list(s["ci95"]),
                        **({"success_rate": s["success_rate"], "success_ci95": list(s["success_ci95"])}
                           if "success_rate" in s else {})} for s in summary["stages"]]}


def required_extras(env: str) -> list[str]:
    """The extras a run's env needs beyond the base install: ``["metaworld"]`` for the Meta-World families."""
    import metarl
    from metarl.envs.meta_world import family_ids

    return ["metaworld"] if metarl.resolve_id(str(env)) in family_ids().values() else []


def export(run_dir: str | Path, name: str, to: str | Path, summary: str | Path | None = None,
           result: str | None = None, description: str = "", trained_by: str | None = None) -> Entry:
    """Make a zoo entry ``to/NAME`` from a finished run: its config, its newest checkpoint's `policy_state`, and
    its final held-out evaluation (``summary``: a summary.json; default: the run's evaluation of that checkpoint
    with the most adaptations per task). ``result``: the committed result file the run belongs to.
    ``trained_by``: the command(s) that trained it (default: the command its evaluation records, which for a run
    trained in parts is only the last part's). ``NAME`` is ``<agent>/<experiment>``-like: two path parts."""
    import torch

    from metarl import __version__
    from metarl.runfolder import latest_checkpoint, load_agent_state, load_run_config
    from metarl.training import build_agent

    run_dir = Path(run_dir)
    parts = name.split("/")
    if len(parts) != 2 or not all(p and p.replace("_", "").replace("-", "").isalnum() for p in parts):
        raise ZooError(f"zoo entry name {name!r}: give two parts of letters, digits, _ and -, e.g. maml_trpo/my_env")
    config = load_run_config(run_dir)
    state = latest_checkpoint(run_dir / "checkpoints")
    if state is None:
        raise ZooError(f"{run_dir}: no checkpoint to export")
    sampler, agent = build_agent(config)
    try:
        load_agent_state(run_dir, state, agent, config)
        policy = agent.policy_state()
    finally:
        sampler.close()
    summary_path = Path(summary) if summary is not None else final_summary(run_dir, agent.iteration)
    record = json.loads(summary_path.read_text())
    if record.get("iteration") != agent.iteration:
        raise ZooError(f"{summary_path} evaluates iteration {record.get('iteration')}, the checkpoint is at "
                       f"{agent.iteration}")
    provenance = record.get("provenance") or {}
    folder = Path(to) / name
    if folder.exists():
        raise ZooError(f"{folder} exists; remove it first to replace that entry")
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"format": FORMAT, "agent": config.agent_name, "state": policy}, tmp / "policy.pt")
    (tmp / "config.yaml").write_text(yaml_dump(config.to_dict()))
    meta = {"format": FORMAT, "name": name, "agent": config.agent_name, "family": record.get("family", config.env),
            "env": config.env, "requires": required_extras(config.env), "description": description,
            "iteration": agent.iteration, "env_steps": agent.env_steps, "evaluation": evaluation_record(record, config), "result": result,
            "trained_by": trained_by or provenance.get("command"), "provenance": provenance, "metarl": __version__,
            "policy_sha256": _sha256(tmp / "policy.pt"), "policy_bytes": (tmp / "policy.pt").stat().st_size}
    atomic_write(tmp / "entry.json", json.dumps(meta, indent=1) + "\n")
    tmp.rename(folder)
    return _read_meta(folder, name)


def reproduction(entry: Entry, summary: dict[str, Any]) -> tuple[bool | None, list[str]]:
    """Whether an evaluation ``summary`` reproduces the entry's recorded figure: None when its protocol differs
    from the recorded one (split, tasks, stages, repeats), else whether every stage's mean lies inside the
    recorded 95% interval; with a line per stage."""
    e = entry.evaluation
    mine = (summary.get("split"), summary.get("distinct_tasks", summary.get("num_tasks")), len(summary["stages"]) - 1,
            int(summary.get("repeats", 1)))
    theirs = (e.get("split"), e.get("tasks"), e.get("steps"), e.get("repeats", 1))
    if mine != theirs:
        return None, [f"(the recorded figure is of split {theirs[0]}, {theirs[1]} tasks, {theirs[2]} stages, "
                      f"{theirs[3]} adaptation(s) per task; this evaluation differs, so it is not compared)"]
    ok, lines = True, []
    for got, want in zip(summary["stages"], e["stages"], strict=True):
        lo, hi = want["ci95"]
        inside = lo <= got["mean_return"] <= hi
        ok &= inside
        lines.append(f"stage {got['stage']}: {got['mean_return']:.2f} (recorded {want['mean_return']:.2f} "
                     f"[{lo:.2f}, {hi:.2f}]) {'inside' if inside else 'OUTSIDE'}")
        if "success_rate" in want and "success_rate" in got:
            lo, hi = want["success_ci95"]
            inside = lo <= got["success_rate"] <= hi
            ok &= inside
            lines.append(f"stage {got['stage']} success: {got['success_rate']:.1%} (recorded "
                         f"{want['success_rate']:.1%} [{lo:.1%}, {hi:.1%}]) {'inside' if inside else 'OUTSIDE'}")
    return ok, lines


TABLE_START, TABLE_END = "<!-- zoo table: metarl.zoo.table() writes it -->", "<!-- end of the zoo table -->"


def table(found: list[Entry] | None = None) -> str:
    """The markdown table of the shipped entries (docs/zoo.md holds it between TABLE_START and TABLE_END)."""
    rows = ["| entry | family | trained for | recorded evaluation | before | after one stage [95% CI] | result |",
            "|---|---|---|---|---|---|---|"]
    def plural(n: int, word: str) -> str:
        return f"{n} {word}{'s' if n != 1 else ''}"

    def success(stage: dict[str, Any]) -> str:
        return f" (success {stage['success_rate']:.1%})" if "success_rate" in stage else ""

    for entry in entries() if found is None else found:
        m, e = entry.meta, entry.evaluation
        stages = e["stages"]
        one = stages[min(1, len(stages) - 1)]
        protocol = (f"{e['tasks']} {e['split']} tasks" + (f" × {e['repeats']} adaptations" if e.get("repeats", 1) > 1
                                                           else "")
                    + f", {plural(e['steps'], 'stage')} of {plural(e['episodes'], 'episode')}")
        family = entry.family + "".join(f" (`{extra}` extra)" for extra in entry.requires)
        rows.append(f"| `{entry.name}` | {family} | {m['iteration']} iterations, {m['env_steps'] / 1e6:.1f}M env "
                    f"steps | {protocol} | {stages[0]['mean_return']:.1f}{success(stages[0])} | "
                    f"{one['mean_return']:.1f} [{one['ci95'][0]:.1f}, {one['ci95'][1]:.1f}]{success(one)} | "
                    f"`{m.get('result') or '–'}` |")
    return "\n".join(rows) + "\n"


def write_table(page: Path) -> None:
    """Replace the table between the markers of ``page`` with `table`; ZooError if the page has no markers."""
    text = page.read_text(encoding="utf-8")
    if TABLE_START not in text or TABLE_END not in text:
        raise ZooError(f"{page}: no zoo table markers ({TABLE_START} ... {TABLE_END})")
    head, rest = text.split(TABLE_START, 1)
    tail = rest.split(TABLE_END, 1)[1]
    atomic_write(page, f"{head}{TABLE_START}\n{table()}{TABLE_END}{tail}")
