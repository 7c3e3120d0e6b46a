"""Small MuJoCo version shims shared by the MuJoCo families (MuJoCo 3.3 and 4.x)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import mujoco


@contextlib.contextmanager
def quiet_settotalmass() -> Iterator[None]:
    """Drop MuJoCo 4's deprecation warning about ``settotalmass`` while Gymnasium loads its XML.

    HalfCheetah's asset uses the attribute; MuJoCo 4 prints the warning and appends it to
    MUJOCO_LOG.TXT in the working directory every time the model is compiled (once per vector-env
    slot). Other warnings are passed on to the handler that was installed before, or printed.
    """
    getter = getattr(mujoco, "get_mju_user_warning", None)
    setter = getattr(mujoco, "set_mju_user_warning", None)
    if getter is None or setter is None:
        yield
        return
    previous = getter()

    def handler(message: str) -> None:
        if "settotalmass" in message:
            return
        if previous is not None:
            previous(message)
        else:
            print(f"MuJoCo WARNING: {message}", file=sys.stderr)

    setter(handler)
    try:
        yield
    finally:
        setter(previous)
