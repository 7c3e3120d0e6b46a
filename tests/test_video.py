"""Videos (`metarl eval RUN_DIR --video`): real off-screen rendering, headless.

The replayed episodes are the evaluated ones (same return, per task and stage), for MAML on PointNav2D
(numpy-drawn frames) and RL² on HalfCheetahVel (MuJoCo through EGL, evaluated by the native sampler and
replayed by Gymnasium); the CLI writes GIFs of the right length and size and logs them to TensorBoard;
bad input is one line and exit code 2.
"""

from __future__ import annotations

import gc
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

import metarl
from metarl.cli import main
from metarl.config import load_config
from metarl.training import build_agent
from metarl.video import (
    VideoError,
    configure_gl,
    encode_gif,
    frame_plan,
    probe_gl,
    record,
    working_gl,
    write_videos,
)

configure_gl()  # MUJOCO_GL=egl on a machine without a display, unless set (Gymnasium reads it at render time)
GL_PROBLEM = probe_gl(os.environ.get("MUJOCO_GL") or "egl")
needs_gl = pytest.mark.skipif(
    GL_PROBLEM is not None, reason=f"MuJoCo cannot render off-screen here (MUJOCO_GL={os.environ.get('MUJOCO_GL')}: "
    f"{GL_PROBLEM}); install libegl1 libegl-mesa0 (EGL), or libosmesa6 and set MUJOCO_GL=osmesa")

MAML = "experiments/maml_trpo/point_nav_2d.yaml"
RL2 = "experiments/rl2/half_cheetah_vel.yaml"
TINY = ["agent.tasks_per_batch=3", "agent.episodes_per_task=3", "agent.hidden=[8]", "sampler.workers=0",
        "eval.tasks=3", "eval.steps=1", "eval.episodes=2", "eval.every=0"]


def _frames(path) -> list[np.ndarray]:
    with Image.open(path) as gif:
        assert gif.info.get("loop") == 0
        return [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)]


def _mp4(path) -> dict:
    """What ffmpeg reads back from an MP4: its frame count, size and rate, and the frames."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
    return {"frames": len(frames), "size": (w, h), "fps": meta["fps"], "images": frames}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", MAML, *TINY, "iterations=1", "--run-dir", str(out), "--quiet"]) == 0
    return out


def test_eval_video_writes_gifs_and_tensorboard(run_dir, capsys):
    args = ["eval", str(run_dir), "--steps", "1", "--episodes", "1", "--tasks", "3", "--video", "--video-tasks", "2",
            "--video-size", "96x64"]
    assert main(args) == 0
    out = capsys.readouterr().out
    video = run_dir / "eval" / "test" / "video"
    horizon = metarl.FAMILIES["PointNav2D"][1]
    for j in range(2):
        for name, width in (("before", 96), ("after", 96), ("before_after", 2 * 96 + 4)):
            frames = _frames(video / f"task{j}_{name}.gif")
            # one frame after the reset and one after every step (PointNav2D plays at its own 20 fps)
            assert len(frames) == horizon + 1, name
            assert frames[0].shape == (64, width, 3), name
            mp4 = _mp4(video / f"task{j}_{name}.mp4")  # beside it, the same frames (odd widths padded to even)
            assert mp4["frames"] == horizon + 1 and mp4["size"] == (width + width % 2, 64) and mp4["fps"] == 20, name
            # lossy, but the same picture: the mean absolute difference from the GIF's frame is small
            assert np.abs(mp4["images"][-1][:, :width].astype(float) - frames[-1]).mean() < 8, name
    assert not (video / "task2_before.gif").exists()
    # the printed returns are the evaluation's per-task returns (one episode per stage here)
    summary = json.loads((run_dir / "eval" / "test" / "summary.json").read_text())
    before, after = (summary["stages"][k]["per_task"][0] for k in (0, 1))
    assert f"task 0: return {before:.1f} before, {after:.1f} after" in out

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    acc.Reload()
    assert {"eval/test/video/task0", "eval/test/video/task1"} <= set(acc.Tags()["images"])
    event = acc.Images("eval/test/video/task0")[-1]
    env_steps = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["env_steps"]
    assert event.step == env_steps  # x axis = total env steps
    assert event.encoded_image_string[:6] == b"GIF89a" and (event.width, event.height) == (2 * 96 + 4, 64)
    assert len(list(ImageSequence.Iterator(Image.open(io.BytesIO(event.encoded_image_string))))) == horizon + 1


def test_maml_replay_is_the_evaluated_episode():
    """The actors of `adaptation_rollouts` replayed on one task give the evaluation's returns, stage by stage,
    and the episode the renderer shows is episode 0 of that task in the sampler's own call."""
    sampler, agent = build_agent(load_config(MAML, [*TINY, "quick=true"]))
    try:
        tasks = sampler.family.sample_tasks(3, "test")
        result = agent.evaluate_adaptation(tasks, 2, 1, seed=7)
        plans = agent.adaptation_rollouts(tasks[:2], 2, 1, seed=7)
        assert [p.stages for p in plans] == [(0,), (1,), (2,)]
        for j in range(2):
            for plan in plans:
                (episode,) = record(sampler.env_id, {}, tasks[j], j, plan, set(plan.stages), size=(32, 32))
                assert episode.episode_return == pytest.approx(result.returns[j, plan.stages[0]], rel=1e-5)
                assert len(episode.frames) == episode.length + 1 == 101
        # more episodes per stage: the replay is episode 0 (slot 0) of the same sampler call
        plans = agent.adaptation_rollouts(tasks[:1], 1, 3, seed=7)
        batch = sampler.sample(plans[1].actor, tasks[:1], 3, plans[1].seed)
        (episode,) = record(sampler.env_id, {}, tasks[0], 0, plans[1], {1}, size=(32, 32))
        assert episode.episode_return == pytest.approx(float(batch.returns[0, 0]), rel=1e-5)
    finally:
        sampler.close()


@needs_gl
def test_rl2_mujoco_trial_renders_headless_and_replays_the_evaluation(tmp_path):
    """RL² on HalfCheetahVel (10-step episodes): one trial of steps + 1 episodes with the hidden state
    carried; the evaluation ran on the native sampler, the replay on Gymnasium with a renderer."""
    overrides = ["agent.tasks_per_batch=2", "agent.hidden_size=16", "sampler.workers=0",
                 "env_kwargs.max_episode_steps=10"]
    config = load_config(RL2, overrides)
    sampler, agent = build_agent(config)
    try:
        assert sampler.backend == "native"
        tasks = sampler.family.sample_tasks(2, "test")
        result = agent.evaluate_adaptation(tasks, 2, 1, seed=3)
        (plan,) = agent.adaptation_rollouts(tasks[:1], 2, 1, seed=3)
        assert plan.stages == (0, 1, 2) and plan.episodes == 3
        episodes = record(sampler.env_id, config.env_kwargs, tasks[0], 0, plan, {0, 2}, size=(64, 48))
        assert [e.stage for e in episodes] == [0, 2]
        for e in episodes:
            assert e.episode_return == pytest.approx(result.returns[0, e.stage], rel=1e-4)
            assert len(e.frames) == 11 and e.frames[0].shape == (48, 64, 3) and e.frames[0].dtype == np.uint8
            frame = e.frames[-1].astype(float)
            assert frame.std() > 20 and len(np.unique(e.frames[-1].reshape(-1, 3), axis=0)) > 50  # a scene, not blank
        assert not np.array_equal(episodes[0].frames[0], episodes[0].frames[-1])  # the robot moved

        # write_videos: HalfCheetah runs at 20 Hz; at 10 fps every other frame is kept (11 -> 6)
        paths = write_videos(sampler.env_id, config.env_kwargs, tasks[:1], [plan], 2, tmp_path, size=(64, 48), fps=10)
        assert sorted(p.name for p in paths) == sorted(f"task0_{n}.{x}" for n in ("after", "before", "before_after")
                                                       for x in ("gif", "mp4"))
        with Image.open(tmp_path / "task0_before.gif") as gif:
            assert gif.info["duration"] == 100
        assert len(_frames(tmp_path / "task0_after.gif")) == 6
        mp4 = _mp4(tmp_path / "task0_after.mp4")  # the same 6 frames, 64x48, 10 fps
        assert mp4["frames"] == 6 and mp4["size"] == (64, 48) and mp4["fps"] == 10
    finally:
        sampler.close()


def test_point_nav_draws_goal_and_path():
    env = metarl.make_family("PointNav2D", render_mode="rgb_array", width=80, height=60)
    family = metarl.family_of(env)
    family.set_task(metarl.GoalTask("PointNav2D", (0.4, 0.0)))
    env.reset(seed=0)
    first = env.render()
    assert first.shape == (60, 80, 3) and first.dtype == np.uint8
    green = (first[..., 1] > 150) & (first[..., 0] < 80) & (first[..., 2] < 100)
    cols = np.nonzero(green)[1]
    assert green.any() and cols.mean() > 40  # the goal is right of the centre
    for _ in range(5):
        env.step(np.array([0.0, 0.1], np.float32))
    assert not np.array_equal(first, env.render())
    assert metarl.make_family("PointNav2D").unwrapped.render() is None  # no render mode: nothing drawn
    env.close()


def test_frame_plan_and_gif_timing():
    assert frame_plan(125.0, None) == (5, 25.0)  # Hopper: every 5th frame at 25 fps is real time
    assert frame_plan(20.0, None) == (1, 20.0)
    assert frame_plan(20.0, 10) == (2, 10.0)
    assert frame_plan(None, None) == (1, 20.0)
    gif = encode_gif([np.full((8, 8, 3), v, np.uint8) for v in (0, 128, 255)], fps=20)
    with Image.open(io.BytesIO(gif)) as image:
        assert image.n_frames == 3 and image.info["duration"] == 50


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--fps", "10"], "--fps needs --video"),
        (["--video", "--fps", "0"], "--fps must be between"),
        (["--video", "--video-size", "big"], "--video-size must be WIDTHxHEIGHT"),
        (["--video", "--video-tasks", "5", "--tasks", "3"], "--video-tasks (5) must be at most"),
        (["--video", "--steps", "0"], "--steps >= 1"),
    ],
)
def test_bad_video_options_are_one_line_exit_2(run_dir, capsys, extra, message):
    assert main(["eval", str(run_dir), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


# Gymnasium's viewer, whose OpenGL context was never made, fails again in __del__ (ignored by Python)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_renderer_is_one_clear_error(monkeypatch, tmp_path):
    sampler, agent = build_agent(load_config(RL2, ["agent.hidden_size=8", "sampler.workers=0",
                                                   "env_kwargs.max_episode_steps=3"]))
    monkeypatch.setenv("MUJOCO_GL", "no-such-backend")  # after `import mujoco`, which refuses such a value
    try:
        tasks = sampler.family.sample_tasks(1, "test")
        plans = agent.adaptation_rollouts(tasks, 1, 1, seed=0)
        with pytest.raises(VideoError, match="MUJOCO_GL='no-such-backend'") as info:
            write_videos(sampler.env_id, {"max_episode_steps": 3}, tasks, plans, 1, tmp_path)
        message = str(info.value)
        assert len(message.splitlines()) == 1
        works = working_gl()  # the error names a backend that works here, or the packages to install
        assert f"MUJOCO_GL={works} works on this machine" in message if works else "apt-get install libegl1" in message
        del info
        gc.collect()  # the half-made viewer goes now, under this test's warning filter
    finally:
        sampler.close()


def test_the_gl_probe_says_what_fails():
    problem = probe_gl("no-such-backend")
    assert problem is not None and len(problem.splitlines()) == 1 and "no-such-backend" in problem
    assert probe_gl("egl") is None or working_gl() != "egl"


def test_env_without_rgb_array_rendering_is_refused_before_any_work():
    import gymnasium as gym

    from metarl.envs import PointNav2D
    from metarl.video import check_renderable

    class Blind(PointNav2D):
        metadata = {"render_modes": []}

    if "tests/BlindPointNav-v0" not in gym.registry:
        gym.register("tests/BlindPointNav-v0", entry_point=Blind, max_episode_steps=5)
    with pytest.raises(VideoError, match=r"tests/BlindPointNav-v0 cannot be rendered to video: its render modes are \[\]"):
        check_renderable("tests/BlindPointNav-v0", {})
    assert check_renderable("metarl/PointNav2D-v0", {}) == 20.0
