"""Whether a trained RL² policy infers its task from the rewards it observes, or acts the same on every task.

    python experiments/benchmarks/rl2_reward_ablation.py RUN_DIR [--split test] [--tasks 50] [--episodes 1]
        [--out FILE.json]

RL² adapts by reading, as inputs, the rewards of the trial so far. On a family whose rewards are dense (Meta-World's
reach: the closer the hand to the hidden goal, the higher the reward), that adaptation can happen inside the first
episode, so the evaluator's stages (one per episode of the trial) can all read the same: flat across episodes, yet
adapted. This script separates the two by running the same policy, from the same initial state, on the same tasks,
with its reward input changed and nothing else:

* ``reward``: the reward the env gives (what the policy was trained on);
* ``other_task``: the reward stream that another task of the list produced under ``reward`` (task i gets task
  i+1's, step by step), of the same size and shape but about another goal;
* ``zero``: 0 at every step.

Each condition runs ``--episodes`` consecutive episodes (one trial, the hidden state carried) in each of the first
``--tasks`` tasks of ``--split``, all tasks at once as one batch, the policy's actions sampled (as in training) with
the same seed in every condition (``--deterministic``: the mean action). Success (any step's ``info["success"]``) and the return are those of the env's
true rewards in every condition. A policy that reads the reward succeeds more under ``reward`` than under the
other two; a task-blind policy succeeds equally often under all three. The result file carries its provenance.
"""

from __future__ import annotations

from metarl.system import sleeping_openmp_threads

sleeping_openmp_threads()  # a program: PyTorch's threads sleep while they wait (set before torch loads)

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

import metarl
import metarl.api
from metarl.evaluation import bootstrap_ci
from metarl.provenance import Recorder, write_result

CONDITIONS = ("reward", "other_task", "zero")


def _env(learner: metarl.api.MetaLearner) -> Any:
    """A fresh env of the run's family, as its config makes it."""
    return metarl.make_family(learner.config.env, **(learner.config.env_kwargs or {}))


def run(learner: metarl.api.MetaLearner, tasks: list, episodes: int, condition: str, seed: int,
        streams: np.ndarray | None, deterministic: bool = False) -> dict[str, np.ndarray]:
    """``episodes`` episodes in each task, all tasks one batch: success and returns ``[tasks, episodes]``, and the
    rewards the policy read ``[tasks, episodes, horizon]``. ``streams``: what ``"reward"`` gave (for
    ``"other_task"``)."""
    envs = []
    for task in tasks:
        env = _env(learner)
        metarl.family_of(env).set_task(task)
        envs.append(env)
    horizon = envs[0].spec.max_episode_steps
    n = len(tasks)
    success = np.zeros((n, episodes), bool)
    returns = np.zeros((n, episodes))
    given = np.zeros((n, episodes, horizon), np.float32)
    torch.manual_seed(seed)
    policy = learner.adapt_on([], seed=seed)
    for k in range(episodes):
        obs = np.stack([env.reset(seed=seed + k)[0] for env in envs])
        for t in range(horizon):
            actions = policy.sample(obs, deterministic).action
            steps = [env.step(a) for env, a in zip(envs, actions, strict=True)]
            obs = np.stack([s[0] for s in steps])
            rewards = np.array([s[1] for s in steps], np.float32)
            done = np.array([s[2] or s[3] for s in steps])
            success[:, k] |= np.array([bool(s[4].get("success", 0.0)) for s in steps])
            returns[:, k] += rewards
            if condition == "reward":
                shown = rewards
            elif condition == "zero":
                shown = np.zeros_like(rewards)
            else:
                shown = np.roll(streams[:, k, t], -1)  # task i sees what task i+1 received
            given[:, k, t] = shown
            policy.observe(shown, done)
            if done.all():
                break
            if done.any():
                raise RuntimeError("the tasks' episodes ended at different steps; this script needs a fixed horizon")
    for env in envs:
        env.close()
    return {"success": success, "returns": returns, "given": given}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--split", default="test")
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--episodes", type=int, default=1, help="episodes per trial (default 1: the first episode)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deterministic", action="store_true", help="the policy's mean action (default: sampled)")
    parser.add_argument("--out", default=None, help="default: RUN_DIR/rl2_reward_ablation.json")
    args = parser.parse_args()
    if args.tasks < 2 or args.episodes < 1:
        parser.error("--tasks must be >= 2 (other_task shows task i+1's rewards) and --episodes >= 1")

    recorder = Recorder()
    learner = metarl.api.load(args.run_dir)
    if learner.name != "rl2":
        parser.error(f"{args.run_dir} is a {learner.name} run; this ablation is of RL²'s reward input")
    probe = _env(learner)
    family = metarl.family_of(probe)
    tasks = list(family.heldout_tasks(args.split) if args.split != "train" else family.sample_tasks(args.tasks, "train"))
    tasks = tasks[: args.tasks]
    probe.close()
    rows, streams = {}, None
    for condition in CONDITIONS:
        out = run(learner, tasks, args.episodes, condition, args.seed, streams, args.deterministic)
        if condition == "reward":
            streams = out["given"]
        per_task = out["success"].mean(axis=1)
        rows[condition] = {"success_rate": round(float(per_task.mean()), 4),
                           "success_ci95": [round(float(x), 4) for x in bootstrap_ci(per_task)],
                           "success_by_episode": [round(float(x), 4) for x in out["success"].mean(axis=0)],
                           "mean_return": round(float(out["returns"].mean()), 1),
                           "return_ci95": [round(float(x), 1) for x in bootstrap_ci(out["returns"].mean(axis=1))]}
        print(f"{condition:<11} success {rows[condition]['success_rate']:.2f} {rows[condition]['success_ci95']}, "
              f"return {rows[condition]['mean_return']:,.1f}", flush=True)
    run_dir = Path(args.run_dir)
    result = {"run_dir": str(run_dir), "family": learner.config.env, "agent": learner.name,
              "experiment": learner.config.experiment, "split": args.split, "tasks": len(tasks),
              "episodes": args.episodes, "seed": args.seed,
              "actions": "mean" if args.deterministic else "sampled", "conditions": rows,
              "note": "the same policy, initial state, tasks and action seed in every condition; only the reward "
                      "the policy reads differs (other_task: task i reads task i+1's stream under 'reward'). "
                      "Success and returns are the env's. provenance.shared says whether other work was busy"}
    print(f"written to {write_result(args.out or run_dir / 'rl2_reward_ablation.json', result, recorder)}")


if __name__ == "__main__":
    main()
