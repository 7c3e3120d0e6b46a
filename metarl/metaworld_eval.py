"""Meta-World's own evaluation beside metarl's: any metarl agent as Meta-World's ``MetaLearningAgent``.

metaworld 3.1.1 ships a meta-RL protocol, ``metaworld.evaluation.metalearning_evaluation(agent, envs, num_evals,
adaptation_steps, adaptation_episodes, evaluation_episodes)``, over a vector env of its own whose sub-envs each
hold one sampled test task: per evaluation it samples tasks, calls ``agent.init()``, then ``adaptation_steps`` times
collects ``adaptation_episodes`` episodes per sub-env through ``adapt_action`` / ``step`` and calls ``adapt()``,
then measures ``evaluation_episodes`` with ``eval_action`` / ``reset``. `MetaWorldAgent` speaks that interface
for a trained `metarl.api.MetaLearner` of any agent, built on the API's adaptation (nothing reimplemented):

* an agent whose adapted policy keeps no state (MAML-TRPO): every ``adapt()`` is one adaptation stage per sub-env,
  ``learner.adapt_on(rounds)`` on the episodes that sub-env's policy collected in each round so far (one
  gradient step per round), so sub-env i acts with its own adapted policy afterwards;
* an agent whose adapted policy carries a state (RL²'s hidden state, PEARL's context and z): one policy runs all
  sub-envs, a state per sub-env, fed every reward and episode end; acting is adapting, so ``adapt()`` changes
  nothing (`MetaLearner.adapt_on` given the same episodes, one per stage, rebuilds the same state: a test checks).
  Meta-World's evaluation phase gives the agent no rewards (``evaluation`` calls only ``eval_action`` and
  ``reset``), so the envs `protocol_envs` builds append the previous action, the raw reward and the episode end to
  each observation (Meta-World's ``recurrent_info_in_obs``, unnormalised) and the adapter reads the reward there;
  the reward of an episode's last step is lost to it (the vector env resets in the same step).

Two variants of the protocol run through the adapter, both reported:

* ``shipped``: metaworld 3.1.1's ``metalearning_evaluation`` as it is. Its ``evaluation`` counts episodes per
  task *name* and turns terminate-on-success on; on ML1 every sub-env has the same name, so it stops once
  ``evaluation_episodes`` episodes have ended across all sub-envs: the fastest, which are successes. Its success
  rate reads 1.0 as soon as that many sub-envs succeed early, and its mean return is the return up to success.
  Metaworld PR #577 (open) fixes this by counting per sampled task.
* ``per_env``: the same protocol with PR #577's effect, implemented here (`metalearning_evaluation_per_env`):
  every sub-env's own first ``evaluation_episodes`` episodes count, run to the time limit (terminate-on-success
  off), and an episode succeeds if any of its steps does. This is metarl's protocol (full episodes, success at any
  step): its figures compare with metarl's evaluator's at the matching stage.

``metarl eval RUN_DIR --metaworld-protocol [N]`` runs both (N evaluations, default Meta-World's 10) after metarl's
own evaluation, prints them beside it and writes ``RUN_DIR/eval/<split>/metaworld.json`` with provenance.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

from metarl.api import AdaptedPolicy, Episode, MetaLearner
from metarl.evaluation import bootstrap_ci

#: Meta-World's defaults for ``metalearning_evaluation`` (metaworld 3.1.1)
PROTOCOL = {"num_evals": 10, "adaptation_steps": 1, "adaptation_episodes": 10, "evaluation_episodes": 3}
#: the sub-envs (sampled tasks) of each evaluation on the command line: a divisor of ML1's 50 test tasks and, for
#: ML10/ML45, five times a divisor of each test env's 50 (Meta-World's default meta batch of 20 divides neither)
SUB_ENVS = 10


class MetaWorldAgent:
    """A trained `MetaLearner` as Meta-World's ``MetaLearningAgent`` (``init``, ``adapt_action``, ``step``,
    ``adapt``, ``eval_action``, ``reset``); see the module docstring.

    Args:
        learner: the trained agent (`metarl.api.load`).
        seed: seeds adaptation (each evaluation and sub-env its own).
        deterministic: act with the policy's mean in the evaluation episodes (default False: sampled actions, as
            metarl's evaluator measures MAML-TRPO and RL²); adaptation episodes are always sampled.
    """

    def __init__(self, learner: MetaLearner, seed: int = 0, deterministic: bool = False):
        self.learner, self.seed, self.deterministic = learner, int(seed), bool(deterministic)
        space = learner.agent.sampler
        self.obs_dim, self.act_dim = space.observation_space.shape[0], space.action_space.shape[0]
        self.evals = -1  # init() calls so far, minus one
        self.rounds: list[list[list[Episode]]] = []  # per sub-env: the complete episodes of each adaptation round
        self.policies: list[AdaptedPolicy] = []  # one per sub-env (stateless), or one for all of them
        self.stateful = False

    # ---- MetaLearningAgent ------------------------------------------------------------------------------------
    def init(self) -> None:
        """A new evaluation: the unadapted policy, no episodes."""
        self.evals += 1
        base = self.learner.adapt_on([], seed=self._seed(0))
        self.stateful = base.stateful
        self.policies, self.rounds, self._open = [base], [], []
        self._pending, self._ended = False, None

    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        obs = self._obs(observations)
        if not self.rounds:
            self.rounds = [[[]] for _ in range(len(obs))]
            self._open = [([], [], []) for _ in range(len(obs))]
        actions, raw = self._act(obs, deterministic=False)
        return actions, {"raw": raw}

    def step(self, timestep: Any) -> None:
        obs = self._obs(timestep.observation)
        raw = np.asarray(timestep.aux_policy_outputs["raw"], np.float32)
        rewards = np.asarray(timestep.reward, np.float64)
        dones = np.logical_or(timestep.terminated, timestep.truncated)
        for i in range(len(obs)):
            seen, acts, rews = self._open[i]
            seen.append(obs[i])
            acts.append(raw[i])
            rews.append(rewards[i])
            if dones[i]:
                self.rounds[i][-1].append(Episode(np.stack(seen), np.stack(acts), np.asarray(rews),
                                                  bool(timestep.terminated[i])))
                self._open[i] = ([], [], [])
        if self.stateful:
            self.policies[0].observe(rewards, dones)

    def adapt(self) -> None:
        """One adaptation stage: stateless policies adapt on every round so far (`MetaLearner.adapt_on`, one
        gradient step per round on its first E episodes, E the fewest any sub-env completed); a stateful policy has
        adapted while it acted."""
        if not self.stateful:
            count = min(len(rounds[-1]) for rounds in self.rounds)
            if count < 1:
                raise ValueError("MetaWorldAgent.adapt: a sub-env completed no episode in this adaptation round")
            self.policies = [self.learner.adapt_on([r[:count] for r in rounds], seed=self._seed(i + 1))
                             for i, rounds in enumerate(self.rounds)]
            for rounds in self.rounds:
                rounds[-1] = rounds[-1][:count]
        for rounds in self.rounds:
            rounds.append([])
        self._open = [([], [], []) for _ in self.rounds]  # an episode cut by the round's end is not one

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        if self.stateful and self._pending:  # the reward and end of the last evaluation step, for the state
            obs = np.asarray(observations, np.float64)
            if obs.shape[-1] < self.obs_dim + self.act_dim + 2:
                raise ValueError("MetaWorldAgent: a stateful policy needs the reward in the observation during "
                                 "Meta-World's evaluation (recurrent_info_in_obs=True, "
                                 "normalize_reward_in_recurrent_info=False; see protocol_envs)")
            ended = np.zeros(len(obs), bool) if self._ended is None else np.asarray(self._ended, bool)
            rewards = np.where(ended, 0.0, obs[:, self.obs_dim + self.act_dim])  # after a reset: the reset's zeros
            self.policies[0].observe(rewards, ended)
        self._pending, self._ended = True, None
        return self._act(self._obs(observations), deterministic=self.deterministic)[0]

    def reset(self, env_mask: np.ndarray) -> None:
        """Episodes that ended (Meta-World calls it after every evaluation step): a stateful policy is told with
        the next `eval_action`; nothing is cleared (the adapted state is what is being measured)."""
        if self._pending:
            self._ended = np.asarray(env_mask, bool)

    # ---- inside ------------------------------------------------------------------------------------------------
    def _seed(self, k: int) -> int:
        return self.seed + 1_000_003 * self.evals + k

    def _obs(self, observations: np.ndarray) -> np.ndarray:
        obs = np.asarray(observations, np.float32)
        if obs.ndim != 2 or obs.shape[1] < self.obs_dim:
            raise ValueError(f"MetaWorldAgent: expected observations [envs, >= {self.obs_dim}], got {obs.shape}")
        return obs[:, : self.obs_dim]  # what follows is Meta-World's recurrent info (action, reward, end)

    def _act(self, obs: np.ndarray, deterministic: bool) -> tuple[np.ndarray, np.ndarray]:
        if len(self.policies) == 1:  # one policy for every sub-env (a state per sub-env where it keeps one)
            sample = self.policies[0].sample(obs, deterministic)
            return sample.action, sample.raw
        out = [policy.sample(o, deterministic) for policy, o in zip(self.policies, obs, strict=True)]
        return np.stack([s.action for s in out]), np.stack([s.raw for s in out])


# ---- the protocol ------------------------------------------------------------------------------------------------
def protocol_envs(family: Any, sub_envs: int) -> Any:
    """Meta-World's own vector env of the held-out tasks of ``family`` (a `metarl.envs.meta_world.MetaWorldFamily`):
    ``Meta-World/ML1-test`` or ``Meta-World/ML10-test`` (``ML45``) built with the family's seed (so from the
    same benchmark lists as its test split), ``sub_envs`` sub-envs (for ML1 a divisor of 50; for the others, whose
    test envs are five, a multiple of 5 whose fifth divides 50), with the recurrent info (raw reward) `MetaWorldAgent` reads.
    Where the family steps fast (its default), so do these envs (`metarl.envs._metaworld_fast.speed_up`: the same
    observations, rewards and infos bit for bit)."""
    import gymnasium as gym

    from metarl.envs.meta_world import check_mujoco

    check_mujoco()
    benchmark, env_name, family_seed = family.benchmark_args()
    kwargs: dict[str, Any] = {"env_name": env_name} if benchmark == "ML1" else {}
    kwargs["reward_function_version"] = getattr(family, "reward", "v2")  # the family's reward functions
    per_class = sub_envs if benchmark == "ML1" else sub_envs // 5
    if sub_envs < 1 or (benchmark != "ML1" and sub_envs % 5) or 50 % max(per_class, 1):
        raise ValueError(f"Meta-World's protocol on {family.family}: {sub_envs} sub-envs do not split its 50 test "
                         f"tasks per env evenly (ML1: a divisor of 50; {benchmark}: 5 times a divisor of 50)")
    envs = gym.make_vec(f"Meta-World/{benchmark}-test", seed=family_seed, meta_batch_size=sub_envs,
                        recurrent_info_in_obs=True, normalize_reward_in_recurrent_info=False, vector_strategy="sync",
                        **kwargs)
    if getattr(family, "_metarl_fast", False):  # the family's faster stepping, bit for bit Meta-World's numbers
        from metarl.envs._metaworld_fast import speed_up

        for env in getattr(envs, "envs", []):
            speed_up(env.unwrapped)
    return envs


def evaluation_per_env(agent: Any, envs: Any, num_episodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Meta-World's ``evaluation`` with PR #577's effect: each sub-env's first ``num_episodes`` episodes, run to the
    time limit (terminate-on-success off), success at any step. Returns ``(returns, successes)``, each
    ``[sub_envs, num_episodes]``."""
    n = envs.num_envs
    was = bool(np.all(envs.get_attr("terminate_on_success")))
    envs.call("toggle_terminate_on_success", False)
    obs, _ = envs.reset()
    agent.reset(np.ones(n, dtype=np.bool_))
    returns: list[list[float]] = [[] for _ in range(n)]
    successes: list[list[float]] = [[] for _ in range(n)]
    running, succeeded = np.zeros(n), np.zeros(n, bool)
    while any(len(r) < num_episodes for r in returns):
        obs, rewards, terminated, truncated, infos = envs.step(agent.eval_action(obs))
        dones = np.logical_or(terminated, truncated)
        agent.reset(dones)
        running += rewards
        if "success" in infos:  # the sub-envs that did not end here
            succeeded |= (np.asarray(infos["success"]) > 0) & np.asarray(infos.get("_success", np.ones(n, bool)))
        final = infos.get("final_info") or {}
        if "success" in final:
            succeeded |= (np.asarray(final["success"]) > 0) & dones
        for i in np.flatnonzero(dones):
            returns[i].append(float(running[i]))
            successes[i].append(float(succeeded[i]))
            running[i], succeeded[i] = 0.0, False
    envs.call("toggle_terminate_on_success", was)
    return (np.array([r[:num_episodes] for r in returns]), np.array([s[:num_episodes] for s in successes]))


def metalearning_evaluation_per_env(agent: Any, envs: Any, num_evals: int = 10, adaptation_steps: int = 1,
                                    adaptation_episodes: int = 10, evaluation_episodes: int = 3
                                    ) -> tuple[np.ndarray, np.ndarray]:
    """Meta-World's ``metalearning_evaluation`` (the same task sampling, adaptation rounds and agent calls) with
    `evaluation_per_env` as its evaluation. Returns ``(returns, successes)``, each ``[num_evals, sub_envs]``: the
    mean over each sub-env's evaluation episodes."""
    from metaworld.evaluation import Timestep

    envs.call("toggle_sample_tasks_on_reset", False)
    envs.call("toggle_terminate_on_success", False)
    returns, successes = [], []
    for _ in range(num_evals):
        envs.call("sample_tasks")
        agent.init()
        for _ in range(adaptation_steps):
            obs, _ = envs.reset()
            elapsed = np.zeros(envs.num_envs, dtype=np.int64)
            while not (elapsed >= adaptation_episodes).all():
                actions, aux = agent.adapt_action(obs)
                next_obs, rewards, terminated, truncated, _ = envs.step(actions)
                agent.step(Timestep(obs, actions, rewards, terminated, truncated, aux))
                elapsed += np.logical_or(terminated, truncated)
                obs = next_obs
            agent.adapt()
        r, s = evaluation_per_env(agent, envs, evaluation_episodes)
        returns.append(r.mean(1))
        successes.append(s.mean(1))
    return np.array(returns), np.array(successes)


def _figures(success: np.ndarray, returns: np.ndarray, units: str) -> dict[str, Any]:
    s, r = np.asarray(success, np.float64).ravel(), np.asarray(returns, np.float64).ravel()
    return {"success_rate": float(s.mean()), "success_ci95": list(bootstrap_ci(s)), "mean_return": float(r.mean()),
            "return_ci95": list(bootstrap_ci(r)), "units": units, "n": len(s)}


def run_protocol(learner: MetaLearner, num_evals: int = 10, sub_envs: int = 10, adaptation_steps: int = 1,
                 adaptation_episodes: int = 10, evaluation_episodes: int = 3, seed: int = 0,
                 deterministic: bool = False, variants: tuple[str, ...] = ("shipped", "per_env")) -> dict[str, Any]:
    """Both variants of Meta-World's protocol (module docstring) through `MetaWorldAgent`, on the learner's family's
    test tasks; their figures with bootstrap 95% intervals (shipped: over the ``num_evals`` evaluations, the only
    figures it returns; per_env: over every (evaluation, sub-env) adaptation)."""
    from metaworld.evaluation import metalearning_evaluation

    family = learner.agent.sampler.family
    if not hasattr(family, "benchmark_args"):
        raise ValueError(f"Meta-World's protocol runs on a Meta-World family (ML1-<env>, ML10, ML45), not "
                         f"{learner.config.env}")
    settings = {"num_evals": int(num_evals), "sub_envs": int(sub_envs), "adaptation_steps": int(adaptation_steps),
                "adaptation_episodes": int(adaptation_episodes), "evaluation_episodes": int(evaluation_episodes),
                "deterministic": bool(deterministic), "seed": int(seed)}
    if min(num_evals, sub_envs, adaptation_steps, adaptation_episodes, evaluation_episodes) < 1:
        raise ValueError(f"Meta-World's protocol: every setting must be >= 1, got {settings}")
    out: dict[str, Any] = {"protocol": settings, "family": family.family, "agent": learner.name,
                           "iteration": learner.agent.iteration}
    if "shipped" in variants:
        envs = protocol_envs(family, sub_envs)
        agent = MetaWorldAgent(learner, seed=seed, deterministic=deterministic)
        try:  # one evaluation a call: the same loop, with each evaluation's figures kept for an interval
            evals = [metalearning_evaluation(agent, envs, num_evals=1, adaptation_steps=adaptation_steps,
                                             adaptation_episodes=adaptation_episodes,
                                             evaluation_episodes=evaluation_episodes) for _ in range(num_evals)]
        finally:
            envs.close()
        out["shipped"] = {
            "what": "metaworld 3.1.1's metalearning_evaluation as shipped: episodes counted per task name with "
                    "terminate-on-success on; on ML1 it stops after the first evaluation_episodes episodes to end "
                    "across all sub-envs (the fastest successes), so success reads high and the return is the "
                    "return up to success (Metaworld PR #577 fixes it)",
            **_figures([e[0] for e in evals], [e[1] for e in evals], "evaluations"),
            "per_evaluation": [{"success_rate": float(e[0]), "mean_return": float(e[1])} for e in evals]}
    if "per_env" in variants:
        envs = protocol_envs(family, sub_envs)
        agent = MetaWorldAgent(learner, seed=seed, deterministic=deterministic)
        try:
            returns, successes = metalearning_evaluation_per_env(
                agent, envs, num_evals, adaptation_steps, adaptation_episodes, evaluation_episodes)
        finally:
            envs.close()
        out["per_env"] = {
            "what": "the same protocol with Metaworld PR #577's effect (implemented in metarl): each sub-env's own "
                    "first evaluation_episodes episodes, run to the time limit, success at any step: comparable "
                    "with metarl's evaluator",
            **_figures(successes, returns, "(evaluation, sub-env) adaptations"),
            "per_adaptation": {"success": successes.tolist(), "return": returns.tolist()}}
    out["metarl_stage"] = (adaptation_steps * adaptation_episodes if agent.stateful else adaptation_steps)
    return out


def agree(a: dict[str, Any], b: dict[str, Any]) -> dict[str, bool]:
    """Whether two figures' 95% intervals overlap, for success and return (``a``, ``b``: a variant of `run_protocol`,
    or a stage of metarl's summary.json)."""
    def interval(x: dict[str, Any], key: str) -> tuple[float, float]:
        return tuple(x["success_ci95" if key == "success" else ("return_ci95" if "return_ci95" in x else "ci95")])

    out = {}
    for key in ("success", "return"):
        (lo1, hi1), (lo2, hi2) = interval(a, key), interval(b, key)
        out[key] = bool(lo1 <= hi2 and lo2 <= hi1)
    return out


def beside_metarl(result: dict[str, Any], stages: list[dict[str, Any]], source: str | None = None) -> dict[str, Any]:
    """``result`` (of `run_protocol`) with metarl's evaluator's figure at the matching stage of ``stages`` (an
    evaluation summary's) under ``metarl`` and whether the per-env variant agrees with it, where that stage exists
    and reports success; returned for convenience."""
    stage = next((s for s in stages if s["stage"] == result["metarl_stage"]), None)
    if stage is not None and "success_rate" in stage:
        result["metarl"] = {"stage": stage["stage"], "success_rate": stage["success_rate"],
                            "success_ci95": stage["success_ci95"], "mean_return": stage["mean_return"],
                            "return_ci95": stage["ci95"], **({"source": source} if source else {})}
        result["per_env_agrees_with_metarl"] = agree(result["per_env"], result["metarl"])
    return result


def check_cli(config: Any, split: str, num_evals: int, repeats: int) -> None:
    """ConfigError in one line, before any evaluation runs, if ``--metaworld-protocol N`` cannot run on this run."""
    import metarl
    from metarl.config import ConfigError
    from metarl.envs.meta_world import family_ids

    if metarl.resolve_id(str(config.env)) not in family_ids().values():
        raise ConfigError(f"--metaworld-protocol runs Meta-World's own evaluation on a Meta-World family "
                          f"(ML1-<env>, ML10, ML45); this run's env is {config.env}")
    if split != "test":
        raise ConfigError(f"--metaworld-protocol evaluates on Meta-World's test tasks: use --split test, not {split}")
    if num_evals < 1 or repeats != 1:
        raise ConfigError(f"--metaworld-protocol N needs N >= 1 and no --repeats, got N={num_evals}, "
                          f"repeats={repeats}")
    if importlib.util.find_spec("metaworld") is None:
        raise ConfigError(f"--metaworld-protocol needs metaworld: {metarl.install_hint('metaworld')}")


def evaluate_cli(run_dir: Path, out: Path, num_evals: int, device: str | None = None, trust_code: bool = False,
                 entry: Any = None, sub_envs: int | None = None) -> dict[str, Any]:
    """``metarl eval RUN_DIR --metaworld-protocol N``: after metarl's own evaluation (its summary.json in ``out``),
    Meta-World's protocol at its defaults with N evaluations, printed beside metarl's figure and written to
    ``out/metaworld.json`` with provenance."""
    import metarl.api as mrl
    from metarl.provenance import Recorder, write_result

    recorder = Recorder()
    learner = mrl.load(run_dir if entry is None else entry.folder, device=device, trust_code=trust_code)
    try:
        settings = dict(PROTOCOL, num_evals=num_evals)
        sub_envs = SUB_ENVS if sub_envs is None else sub_envs
        print(f"Meta-World's protocol (metaworld.evaluation.metalearning_evaluation, {num_evals} evaluations x "
              f"{sub_envs} sub-envs; {settings['adaptation_steps']} adaptation round(s) of "
              f"{settings['adaptation_episodes']} episodes, then {settings['evaluation_episodes']} evaluation "
              "episodes) through metarl.metaworld_eval.MetaWorldAgent ...", flush=True)
        try:
            result = run_protocol(learner, sub_envs=sub_envs, **settings)
        except ValueError as exc:
            from metarl.config import ConfigError

            raise ConfigError(str(exc)) from None
    finally:
        learner.close()
    summary_path = out / "summary.json"
    if summary_path.is_file():
        beside_metarl(result, json.loads(summary_path.read_text()).get("stages", []), source=str(summary_path))
    path = write_result(out / "metaworld.json", result, recorder)
    for line in report_lines(result):
        print(line)
    print(f"written to {path}")
    return result


def report_lines(result: dict[str, Any]) -> list[str]:
    """The table `evaluate_cli` prints: each variant's success and return with their 95% intervals."""
    rows = [("metaworld, as shipped", result.get("shipped")), ("metaworld, per sub-env", result.get("per_env")),
            (f"metarl evaluator, stage {result.get('metarl', {}).get('stage')}", result.get("metarl"))]
    lines = [f"{'':<30} {'success':>8} {'95% CI':>15} {'mean return':>12} {'95% CI':>19}"]
    for name, f in rows:
        if f is not None:
            lines.append(f"{name:<30} {f['success_rate']:>8.3f} [{f['success_ci95'][0]:.3f}, {f['success_ci95'][1]:.3f}] "
                         f"{f['mean_return']:>12.1f} [{f['return_ci95'][0]:.1f}, {f['return_ci95'][1]:.1f}]")
    if "shipped" in result:
        lines.append("as shipped (metaworld 3.1.1): evaluation stops after the first episodes to end across all "
                     "sub-envs with terminate-on-success on (the fastest successes; Metaworld PR #577): its success "
                     "reads high and its return is the return up to success; per sub-env: PR #577's effect, full "
                     "episodes, comparable with metarl's evaluator")
    if "per_env_agrees_with_metarl" in result:
        a = result["per_env_agrees_with_metarl"]
        lines.append(f"per sub-env vs metarl's evaluator: intervals overlap for success: {a['success']}, "
                     f"return: {a['return']}")
    return lines
