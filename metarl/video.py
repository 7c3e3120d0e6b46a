"""Videos of adaptation: held-out episodes before and after adaptation, rendered off-screen.

`metarl eval RUN_DIR --video` replays, for the first few tasks of the evaluation, the episode the
meta-learned policy produced before adaptation (stage 0) and the one after the last adaptation stage, in
one env made with ``render_mode="rgb_array"``, and writes animated GIFs (Pillow; no ffmpeg needed) to
``RUN_DIR/eval/<split>/video/`` and to TensorBoard (``eval/<split>/video/task<j>``, Images tab).

*What is shown is what was evaluated.* The agent's adaptation primitive runs as the evaluation runs it,
and each of its sampler calls is recorded as a `metarl.agent.StageRollout` (the actor, the episodes per task
and the seed of that call; ``agent.adaptation_rollouts(tasks, steps, episodes, seed)``). The renderer runs the sampler's own
`metarl.sampling.rollout` loop with those arguments on one task, with the same env seeds, action noise
and action clipping, and renders its first slot: the frames are episode 0 of that task at that stage, with
the return the evaluation counted (up to float rounding where batch sizes differ). For MAML the
"after" actor is the policy after the evaluation's gradient steps on that task's own episodes; for RL² the
trial of ``steps + 1`` episodes runs continuously with the hidden state carried, and its first and last
episodes are shown.

Headless rendering: MuJoCo renders through OpenGL and picks the backend from the ``MUJOCO_GL``
environment variable (``egl``, ``osmesa`` or ``glfw``). ``glfw`` needs a display, so on a Linux machine
without one `configure_gl` sets ``MUJOCO_GL=egl`` unless the user chose a backend; the CLI calls it
before anything imports ``mujoco`` (``import mujoco`` binds ``mujoco.GLContext`` to the backend named
then, and the EGL backend must also choose PyOpenGL's platform before PyOpenGL is first imported).
Gymnasium reads ``MUJOCO_GL`` again when it makes its renderer, so calling it later in a process that has
imported ``mujoco`` but not PyOpenGL still works. From Python, set ``MUJOCO_GL=egl`` in the environment
(or call `configure_gl` first).
"""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from metarl.agent import StageRollout
from metarl.sampling import GymSlots, rollout
from metarl.system import atomic_write
from metarl.tasks import Task

MAX_DEFAULT_FPS = 25  # default playback rate cap; faster envs (Hopper: 125 Hz) drop frames to stay real time


class VideoError(RuntimeError):
    """A video cannot be made here (no off-screen renderer, an env without ``rgb_array`` rendering)."""


@dataclasses.dataclass
class RenderedEpisode:
    stage: int
    frames: list[np.ndarray]
    episode_return: float
    length: int


#: the Debian/Ubuntu packages each off-screen OpenGL backend of MuJoCo needs
GL_PACKAGES = {"egl": "libegl1 libegl-mesa0", "osmesa": "libosmesa6"}
GL_HINT = ("off-screen rendering needs EGL (Debian/Ubuntu: apt-get install libegl1 libegl-mesa0) or OSMesa "
           "(apt-get install libosmesa6, then MUJOCO_GL=osmesa); bash scripts/setup.sh checks for them")


def probe_gl(backend: str, timeout: float = 60.0) -> str | None:
    """None where MuJoCo makes an off-screen OpenGL context with ``MUJOCO_GL=backend``, else the error's last
    line. Checked in a fresh interpreter: ``import mujoco`` binds the backend named then."""
    code = "import mujoco; c = mujoco.GLContext(64, 64); c.make_current(); c.free()"
    env = {k: v for k, v in os.environ.items() if k != "PYOPENGL_PLATFORM"}  # mujoco sets it for the backend
    try:
        out = subprocess.run([sys.executable, "-c", code], env={**env, "MUJOCO_GL": backend}, capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"no context after {timeout:.0f} s"
    if out.returncode == 0:
        return None
    lines = out.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit code {out.returncode}"


def working_gl() -> str | None:
    """The first off-screen backend (egl, then osmesa) MuJoCo renders with here, or None."""
    return next((b for b in GL_PACKAGES if probe_gl(b) is None), None)


def configure_gl() -> str | None:
    """Default ``MUJOCO_GL`` to ``egl`` on a Linux machine without a display, unless it is set.

    Call before ``mujoco`` is imported (see the module docstring); returns the value in effect.
    """
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("MUJOCO_GL", "egl")
    return os.environ.get("MUJOCO_GL")


class _RenderingSlots(GymSlots):
    """The sampler's Gymnasium env slots, with slot 0 made with ``render_mode="rgb_array"``: it records
    one frame after every reset and step of the episodes (of its trial) listed in ``keep``."""

    def __init__(self, env_id: str, env_kwargs: dict[str, Any], size: tuple[int, int], keep: set[int]):
        width, height = size
        try:
            super().__init__(env_id, {**env_kwargs, "render_mode": "rgb_array", "width": width, "height": height})
        except TypeError:  # an env that renders but takes no width/height: frames are resized instead
            super().__init__(env_id, {**env_kwargs, "render_mode": "rgb_array"})
        self.env_kwargs = dict(env_kwargs)  # the other slots (same task, other trials) do not render
        self.size, self.keep = (int(width), int(height)), set(keep)
        self.episodes: list[list[np.ndarray]] = []  # frames of slot 0, one list per episode of its trial
        self._rendered_once = False

    def reset(self, s: int, seed: int) -> np.ndarray:
        obs = super().reset(s, seed)
        if s == 0:
            self.episodes.append([])
            self._record()
        return obs

    def step(self, idx: np.ndarray, actions: np.ndarray):
        out = super().step(idx, actions)
        if len(idx) and idx[0] == 0:
            self._record()
        return out

    def _record(self) -> None:
        if len(self.episodes) - 1 not in self.keep:
            return
        env = self.envs[0]
        if not self._rendered_once:  # the first render makes the renderer: fail here with a clear message
            try:
                env.render()
            except Exception as exc:
                message = f"{type(exc).__name__}: " + (str(exc).strip().splitlines() or [""])[0]
                if getattr(env.unwrapped, "mujoco_renderer", None) is None:  # not MuJoCo: the env's own error
                    raise VideoError(f"cannot render {self.env_id}: {message}") from exc
                works = working_gl()
                fix = (f"MUJOCO_GL={works} works on this machine: set it" if works else GL_HINT)
                raise VideoError(
                    f"cannot render {self.env_id} off-screen (MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}): "
                    f"{message}; {fix}") from exc
            self._rendered_once = True
        _follow_robot(env.unwrapped)
        frame = np.asarray(env.render())
        if frame.ndim != 3 or frame.shape[2] < 3:
            raise VideoError(f"{self.env_id}: render() returned an array of shape {frame.shape}, not an RGB image")
        frame = np.ascontiguousarray(frame[..., :3], dtype=np.uint8)
        if (frame.shape[1], frame.shape[0]) != self.size:
            from PIL import Image

            frame = np.asarray(Image.fromarray(frame).resize(self.size, Image.Resampling.BILINEAR))
        self.episodes[-1].append(frame)


def _follow_robot(env: Any) -> None:
    """Keep a MuJoCo robot in view: Gymnasium's locomotion envs render from a free camera that stays where
    the robot started. Moves the camera's look-at point (x, y) to the root body; height, distance and
    angles stay as the env configured them."""
    renderer = getattr(env, "mujoco_renderer", None)
    viewer = getattr(renderer, "viewer", None)
    data = getattr(env, "data", None)
    if viewer is None or data is None or env.model.nbody < 2:
        return
    if getattr(renderer, "camera_id", -1) not in (-1, None):  # a fixed camera of the model: leave it
        return
    viewer.cam.lookat[:2] = data.xpos[1][:2]


def check_renderable(env_id: str, env_kwargs: dict[str, Any]) -> float | None:
    """Raise `VideoError` unless ``env_id`` declares the ``rgb_array`` render mode; returns its frame rate
    (``metadata["render_fps"]``, None if it states none)."""
    probe = gym.make(env_id, **env_kwargs)
    try:
        modes = list(probe.metadata.get("render_modes") or [])
        fps = probe.metadata.get("render_fps")
    finally:
        probe.close()
    if "rgb_array" not in modes:
        raise VideoError(f"{env_id} cannot be rendered to video: its render modes are {modes} (needs 'rgb_array')")
    return float(fps) if fps else None


def record(env_id: str, env_kwargs: dict[str, Any], task: Task, task_index: int, plan: StageRollout,
           stages: set[int], size: tuple[int, int] = (320, 240)) -> list[RenderedEpisode]:
    """Replay ``plan`` on one task (``task_index``: its index in the evaluation's task list, which seeds its
    episodes and noise) and render the episodes of its first trial that show one of ``stages``."""
    keep = {k for k, stage in enumerate(plan.stages) if stage in stages}
    if not keep:
        return []
    slots = _RenderingSlots(env_id, env_kwargs, size, keep)
    try:
        out = rollout(slots, plan.actor, [task], [task_index], plan.episodes, plan.seed,
                      episodes_per_trial=len(plan.stages))
    finally:
        slots.close()
    rewards = out["rewards"][0].astype(np.float64) * out["mask"][0]
    return [RenderedEpisode(stage=plan.stages[k], frames=slots.episodes[k], episode_return=float(rewards[k].sum()),
                            length=int(out["mask"][0, k].sum())) for k in sorted(keep)]


def caption(frames: Sequence[np.ndarray], lines: Sequence[str]) -> list[np.ndarray]:
    """The frames with ``lines`` of text in a dark band across the top."""
    from PIL import Image, ImageDraw, ImageFont

    if not frames:
        return []
    h, w = frames[0].shape[:2]
    size = max(10, min(16, h // 14))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    band = Image.new("RGBA", (w, (size + 3) * len(lines) + 4), (0, 0, 0, 170))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((4, 2 + i * (size + 3)), line, fill=(255, 255, 255, 255), font=font)
    out = []
    for frame in frames:
        image = Image.fromarray(frame).convert("RGBA")
        image.alpha_composite(band)
        out.append(np.asarray(image.convert("RGB")))
    return out


def side_by_side(left: Sequence[np.ndarray], right: Sequence[np.ndarray], gap: int = 4) -> list[np.ndarray]:
    """Frames of two clips next to each other; the shorter clip holds its last frame."""
    n = max(len(left), len(right))
    h = max(left[0].shape[0], right[0].shape[0])
    out = []
    for t in range(n):
        a, b = left[min(t, len(left) - 1)], right[min(t, len(right) - 1)]
        canvas = np.full((h, a.shape[1] + gap + b.shape[1], 3), 255, np.uint8)
        canvas[: a.shape[0], : a.shape[1]] = a
        canvas[: b.shape[0], a.shape[1] + gap:] = b
        out.append(canvas)
    return out


def write_mp4(frames: Sequence[np.ndarray], fps: float, path: str | Path) -> Path:
    """An H.264 MP4 of ``frames`` (``[H, W, 3]`` uint8) at ``fps`` frames per second, through the ffmpeg that
    imageio-ffmpeg ships; odd sizes are padded by a black row or column (H.264's 4:2:0 needs even ones).
    Written beside ``path`` and renamed into place."""
    import imageio_ffmpeg

    if not frames:
        raise ValueError("write_mp4: no frames")
    h, w = frames[0].shape[:2]
    H, W = h + h % 2, w + w % 2
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    writer = imageio_ffmpeg.write_frames(str(tmp), (W, H), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                         macro_block_size=1, quality=None, output_params=["-crf", "20"],
                                         ffmpeg_log_level="error")
    writer.send(None)
    try:
        for frame in frames:
            padded = np.zeros((H, W, 3), np.uint8)
            padded[:h, :w] = np.asarray(frame, dtype=np.uint8)[..., :3]
            writer.send(padded)
    finally:
        writer.close()
    os.replace(tmp, path)
    return path


def encode_gif(frames: Sequence[np.ndarray], fps: float) -> bytes:
    """An endlessly looping animated GIF of ``frames`` (``[H, W, 3]`` uint8) at ``fps`` frames per second.

    One 255-colour palette, taken from the first, middle and last frames, serves every frame, so colours do
    not flicker and Pillow stores only the part of each frame that changed."""
    from PIL import Image

    if not frames:
        raise ValueError("encode_gif: no frames")
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    probe = [images[0], images[len(images) // 2], images[-1]]
    strip = Image.new("RGB", (probe[0].width, probe[0].height * len(probe)))
    for i, image in enumerate(probe):
        strip.paste(image, (0, i * probe[0].height))
    palette = strip.quantize(colors=255, method=Image.Quantize.MEDIANCUT)
    indexed = [image.quantize(palette=palette, dither=Image.Dither.NONE) for image in images]
    buf = io.BytesIO()
    indexed[0].save(buf, format="GIF", save_all=True, append_images=indexed[1:], duration=round(1000 / fps),
                    loop=0, optimize=False)
    return buf.getvalue()


def gif_summary(tag: str, gif: bytes, height: int, width: int) -> Any:
    """A TensorBoard image summary holding an animated GIF (what ``SummaryWriter.add_video`` writes,
    without its moviepy dependency); the Images dashboard plays it."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def task_label(task: Task) -> str:
    """A short description of a task's scalar parameters (empty for high-dimensional ones)."""
    parts = []
    for key, value in task.params().items():
        if isinstance(value, (int, float)):
            parts.append(f"{key} {value:.2f}")
        elif isinstance(value, tuple) and 0 < len(value) <= 3 and all(isinstance(v, (int, float)) for v in value):
            parts.append(f"{key} (" + ", ".join(f"{v:.2f}" for v in value) + ")")
    return ", ".join(parts)


def frame_plan(env_fps: float | None, fps: float | None) -> tuple[int, float]:
    """``(stride, fps)``: keep every ``stride``-th frame and play at ``fps``, so the video runs at about real
    time. Default fps: the env's rate, at most `MAX_DEFAULT_FPS`; an env without a rate plays at 20."""
    if fps is None:
        fps = min(env_fps, MAX_DEFAULT_FPS) if env_fps else 20.0
    stride = max(1, round(env_fps / fps)) if env_fps else 1
    return stride, float(fps)


def write_videos(env_id: str, env_kwargs: dict[str, Any], tasks: Sequence[Task], plans: Sequence[StageRollout],
                 steps: int, out_dir: str | Path, size: tuple[int, int] = (320, 240), fps: float | None = None,
                 writer: Any = None, global_step: int = 0, tag: str = "eval/video",
                 verbose: bool = False) -> list[Path]:
    """Render stage 0 and stage ``steps`` of ``plans`` on each of ``tasks`` (task ``j`` is index ``j`` of
    the evaluation) and write ``task<j>_before.gif``, ``task<j>_after.gif`` and ``task<j>_before_after.gif``
    (the two side by side) into ``out_dir``, each with an MP4 of the same frames beside it (``.mp4``); with a TensorBoard ``writer``, log the side-by-side clip as
    ``<tag>/task<j>`` at ``global_step``. Returns the paths written."""
    if steps < 1:
        raise VideoError("a video needs at least one adaptation stage (--steps >= 1) to show before and after")
    for stage in (0, steps):
        if not any(stage in plan.stages for plan in plans):
            raise VideoError(f"the agent's adaptation rollouts do not include stage {stage}")
    env_fps = check_renderable(env_id, env_kwargs)
    stride, fps = frame_plan(env_fps, fps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for j, task in enumerate(tasks):
        shown: dict[int, RenderedEpisode] = {}
        for plan in plans:
            for episode in record(env_id, env_kwargs, task, j, plan, {0, steps} - set(shown), size):
                shown[episode.stage] = episode
        label = task_label(task)
        clips = {}
        for name, stage in (("before", 0), ("after", steps)):
            episode = shown[stage]
            lines = [f"task {j}" + (f" ({label})" if label else "") + f", stage {stage}",
                     f"{name} adaptation: return {episode.episode_return:.1f}"]
            clips[name] = caption(episode.frames[::stride], lines)
        clips["before_after"] = side_by_side(clips["before"], clips["after"])
        for name, frames in clips.items():
            gif = encode_gif(frames, fps)
            path = out / f"task{j}_{name}.gif"
            atomic_write(path, gif)
            written += [path, write_mp4(frames, fps, path.with_suffix(".mp4"))]
            if writer is not None and name == "before_after":
                h, w = frames[0].shape[:2]
                writer.file_writer.add_summary(gif_summary(f"{tag}/task{j}", gif, h, w), global_step)
        if verbose:
            print(f"  task {j}: return {shown[0].episode_return:.1f} before, {shown[steps].episode_return:.1f} after "
                  f"-> {out / f'task{j}_before_after.gif'}", flush=True)
    if writer is not None:
        writer.flush()
    return written
