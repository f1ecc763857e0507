"""What the fleet says of itself: worker heartbeats, the models their TorchServes serve, and the counters every
process adds to, for ``/v1/queue``, ``/v1/models``, ``/readyz`` and ``/metrics``."""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json

from arq.connections import ArqRedis

from gateway.jobs import keys
from gateway.jobs.records import ModelInfo, QueueStats, WorkerInfo, now_ms

ENDED = ("succeeded", "failed", "canceled", "expired")
WORKER_TTL_MS = 10_000  # a worker whose heartbeat is older than this counts as gone

# Histogram buckets (seconds) of the job timings that /metrics exports.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
HISTOGRAMS = {
    "queue_wait": "Seconds from submission until a worker started the job",
    "inference": "Seconds of model time per job, as the handler measured it",
    "total": "Seconds from submission until the job ended",
}


@dataclasses.dataclass(frozen=True)
class Counters:
    """Every counter and histogram bucket, with the backlog (every job accepted and not ended) and the running
    jobs, for /metrics."""

    stats: dict[str, float]
    in_backlog: int
    running: int


def counter_increments(status: str, seconds: dict[str, float]) -> list[tuple[str, float]]:
    """The counter and histogram-bucket increments for one job that ended with ``status``."""
    increments: list[tuple[str, float]] = [(f"finished:{status}", 1)]
    for name, value in seconds.items():
        index = bisect.bisect_left(BUCKETS, value)
        bucket = repr(BUCKETS[index]) if index < len(BUCKETS) else "+Inf"
        increments += [(f"{name}:bucket:{bucket}", 1), (f"{name}:sum", value)]
    return increments


class Fleet:
    def __init__(self, redis: ArqRedis) -> None:
        self.redis = redis

    async def heartbeat(self, worker: WorkerInfo, at_ms: float) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(keys.WORKERS, {worker.id: at_ms})
            pipe.zremrangebyscore(keys.WORKERS, "-inf", at_ms - 60_000)
            pipe.set(keys.worker(worker.id), worker.to_json(), px=WORKER_TTL_MS)
            if worker.models:
                pipe.set(keys.MODELS, json.dumps([model.to_api() for model in worker.models]))
            await pipe.execute()
        await self.count_slots()

    async def forget_worker(self, worker_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.WORKERS, worker_id)
            pipe.delete(keys.worker(worker_id))
            await pipe.execute()
        await self.count_slots()

    async def count_slots(self) -> None:
        """Record the jobs the live workers take at once: the dispatch keeps arq's queue at twice that. Each
        heartbeat counts again, so a worker gone without a word drops out within WORKER_TTL_MS."""
        slots = sum(worker.concurrency for worker in await self.live_workers())
        await self.redis.hset(keys.STATS, keys.FLEET_SLOTS, str(slots))  # type: ignore[misc]

    async def live_workers(self) -> list[WorkerInfo]:
        """Every worker whose heartbeat is recent, as it last described itself and its TorchServe."""
        ids = await self.redis.zrangebyscore(keys.WORKERS, now_ms() - WORKER_TTL_MS, "+inf")
        infos = await self.redis.mget([keys.worker(w.decode()) for w in ids]) if ids else []
        return [WorkerInfo.from_json(info) for info in infos if info]

    async def models(self) -> list[ModelInfo] | None:
        """Each model version that live workers' TorchServes serve, with their workers summed. While no
        worker is alive (scaled to zero): the last catalog a worker reported, with no workers. None if no
        worker ever reported one."""
        merged: dict[tuple[str, str], ModelInfo] = {}
        for worker in await self.live_workers():
            for model in worker.models:
                key = (model.name, model.version)
                if key in merged:
                    seen = merged[key]
                    workers, ready = seen.workers + model.workers, seen.workers_ready + model.workers_ready
                    merged[key] = dataclasses.replace(seen, workers=workers, workers_ready=ready)
                else:
                    merged[key] = model
        if merged:
            return list(merged.values())
        last = await self.redis.get(keys.MODELS)
        if last is None:
            return None
        return [
            dataclasses.replace(ModelInfo.from_api(m), workers=0, workers_ready=0) for m in json.loads(last)
        ]

    async def queue_stats(self, *, show_hosts: bool = False) -> QueueStats:
        """The queue's counts and the live workers. Without ``show_hosts`` (callers are tenants, not the
        operator) a worker is named by a digest of its id, with no host name or pid."""
        now = now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(keys.BACKLOG)
            pipe.zcount(keys.RUNNING, now, "+inf")
            pipe.hmget(keys.STATS, [f"finished:{status}" for status in ENDED])
            in_backlog, running, finished = await pipe.execute()
        workers = [dataclasses.asdict(w) for w in await self.live_workers()]
        for worker in workers:
            del worker["models"]  # /v1/models shows them, summed over workers
            if not show_hosts:
                del worker["host"], worker["pid"]
                worker["id"] = hashlib.sha256(worker["id"].encode()).hexdigest()[:16]
        succeeded, failed, canceled, expired = (int(float(v or 0)) for v in finished)
        queued = max(0, in_backlog - running)
        return QueueStats(queued, running, succeeded, failed, canceled, expired, workers)

    async def counters(self) -> Counters:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.STATS)
            pipe.zcount(keys.RUNNING, now_ms(), "+inf")
            pipe.zcard(keys.BACKLOG)
            raw, running, in_backlog = await pipe.execute()
        return Counters({k.decode(): float(v) for k, v in raw.items()}, in_backlog, running)
