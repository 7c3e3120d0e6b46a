"""``device: auto | cpu | cuda`` for every agent's update and the deployment API: checked on the CPU (CI has no
GPU), CUDA refused in one line where torch has none, runs loading on another device setting than they were
trained with. The CUDA path itself is untested so far (docs/speed.md)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import metarl.api as mrl
from metarl.cli import main
from metarl.config import ConfigError, load_config
from metarl.training import build_agent

ROOT = Path(__file__).resolve().parents[1]
TINY = {  # one short iteration of each agent on PointNav2D, episodes of 10 steps, in this process
    "maml_trpo": ["agent.tasks_per_batch=2", "agent.episodes_per_task=2", "agent.hidden=[8, 8]"],
    "rl2": ["agent.tasks_per_batch=2", "agent.hidden_size=8"],
    "pearl": [],
}
COMMON = ["quick=true", "iterations=1", "sampler.workers=0", "env_kwargs={max_episode_steps: 10}", "eval.tasks=2",
          "eval.steps=1", "eval.episodes=1"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch has no CUDA")


def _config(agent: str, *extra: str):
    return load_config(ROOT / f"experiments/{agent}/point_nav_2d.yaml", [*COMMON, *TINY[agent], *extra])


@no_cuda
@pytest.mark.parametrize("agent", sorted(TINY))
def test_auto_picks_the_cpu_here_and_cpu_is_the_cpu(agent):
    for device in ("auto", "cpu"):
        sampler, built = build_agent(_config(agent, f"device={device}"))
        sampler.close()
        assert built.device == torch.device("cpu")
        tensors = [v for v in built.state_dict().values() if isinstance(v, torch.Tensor)]
        tensors += [t for v in built.state_dict().values() if isinstance(v, dict) for t in v.values()
                    if isinstance(t, torch.Tensor)]
        assert tensors and all(t.device.type == "cpu" for t in tensors)


@no_cuda
def test_cuda_where_there_is_none_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^device: cuda asked for, but CUDA is not available \(.*\); use "
                                          r"device=cpu or device=auto$"):
        build_agent(_config("rl2", "device=cuda"))
    code = main(["train", "maml_trpo/point_nav_2d.yaml", "quick=true", "--run-dir", str(tmp_path / "run"),
                 "device=cuda:1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "device: cuda:1 asked for, but CUDA is not available" in err[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="device: expected auto, cpu, cuda or cuda:N, got 'gpu'"):
        _config("rl2", "device=gpu")


def test_an_agent_without_to_runs_on_the_cpu_under_auto():
    # in a fresh interpreter: importing the example registers it process-wide, which later tests that import
    # their own copy of it would refuse
    code = ("import torch; from metarl.plugins import load; load(['experiments/custom_agent/fomaml.py']); "
            "from metarl.agent import get_agent; from metarl.config import resolve_device; "
            "a = get_agent('fomaml'); print(a.devices, resolve_device('auto', a))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["('cpu',)", "cpu"]


@no_cuda
@pytest.mark.parametrize("agent", sorted(TINY))
def test_a_run_trained_with_one_device_setting_loads_with_another(agent, tmp_path):
    """The run records device: cpu; the API loads it with device=auto (and cuda is refused there in one line),
    adapts and evaluates; the checkpoint loads onto the CPU whatever device wrote it (map_location)."""
    folder = tmp_path / "run"
    mrl.train(_config(agent, "device=cpu"), run_dir=folder).close()
    assert yaml.safe_load((folder / "config.yaml").read_text())["device"] == "cpu"
    with mrl.load(folder, device="auto") as learner:
        assert learner.agent.device == torch.device("cpu") and learner.agent.iteration == 1
        summary = learner.evaluate(tasks=2, steps=1, episodes=1)
        assert len(summary["stages"]) == 2
    with pytest.raises(ConfigError, match="device: cuda asked for"):
        mrl.load(folder, device="cuda")
    with pytest.raises(ConfigError, match="device: expected auto"):
        mrl.load(folder, device="tpu")


def test_the_device_is_left_out_of_configs_that_keep_the_default():
    config = _config("maml_trpo")
    assert config.device == "auto" and "device" not in config.to_dict()  # earlier runs' records still match
    assert dataclasses.replace(config, device="cpu").to_dict()["device"] == "cpu"


def test_episode_batches_move_between_devices():
    from metarl.episodes import EpisodeBatch

    batch = EpisodeBatch.from_numpy([None], {"observations": [[[[0.0]]]], "actions": [[[[0.0]]]], "rewards": [[[1.0]]],
                                             "mask": [[[1.0]]], "terminated": [[False]], "truncated": [[True]],
                                             "last_observations": [[[0.0]]]})
    assert batch.to("cpu") is batch  # already there: nothing copied
    moved = batch.to("meta")  # a device without data: every field goes
    assert all(t.device.type == "meta" for t in (moved.observations, moved.actions, moved.rewards, moved.mask,
                                                  moved.terminated, moved.truncated, moved.last_observations))
