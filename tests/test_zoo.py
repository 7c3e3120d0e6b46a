"""The zoo of pretrained meta-policies (metarl.zoo): every shipped entry loads and adapts, the PointNav2D entries
reproduce the figures they record, a run exports to an entry that acts as the run did, the slim policy state of
every agent evaluates as the whole agent, and a damaged, foreign or newer entry is one clear line."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import metarl
import metarl.api as mrl
from metarl import zoo
from metarl.cli import main
from metarl.config import load_config
from metarl.training import build_agent, eval_tasks

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = zoo.names()


@pytest.fixture(scope="module")
def maml_run(tmp_path_factory):
    """A short real MAML-TRPO run on PointNav2D, with its final evaluation."""
    folder = tmp_path_factory.mktemp("zoo-maml") / "run"
    config = load_config(ROOT / "experiments/maml_trpo/point_nav_2d.yaml",
                         ["iterations=6", "agent.tasks_per_batch=8", "agent.episodes_per_task=8",
                          "agent.hidden=[32, 32]", "eval.every=0", "eval.tasks=6", "eval.steps=1",
                          "eval.episodes=4", "sampler.workers=0"])
    mrl.train(config, run_dir=folder).close()
    return folder


@pytest.fixture(scope="module")
def exported(maml_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo-root")
    zoo.export(maml_run, "maml_trpo/tiny_point_nav", root, result="experiments/results/none.json",
               description="a test entry")
    return root / "maml_trpo" / "tiny_point_nav"


def test_the_shipped_zoo_has_each_agent_on_point_nav_and_on_a_locomotion_family():
    by_agent: dict[str, set[str]] = {}
    for entry in zoo.entries():
        by_agent.setdefault(entry.agent, set()).add(entry.family)
    for agent in ("maml_trpo", "rl2", "pearl"):
        assert "PointNav2D" in by_agent.get(agent, set()), (agent, by_agent)
        assert by_agent[agent] & {"HalfCheetahVel", "HalfCheetahDir", "AntDir"}, (agent, by_agent)
    assert len(SHIPPED) >= 6
    assert [e.name for e in zoo.entries() if e.requires] == ["maml_trpo/ml10", "rl2/ml1_reach"]  # Meta-World's
    assert zoo.find("zoo:maml_trpo/ml10").requires == ["metaworld"]


def test_an_entry_whose_extra_is_missing_is_marked_and_one_clear_line(capsys):
    import importlib.util

    if importlib.util.find_spec("metaworld") is not None:
        pytest.skip("the metaworld extra is installed here (tests/test_metaworld.py runs its entries)")
    assert zoo.find("zoo:maml_trpo/ml10").missing() == ["metaworld"]
    assert main(["zoo"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("maml_trpo/ml10")]
    assert len(listed) == 1 and listed[0].endswith("[needs the metaworld extra]")
    assert main(["eval", "zoo:maml_trpo/ml10"]) == 2
    err = capsys.readouterr().err
    assert "'ML10' is a Meta-World family: install the extra" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_entry_records_its_result_and_adapts_on_an_env_of_its_family(name):
    entry = zoo.find(f"zoo:{name}")
    if entry.missing():  # e.g. a Meta-World entry without the metaworld extra (tests/test_metaworld.py runs it)
        pytest.skip(f"{name} needs the {entry.missing()} extra")
    m = entry.meta
    assert m["trained_by"] and m["provenance"].get("commit"), "the command and commit that trained it"
    assert m["result"] and (ROOT / m["result"]).is_file(), "the committed result file it belongs to"
    assert m["policy_bytes"] < 2_000_000, "only what adapting and acting need"
    stages = entry.evaluation["stages"]
    assert len(stages) == entry.evaluation["steps"] + 1
    assert all(s["ci95"][0] <= s["mean_return"] <= s["ci95"][1] for s in stages)
    with mrl.load(f"zoo:{name}") as learner:
        assert learner.agent.iteration == m["iteration"] and learner.agent.env_steps == m["env_steps"]
        env = metarl.make_family(learner.config.env, **learner.config.env_kwargs)
        policy = learner.adapt(env, steps=1, episodes=1, horizon=20)
        obs, _ = env.reset(seed=0)
        action = policy.predict(obs, deterministic=True)
        assert action.shape == env.action_space.shape and np.isfinite(action).all()
        env.close()


@pytest.mark.parametrize("name", [n for n in SHIPPED if n.endswith("/point_nav_2d")])
def test_metarl_eval_of_a_point_nav_entry_reproduces_its_figure(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", f"zoo:{name}"]) == 0
    out = capsys.readouterr().out
    assert "the figure is reproduced" in out, out
    summary = json.loads((tmp_path / "runs/zoo" / name / "eval/test/summary.json").read_text())
    recorded = zoo.find(f"zoo:{name}").evaluation["stages"]
    np.testing.assert_allclose([s["mean_return"] for s in summary["stages"]],
                               [s["mean_return"] for s in recorded], rtol=1e-4, atol=1e-3)


def test_an_exported_entry_acts_and_evaluates_as_its_run(maml_run, exported, tmp_path, monkeypatch, capsys):
    assert {p.name for p in exported.iterdir()} == set(zoo.FILES)
    meta = json.loads((exported / "entry.json").read_text())
    run_summary = json.loads((maml_run / "eval/test/summary.json").read_text())
    assert [s["mean_return"] for s in meta["evaluation"]["stages"]] == [s["mean_return"] for s in run_summary["stages"]]
    env = metarl.make_family("PointNav2D")
    metarl.family_of(env).set_task(metarl.GoalTask("PointNav2D", goal=(0.3, -0.2)))
    actions = []
    for ref in (maml_run, exported):
        with mrl.load(ref) as learner:
            policy = learner.adapt(env, steps=1, episodes=2, seed=3)
            obs, _ = env.reset(seed=5)
            actions.append(np.stack([policy.predict(obs + 0.01 * k, deterministic=True) for k in range(5)]))
    np.testing.assert_array_equal(actions[0], actions[1])
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(exported)]) == 0
    assert "the figure is reproduced" in capsys.readouterr().out
    assert (tmp_path / "runs/zoo/maml_trpo/tiny_point_nav/eval/test/summary.json").is_file()


@pytest.mark.parametrize("config", ["rl2/point_nav_2d.yaml", "pearl/point_nav_2d.yaml"])
def test_the_slim_policy_state_evaluates_as_the_whole_agent(config):
    """An agent given only another's policy_state adapts exactly as that agent (here: freshly initialised
    agents of two seeds, so the networks differ until the state is loaded)."""
    data = load_config(ROOT / "experiments" / config, ["quick=true", "sampler.workers=0",
                                                       "env_kwargs={max_episode_steps: 15}"])
    source_sampler, source = build_agent(data)
    target_sampler, target = build_agent(dataclasses.replace(data, seed=7))
    try:
        held_out = eval_tasks(source_sampler.family, 0, "test", 2)
        before = target.evaluate_adaptation(held_out, 1, 1, seed=11).returns
        target.load_policy_state(source.policy_state())
        want = source.evaluate_adaptation(held_out, 1, 1, seed=11).returns
        got = target.evaluate_adaptation(held_out, 1, 1, seed=11).returns
        np.testing.assert_array_equal(got, want)
        assert not np.array_equal(before, want)
        assert set(source.policy_state()) < set(source.state_dict()), "no optimiser state or buffers"
    finally:
        source_sampler.close()
        target_sampler.close()


def _copy(exported: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "entry"
    shutil.copytree(exported, folder)
    return folder


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_zoo_input_is_one_clear_line(exported, maml_run, tmp_path, capsys):
    err = _one_line_error(["eval", "zoo:maml_trpo/no_such_entry"], capsys)
    assert "unknown zoo entry 'maml_trpo/no_such_entry'" in err and "metarl zoo lists them" in err
    assert "unknown zoo entry" in _one_line_error(["zoo", "nothing/here"], capsys)

    damaged = _copy(exported, tmp_path / "a")
    data = bytearray((damaged / "policy.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / "policy.pt").write_bytes(bytes(data))
    err = _one_line_error(["eval", str(damaged)], capsys)
    assert "policy.pt is damaged" in err and "export it again" in err

    newer = _copy(exported, tmp_path / "b")
    meta = json.loads((newer / "entry.json").read_text())
    (newer / "entry.json").write_text(json.dumps({**meta, "format": zoo.FORMAT + 1, "metarl": "9.0"}))
    err = _one_line_error(["eval", str(newer)], capsys)
    assert f"zoo format {zoo.FORMAT + 1}" in err and "upgrade metarl" in err
    with pytest.raises(zoo.ZooError, match="upgrade metarl"):
        mrl.load(newer)

    garbled = _copy(exported, tmp_path / "c")
    (garbled / "entry.json").write_text("{not json")
    assert "entry.json is damaged" in _one_line_error(["eval", str(garbled)], capsys)

    other_shape = _copy(exported, tmp_path / "d")  # an entry from a metarl whose networks differ
    text = (other_shape / "config.yaml").read_text()
    (other_shape / "config.yaml").write_text(text.replace("- 32\n  - 32", "- 16\n  - 16"))
    err = _one_line_error(["eval", str(other_shape)], capsys)
    assert "does not fit the networks" in err and "metarl" in err

    unknown_option = _copy(exported, tmp_path / "e")
    text = (unknown_option / "config.yaml").read_text()
    (unknown_option / "config.yaml").write_text(text.replace("agent:\n", "agent:\n  option_of_the_future: 1\n", 1))
    assert "does not load in this metarl" in _one_line_error(["eval", str(unknown_option)], capsys)

    err = _one_line_error(["zoo", "--export", str(maml_run), "maml_trpo/tiny_point_nav", "--to",
                           str(exported.parent.parent)], capsys)
    assert "exists" in err
    assert "two parts" in _one_line_error(["zoo", "--export", str(maml_run), "tiny", "--to", str(tmp_path)], capsys)
    unevaluated = tmp_path / "unevaluated"
    shutil.copytree(maml_run, unevaluated)
    shutil.rmtree(unevaluated / "eval")
    assert "no held-out evaluation" in _one_line_error(
        ["zoo", "--export", str(unevaluated), "maml_trpo/x", "--to", str(tmp_path / "z")], capsys)


def test_metarl_zoo_lists_and_shows(capsys):
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SHIPPED)
    assert main(["zoo", SHIPPED[0]]) == 0
    out = capsys.readouterr().out
    assert "trained by:" in out and f"metarl eval zoo:{SHIPPED[0]}" in out


def test_the_docs_table_is_generated_from_the_entries():
    text = (ROOT / "docs/zoo.md").read_text(encoding="utf-8")
    assert f"{zoo.TABLE_START}\n{zoo.table()}{zoo.TABLE_END}" in text, (
        "docs/zoo.md's table is stale: python -c \"from pathlib import Path; from metarl import zoo; "
        "zoo.write_table(Path('docs/zoo.md'))\"")


def test_code_an_entry_names_from_its_own_folder_runs_only_when_trusted(exported, tmp_path, capsys):
    folder = _copy(exported, tmp_path / "shared")
    marker = tmp_path / "imported"
    (folder / "payload.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    text = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(f"imports: [{str(folder / 'payload.py')!r}]\n" + text.replace("imports: []\n", ""))
    err = _one_line_error(["eval", str(folder)], capsys)
    assert "--trust-run-code" in err and not marker.exists()
    with pytest.raises(zoo.ZooError, match="trust"):
        mrl.load(folder)
    assert not marker.exists()
    mrl.load(folder, trust_code=True).close()
    assert marker.exists()


def test_a_video_of_an_entry_recorded_with_repeats_shows_one_adaptation(exported, tmp_path, monkeypatch, capsys):
    folder = _copy(exported, tmp_path / "repeated")
    meta = json.loads((folder / "entry.json").read_text())
    meta["evaluation"]["repeats"] = 3
    (folder / "entry.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(folder), "--video", "--tasks", "2"]) == 0
    out = capsys.readouterr().out
    assert "not compared" in out and (tmp_path / "runs/zoo/maml_trpo/tiny_point_nav/eval/test/video").is_dir()
