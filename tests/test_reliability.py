"""Reliability: runs killed at chosen moments resume to the uninterrupted run; damaged or edited run files
are found and named; one writer per run folder; bad numbers stop at their source; hardened configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from metarl.cli import main

CONFIG = "experiments/maml_trpo/point_nav_2d.yaml"
TINY = ["agent.tasks_per_batch=3", "agent.episodes_per_task=3", "agent.hidden=[8]", "sampler.workers=0",
        "eval.tasks=3", "eval.steps=1", "eval.episodes=2", "eval.every=1", "iterations=2"]
REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, fault: str | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "METARL_FAULT"}
    if fault:
        env["METARL_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "metarl.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def _load_fault_injection():
    """The fault-injection script's run-folder readers serve these tests too (one definition of 'the same')."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fault_injection", REPO / "experiments/benchmarks/fault_injection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_fault_injection = _load_fault_injection()
_scalars, _metrics = _fault_injection.scalars, _fault_injection.metrics_rows


def _assert_same_run(a: Path, b: Path) -> None:
    x = torch.load(a / "checkpoints" / "latest.pt", weights_only=True)
    y = torch.load(b / "checkpoints" / "latest.pt", weights_only=True)
    assert x["iteration"] == y["iteration"]
    for key, value in x["agent"]["policy"].items():
        assert torch.equal(value, y["agent"]["policy"][key]), key
    assert _metrics(a) == _metrics(b)
    sa = json.loads((a / "eval" / "test" / "summary.json").read_text())
    sb = json.loads((b / "eval" / "test" / "summary.json").read_text())
    assert sa["iteration"] == sb["iteration"] and sa["stages"] == sb["stages"]
    for name in ("summary.csv", "per_task.csv"):
        assert (a / "eval" / "test" / name).read_text() == (b / "eval" / "test" / name).read_text(), name
    assert (b / "eval" / "test" / "adaptation_curve.png").stat().st_size > 0
    assert _scalars(a) == _scalars(b)
    history = [(r / "eval" / "test" / "history.jsonl").read_text().splitlines() for r in (a, b)]
    assert [json.loads(line)["iteration"] for line in history[1]] == [json.loads(line)["iteration"] for line in history[0]]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", CONFIG, *TINY, "--run-dir", str(out), "--quiet"]) == 0
    return out


# ---- resume always right --------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", [
    "eval_files:2",   # final evaluation killed between summary.json and summary.csv
    "eval_files:1",   # the first evaluation killed there: no evaluation recorded yet (evals.json)
    "eval_history:1",  # the first evaluation's files and TensorBoard points written, not yet its history line
    "eval_logged:1",  # the first evaluation's files, points and history written, not yet recorded as done
    "eval:1",         # mid-run evaluation killed after computing, before writing
    "iteration:1",    # killed before the first checkpoint
    "metrics:1",      # killed after iteration 1's metrics line, before the first checkpoint
    "checkpoint:2",   # killed while the second checkpoint is being put in place
])
def test_a_killed_run_resumes_to_the_uninterrupted_run(straight, tmp_path, fault):
    run = tmp_path / "run"
    killed = _cli("train", CONFIG, *TINY, "--run-dir", str(run), "--quiet", fault=fault)
    assert killed.returncode == -9, killed.stderr
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    _assert_same_run(straight, run)
    assert json.loads((run / "checkpoints" / "evals.json").read_text())["done"] == [1, 2]


def test_a_run_without_mid_run_evaluations_killed_in_its_only_evaluation_redoes_it(tmp_path):
    """eval.every 0: the final evaluation is the first one; killed before its history line, a resume used to
    say "finished, nothing to do" and leave no history. Now the run's record says no evaluation is done."""
    run = tmp_path / "run"
    only_final = [*(o for o in TINY if not o.startswith("eval.every")), "eval.every=0"]
    killed = _cli("train", CONFIG, *only_final, "--run-dir", str(run), "--quiet", fault="eval_history:1")
    assert killed.returncode == -9, killed.stderr
    assert json.loads((run / "checkpoints" / "evals.json").read_text())["done"] == []
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    history = (run / "eval" / "test" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in history] == [2]
    assert json.loads((run / "checkpoints" / "evals.json").read_text())["done"] == [2]


def test_a_resume_in_the_same_second_as_the_kill_keeps_tensorboard_in_order(straight, tmp_path):
    """TensorBoard reads event files in name order (second, host, pid): the resume's file must not sort
    before the killed run's, or the killed run's points come back after the resume purged them."""
    import time

    run = tmp_path / "run"
    killed = _cli("train", CONFIG, *TINY, "--run-dir", str(run), "--quiet", fault="eval:1")
    assert killed.returncode == -9, killed.stderr
    (old,) = run.glob("events.out.tfevents.*")
    parts = old.name.split(".")
    parts[3], parts[-2] = f"{int(time.time()) + 1:010d}", "99999999"  # same second as the resume, larger pid
    old.rename(run / ".".join(parts))
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    _assert_same_run(straight, run)


def test_a_run_whose_sampler_worker_was_killed_resumes_to_the_uninterrupted_run(straight, tmp_path):
    run = tmp_path / "run"
    workers = [a if a != "sampler.workers=0" else "sampler.workers=1" for a in TINY]
    failed = _cli("train", CONFIG, *workers, "--run-dir", str(run), "--quiet", fault="worker:3")
    err = failed.stderr.strip()  # one line (it was a 41-48-line traceback): which worker died, what to run
    assert failed.returncode == 1 and len(err.splitlines()) == 1, err
    assert "sampler worker 0 (of 1, pid" in err and "died (killed by SIGKILL)" in err, err
    assert err.endswith(f"resume it with metarl train --resume {run}"), err
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    _assert_same_run(straight, run)  # results do not depend on the number of workers


def test_resuming_a_finished_run_does_nothing(straight, capsys):
    before = sorted(p.name for p in straight.iterdir())
    mtimes = {p: p.stat().st_mtime_ns for p in straight.rglob("*") if p.is_file() and p.name != ".lock"}
    assert main(["train", "--resume", str(straight)]) == 0
    assert "finished" in capsys.readouterr().out
    assert sorted(p.name for p in straight.iterdir()) == before  # no new events file
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_a_run_folder_from_before_the_evaluation_record_resumes_by_its_summary(straight, tmp_path, capsys):
    run = _copy(straight, tmp_path / "run")
    (run / "checkpoints" / "evals.json").unlink()
    events = sorted(run.glob("events.out.tfevents.*"))
    assert main(["train", "--resume", str(run)]) == 0  # complete summary files of iteration 2: finished
    assert "finished" in capsys.readouterr().out and sorted(run.glob("events.out.tfevents.*")) == events
    (run / "eval" / "test" / "per_task.csv").unlink()  # as a kill between the files of that evaluation leaves it
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    _assert_same_run(straight, run)


def test_eval_checks_its_folder_is_writable_before_evaluating(straight, tmp_path, capsys):
    run = _copy(straight, tmp_path / "run")
    (run / "eval" / "ood").write_text("a file where the split's folder goes")
    assert main(["eval", str(run), "--split", "ood"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write to {run / 'eval' / 'ood'}" in err, err


def test_a_run_whose_checkpoints_were_removed_is_not_restarted_in_place(straight, tmp_path, capsys):
    run = _copy(straight, tmp_path / "run")
    for path in (run / "checkpoints").glob("*.pt"):
        path.unlink()
    metrics = (run / "metrics.jsonl").read_bytes()
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    assert "the checkpoints were removed?" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.parametrize(("args", "message"), [
    (["iterations=+4"], "not an increment"),
    (["iterations=1"], "shrink"),
    ([CONFIG], "its own config.yaml"),
    (["agent.inner_lr=0.5"], "only iterations=N"),
])
def test_misread_resume_arguments_are_refused(straight, capsys, args, message):
    config = (straight / "config.yaml").read_bytes()
    assert main(["train", "--resume", str(straight), *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert (straight / "config.yaml").read_bytes() == config


# ---- integrity ---------------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def _flip(path: Path) -> None:
    """Flip one exponent bit of a stored policy weight (as a failing disk or a bad copy might)."""
    state = torch.load(path, weights_only=True)
    weights = next(v for k, v in state["agent"]["policy"].items() if v.numel() >= 8)
    data = bytearray(path.read_bytes())
    at = bytes(data).index(weights.numpy().tobytes())
    data[at + 3] ^= 0x20
    path.write_bytes(bytes(data))


def test_checkpoints_are_kept_two_deep_and_carry_a_checksum(straight):
    from metarl.runfolder import checksum

    latest = torch.load(straight / "checkpoints" / "latest.pt", weights_only=True)
    previous = torch.load(straight / "checkpoints" / "previous.pt", weights_only=True)
    assert (latest["iteration"], previous["iteration"]) == (2, 1)
    assert latest["sha256"] == checksum(latest)
    latest["agent"]["policy"]["log_std"] = latest["agent"]["policy"]["log_std"] + 1e-6
    assert latest["sha256"] != checksum(latest)


def _payload(iteration: int) -> dict:
    return {"agent": {"weights": torch.full((3,), float(iteration))}, "iteration": iteration, "env_steps": 10 * iteration}


def test_the_two_checkpoints_are_distinct_files_at_every_moment_of_a_save(tmp_path, monkeypatch):
    """Between its two renames (the fault point) a save leaves previous.pt (the last complete checkpoint) and the
    new file, two files; after it, latest.pt and previous.pt are two files (no hard link: damage to one cannot
    reach the other), and the checkpoint read back is the one written."""
    import metarl.runfolder as rf

    folder = tmp_path / "checkpoints"
    seen = []

    def at_fault(name):
        if name == "checkpoint" and (folder / "previous.pt").exists():
            seen.append((sorted(p.name for p in folder.iterdir()), (folder / "previous.pt").stat().st_nlink,
                         rf.read_checkpoint(folder / "previous.pt")["iteration"]))

    monkeypatch.setattr(rf, "fault_point", at_fault)
    for it in (1, 2, 3):
        rf.save_checkpoint(folder, _payload(it))
    assert seen == [([".latest.pt.tmp", "previous.pt"], 1, 1), ([".latest.pt.tmp", "previous.pt"], 1, 2)]
    latest, previous = folder / "latest.pt", folder / "previous.pt"
    assert latest.stat().st_ino != previous.stat().st_ino and latest.stat().st_nlink == previous.stat().st_nlink == 1
    assert (rf.read_checkpoint(latest)["iteration"], rf.read_checkpoint(previous)["iteration"]) == (3, 2)


@pytest.mark.parametrize("cut", ["before the renames", "between the renames"])
def test_a_power_cut_during_a_save_never_loses_the_last_good_checkpoint(tmp_path, monkeypatch, cut, capsys):
    """A power cut as a crash leaves it: the new file written but its data never flushed (empty), and the save's
    remaining renames never done. The checkpoint read afterwards is the last complete one, iteration 2, from
    latest.pt or (the cut between the renames) from previous.pt with a warning."""
    import metarl.runfolder as rf

    folder = tmp_path / "checkpoints"
    for it in (1, 2):
        rf.save_checkpoint(folder, _payload(it))

    class PowerCut(BaseException):
        pass

    real_replace = os.replace

    def replace(src, dst):
        if cut == "before the renames" or Path(dst).name == "latest.pt":
            Path(folder / ".latest.pt.tmp").write_bytes(b"")  # the unflushed data is lost with the power
            raise PowerCut
        real_replace(src, dst)

    monkeypatch.setattr(rf.os, "replace", replace)
    with pytest.raises(PowerCut):
        rf.save_checkpoint(folder, _payload(3))
    monkeypatch.setattr(rf.os, "replace", real_replace)
    state = rf.latest_checkpoint(folder)
    assert state["iteration"] == 2 and torch.equal(state["agent"]["weights"], torch.full((3,), 2.0))
    assert ("using" in capsys.readouterr().err) == (cut == "between the renames")


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(straight, tmp_path, capsys):
    """eval evaluates the fallback beside the final evaluation, never over it (it replaced the valid summary of
    iteration 2 with one of iteration 1); a resume then trains iteration 2 again."""
    run = _copy(straight, tmp_path / "run")
    _flip(run / "checkpoints" / "latest.pt")
    final = {name: (run / "eval" / "test" / name).read_bytes() for name in ("summary.json", "summary.csv", "per_task.csv")}
    assert main(["eval", str(run)]) == 0  # warns and evaluates the previous checkpoint
    err = capsys.readouterr().err
    assert "latest.pt: damaged checkpoint" in err and "previous.pt (iteration 1)" in err
    aside = run / "eval" / "test-iteration1"
    assert (f"{run / 'eval' / 'test'} holds the evaluation of iteration 2, later than the checkpoint evaluated "
            f"(iteration 1); writing this one to {aside} instead") in err
    assert {name: (run / "eval" / "test" / name).read_bytes() for name in final} == final
    assert json.loads((aside / "summary.json").read_text())["iteration"] == 1
    assert (aside / "per_task.csv").is_file() and (aside / "adaptation_curve.png").is_file()
    # a resume moves the damaged file aside and trains iteration 2 again: the same run as before
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert "damaged checkpoint" in capsys.readouterr().err
    assert (run / "checkpoints" / "latest.damaged.pt").is_file()
    _assert_same_run(straight, run)


@pytest.mark.parametrize("damage", ["empty", "truncated", "random", "bitflip", "iteration"])
def test_a_damaged_checkpoint_without_fallback_is_one_line_exit_2(straight, tmp_path, capsys, damage):
    run = _copy(straight, tmp_path / "run")
    (run / "checkpoints" / "previous.pt").unlink()
    path = run / "checkpoints" / "latest.pt"
    data = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        path.write_bytes(os.urandom(len(data)))
    elif damage == "bitflip":
        _flip(path)
    else:  # a hand edit that makes the run look finished at another iteration
        state = torch.load(path, weights_only=True)
        torch.save({**state, "iteration": 7}, path)
    for argv in (["eval", str(run)], ["train", "--resume", str(run), "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and "damaged checkpoint" in err, err
    assert path.is_file()  # kept for inspection


def test_an_eval_killed_between_its_files_never_leaves_a_folder_mixing_two_evaluations(straight, tmp_path, capsys):
    """Killed after its first file, an eval of 2 tasks left the new summary.json beside the csv files and plot of
    the 3-task evaluation before it. Now the folder holds the unfinished evaluation's files only, without the
    summary.json that names a complete one, and the rerun says what it replaces."""
    run = _copy(straight, tmp_path / "run")
    out = run / "eval" / "test"
    killed = _cli("eval", str(run), "--tasks", "2", fault="eval_files:1")
    assert killed.returncode == -9, killed.stderr
    left = sorted(p.name for p in out.iterdir())
    assert "summary.json" not in left and "per_task.csv" not in left and "adaptation_curve.png" not in left, left
    assert "history.jsonl" in left  # the training's held-out curve is not the evaluation's to remove
    assert main(["eval", str(run), "--tasks", "2"]) == 0
    err = capsys.readouterr().err.strip()
    assert err == f"metarl: warning: {out} held files of an evaluation that did not finish (summary.csv); replacing them"
    assert json.loads((out / "summary.json").read_text())["num_tasks"] == 2
    assert len((out / "per_task.csv").read_text().splitlines()) == 1 + 2


def test_damaged_metrics_lines_are_reported(straight, tmp_path, capsys):
    run = _copy(straight, tmp_path / "run")
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0][:-7] + "\n" + lines[1] + "\n")  # iteration 1's line garbled
    assert main(["train", "--resume", str(run), "iterations=3", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"{path} line 1 is damaged" in err and "missing: [1]" in err
    assert [r["iteration"] for r in _metrics(run)] == [2, 3]
    assert (run / "metrics.jsonl.damaged").read_text().startswith(lines[0][:-7])


def test_a_missing_metrics_file_is_reported_on_resume(straight, tmp_path, capsys):
    run = _copy(straight, tmp_path / "run")
    (run / "metrics.jsonl").unlink()  # a resume said nothing, and only the later iterations remained
    assert main(["train", "--resume", str(run), "iterations=3", "--quiet"]) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{run / 'metrics.jsonl'} is missing: the training metrics of iterations 1-2 are lost" in err, err
    assert [r["iteration"] for r in _metrics(run)] == [3]


def _rebuildable(scalars: dict) -> dict:
    """The TensorBoard scalars a run's records keep: training metrics, and each evaluation's return and gain (not
    the HParams view's copy of the final figures, which is reported lost with the figures)."""
    return {tag: sorted(points) for tag, points in scalars.items() if not tag.startswith("hparam/")
            and (not tag.startswith("eval/") or "return_stage" in tag or "adaptation_gain" in tag)}


@pytest.mark.parametrize("damage", ["garbled", "truncated"])
def test_a_damaged_event_file_is_reported_and_its_scalars_rebuilt(straight, tmp_path, capsys, damage):
    """A finished run whose TensorBoard event file was garbled or cut: the resume said "nothing to do" and the
    points after the damage (the final evaluation's among them) were silently gone."""
    run = _copy(straight, tmp_path / "run")
    (events,) = run.glob("events.out.tfevents.*")
    data = bytearray(events.read_bytes())
    first = data.index(b"meta/return_step0")
    cut = data.index(b"meta/return_step0", first + 1)  # in a record of iteration 2: it and all after are lost
    if damage == "garbled":
        data[cut:cut + 64] = bytes(64)
    else:
        del data[cut:]
    events.write_bytes(bytes(data))
    before = _rebuildable(_scalars(run))
    assert before != _rebuildable(_scalars(straight))  # points are lost indeed
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{events} is damaged (a record" in err, err
    assert "written again" in err and "figures, text, HParams row and other evaluation scalars" in err and "are lost" in err, err
    assert _rebuildable(_scalars(run)) == _rebuildable(_scalars(straight))
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # rebuilt once: the next resume adds nothing
    assert _rebuildable(_scalars(run)) == _rebuildable(_scalars(straight))


@pytest.mark.parametrize("damage", ["garbled", "removed"])
def test_a_damaged_final_summary_is_redone_on_resume(straight, tmp_path, capsys, damage):
    """--resume said "finished, nothing to do" and left the final summary.json unreadable."""
    run = _copy(straight, tmp_path / "run")
    path = run / "eval" / "test" / "summary.json"
    if damage == "garbled":
        path.write_bytes(path.read_bytes()[:100] + b"\x00garbled")
    else:
        path.unlink()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()  # (removed: the redo also names the files it replaces)
    assert str(path) in lines[0] and "redoing the evaluation of iteration 2 from its checkpoint" in lines[0], lines
    assert all(line.startswith("metarl: warning: ") for line in lines) and len(lines) <= 2, lines
    _assert_same_run(straight, run)


def test_an_edited_config_is_refused(straight, tmp_path, capsys):
    run = _copy(straight, tmp_path / "run")
    data = yaml.safe_load((run / "config.yaml").read_text())
    data["sampler"]["workers"] = 1  # may change: results do not depend on it
    (run / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["eval", str(run)]) == 0
    data["agent"]["inner_lr"] = 0.5
    (run / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    for argv in (["eval", str(run)], ["train", "--resume", str(run), "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "config.yaml was edited" in err and "agent.inner_lr 0.1 -> 0.5" in err


@pytest.mark.parametrize(("other", "message"), [
    (["experiments/rl2/point_nav_2d.yaml", "agent.hidden_size=8"], "is a checkpoint of another agent (rl2), not of "
     "this run's maml_trpo"),
    ([CONFIG, "agent.hidden=[16]"], "holds networks of another shape than"),
])
def test_a_checkpoint_swapped_in_from_another_run_is_named_as_such(straight, tmp_path, capsys, other, message):
    """It was reported as 'config.yaml was edited', naming fields the user never touched."""
    from metarl.config import load_config
    from metarl.runfolder import config_record, save_checkpoint
    from metarl.training import build_agent

    run = _copy(straight, tmp_path / "run")
    config = load_config(other[0], [*other[1:], "sampler.workers=0"])
    sampler, agent = build_agent(config)
    sampler.close()
    for name in ("latest.pt", "previous.pt"):
        (run / "checkpoints" / name).unlink()
    save_checkpoint(run / "checkpoints", {"agent": agent.state_dict(), "iteration": 2, "env_steps": 1800,
                                          "config": config_record(config.to_dict())})
    for argv in (["eval", str(run)], ["train", "--resume", str(run), "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and "was edited" not in err, err
        assert "put this run's own checkpoint back" in err or "put back this run's own" in err, err


def test_a_run_recorded_before_an_option_existed_still_resumes(straight, tmp_path, capsys):
    """A checkpoint whose config record predates an option (the agent's added_options) matches a config holding the
    value that keeps the old behaviour, so the run resumes; any other value is still an edit."""
    from metarl.runfolder import added_options, checksum

    run = _copy(straight, tmp_path / "run")
    for name in ("latest.pt", "previous.pt"):
        path = run / "checkpoints" / name
        state = torch.load(path, weights_only=False)
        record = json.loads(state["config"])
        for option in added_options("maml_trpo"):
            record["agent"].pop(option.split(".", 1)[1])
        state["config"] = json.dumps(record, sort_keys=True)
        state["sha256"] = checksum(state)
        torch.save(state, path)
    data = yaml.safe_load((run / "config.yaml").read_text())
    for option, value in added_options("maml_trpo").items():  # the config gives each its old behaviour
        data["agent"][option.split(".", 1)[1]] = value
    for option, value, message in (("inner_objective", "lvc", "agent.inner_objective (absent) -> 'lvc'"),
                                   ("action_scale", 0.1, "agent.action_scale (absent) -> 0.1")):
        data["agent"][option] = value  # a record without the field ran the old behaviour, not this
        (run / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        assert main(["train", "--resume", str(run), "iterations=3", "--quiet"]) == 2
        assert message in capsys.readouterr().err
        data["agent"][option] = added_options("maml_trpo")[f"agent.{option}"]
    (run / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["train", "--resume", str(run), "iterations=3", "--quiet"]) == 0
    assert [r["iteration"] for r in _metrics(run)] == [1, 2, 3]

    # recorded while the retired options existed (config.yaml and the checkpoints' records), at their neutral
    # values: it resumes; a retired option set to anything else is one line saying it is retired
    from metarl.runfolder import retired_options

    retired = {option.split(".", 1)[1]: neutral for option, neutral in retired_options("maml_trpo").items()}
    assert set(retired) == {"learn_inner_lr", "inner_gae_lambda", "inner_max_kl_grad"}
    for name in ("latest.pt", "previous.pt"):
        path = run / "checkpoints" / name
        state = torch.load(path, weights_only=False)
        record = json.loads(state["config"])
        record["agent"].update(retired)
        state["config"] = json.dumps(record, sort_keys=True)
        state["sha256"] = checksum(state)
        torch.save(state, path)
    data["agent"].update(retired)
    (run / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["train", "--resume", str(run), "iterations=4", "--quiet"]) == 0
    assert [r["iteration"] for r in _metrics(run)] == [1, 2, 3, 4]
    data["agent"]["learn_inner_lr"] = "per_tensor"
    (run / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "iterations=5", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "agent.learn_inner_lr: retired (" in err


def test_record_changes_names_each_differing_field():
    """The comparison behind resume and bench: nested fields by dotted name; a field one record lacks differs
    from every value (None too), but an added option of the new record's agent at its old value, and
    only under ``config_at``; ``may_change`` fields are never differences."""
    from metarl.runfolder import record_changes

    old = {"agent": {"name": "maml_trpo", "inner_lr": 0.1, "hidden": [8]}, "sampler": {"workers": 2}}
    new = {"agent": {"name": "maml_trpo", "inner_lr": 0.5, "hidden": [8], "extra": None}, "sampler": {"workers": 4}}
    assert record_changes(old, new) == ["agent.extra (absent) -> None", "agent.inner_lr 0.1 -> 0.5",
                                        "sampler.workers 2 -> 4"]
    assert record_changes(old, new, may_change=frozenset({"sampler.workers"}))[-1] == "agent.inner_lr 0.1 -> 0.5"
    added = {"agent": {"name": "maml_trpo", "inner_lr": 0.1, "hidden": [8], "inner_max_kl": 0.0},
             "sampler": {"workers": 2}}
    assert record_changes(old, added) == []
    assert record_changes(added, old) == ["agent.inner_max_kl 0.0 -> (absent)"]
    assert record_changes(old, {**added, "agent": {**added["agent"], "inner_max_kl": 5.0}}) == [
        "agent.inner_max_kl (absent) -> 5.0"]
    assert record_changes({"config": old}, {"config": added}, config_at="config.") == []
    assert record_changes({"config": old}, {"config": added}) == ["config.agent.inner_max_kl (absent) -> 0.0"]
    # scoped by the agent the new record names: another agent's field of the same name is a change
    rl2 = {section: {**fields, "name": "rl2"} if section == "agent" else fields for section, fields in added.items()}
    assert record_changes({**old, "agent": {**old["agent"], "name": "rl2"}}, rl2) == [
        "agent.inner_max_kl (absent) -> 0.0"]


@pytest.mark.parametrize(("content", "message"), [
    (b"", "expected a mapping"),
    (b"experiment: [x\n", "not valid YAML"),
    (b"experiment: \xff\xfe x\n", "not UTF-8"),
])
def test_a_broken_run_config_is_one_line(straight, tmp_path, capsys, content, message):
    run = _copy(straight, tmp_path / "run")
    (run / "config.yaml").write_bytes(content)
    for argv in (["eval", str(run)], ["train", "--resume", str(run), "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and "config.yaml" in err, err


# ---- one writer per folder ---------------------------------------------------------------------------------
def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds the folder's lock until it is killed."""
    code = ("import sys, time; from pathlib import Path; from metarl.runfolder import run_lock\n"
            "with run_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_one_writer_per_run_folder_and_a_dead_holder_releases_it(straight, tmp_path, capsys):
    run = _copy(straight, tmp_path / "run")
    metrics = (run / "metrics.jsonl").read_bytes()
    holder = _hold_lock(run)
    try:
        for argv in (["train", "--resume", str(run), "iterations=3", "--quiet"], ["eval", str(run)]):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "is in use by pid" in err, err
        assert (run / "metrics.jsonl").read_bytes() == metrics
        assert yaml.safe_load((run / "config.yaml").read_text())["iterations"] == 2
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", "--resume", str(run), "iterations=3", "--quiet"]) == 0  # the kernel dropped the lock
    assert [r["iteration"] for r in _metrics(run)] == [1, 2, 3]


def _tiny_suite(tmp_path: Path) -> Path:
    data = {"name": "tiny", "out": str(tmp_path / "bench"), "eval": {"tasks": 2, "steps": 1, "episodes": 2},
            "families": {"PointNav2D": {}},
            "methods": {"maml_trpo": {"overrides": ["iterations=2", "agent.tasks_per_batch=2",
                                                    "agent.episodes_per_task=2", "agent.hidden=[8]",
                                                    "sampler.workers=0"]}}}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_bench_killed_in_its_final_evaluation_reports_the_final_iteration(tmp_path, capsys):
    suite = _tiny_suite(tmp_path)
    killed = _cli("bench", str(suite), "--quiet", fault="eval_files:1")
    assert killed.returncode == -9, killed.stderr
    holder = _hold_lock(tmp_path / "bench")
    try:
        assert main(["bench", str(suite), "--quiet"]) == 2
        assert "bench folder" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert main(["bench", str(suite), "--quiet"]) == 0
    cell = json.loads((tmp_path / "bench" / "cells" / "PointNav2D" / "maml_trpo" / "seed0" / "cell.json").read_text())
    assert cell["summary"]["iteration"] == 2 and cell["resumed"]
    assert cell["pretrain_env_steps"] == 2 * 2 * 2 * 2 * 100


# ---- no code from the current directory ------------------------------------------------------------------
def test_the_cli_never_imports_code_from_the_current_directory(tmp_path):
    (tmp_path / "yaml.py").write_text(f"open({str(tmp_path / 'MARKER')!r}, 'w').write('ran')\n")
    script = Path(sys.executable).parent / "metarl"
    for argv in ([str(script), "eval", "."], [sys.executable, "-P", "-m", "metarl.cli", "eval", "."]):
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "not a run folder" in done.stderr, done.stderr
        assert not (tmp_path / "MARKER").exists(), argv


PAYLOAD = """
import gymnasium
from metarl.envs.point_nav import PointNav2D
open({marker!r}, "w").write("ran")
gymnasium.register("payload/Point-v0", entry_point=PointNav2D, max_episode_steps=100)
"""


@pytest.mark.parametrize("named_by", ["env", "imports"])
def test_code_a_run_folder_names_from_inside_itself_runs_only_when_trusted(straight, tmp_path, named_by):
    """`cd RUN && metarl eval .` imported the payload.py that RUN's own config.yaml names (env: payload:Id, or
    imports:): a run folder someone hands you ran their code. Now it is refused in one line saying how to allow
    it, before anything is imported; --trust-run-code imports it."""
    run = _copy(straight, tmp_path / "run")
    marker = tmp_path / "MARKER"
    (run / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    data = yaml.safe_load((run / "config.yaml").read_text())
    if named_by == "env":
        data["env"] = "payload:payload/Point-v0"
    else:
        data["imports"] = ["payload"]
    (run / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    script = Path(sys.executable).parent / "metarl"
    for argv in (["eval", "."], ["train", "--resume", ".", "--quiet"]):
        done = subprocess.run([str(script), *argv], cwd=run, capture_output=True, text=True, timeout=300)
        err = done.stderr.strip()
        assert done.returncode == 2 and len(err.splitlines()) == 1, err
        assert f"names code inside the run folder ({(run / 'payload.py').resolve()})" in err, err
        assert "add --trust-run-code" in err, err
        assert not marker.exists(), argv
    done = subprocess.run([str(script), "eval", ".", "--trust-run-code"], cwd=run, capture_output=True, text=True,
                          timeout=300)
    assert marker.read_text() == "ran", done.stderr  # trusted: imported (the run then differs from its checkpoint)


def test_a_module_the_user_names_still_loads_from_the_current_directory(tmp_path):
    (tmp_path / "my_family.py").write_text(
        "import gymnasium\nfrom metarl.envs.point_nav import PointNav2D\n"
        "gymnasium.register('me/Point-v0', entry_point=PointNav2D, max_episode_steps=100)\n")
    script = Path(sys.executable).parent / "metarl"
    done = subprocess.run([str(script), "check", "my_family:me/Point-v0"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "checks passed" in done.stdout, done.stderr


# ---- non-finite numbers stop at their source -----------------------------------------------------------------
FAULTY = '''
import gymnasium, numpy as np
from metarl.envs.point_nav import PointNav2D

class FaultyPoint(PointNav2D):
    """PointNav2D whose step `at` (0-based, every episode) returns a bad value in `what`."""
    def __init__(self, what="reward", at=5, **kwargs):
        super().__init__(**kwargs)
        self.what, self.at, self.t = what, at, 0
    def reset(self, **kwargs):
        self.t = 0
        return super().reset(**kwargs)
    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        if self.t == self.at:
            if self.what == "reward":
                reward = float("nan")
            elif self.what == "term":
                info = {**info, "reward_goal": float("inf")}
            elif self.what == "obs":
                obs = np.array([obs[0], np.nan], np.float32)
            elif self.what == "huge_obs":
                obs = np.array([1e30, obs[1]], np.float32)
        self.t += 1
        return obs, reward, terminated, truncated, info

gymnasium.register("test/FaultyPoint-v0", entry_point=FaultyPoint, max_episode_steps=100)
'''


@pytest.fixture
def faulty(tmp_path, monkeypatch):
    """A module ``faulty_point`` registering test/FaultyPoint-v0, importable here and in sampler workers."""
    (tmp_path / "faulty_point.py").write_text(FAULTY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import faulty_point  # noqa: F401

    return "test/FaultyPoint-v0"


@pytest.mark.parametrize(("what", "at", "named"), [
    ("reward", 5, "non-finite reward (nan)"),
    ("term", 5, "non-finite reward_goal term (inf)"),
    ("obs", 99, "non-finite observation[1] (nan)"),   # the final observation of an episode
])
def test_a_non_finite_env_value_stops_training_naming_where(faulty, tmp_path, capsys, what, at, named):
    run = tmp_path / "run"
    argv = ["train", CONFIG, *TINY, f"env={faulty}", f"env_kwargs={{what: {what}, at: {at}}}", "--run-dir", str(run),
            "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert f"env {faulty}" in err and "on task 0 (" in err and f"episode 0, step {at};" in err, err
    assert not (run / "checkpoints" / "latest.pt").exists() and not (run / "metrics.jsonl").exists()


def test_a_sampler_worker_reports_a_non_finite_value_as_such(faulty):
    from metarl.sampling import NonFiniteError, make_sampler

    with make_sampler(f"faulty_point:{faulty}", {"what": "reward", "at": 3}, backend="gymnasium", workers=1) as sampler:
        tasks = sampler.family.sample_tasks(2, "train", seed=0)
        with pytest.raises(NonFiniteError, match=r"on task 0 .*episode 0, step 3;"):
            sampler.sample(_RandomActor(sampler.action_space.shape[0]), tasks, 2, seed=0)


class _RandomActor:
    def __init__(self, act_dim: int):
        self.act_dim = act_dim

    def start(self, task_indices, slots_per_task):
        self.rng = __import__("numpy").random.default_rng(0)

    def act(self, obs):
        return self.rng.uniform(-0.1, 0.1, size=(*obs.shape[:2], self.act_dim))


def test_rl2_refuses_an_absurd_observation_before_its_normaliser_uses_it(faulty, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "experiments/rl2/point_nav_2d.yaml", "quick=true", "agent.hidden_size=8", "sampler.workers=0",
            f"env={faulty}", "env_kwargs={what: huge_obs, at: 7}", "--run-dir", str(run), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "observation normaliser" in err and "1e+30" in err, err
    assert not (run / "checkpoints" / "latest.pt").exists()


def test_non_finite_agent_state_is_named():
    from metarl.training import check_finite_state

    state = {"policy": {"w": torch.ones(3), "b": torch.tensor([0.0, float("nan")])}, "steps": torch.tensor([1, 2])}
    with pytest.raises(FloatingPointError, match=r"policy\.b non-finite"):
        check_finite_state(state, "iteration 3: the update made agent state")
    check_finite_state({"policy": {"w": torch.ones(3)}}, "fine")


# ---- config hardening ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "message"), [
    (["experiment=/tmp/elsewhere"], "experiment: expected a relative name"),
    (["experiment=../../outside"], "experiment: expected a relative name"),
    (["iterations=1000000000000000000000000000000"], "iterations: 1000000000000000000000000000000 iterations would take"),
    (["agent.episodes_per_task=100000000"], "agent: an iteration would take"),
    (["eval.tasks=1000"], "fixed list of 40 tasks"),
    (["agent.activation=swish"], "agent.activation must be 'tanh' or 'relu', got 'swish'"),
    # numbers a tensor cannot hold, or far beyond any setting that trains (a 25-line RuntimeError, or a run
    # folder written and then "the policy produced non-finite actions")
    (["agent.inner_lr=1e300"], "agent.inner_lr: expected a number of magnitude at most 3.4e+38, got 1e+300"),
    (["agent.inner_lr=1000"], "agent.inner_lr must be in (0, 100], got 1000.0"),
])
def test_hardened_config_fields_are_one_line_before_any_work(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    assert main(["train", CONFIG, *overrides, "--run-dir", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_duplicate_yaml_keys_are_refused(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text(Path(CONFIG).read_text().replace("  inner_lr: 0.1\n", "  inner_lr: 0.1\n  inner_lr: 0.5\n"))
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "duplicate key 'inner_lr'" in err, err


def test_exponent_floats_mean_numbers(tmp_path):
    from metarl.config import load_config

    path = tmp_path / "exp.yaml"
    path.write_text(Path(CONFIG).read_text().replace("  inner_lr: 0.1\n", "  inner_lr: 1e-3\n"))
    assert load_config(path).agent.inner_lr == 0.001
    assert load_config(CONFIG, ["agent.max_kl=5e-3"]).agent.max_kl == 0.005


def test_an_unwritable_run_root_is_one_line_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["train", CONFIG, *TINY, f"run_root={blocker / 'runs'}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write to run folder" in err, err
    assert blocker.read_text() == "not a folder"


def test_a_run_killed_while_writing_its_config_is_restarted_in_place_not_a_dead_end(tmp_path, capsys):
    """A kill during config.yaml's first write leaves a lock file, an empty checkpoints/ and the config's
    temporary file: --resume says there is nothing to resume and what to run, and train --run-dir starts the
    run again in that folder (it refused, 'already exists', and the folder had to be deleted by hand)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".lock").write_text("")
    (run / ".config.yaml.tmp").write_text("experiment: maml_trpo/point_na")  # cut mid-write
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "killed before its config.yaml was written" in err
    assert f"metarl train CONFIG --run-dir {run}" in err
    assert main(["train", CONFIG, *TINY, "--run-dir", str(run), "--quiet"]) == 0
    assert (run / "config.yaml").is_file() and not (run / ".config.yaml.tmp").exists()
    assert json.loads((run / "checkpoints" / "evals.json").read_text())["done"] == [1, 2]
