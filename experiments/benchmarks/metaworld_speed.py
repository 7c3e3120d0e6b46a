"""Sampling Meta-World against the simulator's limit: metarl's Meta-World sampling beside EnvPool's native C++
Meta-World v3 (the speed reference) and raw ``mj_step`` of the same Sawyer scene, measured side by side.

    .venv-metaworld/bin/python experiments/benchmarks/metaworld_speed.py --envpool-python /path/to/envpool/python \
        [--env reach-v3] [--repeats 3] [--out experiments/results/metaworld_speed.json]

Every row is env steps per second on ``--env`` (default reach-v3; one env step is Meta-World's ``frame_skip`` = 5
MuJoCo steps), taken in turn in each of ``--repeats`` rounds (so the ratios are fair on a shared, noisy machine),
median over the rounds:

* ``mj_step``: ``mujoco.mj_step(model, data, nstep=frame_skip)`` on the Meta-World env's own model and data, random
  controls; no Python env, no policy: what the simulator allows one core;
* ``metaworld env.step``: metaworld's Python env (``SawyerReachEnvV3`` with its task set), random actions, no policy;
* ``metaworld env.step, sped up``: the same env after `metarl.envs._metaworld_fast.speed_up` (bit-identical
  observations, rewards and infos);
* ``metarl sampler (fast=False)`` and ``metarl sampler``: ``metarl.sampling.Sampler`` on ``metarl/ML1-<env>-v0`` in
  this process (``workers=0``, the gymnasium backend: the only one that runs Meta-World), stepping Meta-World's own
  methods and (the default) the sped-up ones; a numpy tanh MLP 64x64 policy with Gaussian noise, full 500-step
  episodes of 4 held-out tasks, timed after a first call that built the env slots (steady state, as in training);
* ``envpool``: EnvPool's native ``MetaWorld/<Env>-v3`` (8 envs, 1 and 2 threads) with the same MLP, run by
  experiments/benchmarks/envpool_rate.py under ``--envpool-python`` (EnvPool pins numpy < 2; only its stepping loop
  is timed).

Ratios are to ``mj_step``. The result file carries its provenance (whether other work shared the cores).
"""

from __future__ import annotations

from metarl.system import sleeping_openmp_threads

sleeping_openmp_threads()  # a program: PyTorch's threads sleep while they wait (set before torch loads)

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

import metarl
from metarl.provenance import Recorder, write_result
from metarl.sampling import Sampler

ROOT = Path(__file__).resolve().parents[2]


class _MLP:
    """The policy inference envpool_rate.py does: a tanh MLP 64x64 and Gaussian noise, in numpy."""

    def __init__(self, obs_dim: int, act_dim: int, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.w = [self.rng.normal(size=s) / np.sqrt(s[0]) for s in ((obs_dim, 64), (64, 64), (64, act_dim))]

    def start(self, task_indices, slots):
        pass

    def act(self, obs):
        mean = np.tanh(np.tanh(np.asarray(obs) @ self.w[0]) @ self.w[1]) @ self.w[2]
        return np.clip(mean + self.rng.normal(size=mean.shape), -1.0, 1.0).astype(np.float32)


def _metaworld_env(name: str):
    family = metarl.family_of(env := metarl.make_family(f"ML1-{name}", fast=False))
    family.set_task(family.sample_tasks(1, "test")[0])
    return env, family._metarl_env  # the metaworld env itself, for the rows that bypass metarl


def rate_mj_step(name: str, steps: int, seed: int) -> float:
    import mujoco

    env, raw = _metaworld_env(name)
    raw.reset()
    model, data, skip = raw.model, raw.data, raw.frame_skip
    rng = np.random.default_rng(seed)
    controls = rng.uniform(-1, 1, size=(1000, model.nu))
    start = time.perf_counter()
    for t in range(steps):
        data.ctrl[:] = controls[t % 1000]
        mujoco.mj_step(model, data, nstep=skip)
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def rate_env_step(name: str, steps: int, seed: int, fast: bool = False) -> float:
    env, raw = _metaworld_env(name)
    if fast:
        from metarl.envs._metaworld_fast import speed_up

        speed_up(raw)
    actions = np.random.default_rng(seed).uniform(-1, 1, size=(1000, 4)).astype(np.float32)
    raw.reset()
    start = time.perf_counter()
    for t in range(steps):
        *_, truncated, _ = raw.step(actions[t % 1000])
        if truncated:
            raw.reset()
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def rate_sampler(name: str, steps: int, seed: int, fast: bool = True) -> float:
    gid = f"metarl/ML1-{name}-v0"
    fam = metarl.family_of(probe := metarl.make_family(gid))
    tasks = fam.sample_tasks(4, "test")
    probe.close()
    episodes = max(1, steps // (len(tasks) * fam.horizon))
    with Sampler(gid, env_kwargs={"fast": fast}, workers=0, backend="auto") as sampler:
        assert sampler.backend == "gymnasium"
        actor = _MLP(39, 4, seed)
        sampler.sample(actor, tasks, episodes, seed=seed)  # warm: the first call builds its env slots
        start = time.perf_counter()
        batch = sampler.sample(actor, tasks, episodes, seed=seed)
        elapsed = time.perf_counter() - start
    return float(batch.env_steps) / elapsed


def rate_envpool(python: str, name: str, steps: int, threads: int, seed: int) -> tuple[float, str]:
    task = "MetaWorld/" + "".join(part.capitalize() for part in name[:-len("-v3")].split("-")) + "-v3"
    done = subprocess.run([python, str(ROOT / "experiments" / "benchmarks" / "envpool_rate.py"), "--env", task,
                           "--steps", str(steps), "--envs", "8", "--threads", str(threads), "--horizon", "500",
                           "--seed", str(seed)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"envpool_rate.py failed under {python}: {done.stderr.strip().splitlines()[-1:]}")
    line = json.loads(done.stdout.strip().splitlines()[-1])
    return float(line["rate"]), str(line["envpool"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envpool-python", help="a Python with envpool (and envpool-assets); without it the "
                        "EnvPool rows are left out")
    parser.add_argument("--env", default="reach-v3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20_000, help="env steps per Python measurement (EnvPool: 4x)")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "metaworld_speed.json"))
    args = parser.parse_args()

    recorder = Recorder()
    rows: dict[str, list[float]] = {"mj_step": [], "metaworld env.step": [], "metaworld env.step, sped up": [],
                                    "metarl sampler (fast=False)": [], "metarl sampler": []}
    if args.envpool_python:
        rows.update({"envpool, 1 thread": [], "envpool, 2 threads": []})
    envpool_version = None
    for r in range(args.repeats):
        rows["mj_step"].append(rate_mj_step(args.env, args.steps * 4, seed=r))
        rows["metaworld env.step"].append(rate_env_step(args.env, args.steps, seed=r))
        rows["metaworld env.step, sped up"].append(rate_env_step(args.env, args.steps, seed=r, fast=True))
        rows["metarl sampler (fast=False)"].append(rate_sampler(args.env, args.steps, seed=r, fast=False))
        rows["metarl sampler"].append(rate_sampler(args.env, args.steps, seed=r))
        for threads in (1, 2) if args.envpool_python else ():
            rate, envpool_version = rate_envpool(args.envpool_python, args.env, args.steps * 4, threads, seed=r)
            rows[f"envpool, {threads} thread{'s' if threads > 1 else ''}"].append(rate)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rows.items()), flush=True)
    medians = {k: statistics.median(v) for k, v in rows.items()}
    base = medians["mj_step"]
    result = {
        "env": args.env,
        "unit": "env steps per second (one env step = frame_skip 5 MuJoCo steps)",
        "rows": [{"what": k, "median": round(v, 1), "rounds": [round(x, 1) for x in rows[k]],
                  "ratio_to_mj_step": round(v / base, 3)} for k, v in medians.items()],
        "envpool": envpool_version,
        "repeats": args.repeats,
        # per round, so that both sides of each ratio ran at the same moment
        "sampler_speedup": {"median": round(statistics.median(
            f / p for f, p in zip(rows["metarl sampler"], rows["metarl sampler (fast=False)"], strict=True)), 3),
            "what": "metarl sampler / metarl sampler (fast=False), per round"},
        "note": "rows measured in turn in each round; compare ratios (provenance.shared says whether other work was "
                "busy on the cores)",
    }
    path = write_result(args.out, result, recorder)
    for row in result["rows"]:
        print(f"{row['what']:<30} {row['median']:>10,.0f} steps/s  {row['ratio_to_mj_step']:>6.3f} x mj_step")
    print(f"sampler speed-up from the faster stepping: {result['sampler_speedup']['median']:.2f}x")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
