"""Fair sharing between owners (API keys), as the job store sees it: what each owner may hold, the order its
own jobs go in, and where a waiting job stands under fair dispatch.

The dispatch itself is a Lua step (``lua/shared.lua``): each owner's jobs wait in a queue of their own, and
arq's queue receives the next job of the owner with the lowest *pass*; each job handed over adds 1/weight to
its owner's pass. That is stride scheduling, weighted fair queueing over jobs of unit cost: over any stretch
of time, owners with work get jobs started in proportion to their weights, and an owner alone gets them all.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import asdict, dataclass

from arq.connections import ArqRedis
from redis.typing import EncodableT

from gateway.jobs import keys
from gateway.jobs.records import now_ms
from gateway.jobs.scripts import Scripts

VIEW_SECONDS = 0.5  # a gateway reads the fair order at most this often, for all the jobs it shows
VIEW_OWNERS = 2000  # owners with waiting jobs a position counts; past them, a position is a lower bound
RATE_WINDOW_S = 60.0  # the service rate behind eta_seconds is measured over about this long


@dataclass(frozen=True)
class OwnerLimits:
    """What one owner may hold, as its API key's settings resolve it (gateway.tenants)."""

    weight: float = 1.0
    max_queued: int = 0  # jobs accepted and not ended; 0: only the whole backlog's bound
    max_running: int = 0  # jobs in arq's queue at once (started or next); 0: running_share decides
    running_share: float = 1.0  # of the live workers' slots, when max_running is 0; 1: no limit
    rate: float = 0.0  # submissions a second, refilling a bucket of `burst`; 0: no limit
    burst: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass(frozen=True)
class Admission:
    """How an owner's bounds stand after a submission it made, for the RateLimit header fields."""

    queued: int  # its jobs accepted and not ended, this one included
    tokens: int  # what its rate bucket still holds; -1 when it has no rate


@dataclass(frozen=True)
class OwnerTurn:
    owner: str
    pass_: float
    stride: float  # 1/weight: what each job handed over adds to its pass
    waiting: int


@dataclass(frozen=True)
class FairOrder:
    """The fair order at one moment: the jobs in arq's queue not started yet, then each owner's turns."""

    in_arq: int
    owners: dict[str, OwnerTurn]

    def position(self, owner: str, place: int) -> int:
        """Jobs that start before the job at ``place`` in ``owner``'s queue: the jobs handed over already, the
        owner's own jobs before it, and each other owner's jobs whose turn comes first."""
        me = self.owners.get(owner)
        ahead = self.in_arq + place
        if me is None:  # not in the order read (a moment ago): counted as if it came last
            return ahead + sum(turn.waiting for turn in self.owners.values())
        turn_at = me.pass_ + place * me.stride
        for other in self.owners.values():
            if other.owner == owner:
                continue
            # The other's turns come at other.pass_ + k * other.stride, k = 0, 1, ...: count those before
            # turn_at, and one at turn_at itself when its name sorts first (Redis orders equal passes by name).
            turns = (turn_at - other.pass_) / other.stride
            whole = round(turns)
            if abs(turns - whole) < 1e-9:
                before = whole + (1 if other.owner < owner else 0)
            else:
                before = math.ceil(turns)
            ahead += min(other.waiting, max(0, before))
        return ahead


class FairView:
    """A gateway's reading of the fair order, shared by every job it shows, and the service rate measured
    from the jobs that end, for ``eta_seconds``."""

    def __init__(self, redis: ArqRedis, scripts: Scripts, layout: str) -> None:
        self.redis = redis
        self.scripts = scripts
        self.layout = layout
        self._order: FairOrder | None = None
        self._read_at = -math.inf
        self._ended: deque[tuple[float, int]] = deque()  # (monotonic time, jobs ended so far)

    async def order(self, owner: str | None = None) -> FairOrder:
        """The fair order, read again when it is older than VIEW_SECONDS or does not have ``owner`` yet."""
        stale = self._order is None or time.monotonic() - self._read_at > VIEW_SECONDS
        if stale or (owner is not None and owner not in self._order.owners):  # type: ignore[union-attr]
            args: list[EncodableT] = [repr(now_ms()), VIEW_OWNERS, self.layout]
            in_arq, ended, *owners = await self.scripts["view"](args=args)
            self._read_at = time.monotonic()
            self._ended.append((self._read_at, int(ended)))
            while self._ended[0][0] < self._read_at - RATE_WINDOW_S:
                self._ended.popleft()
            turns = {}
            for raw_owner, raw_pass, raw_weight, waiting in owners:
                name = raw_owner.decode()
                turns[name] = OwnerTurn(name, float(raw_pass), 1 / float(raw_weight), int(waiting))
            self._order = FairOrder(int(in_arq), turns)
        return self._order  # type: ignore[return-value]

    def eta_seconds(self, position: int) -> float | None:
        """Seconds until a job with ``position`` jobs ahead starts, at the rate jobs have ended lately; None
        until that rate is known."""
        if len(self._ended) < 2:
            return None
        (first_at, first), (last_at, last) = self._ended[0], self._ended[-1]
        if last <= first or last_at - first_at < 1:
            return None
        return round((position + 1) * (last_at - first_at) / (last - first), 1)


def layout(ttl_ms: int, min_window: int) -> str:
    """The scripts' last argument: every key they use, the ttl, and the least size of the hand-off."""
    return json.dumps({**keys.layout(), "ttl": ttl_ms, "min_window": min_window})


@dataclass(frozen=True)
class OwnerQueue:
    """One owner's part of the backlog, for /metrics."""

    waiting: int  # in its own queue
    dispatched: int  # in arq's queue: next, or running
    next_waited_s: float  # how long the job that goes next has waited so far (0 when none waits)


async def owner_queues(redis: ArqRedis, owners: list[str]) -> dict[str, OwnerQueue]:
    async with redis.pipeline(transaction=False) as pipe:
        for owner in owners:
            pipe.zcard(keys.waiting(owner))
            pipe.scard(keys.dispatched(owner))
            pipe.zrange(keys.waiting(owner), 0, 0, withscores=True)
        answers = await pipe.execute() if owners else []
    now, queues = now_ms(), {}
    for index, owner in enumerate(owners):
        waiting, dispatched, head = answers[3 * index : 3 * index + 3]
        waited = (now - head[0][1] % 1e13) / 1000 if head else 0.0  # the score: band * 1e13 + created
        queues[owner] = OwnerQueue(int(waiting), int(dispatched), max(0.0, waited))
    return queues
