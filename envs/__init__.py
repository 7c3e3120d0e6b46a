"""metarl task families, registered with Gymnasium as ``metarl/<Name>-v0`` (their horizon is the
registered time limit). Importing ``metarl`` registers them.

=====================  ==============================================  =======
id                     task parameter                                  horizon
=====================  ==============================================  =======
metarl/PointNav2D-v0   goal ~ U[-0.5, 0.5]^2                           100
metarl/HalfCheetahVel-v0  target velocity ~ U[0, 3]                    200
metarl/HalfCheetahDir-v0  direction in {-1, +1}                        200
metarl/AntDir-v0       heading ~ U[0, 2 pi)                            200
metarl/AntFwdBwd-v0    heading in {0, pi}                              200
metarl/AntGoal-v0      goal uniform in the disc of radius 3            200
metarl/HopperRandParams-v0  mass/inertia/damping/friction multipliers  200
metarl/Walker2DRandParams-v0  mass/inertia/damping/friction multipliers  200
=====================  ==============================================  =======

Where ``metaworld`` is installed (``pip install -e ".[metaworld]"``), Meta-World's ML1, ML10 and ML45 are
registered too: ``metarl/ML1-<env>-v0`` for its 50 v3 envs, ``metarl/ML10-v0`` and ``metarl/ML45-v0``
(`metarl.envs.meta_world`).
"""

from __future__ import annotations

import gymnasium as gym

FAMILIES: dict[str, tuple[str, int]] = {
    "PointNav2D": ("metarl.envs.point_nav:PointNav2D", 100),
    "HalfCheetahVel": ("metarl.envs.half_cheetah:HalfCheetahVel", 200),
    "HalfCheetahDir": ("metarl.envs.half_cheetah:HalfCheetahDir", 200),
    "AntDir": ("metarl.envs.ant:AntDir", 200),
    "AntFwdBwd": ("metarl.envs.ant:AntFwdBwd", 200),
    "AntGoal": ("metarl.envs.ant:AntGoal", 200),
    "HopperRandParams": ("metarl.envs.dynamics:HopperRandParams", 200),
    "Walker2DRandParams": ("metarl.envs.dynamics:Walker2DRandParams", 200),
}


def env_id(name: str) -> str:
    """The Gymnasium id of a built-in family, e.g. ``env_id("AntGoal") == "metarl/AntGoal-v0"``."""
    return f"metarl/{name}-v0"


def register_envs() -> None:
    """Register every built-in family with Gymnasium (idempotent)."""
    for name, (entry_point, horizon) in FAMILIES.items():
        if env_id(name) not in gym.registry:
            gym.register(id=env_id(name), entry_point=entry_point, max_episode_steps=horizon)
    from metarl.envs import meta_world  # never imports metaworld itself

    if meta_world.installed():  # the extra
        meta_world.register()


def resolve_id(name_or_id: str) -> str:
    """The Gymnasium id of a family name (``AntGoal``, ``ML1-reach-v3``), or ``name_or_id`` itself."""
    if name_or_id in FAMILIES or (":" not in name_or_id and "/" not in name_or_id
                                  and env_id(name_or_id) in gym.registry):
        return env_id(name_or_id)
    return name_or_id


def __getattr__(name: str):
    # Lazy access to the family classes, so `import metarl` stays cheap.
    import importlib

    lazy = {
        "PointNav2D": "point_nav", "HalfCheetahVel": "half_cheetah", "HalfCheetahDir": "half_cheetah",
        "AntDir": "ant", "AntFwdBwd": "ant", "AntGoal": "ant", "HopperRandParams": "dynamics",
        "Walker2DRandParams": "dynamics", "DynamicsFamily": "dynamics", "Vary": "dynamics",
    }
    if name in lazy:
        return getattr(importlib.import_module(f"metarl.envs.{lazy[name]}"), name)
    raise AttributeError(f"module 'metarl.envs' has no attribute {name!r}")
