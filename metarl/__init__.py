"""metarl: meta-reinforcement learning for robotics.

Task families (`metarl.envs`), the task API (`metarl.tasks`), agents (`metarl.agents`), evaluation,
logging and the ``metarl`` command line.
"""

import os as _os

# PyTorch's OpenMP threads spin while they wait for work; when another process shares the cores the
# spinning steals its time slices and everything collapses: measured here with three processes on the two
# cores, a PointNav2D MAML-TRPO update took 40 s with spinning threads and 9-11 s with sleeping ones (as
# with one thread). It has to be set before torch loads OpenMP, so importing metarl first (as the CLI,
# the sampler workers and the tests do) applies it; an OMP_WAIT_POLICY you set yourself wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy's OpenBLAS would wake a second thread for matrices as small as RL²'s GRU step ([16, 128] x [128, 384]):
# the handoff costs more than it saves (RL²'s update measured 1.7x slower with it), and in the sampler's
# workers, one per core, a second thread per worker only oversubscribes the cores. Like the line above it
# must precede numpy's import; one you set yourself wins.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from metarl.envs import FAMILIES, env_id, register_envs, resolve_id
from metarl.tasks import (
    SPLITS,
    DirectionTask,
    DynamicsTask,
    GoalTask,
    HeadingTask,
    Task,
    TaskError,
    TaskFamily,
    VelocityTask,
    family_of,
    set_tasks,
)

__version__ = "0.1.0"

#: the distribution's name (the import name is ``metarl``; ``metarl`` on the public index is another project)
DISTRIBUTION = "metarl-robotics"


def install_hint(extra: str) -> str:
    """What to run for one of the extras: in a clone of metarl, or from a built wheel or the index."""
    return f'pip install -e ".[{extra}]" in a clone of metarl (a wheel or the index: "{DISTRIBUTION}[{extra}]")'

register_envs()


def make_family(name_or_id: str, **kwargs):
    """Make a task family by family name (``"AntGoal"``) or Gymnasium id, with its time limit.

    Returns the (wrapped) Gymnasium env; `family_of` gives the family inside it.
    """
    import gymnasium as gym

    from metarl import plugins

    gid = resolve_id(name_or_id)  # a family name (built-in, or Meta-World's where installed) or an id
    module = plugins.module_of(gid)
    if module is not None:  # Gymnasium's "module:Id": import the module (found as `metarl.plugins` says), make Id
        plugins.load([plugins.resolve(module)])
        if gid.split(":", 1)[1] not in gym.registry:
            raise TaskError(f"{name_or_id!r}: importing {module!r} registered no Gymnasium id "
                            f"{gid.split(':', 1)[1]!r}")
    elif gid not in gym.registry:
        from metarl.envs.meta_world import missing_extra

        if missing_extra(name_or_id):
            raise TaskError(f"{name_or_id!r} is a Meta-World family: install the extra, {install_hint('metaworld')}")
        raise TaskError(
            f"unknown task family {name_or_id!r}; built-in families: {', '.join(FAMILIES)} (for your own, "
            "name the module that registers it: env 'module:Id', imports: [module], or --import module)"
        )
    env = gym.make(gid, **kwargs)
    try:
        family_of(env)  # raises a clear TaskError if the id is not a task family
    except TaskError:
        env.close()
        raise
    return env


__all__ = [
    "FAMILIES", "SPLITS", "DirectionTask", "DynamicsTask", "GoalTask", "HeadingTask", "Task", "TaskError",
    "TaskFamily", "VelocityTask", "env_id", "family_of", "make_family", "register_envs", "resolve_id", "set_tasks",
]
