"""What a worker process holds for its jobs: one typed record in arq's ``ctx``, made in ``on_startup``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from gateway.budget import MemoryBudget
from gateway.jobs import JobStore, WorkerInfo
from gateway.settings import Settings
from gateway.torchserve import TorchServe


@dataclass
class WorkerState:
    settings: Settings
    store: JobStore
    torchserve: TorchServe
    info: WorkerInfo  # what its heartbeat says of it
    image_memory: MemoryBudget  # the image bytes its jobs hold at once
    # How many jobs it takes at once: what its TorchServe computes now and next, as the heartbeat last read it.
    in_flight: int
    loops: list[asyncio.Task[None]] = field(default_factory=list)  # heartbeat, deliveries, sweeper
    stale: set[str] = field(default_factory=set)  # jobs whose try here was fenced off: arq's end leaves them
    ended: set[str] = field(default_factory=set)  # jobs whose try here ended them, or found them ended


def state_of(ctx: dict[str, object]) -> WorkerState:
    state = ctx["state"]
    assert isinstance(state, WorkerState)
    return state
