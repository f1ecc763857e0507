"""The job protocol's steps: one Lua script each, in ``lua/``, that Redis runs atomically.

Each step starts with a shebang that tells Redis what it may do when it is out of memory: steps that admit new
work have no flags, so Redis refuses them whole instead of failing them halfway; steps that move accepted work
on (start, complete, cancel, delete, deliveries) say ``allow-oom``; reads say ``no-writes``. ``shared.lua`` holds
what several steps do alike and is put in front of each step's own text.
"""

from __future__ import annotations

from importlib.resources import files

from arq.connections import ArqRedis
from redis.commands.core import AsyncScript

STEPS = (
    "submit",
    "load",
    "start",
    "complete",
    "release",
    "abandon",
    "cancel",
    "delete",
    "retry",
    "claim",
    "record",
    "sweep",
    "tick",
    "admit",
    "view",
    "list",
)


def source(step: str) -> str:
    """The script Redis runs for ``step``: its shebang line, then the shared functions, then its own body."""
    lua = files("gateway.jobs").joinpath("lua")
    shebang, _, body = lua.joinpath(f"{step}.lua").read_text().partition("\n")
    if not shebang.startswith("#!lua"):
        raise ValueError(f"lua/{step}.lua must start with a #!lua line that says what it may do under OOM")
    return f"{shebang}\n{lua.joinpath('shared.lua').read_text()}\n{body}"


class Scripts:
    """Every step, registered with one Redis client (redis-py sends each by its SHA, loading it once)."""

    def __init__(self, redis: ArqRedis) -> None:
        self._steps = {step: redis.register_script(source(step)) for step in STEPS}

    def __getitem__(self, step: str) -> AsyncScript:
        return self._steps[step]
