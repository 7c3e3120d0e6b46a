"""The comments of the shipped configs, suites and sweeps say what a file runs and where its settings come from.

A header is at most five comment lines (the family, the agent, the essential setting, the settings' source and
the docs page that explains them); results, measured figures and their history belong in the docs and in
experiments/results/, where they are checked against the result files, not in comments that nothing checks.
"""

import re
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
MAX_HEADER_LINES = 5
# a percentage, or a phrase that narrates what a run reached or used to do
RESULT_LIKE = re.compile(r"\d+(\.\d+)?\s*%|learned nothing|did not (adapt|learn)|\breach(es|ed)\b|\bmeasured\b"
                         r"|\bwas\b|\bwere\b", re.IGNORECASE)


def shipped_yaml() -> list[Path]:
    return sorted(p for p in EXPERIMENTS.rglob("*.yaml")
                  if "results" not in p.relative_to(EXPERIMENTS).parts and p.name != "manifest.yaml")


def comments(text: str) -> list[str]:
    """Every comment of a YAML text: whole-line comments and the end-of-line comments after a value."""
    found = []
    for line in text.splitlines():
        match = re.search(r"(?:^|\s)#(.*)$", line)
        if match:
            found.append(match.group(1))
    return found


def header_problems(text: str) -> list[str]:
    """What is wrong with a config's comments: a leading comment block over MAX_HEADER_LINES lines, and each
    comment that reads like a result."""
    lines = text.splitlines()
    header = 0
    while header < len(lines) and lines[header].lstrip().startswith("#"):
        header += 1
    problems = [f"a header of {header} comment lines (at most {MAX_HEADER_LINES})"] if header > MAX_HEADER_LINES else []
    for comment in comments(text):
        match = RESULT_LIKE.search(comment)
        if match:
            problems.append(f"a result-like comment ({match.group(0)!r}): {comment.strip()[:80]}")
    return problems


OLD_STYLE = """\
# RL² on AntDir with VariBAD's RL² (lmzintgraf/varibad; docs/anchors.md, "RL² settings"): its hyperparameters
# (GRU 128, 2 episodes per trial, 16 tasks x 2 trials = 64 episodes per update, lr 7e-4, clip 0.1, 2 epochs,
# 4 minibatches, gamma 0.97, GAE lambda 0.9, entropy 0.01) and its input path and losses (each input embedded
# by its own ReLU layer: state + done 32, action 16, reward 16; the raw previous reward as input while PPO
# learns from normalised rewards; 128-unit tanh actor and critic heads after an orthogonal GRU; Huber value
# loss, clipped). These adapt in context on HalfCheetahVel and HalfCheetahDir and learn AntDir here; the agent's
# defaults (one tanh input layer, reward scaled by the return's std, linear heads) learned nothing in context
experiment: rl2/ant_dir
"""


@pytest.mark.parametrize(("text", "expected"), [
    (OLD_STYLE, ["a header of 7", "learned nothing"]),
    ("# PEARL on PointNav2D.\nagent:\n  update_threads: 1   # measured 5-10x faster than 2 threads\n", ["measured"]),
    ("# MAML-TRPO on PointNav2D: the one-step gain was 27% after 100 iterations.\nseed: 0\n", ["27%", "was"]),
    ("# MAML-TRPO on PointNav2D (goal ~ U[-0.5, 0.5]^2), action_scale 0.1.\n# Options: docs/agents.md.\n"
     "seed: 0   # the run's seed\n", []),
])
def test_the_header_check_catches_long_headers_and_results(text, expected):
    problems = " ".join(header_problems(text))
    for needle in expected:
        assert needle in problems, (needle, problems)
    assert bool(problems) == bool(expected), problems


@pytest.mark.parametrize("path", shipped_yaml(), ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_config_headers_are_short_and_carry_no_results(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#"), f"{path}: no header saying what the file runs"
    assert not header_problems(text), f"{path.relative_to(EXPERIMENTS)}: {header_problems(text)}"
