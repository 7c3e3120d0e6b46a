"""metarl: meta-reinforcement learning for robotics.

Task families (`metarl.envs`), the task API (`metarl.tasks`), agents (`metarl.agents`), evaluation,
logging and the ``metarl`` command line.
"""

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
        from metarl.envs.meta_world import missing_extra, unknown_name

        if unknown_name(name_or_id):
            raise TaskError(unknown_name(name_or_id))
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
