"""mkdocs hook: serve the committed result figures from where the benchmarks write them.

The pages show figures that live in ``experiments/results/`` (rewritten whenever a benchmark is rerun), so
they are added to the site from there instead of being copied into ``docs/``, where a copy would go
stale. A page links them by their repository path, e.g. ``experiments/results/quick/curves_PointNav2D.png``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
FIGURES = [
    "experiments/results/quick/curves_PointNav2D.png",
    "experiments/results/videos/maml_point_nav_2d.gif",
    "experiments/results/videos/maml_half_cheetah_vel_quick.gif",
    "experiments/results/rl2_vs_multitask/curves_HalfCheetahDir.png",
    "experiments/results/rl2_half_cheetah_vel_varibad_within_episode.png",
    "experiments/results/sweeps/point_nav_task_diversity/sensitivity.png",
    "experiments/results/sweeps/maml_point_nav_sensitivity/sensitivity.png",
]


def on_files(files, config):
    for path in FIGURES:
        files.append(File.generated(config, path, abs_src_path=str(ROOT / path)))
    return files
