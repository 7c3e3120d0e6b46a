"""The ``metarl`` command line: a short real run, its run folder, resume, eval, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from metarl.cli import main

CONFIG = "experiments/maml_trpo/point_nav_2d.yaml"
TINY = ["agent.tasks_per_batch=3", "agent.episodes_per_task=3", "agent.hidden=[8]", "sampler.workers=0",
        "eval.tasks=3", "eval.steps=1", "eval.episodes=2", "eval.every=0"]


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", CONFIG, *TINY, "iterations=2", "--run-dir", str(out), "--quiet"]) == 0
    return out


def test_training_run_writes_the_run_folder(run_dir):
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["agent"]["name"] == "maml_trpo" and config["agent"]["tasks_per_batch"] == 3
    assert config["seed"] == 0 and set(config["meta"]["versions"]) >= {"torch", "mujoco", "gymnasium"}
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2]
    # 2 iterations x (pre + post) x 3 tasks x 3 episodes x 100 steps
    assert lines[-1]["env_steps"] == 2 * 2 * 3 * 3 * 100
    state = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert state["iteration"] == 2
    summary = json.loads((run_dir / "eval" / "test" / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == [0, 1]
    assert [s["adapt_episodes"] for s in summary["stages"]] == [0, 2]
    assert [s["adapt_env_steps"] for s in summary["stages"]] == [0.0, 200.0]
    for stage in summary["stages"]:
        assert len(stage["per_task"]) == 3
        assert stage["ci95"][0] <= stage["mean_return"] <= stage["ci95"][1]
    for name in ("summary.csv", "per_task.csv", "adaptation_curve.png"):
        assert (run_dir / "eval" / "test" / name).stat().st_size > 0
    scalars = _scalars(run_dir)
    for tag in ("meta/return_pre_adaptation", "meta/return_post_adaptation", "loss/surrogate_before", "loss/kl",
                "loss/line_search_steps", "time/env_steps_per_s", "time/sampling_s", "time/update_s",
                "eval/test/return_stage0", "eval/test/return_stage1"):
        assert tag in scalars, tag
    assert [step for step, _ in scalars["meta/return_pre_adaptation"]] == [1800, 3600]  # x axis = env steps


def test_the_final_figures_and_settings_reach_tensorboards_hparams_view(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # in the run's own event file, no second one
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hparams = {k: v.ListFields()[0][1] for k, v in start.hparams.items()}
    assert hparams["agent.tasks_per_batch"] == 3 and hparams["agent.name"] == "maml_trpo" and hparams["seed"] == 0
    assert hparams["agent.hidden"] == "[8]" and hparams["env"] == "PointNav2D"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert metrics == {"hparam/test/return_stage0", "hparam/test/return_stage1", "hparam/test/adaptation_gain"}
    summary = json.loads((run_dir / "eval" / "test" / "summary.json").read_text())
    value = _scalars(run_dir)["hparam/test/return_stage1"][-1][1]
    assert value == pytest.approx(summary["stages"][1]["mean_return"], rel=1e-5)


def test_eval_command_writes_the_requested_split(run_dir, capsys):
    assert main(["eval", str(run_dir), "--split", "ood", "--steps", "2", "--episodes", "2", "--tasks", "2"]) == 0
    summary = json.loads((run_dir / "eval" / "ood" / "summary.json").read_text())
    assert summary["split"] == "ood" and len(summary["stages"]) == 3 and summary["num_tasks"] == 2
    assert all(max(abs(c) for c in t["goal"]) > 0.5 for t in summary["tasks"])  # ood goals
    out = capsys.readouterr().out
    assert "mean return" in out
    # progress while it runs: what is evaluated, then a line per collected batch (MAML-TRPO: one per stage)
    assert f"evaluating {run_dir} (iteration " in out and "on 2 ood tasks, 2 adaptation stages of 2 episodes" in out
    batches = [line for line in out.splitlines() if line.startswith("  evaluating: batch ")]
    assert [b.split()[2] for b in batches] == ["1", "2", "3"] and "(2 tasks x 2 episodes;" in batches[0]
    assert out.index("evaluating: batch 3") < out.index("mean return")


def test_eval_reuse_keeps_an_evaluation_of_the_same_checkpoint_and_protocol_only(run_dir, capsys):
    plain = (run_dir / "eval" / "test" / "summary.json").read_bytes()  # the run's final one: 3 tasks, 1 stage of 2
    assert main(["eval", str(run_dir), "--reuse", "--tasks", "3", "--steps", "1", "--episodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "--reuse: keeping" in out and "(iteration 2)" in out and "evaluating: batch" not in out
    assert "mean return" in out and (run_dir / "eval" / "test" / "summary.json").read_bytes() == plain
    # another protocol (more stages): measured again, not kept
    assert main(["eval", str(run_dir), "--reuse", "--tasks", "3", "--steps", "2", "--episodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "holds no evaluation of iteration 2 with this protocol" in out and "evaluating: batch 3" in out
    assert len(json.loads((run_dir / "eval" / "test" / "summary.json").read_text())["stages"]) == 3
    from metarl.cli import same_evaluation

    path = run_dir / "eval" / "test" / "summary.json"
    assert same_evaluation(path, 2, "test", 3, 2, 2) is not None
    for args in ((1, "test", 3, 2, 2), (2, "ood", 3, 2, 2), (2, "test", 4, 2, 2), (2, "test", 3, 2, 3)):
        assert same_evaluation(path, *args) is None, args  # another iteration, split, task count or episodes
    assert same_evaluation(run_dir / "eval" / "absent.json", 2, "test", 3, 2, 2) is None
    assert same_evaluation(path, 2, "test", 3, 2, 2, repeats=2) is None  # one adaptation per task, not two
    path.write_bytes(plain)  # the run's final evaluation back, for the tests below


def test_eval_repeats_adapts_each_task_again_beside_the_plain_evaluation(run_dir, capsys):
    plain = (run_dir / "eval" / "test" / "summary.json").read_bytes()
    assert main(["eval", str(run_dir), "--repeats", "3", "--tasks", "2", "--steps", "1", "--episodes", "2"]) == 0
    pooled = json.loads((run_dir / "eval" / "test-repeats3" / "summary.json").read_text())
    assert (pooled["repeats"], pooled["distinct_tasks"], pooled["num_tasks"]) == (3, 2, 6)
    assert pooled["tasks"][:2] == pooled["tasks"][2:4] == pooled["tasks"][4:]  # the task list, three times
    returns = np.array(pooled["stages"][1]["per_task"])
    assert len(set(returns.round(6))) == 6  # six separate adaptations
    assert pooled["stages"][1]["mean_return"] == pytest.approx(returns.mean())
    from metarl.evaluation import stratified_bootstrap_ci  # the interval resamples within each task

    assert pooled["stages"][1]["ci95"] == pytest.approx(list(stratified_bootstrap_ci(returns, [0, 1] * 3, seed=1)))
    assert (run_dir / "eval" / "test" / "summary.json").read_bytes() == plain  # the run's own evaluation stays
    assert "3 independent adaptations on each of 2 tasks" in capsys.readouterr().out
    kept = (run_dir / "eval" / "test-repeats3" / "summary.json").read_bytes()  # --reuse: pooled ones too
    assert main(["eval", str(run_dir), "--repeats", "3", "--tasks", "2", "--steps", "1", "--episodes", "2",
                 "--reuse"]) == 0
    assert "--reuse: keeping" in capsys.readouterr().out
    assert (run_dir / "eval" / "test-repeats3" / "summary.json").read_bytes() == kept
    for bad, message in ((["--repeats", "0"], "--repeats must be >= 1, got 0"),
                         (["--repeats", "2", "--video"], "leave out --repeats")):
        assert main(["eval", str(run_dir), *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_resume_continues_exactly_where_a_run_stopped(tmp_path):
    """Train 3 iterations straight; train 2 then resume to 3: same parameters and metrics."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", CONFIG, *TINY, "iterations=3", "--run-dir", str(straight), "--quiet"]) == 0
    assert main(["train", CONFIG, *TINY, "iterations=2", "--run-dir", str(resumed), "--quiet"]) == 0
    assert main(["train", "--resume", str(resumed), "iterations=3", "--quiet"]) == 0
    a = torch.load(straight / "checkpoints" / "latest.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "latest.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 3
    for key, value in a["agent"]["policy"].items():
        assert torch.equal(value, b["agent"]["policy"][key]), key

    def metrics(path):
        rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]

    assert metrics(straight) == metrics(resumed)


def test_resume_of_a_killed_run_loses_at_most_the_iteration_in_progress(tmp_path):
    """A run killed after iteration 2 (metrics of a 3rd partly written) resumes from its checkpoint at 2."""
    run = tmp_path / "run"
    assert main(["train", CONFIG, *TINY, "iterations=2", "--run-dir", str(run), "--quiet"]) == 0
    with (run / "metrics.jsonl").open("a") as f:  # what a kill during the next iteration leaves behind
        f.write(json.dumps({"iteration": 3, "env_steps": 99}) + "\n")
        f.write('{"iteration": 4, "env_st')  # and a line cut in the middle by the kill
    assert main(["train", "--resume", str(run), "iterations=3", "--quiet"]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2, 3]
    assert lines[-1]["env_steps"] == 3 * 1800
    # the extended budget is now the run's own config: a second resume without the override is a no-op
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["iterations"] == 3 and stored["meta"]["changes"][0]["iterations"] == [2, 3]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([CONFIG, "agent.tasks_per_batch=0"], "agent.tasks_per_batch"),
        ([CONFIG, "agent.inner_lr=-0.1"], "agent.inner_lr"),
        ([CONFIG, "agent.inner_lr=fast"], "agent.inner_lr"),
        ([CONFIG, "agent.name=reptile"], "unknown agent"),
        ([CONFIG, "env=NoSuchFamily"], "env"),
        ([CONFIG, "agent.no_such_field=1"], "agent.no_such_field"),
        ([CONFIG, "iterations=0"], "iterations"),
        ([CONFIG, "seed=-1"], "seed"),
        ([CONFIG, "agent.ls_backtrack=1.0"], "agent.ls_backtrack"),
        ([CONFIG, "eval.split=validation"], "eval.split"),
        ([CONFIG, "sampler.backend=warp"], "sampler.backend"),
        ([CONFIG, "notakeyvalue"], "key=value"),
        (["does/not/exist.yaml"], "does not exist"),
    ],
)
def test_bad_config_is_one_clear_line_exit_2_nothing_written(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", *args, "--run-dir", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_malformed_yaml_and_wrong_types(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: x\nenv: PointNav2D\nagent: [1, 2\n")
    assert main(["train", str(bad), "--quiet"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    bad.write_text("experiment: x\nenv: PointNav2D\niterations: ten\nagent: {name: maml_trpo}\n")
    assert main(["train", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "iterations: expected an integer" in err


def test_existing_run_folder_is_never_overwritten(run_dir, capsys):
    before = (run_dir / "checkpoints" / "latest.pt").read_bytes()
    assert main(["train", CONFIG, *TINY, "--run-dir", str(run_dir), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run_dir / "checkpoints" / "latest.pt").read_bytes() == before


def test_eval_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_an_invalid_mujoco_gl_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setenv("MUJOCO_GL", "bogus")
    assert main(["families"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MUJOCO_GL='bogus'" in err and "egl" in err


def test_the_other_projects_metarl_installed_beside_is_one_clear_line(monkeypatch, capsys):
    """``pip install metarl`` fetches an unrelated project with the same import name; beside metarl-robotics the
    two distributions' files mix."""
    from importlib import metadata

    class Other:
        version = "0.1.0"
        metadata = {"Name": "metarl"}

    real = metadata.distribution
    monkeypatch.setattr(metadata, "distribution", lambda name: Other() if name == "metarl" else real(name))
    assert main(["families"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip uninstall metarl" in err and "metarl-robotics" in err
    monkeypatch.setattr(metadata, "distribution", real)
    assert main(["families"]) == 0  # this project's own install passes


AGENT_CONFIGS = sorted(p for d in ("maml_trpo", "rl2", "pearl") for p in Path("experiments", d).glob("*.yaml"))


@pytest.mark.parametrize("path", AGENT_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_agent_config_loads_with_its_header_and_quick_mode(path):
    """A shipped config whose settings no longer parse (a renamed option, a typo in an edit) fails here, not
    an hour into someone's run; each says in its header what it is, and its quick mode is smaller."""
    from metarl.config import load_config

    text = path.read_text()
    assert text.startswith("#"), f"{path}: no header comment saying what the config reproduces"
    config = load_config(path)
    assert config.experiment == f"{path.parent.name}/{path.stem}"
    quick = load_config(path, ["quick=true"])
    assert quick.iterations < config.iterations


def test_overrides_anywhere_after_the_command_and_the_version(tmp_path, capsys):
    """key=value overrides after the options count as before them (the same run); an option the command does
    not know, or a stray word, is still the one-line usage error; --version names the installed version."""
    small = ["iterations=1", "agent.tasks_per_batch=2", "agent.episodes_per_task=2", "eval.every=0", "eval.tasks=2",
             "eval.steps=1", "eval.episodes=2", "sampler.workers=0"]
    config = "experiments/maml_trpo/point_nav_2d.yaml"
    assert main(["train", config, *small[:3], "--run-dir", str(tmp_path / "a"), "--quiet", *small[3:]]) == 0
    assert main(["train", config, *small, "--run-dir", str(tmp_path / "b"), "--quiet"]) == 0
    stored = [yaml.safe_load((tmp_path / name / "config.yaml").read_text()) for name in "ab"]
    assert {k: v for k, v in stored[0].items() if k != "meta"} == {k: v for k, v in stored[1].items() if k != "meta"}
    assert stored[0]["agent"]["tasks_per_batch"] == 2 and stored[0]["sampler"]["workers"] == 0
    capsys.readouterr()
    for stray in (["--bogus"], ["stray"]):
        with pytest.raises(SystemExit) as exit_:
            main(["train", config, "--run-dir", str(tmp_path / "c"), *stray])
        assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    import metarl

    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"metarl {metarl.__version__}"
