"""Jobs in Redis: the keys, submission, state as the API shows it, cancel, delete, and waiting for the end.

A job's state is derived, never copied: arq's own keys say whether it is queued (in ``arq:queue``),
running (``arq:in-progress:<id>``) or finished (``arq:result:<id>``, holding the worker's outcome);
``segserve:job:<id>`` holds what arq does not know (model, parameters, owner, times, cancellation).
Inputs live under their own key with a TTL, never as arq job arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from arq.connections import ArqRedis
from arq.constants import default_queue_name, in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import serialize_job

logger = logging.getLogger(__name__)

QUEUE = default_queue_name
FUNCTION = "segment"
DONE_CHANNEL = "segserve:done"
ENQUEUED_CHANNEL = "segserve:enqueued"  # wakes idle workers at once instead of at their next poll
RUNNING = "segserve:running"  # sorted set: job id -> deadline (ms); stale entries age out
WORKERS = "segserve:workers"  # sorted set: worker id -> last heartbeat (ms)
STATS = "segserve:stats"  # hash of counters and histogram buckets, shared by all workers


def meta_key(job_id: str) -> str:
    return f"segserve:job:{job_id}"


def input_key(job_id: str) -> str:
    return f"segserve:input:{job_id}"


def mask_key(job_id: str) -> str:
    return f"segserve:mask:{job_id}"


def worker_key(worker_id: str) -> str:
    return f"segserve:worker:{worker_id}"


def idempotency_key(owner: str, key: str) -> str:
    return f"segserve:idempotency:{owner}:{key}"


JOB_ID = re.compile(r"^j_[0-9a-f]{32}$")


def valid_id(job_id: str) -> bool:
    return bool(JOB_ID.match(job_id))


def new_job_id() -> str:
    return "j_" + secrets.token_hex(16)  # 128 random bits


def serialize(obj: Any) -> bytes:
    """arq's serializer: JSON, so nothing in Redis can make a worker run code (pickle could)."""
    return json.dumps(obj, separators=(",", ":"), default=_describe).encode()


def deserialize(data: bytes) -> Any:
    return json.loads(data)


def _describe(obj: Any) -> Any:
    if isinstance(obj, BaseException):  # arq stores exceptions of its own as results
        return f"{type(obj).__name__}: {obj}"
    if isinstance(obj, datetime):
        return obj.isoformat()
    raise TypeError(f"cannot serialize {type(obj).__name__}")


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


def iso(ms: float | None) -> str | None:
    if ms is None:
        return None
    moment = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_ms() -> float:
    return time.time() * 1000


# One round trip, atomic: refuse when the queue is full (-1), else store input, metadata and arq's job
# and return the job's position: the jobs ahead that no worker has started (running ones age out of KEYS[6]).
SUBMIT = """
local ahead = redis.call('ZCARD', KEYS[1])
if ahead >= tonumber(ARGV[4]) then return -1 end
redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[3])
redis.call('HSET', KEYS[4], unpack(cjson.decode(ARGV[7])))
redis.call('PEXPIRE', KEYS[4], ARGV[3])
redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HINCRBY', KEYS[5], 'submitted', 1)
redis.call('PUBLISH', ARGV[8], '1')
local running = redis.call('ZCOUNT', KEYS[6], ARGV[2], '+inf')
return math.max(0, ahead - running)
"""

# Everything a job's state is derived from, read in one atomic step: read apart, a job that ends between
# the reads would look neither queued, running nor finished. Returns nil for an unknown job, else
# {metadata, arq's result or nil, 1 if running, jobs ahead that no worker has started or -1}.
LOAD = """
local meta = redis.call('HGETALL', KEYS[1])
if #meta == 0 then return false end
local result = redis.call('GET', KEYS[2])
local running = redis.call('EXISTS', KEYS[3])
local position = -1
local score = (not result and running == 0) and redis.call('ZSCORE', KEYS[4], ARGV[1])
if score then
  position = 0
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. score)) do
    if redis.call('EXISTS', ARGV[2] .. id) == 0 then position = position + 1 end
  end
end
return {meta, result, running, position}
"""

# A queued job leaves the queue and never runs; a running one is flagged, and its worker discards the result.
CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
if redis.call('HEXISTS', KEYS[1], 'canceled_at') == 1 then return 'canceled' end
if redis.call('EXISTS', KEYS[4]) == 1 then return 'finished' end
if redis.call('EXISTS', KEYS[5]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[3], KEYS[6])
end
redis.call('HSET', KEYS[1], 'canceled_at', ARGV[2])
redis.call('HINCRBY', KEYS[7], 'finished:canceled', 1)
return 'canceled'
"""


@dataclass
class Submission:
    model: str
    params: dict[str, Any]
    image: bytes
    content_type: str
    owner: str = ""
    extra: dict[str, str] | None = None  # e.g. the compatibility route's image_path and class order


class QueueFull(Exception):
    pass


class JobStore:
    """Everything the gateway does with jobs in Redis."""

    def __init__(self, redis: ArqRedis, result_ttl: int, max_queued: int) -> None:
        self.redis = redis
        self.ttl_ms = result_ttl * 1000
        self.max_queued = max_queued
        self._submit = redis.register_script(SUBMIT)
        self._load = redis.register_script(LOAD)
        self._cancel = redis.register_script(CANCEL)

    async def submit(self, sub: Submission, idempotency: str | None = None) -> tuple[dict[str, Any], bool]:
        """Store and enqueue; return (job, created). A repeated idempotency key returns the first job."""
        job_id = new_job_id()
        if idempotency:
            key = idempotency_key(sub.owner, idempotency)
            if not await self.redis.set(key, job_id, nx=True, px=self.ttl_ms):
                existing = await self.redis.get(key)
                first = await self.load(existing.decode(), sub.owner) if existing else None
                if first is not None:
                    return first, False
                await self.redis.set(key, job_id, px=self.ttl_ms)
        created = now_ms()
        meta = {
            "id": job_id,
            "model": sub.model,
            "params": json.dumps(sub.params),
            "owner": sub.owner,
            "content_type": sub.content_type,
            "created_at": repr(created),
            **(sub.extra or {}),
        }
        job = serialize_job(FUNCTION, (job_id,), {}, None, int(created), serializer=serialize)
        flat = [item for pair in meta.items() for item in pair]
        position = await self._submit(
            keys=[QUEUE, job_key_prefix + job_id, input_key(job_id), meta_key(job_id), STATS, RUNNING],
            args=[
                job_id,
                int(created),
                self.ttl_ms,
                self.max_queued,
                job,
                sub.image,
                json.dumps(flat),
                ENQUEUED_CHANNEL,
            ],
        )
        if position < 0:
            if idempotency:
                await self.redis.delete(idempotency_key(sub.owner, idempotency))
            raise QueueFull()
        return self.render(job_id, meta, None, False, position), True

    async def load(self, job_id: str, owner: str = "") -> dict[str, Any] | None:
        """The job as the API shows it; None when unknown, expired, deleted or another key's."""
        keys = [meta_key(job_id), result_key_prefix + job_id, in_progress_key_prefix + job_id, QUEUE]
        state = await self._load(keys=keys, args=[job_id, in_progress_key_prefix])
        if not state:
            return None
        raw_meta, raw_result, in_progress, position = state
        meta = {k.decode(): v.decode() for k, v in zip(raw_meta[::2], raw_meta[1::2], strict=True)}
        if meta.get("owner", "") != owner:
            return None
        outcome = _outcome(raw_result)
        return self.render(job_id, meta, outcome, bool(in_progress), position)

    def render(
        self,
        job_id: str,
        meta: dict[str, str],
        outcome: dict[str, Any] | None,
        in_progress: bool,
        position: int | None,
    ) -> dict[str, Any]:
        """The API's job object from what Redis holds (see load)."""
        created = float(meta["created_at"])
        job: dict[str, Any] = {
            "id": job_id,
            "status": JobStatus.QUEUED.value,
            "model": meta["model"],
            "params": json.loads(meta["params"]),
            "created_at": iso(created),
            "started_at": iso(float(meta["started_at"])) if "started_at" in meta else None,
            "finished_at": None,
            "expires_at": iso(created + self.ttl_ms),
            "attempts": int(meta.get("attempts", 0)),
            "timings_ms": {},
        }
        if "canceled_at" in meta:
            job["status"] = JobStatus.CANCELED.value
            job["finished_at"] = iso(float(meta["canceled_at"]))
        elif outcome is not None:
            job["status"] = outcome.get("status", JobStatus.FAILED.value)
            job["finished_at"] = iso(outcome.get("finished_at"))
            job["expires_at"] = iso(outcome.get("expires_at")) or job["expires_at"]
            job["timings_ms"] = outcome.get("timings_ms", {})
            if job["status"] == JobStatus.SUCCEEDED.value:
                job["result"] = {**outcome["result"], "mask_url": f"/v1/jobs/{job_id}/mask.png"}
            elif job["status"] == JobStatus.FAILED.value:
                job["error"] = outcome.get("error") or {"code": "internal_error", "message": "job failed"}
        elif in_progress:
            job["status"] = JobStatus.RUNNING.value
        elif position is not None and position >= 0:
            job["position"] = int(position)
        else:  # neither queued, running nor finished: its arq keys expired before a worker took it
            job["status"] = JobStatus.FAILED.value
            job["error"] = {"code": "expired", "message": "the job expired before a worker took it"}
        if job["started_at"] and job["status"] != JobStatus.QUEUED.value:
            job["timings_ms"].setdefault("queued", round(float(meta["started_at"]) - created, 1))
        job["_meta"] = meta  # for the routes that need more than the API shows; dropped before answering
        return job

    async def cancel(self, job_id: str) -> str:
        """'canceled', 'finished' or 'missing'."""
        keys = [
            meta_key(job_id), QUEUE, job_key_prefix + job_id, result_key_prefix + job_id,
            in_progress_key_prefix + job_id, input_key(job_id), STATS,
        ]  # fmt: skip
        outcome = await self._cancel(keys=keys, args=[job_id, repr(now_ms())])
        outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
        if outcome == "canceled":
            await self.redis.publish(DONE_CHANNEL, job_id)
        return str(outcome)

    async def delete(self, job_id: str) -> None:
        """Forget everything of the job. A running one finishes, sees its metadata gone and drops the result."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.exists(in_progress_key_prefix + job_id)
            pipe.delete(meta_key(job_id), input_key(job_id), mask_key(job_id), result_key_prefix + job_id)
            running, _ = await pipe.execute()
        if not running:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(QUEUE, job_id)
                pipe.delete(job_key_prefix + job_id)
                await pipe.execute()
        await self.redis.publish(DONE_CHANNEL, job_id)

    async def mask(self, job_id: str) -> bytes | None:
        data: bytes | None = await self.redis.get(mask_key(job_id))
        return data

    async def image(self, job_id: str) -> bytes | None:
        data: bytes | None = await self.redis.get(input_key(job_id))
        return data

    async def queue_stats(self) -> dict[str, Any]:
        now = now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(QUEUE)
            pipe.zcount(RUNNING, now, "+inf")
            pipe.hmget(STATS, ["finished:succeeded", "finished:failed", "finished:canceled"])
            pipe.zrangebyscore(WORKERS, now - 10_000, "+inf")
            in_queue, running, finished, worker_ids = await pipe.execute()
        workers = []
        if worker_ids:
            infos = await self.redis.mget([worker_key(w.decode()) for w in worker_ids])
            workers = [json.loads(info) for info in infos if info]
        succeeded, failed, canceled = (int(v or 0) for v in finished)
        return {
            "queued": max(0, in_queue - running),
            "running": running,
            "succeeded": succeeded,
            "failed": failed,
            "canceled": canceled,
            "workers": workers,
        }


def _outcome(raw: bytes | None) -> dict[str, Any] | None:
    """The worker's outcome from arq's result record; arq's own failures become failed outcomes."""
    if raw is None:
        return None
    try:
        record = deserialize(raw)
    except ValueError:
        return {"status": "failed", "error": {"code": "internal_error", "message": "unreadable result"}}
    result = record.get("r")
    if record.get("s") and isinstance(result, dict):
        return result
    return {
        "status": "failed",
        "finished_at": record.get("ft"),
        "error": {"code": "worker_error", "message": str(result)},
    }


class Waiters:
    """Wakes requests that wait for jobs to end, from one pub/sub subscription shared by all of them."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._events: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(DONE_CHANNEL)
                    self._wake_all()  # anything that ended while we were not listening
                    async for message in pubsub.listen():
                        job_id = message["data"].decode()
                        for event in self._events.get(job_id, ()):
                            event.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: wake everyone (they re-read), then reconnect
                logger.warning("job notifications interrupted (%s); reconnecting", exc)
                self._wake_all()
                await asyncio.sleep(0.5)

    def _wake_all(self) -> None:
        for events in self._events.values():
            for event in events:
                event.set()

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set when the job may have ended; register before reading the state to miss nothing."""
        event = asyncio.Event()
        self._events.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._events.get(job_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[job_id]


async def wait_for_end(
    store: JobStore, waiters: Waiters, job_id: str, owner: str, timeout: float
) -> dict[str, Any] | None:
    """The job once it has ended, or as it stands after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    async with waiters.watch(job_id) as event:
        while True:
            event.clear()  # before reading, so a notification during the read is not lost
            job = await store.load(job_id, owner)
            remaining = deadline - time.monotonic()
            if job is None or JobStatus(job["status"]).is_terminal() or remaining <= 0:
                return job
            # The notification is what wakes us; the 5 s bound only guards against a lost message.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), min(remaining, 5.0))
