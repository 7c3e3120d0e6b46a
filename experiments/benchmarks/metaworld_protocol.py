"""Meta-World's own evaluation beside metarl's on one trained run, at settings of one's choosing (``metarl eval
RUN_DIR --metaworld-protocol N`` runs Meta-World's defaults: 10 adaptation episodes, 3 evaluation episodes).

    .venv-metaworld/bin/python experiments/benchmarks/metaworld_protocol.py RUN_DIR [--evals 2] [--sub-envs 10] \
        [--adaptation-episodes 3] [--evaluation-episodes 3] [--tasks 10] --out experiments/results/FILE.json

Runs, on the run's Meta-World family's test tasks: metarl's evaluator (``--tasks`` tasks, one adaptation stage of
``--adaptation-episodes`` episodes then as many measured: MAML-TRPO's protocol; the matching stage of the others),
then Meta-World's ``metalearning_evaluation`` through `metarl.metaworld_eval.MetaWorldAgent`, as shipped and per
sub-env (Metaworld PR #577's effect; module docstring of metarl/metaworld_eval.py). Writes one JSON file with all
three figures and their 95% intervals, and its provenance (the run folder itself is not written to).
"""

from __future__ import annotations

from metarl.system import sleeping_openmp_threads

sleeping_openmp_threads()  # a program: PyTorch's threads sleep while they wait (set before torch loads)

import argparse
from pathlib import Path

import metarl.api as mrl
from metarl.evaluation import summarize, with_episode_metrics
from metarl.metaworld_eval import agree, report_lines, run_protocol
from metarl.provenance import Recorder, write_result
from metarl.training import eval_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--evals", type=int, default=2)
    parser.add_argument("--sub-envs", type=int, default=10)
    parser.add_argument("--adaptation-episodes", type=int, default=3)
    parser.add_argument("--evaluation-episodes", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=10, help="held-out tasks of metarl's evaluator")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    recorder = Recorder()
    with mrl.load(args.run_dir) as learner:
        result = run_protocol(learner, num_evals=args.evals, sub_envs=args.sub_envs, adaptation_steps=1,
                              adaptation_episodes=args.adaptation_episodes,
                              evaluation_episodes=args.evaluation_episodes, seed=args.seed)
        agent, stage = learner.agent, result["metarl_stage"]
        tasks = eval_tasks(agent.sampler.family, learner.config.seed, "test", args.tasks)
        steps, episodes = (stage, args.adaptation_episodes) if stage == 1 else (stage, 1)
        with agent.sampler.recording() as calls:  # metarl's evaluator, as `metarl eval` runs it, not written
            evaluated = agent.evaluate_adaptation(tasks, steps, episodes, seed=args.seed)
        summary = summarize(with_episode_metrics(evaluated, calls))
    s = summary["stages"][stage]
    result["metarl"] = {"stage": stage, "success_rate": s["success_rate"], "success_ci95": s["success_ci95"],
                        "mean_return": s["mean_return"], "return_ci95": s["ci95"], "tasks": args.tasks,
                        "episodes_per_stage": episodes}
    result["per_env_agrees_with_metarl"] = agree(result["per_env"], result["metarl"])
    result["run_dir"] = str(Path(args.run_dir))
    result["note"] = "shared cores (2 cores, other training runs busy); figures, not timings"
    path = write_result(args.out, result, recorder)
    for line in report_lines(result):
        print(line)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
