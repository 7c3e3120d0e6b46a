"""MAML-TRPO ablation: the differences found between metarl's first settings and the anchors' (the
issue on reproducing MAML; docs/reproducing.md), each alone and combined, on PointNav2D at 150 iterations.

    python experiments/benchmarks/maml_ablation.py                 # run what is missing, then print the table
    python experiments/benchmarks/maml_ablation.py --only mean     # one variant (resumable: rerun to continue)
    python experiments/benchmarks/maml_ablation.py --table-only    # the table from the files already written

Every variant is the shipped config (experiments/maml_trpo/point_nav_2d.yaml: action_scale 0.1, summed
log-probs, (64, 64) tanh, 20 tasks x 20 episodes, line search x0.8) with the overrides listed below, seed 0,
run by learning.py into ``experiments/results/ablation_point_nav/<name>_150.json``; a finished file is read
back, not rerun. The table gives, per variant, the held-out return before adaptation and after one step at
iteration 150, the one-step gain with its paired 95% CI over the 40 test goals and as a share of stage 0's
return, and that share at iterations 50 and 100 (from the run's held-out curve), so a gain that only holds
early shows. A killed variant continues from its run folder's checkpoint when its folder holds the same
config; a folder of other settings is left alone and the variant starts afresh. Written to
``experiments/results/ablation_point_nav/table.md`` as well.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from metarl.system import atomic_write

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "experiments" / "results" / "ablation_point_nav"
CONFIG = ROOT / "experiments" / "maml_trpo" / "point_nav_2d.yaml"
ITERATIONS = 150
L2L = ["agent.log_prob_reduction=mean", "agent.hidden=[100,100]", "agent.activation=relu", "agent.ls_backtrack=0.5",
       "agent.tasks_per_batch=40"]  # learn2learn's Xavier init is already the default

# name -> (what differs from the shipped config, overrides)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "shipped": ("shipped config (action scale 0.1)", []),
    "no_action_scale": ("action scale 1 (metarl's first setting: σ = 1 in env units)", ["agent.action_scale=1.0"]),
    "mean": ("log-probs and KLs averaged over action dims", ["agent.log_prob_reduction=mean"]),
    "mean_no_action_scale": ("mean reduction, action scale 1", ["agent.log_prob_reduction=mean",
                                                                "agent.action_scale=1.0"]),
    "relu_100": ("(100, 100) ReLU policy", ["agent.hidden=[100,100]", "agent.activation=relu"]),
    "tasks_40": ("40 tasks per meta-batch", ["agent.tasks_per_batch=40"]),
    "inner_max_kl_5": ("inner step bounded to KL 5 per task", ["agent.inner_max_kl=5.0"]),
    "lvc": ("ProMP's LVC inner objective (the sampling term in the meta-gradient)", ["agent.inner_objective=lvc"]),
    "fisher_subsample_4": ("curvature from every 4th episode (`fisher_subsample` 4; the meta-gradient exact)",
                           ["agent.fisher_subsample=4"]),
    "l2l_combined": ("all of learn2learn's: mean, (100, 100) ReLU, line search x0.5, 40 tasks", L2L),
    "l2l_no_action_scale": ("learn2learn's as it is (the above with action scale 1)", [*L2L, "agent.action_scale=1.0"]),
}


def out_file(name: str) -> Path:
    return OUT / f"{name}_{ITERATIONS}.json"


def run(name: str) -> None:
    from metarl.config import load_config
    from metarl.runfolder import load_run_config

    what, overrides = VARIANTS[name]
    overrides = [*overrides, f"iterations={ITERATIONS}", f"experiment=ablation_point_nav/{name}_{ITERATIONS}"]
    note = f"ablation: {what}"
    script = str(ROOT / "experiments" / "benchmarks" / "learning.py")
    cmd = [sys.executable, script, str(CONFIG), *overrides, "--out", str(out_file(name)), "--note", note]
    config = load_config(str(CONFIG), overrides)
    root = ROOT / config.run_root / config.experiment
    same = [p for p in sorted(root.iterdir()) if (p / "config.yaml").is_file()
            and {**load_run_config(p).to_dict(), "run_root": None} == {**config.to_dict(), "run_root": None}] \
        if root.is_dir() else []
    if same:  # a killed run of these settings continues from its checkpoint
        cmd = [sys.executable, script, "--resume", str(same[-1]), f"iterations={ITERATIONS}",
               "--out", str(out_file(name)), "--note", note]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    if same:  # the resumed file says which variant it is, as a fresh one would
        result = json.loads(out_file(name).read_text())
        result["overrides"] = overrides
        result["resumed"] = True  # wall_time_s is the resumed part's; train_time_s is whole
        atomic_write(out_file(name), json.dumps(result, indent=2) + "\n")


def row(name: str) -> str:
    what, _ = VARIANTS[name]
    result = json.loads(out_file(name).read_text())
    stages = result["heldout"]["stages"]
    pre, one = stages[0], stages[1]
    curve = {e["iteration"]: e["stages"] for e in result["heldout_curve"]}

    def share(s: list[dict]) -> str:  # the one-step gain as a share of |stage 0's return|
        return f"{(s[1]['mean_return'] - s[0]['mean_return']) / abs(s[0]['mean_return']) * 100:.0f}%"

    def share_at(it: int) -> str:
        return share(curve[it]) if it in curve else "–"

    gain = f"{one['gain']:+.1f} [{one['gain_ci95'][0]:+.1f}, {one['gain_ci95'][1]:+.1f}]"
    steps = result["env_steps"] / 1e6
    return (f"| {what} | {pre['mean_return']:.1f} | **{one['mean_return']:.1f}** | {gain} ({share(stages)}) | "
            f"{share_at(50)} / {share_at(100)} | {stages[-1]['mean_return']:.1f} | {steps:.1f}M |")


def table() -> str:
    # share: the one-step gain as a share of |stage 0's return|, at iteration 150 (in brackets after the gain)
    # and at 50 and 100 (from the held-out curve)
    head = ("| PointNav2D, seed 0, 150 iterations | before | after 1 step | one-step gain [paired 95% CI] (share) | "
            "share at it. 50 / 100 | after 3 steps | env steps |\n|---|---|---|---|---|---|---|")
    rows = [row(n) for n in VARIANTS if out_file(n).is_file()]
    return "\n".join([head, *rows]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="run only these variants")
    parser.add_argument("--table-only", action="store_true", help="print the table of the files already written")
    args = parser.parse_args()
    if not args.table_only:
        for name in args.only or VARIANTS:
            if not out_file(name).is_file():
                run(name)
    text = table()
    atomic_write(OUT / "table.md", text)
    print(text)


if __name__ == "__main__":
    main()
