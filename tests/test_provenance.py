"""Provenance records: the commit and tree state, the CPU time of the work and of everything else on the machine,
the command; and the check every result file passes (the committed ones included)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metarl import provenance
from metarl.cli import main
from metarl.provenance import FIELDS, ProvenanceError, Recorder, check, git_state, recovered, write_result

ROOT = Path(__file__).resolve().parents[1]
BURN = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\n"


def test_cpu_time_counts_the_work_and_its_children_but_not_other_processes(tmp_path):
    recorder = Recorder(command="work")
    # a child of this process: its CPU time is the work's
    subprocess.run([sys.executable, "-c", BURN.format(s=0.6)], check=True)
    # a process that is no descendant (its parent exits at once, so it is adopted by init): another user's
    subprocess.run(["sh", "-c", f"{sys.executable} -c '{BURN.format(s=1.0)}' >/dev/null 2>&1 &"], check=True)
    time.sleep(0.3)
    deadline = time.time() + 20
    while time.time() < deadline and subprocess.run(["pgrep", "-f", "process_time\\(\\) \\+ 1.0"],
                                                    capture_output=True).returncode == 0:
        time.sleep(0.1)
    record = recorder.record(extra_field=1)
    assert set(FIELDS) <= set(record) and record["extra_field"] == 1 and record["command"] == "work"
    assert 0.55 <= record["cpu_s"] < 1.3  # the child's 0.6 s and the interpreter's start, not the 1.0 s
    assert record["others_cpu_s"] >= 0.9  # the non-descendant's second
    assert record["shared"] is True and record["others_share"] > provenance.SHARED_SHARE
    assert record["wall_s"] >= 1.0 and record["cores"] >= 1 and record["python"] == sys.version.split()[0]


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "checkout"
    (repo / "metarl").mkdir(parents=True)
    (repo / "experiments" / "results").mkdir(parents=True)
    (repo / "metarl" / "core.py").write_text("x = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "first"], check=True)
    return repo


def test_git_state_tells_clean_from_dirty_by_code_not_by_results(tmp_path):
    repo = _repo(tmp_path)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_state(repo) == {"commit": head, "dirty": False, "changed": []}
    (repo / "experiments" / "results" / "new.json").write_text("{}")  # a result the run writes meanwhile
    assert git_state(repo)["dirty"] is False
    (repo / "metarl" / "core.py").write_text("x = 2\n")
    assert git_state(repo) == {"commit": head, "dirty": True, "changed": ["metarl/core.py"]}
    subprocess.run(["git", "-C", str(repo), "checkout", "-q", "metarl/core.py"], check=True)
    (repo / "metarl" / "extra.py").write_text("")  # new, untracked code counts too
    assert git_state(repo)["dirty"] is True and git_state(repo)["changed"] == ["metarl/extra.py"]


def test_an_install_inside_another_checkout_has_no_commit(tmp_path):
    repo = _repo(tmp_path)
    site = repo / "venv" / "site-packages"  # a wheel installed into a venv that lies inside some repository
    (site / "metarl").mkdir(parents=True)
    assert git_state(site) == {"commit": None, "dirty": None, "changed": []}
    assert git_state(tmp_path / "nowhere") == {"commit": None, "dirty": None, "changed": []}


def test_a_record_names_the_code_the_process_started_with_and_a_tree_changed_since(monkeypatch):
    """A long run records the commit it loaded, not one committed while it ran; a change is named beside it."""
    from metarl import provenance

    states = iter([{"commit": "a" * 40, "dirty": False, "changed": []},
                   {"commit": "b" * 40, "dirty": True, "changed": ["metarl/cli.py"]}])
    monkeypatch.setattr(provenance, "_AT_START", None)
    monkeypatch.setattr(provenance, "git_state", lambda: next(states))
    recorder = Recorder(command="metarl train x")  # the process's first look: commit a
    record = recorder.record()
    assert record["commit"] == "a" * 40 and record["dirty"] is False
    assert record["tree_at_finish"] == {"commit": "b" * 40, "dirty": True, "changed": ["metarl/cli.py"]}
    monkeypatch.setattr(provenance, "git_state", lambda: {"commit": "a" * 40, "dirty": False, "changed": []})
    assert "tree_at_finish" not in Recorder(command="x").record()  # unchanged: nothing added
    assert provenance.git_state_at_start()["commit"] == "a" * 40  # later recorders too see the start


def test_check_names_what_is_missing():
    with pytest.raises(ProvenanceError, match=r"^r\.json: no provenance record .*metarl reproduce"):
        check({"figure": 1.0}, "r.json")
    full = Recorder(command="c").record()
    check({"provenance": full}, "ok.json")
    with pytest.raises(ProvenanceError, match=r"^r\.json: provenance lacks commit, shared$"):
        check({"provenance": {k: v for k, v in full.items() if k not in ("commit", "shared")}}, "r.json")
    check({"provenance": recovered("older", commit_added="abc")}, "old.json")
    assert recovered("older", command="x")["unknown"] == [f for f in FIELDS if f != "command"]
    with pytest.raises(ProvenanceError, match="must list its unknown fields"):
        check({"provenance": {"recovered": True}}, "r.json")


def test_write_result_adds_the_record_and_the_cli_records_its_own_command_line(tmp_path):
    path = write_result(tmp_path / "sub" / "r.json", {"figure": 2.5}, Recorder(command="python x.py"))
    written = json.loads(path.read_text())
    assert written["figure"] == 2.5 and written["provenance"]["command"] == "python x.py"
    # called from Python (not as the program), the CLI records its argv, not the host program's
    out = tmp_path / "speed.json"
    assert main(["speed", "--family", "HalfCheetahVel", "--tasks", "2", "--episodes", "1", "--repeats", "1",
                 "--steps", "50", "--workers", "0", "--async-envs", "2", "--json", str(out)]) == 0
    record = json.loads(out.read_text())["provenance"]
    assert record["command"].startswith("metarl speed --family HalfCheetahVel") and record["commit"] == git_state()["commit"]


def _result_files() -> list[Path]:
    results = ROOT / "experiments" / "results"
    return [p for p in sorted(results.rglob("*.json")) if "probes" not in p.relative_to(results).parts]


def test_every_committed_result_outside_the_probes_carries_provenance():
    files = _result_files()
    assert len(files) > 20
    missing = []
    for path in files:
        data = json.loads(path.read_text())
        try:
            check(data, str(path.relative_to(ROOT)))
        except ProvenanceError as exc:
            missing.append(str(exc))
    assert not missing, "\n".join(missing[:10])
