"""Every Redis read and write of a job: submit, load, cancel, delete, start, complete, heartbeats, counters.

arq is the queue: a job is queued while it is in ``arq:queue`` and running while ``arq:in-progress:<id>``
exists. ``segserve:job:<id>`` holds the rest (model, parameters, owner, times) and, once the job has
ended, its outcome; arq keeps no results of its own (``keep_result = 0``). Inputs and masks live under
their own keys with a TTL, never as arq job arguments. Each step that writes is one Lua script in
``lua/``, so it is atomic and concurrent gateways and workers cannot interleave within it.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files
from typing import Any

from arq.connections import ArqRedis
from arq.constants import default_queue_name, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.jobs import serialize_job
from redis.commands.core import AsyncScript
from redis.typing import EncodableT

from gateway.jobs.records import (
    Job,
    JobError,
    JobStatus,
    Outcome,
    QueueStats,
    Result,
    Submission,
    WorkerInfo,
)

QUEUE = default_queue_name
FUNCTION = "segment"
CHANGED_CHANNEL = "segserve:changed"  # a job id, whenever that job's state changed
ENQUEUED_CHANNEL = "segserve:enqueued"  # wakes idle workers at once instead of at their next poll
RUNNING = "segserve:running"  # sorted set: job id -> deadline of its try (ms); stale entries age out
WORKERS = "segserve:workers"  # sorted set: worker id -> last heartbeat (ms)
MODELS = "segserve:models"  # the last model catalog a worker reported: /v1/models while none is alive
STATS = "segserve:stats"  # hash of counters and histogram buckets, shared by all workers
META_PREFIX = "segserve:job:"
WORKER_TTL_MS = 10_000  # a worker whose heartbeat is older than this counts as gone

# Each step of the protocol is one Lua script, lua/<step>.lua.
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
)
DELIVERIES = "segserve:deliveries"  # sorted set: webhook delivery id -> when it is due (ms)

# Histogram buckets (seconds) of the job timings that /metrics exports.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
HISTOGRAMS = {
    "queue_wait": "Seconds from submission until a worker started the job",
    "inference": "Seconds of model time per job, as the handler measured it",
    "total": "Seconds from submission until the job ended",
}


def meta_key(job_id: str) -> str:
    return META_PREFIX + job_id


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


def now_ms() -> float:
    return time.time() * 1000


def serialize(obj: Any) -> bytes:
    """arq's serializer: JSON, so nothing in Redis can make a worker run code (pickle could)."""
    return json.dumps(obj, separators=(",", ":"), default=_describe).encode()


def deserialize(data: bytes) -> Any:
    return json.loads(data)


def _describe(obj: Any) -> Any:
    if isinstance(obj, BaseException):  # arq serializes exceptions of its own
        return f"{type(obj).__name__}: {obj}"
    if isinstance(obj, datetime):
        return obj.isoformat()
    raise TypeError(f"cannot serialize {type(obj).__name__}")


@dataclass(frozen=True)
class Delivery:
    """A webhook delivery: one event of one job, for its receiver."""

    id: str  # the webhook-id, the same for every attempt
    type: str  # job.started or job.completed
    url: str
    owner: str  # whose key signs it
    created_at: float
    attempts: int
    job: Job  # the job as it was at the event
    body: bytes | None  # as sent at the first attempt, and so at every later one
    lease: str  # this attempt's claim: recording it needs it


class QueueFull(Exception):
    pass


class NotReplicated(Exception):
    """Fewer replicas than asked for confirmed a new job in time."""


@dataclass(frozen=True)
class RetryRefused:
    """Why a job cannot be queued again: 'active' (queued or running), 'succeeded', 'ending' (canceled
    while it ran, and that try has not ended yet), 'no_input' (its input expired) or 'missing'."""

    reason: str


@dataclass(frozen=True)
class Started:
    """A job a worker has taken for one try, with its input (None when the input has expired)."""

    job: Job
    image: bytes | None


def _script(redis: ArqRedis, name: str) -> AsyncScript:
    lua = files("gateway.jobs").joinpath("lua")
    # webhook.lua defines what every step may need to queue a webhook delivery.
    return redis.register_script(
        lua.joinpath("webhook.lua").read_text() + lua.joinpath(f"{name}.lua").read_text()
    )


def delivery_key(delivery_id: str) -> str:
    return f"segserve:delivery:{delivery_id}"


def _decode(flat: list[bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in zip(flat[::2], flat[1::2], strict=True)}


def _flat(fields: dict[str, str]) -> str:
    return json.dumps([item for pair in fields.items() for item in pair])


class JobStore:
    """The job protocol, for gateways and workers alike."""

    def __init__(
        self,
        redis: ArqRedis,
        result_ttl: int,
        max_queued: int = 0,
        min_replicas: int = 0,
        replica_timeout_ms: int = 1000,
    ) -> None:
        self.redis = redis
        self.ttl_ms = result_ttl * 1000
        self.max_queued = max_queued
        self.min_replicas = min_replicas
        self.replica_timeout_ms = replica_timeout_ms
        self._scripts = {step: _script(redis, step) for step in STEPS}

    # The gateway's side.

    async def submit(self, sub: Submission, idempotency: str | None = None) -> tuple[Job, bool]:
        """Store and enqueue; return (job, created). A repeated idempotency key returns the first job."""
        job_id = new_job_id()
        created = now_ms()
        fields = {
            "model": sub.model,
            "params": json.dumps(sub.params),
            "owner": sub.owner,
            "content_type": sub.content_type,
            "created_at": repr(created),
        }
        if sub.image_path is not None:
            fields["image_path"] = sub.image_path
        if sub.target_class_ids is not None:
            fields["target_class_ids"] = json.dumps(sub.target_class_ids)
        if sub.webhook is not None:
            fields["webhook"] = sub.webhook
            fields["webhook_events"] = json.dumps(list(sub.webhook_events))
        arq_job = serialize_job(FUNCTION, (job_id,), {}, None, int(created), serializer=serialize)
        keys = [QUEUE, job_key_prefix + job_id, input_key(job_id), meta_key(job_id), STATS, RUNNING]
        if idempotency:
            keys.append(idempotency_key(sub.owner, idempotency))
        args: list[EncodableT] = [
            job_id, repr(created), self.ttl_ms, self.max_queued, arq_job, sub.image, _flat(fields),
            ENQUEUED_CHANNEL, META_PREFIX,
        ]  # fmt: skip
        if self.min_replicas:
            # WAIT counts the replicas that have this connection's writes: it goes on the submit's connection.
            async with self.redis.pipeline(transaction=False) as pipe:
                await self._scripts["submit"](keys=keys, args=args, client=pipe)
                pipe.execute_command("WAIT", self.min_replicas, self.replica_timeout_ms)
                answer, *confirmed = await pipe.execute()
        else:  # one round trip: a pipeline with a script asks Redis first whether it has the script
            answer, confirmed = await self._scripts["submit"](keys=keys, args=args), []
        kind = answer[0].decode()
        if kind == "full":
            raise QueueFull()
        if kind == "existing":
            first = await self.load(answer[1].decode(), sub.owner)
            if first is not None:
                return first, False
            return await self.submit(sub, idempotency)  # the first job was deleted in between: start afresh
        if confirmed and int(confirmed[0]) < self.min_replicas:
            # Not on enough replicas to survive a failover: take it back, and let the client try again.
            await self.delete(job_id)
            raise NotReplicated(
                f"the job store's replicas did not confirm the job in {self.replica_timeout_ms} ms"
            )
        return self._job(job_id, fields, running=False, position=int(answer[1])), True

    async def load(self, job_id: str, owner: str = "") -> Job | None:
        """The job; None when unknown, expired, deleted or another key's."""
        if not valid_id(job_id):
            return None
        keys = [meta_key(job_id), in_progress_key_prefix + job_id, QUEUE]
        state = await self._scripts["load"](keys=keys, args=[job_id, in_progress_key_prefix])
        if not state:
            return None
        raw_meta, running, position = state
        fields = _decode(raw_meta)
        if fields.get("owner", "") != owner:
            return None
        return self._job(job_id, fields, running=bool(running), position=int(position))

    async def cancel(self, job_id: str) -> JobStatus | None:
        """The job's status after the cancel: CANCELED, or how it had already ended; None when unknown."""
        keys = [meta_key(job_id), QUEUE, job_key_prefix + job_id, in_progress_key_prefix + job_id,
                retry_key_prefix + job_id, input_key(job_id), STATS]  # fmt: skip
        args: list[EncodableT] = [job_id, repr(now_ms()), CHANGED_CHANNEL, self.ttl_ms]
        answer = (await self._scripts["cancel"](keys=keys, args=args)).decode()
        return None if answer == "missing" else JobStatus(answer)

    async def retry(self, job_id: str) -> RetryRefused | None:
        """Queue a failed or canceled job again under its own id; None when it is queued, else why not."""
        enqueued = now_ms()
        arq_job = serialize_job(FUNCTION, (job_id,), {}, None, int(enqueued), serializer=serialize)
        keys = [meta_key(job_id), input_key(job_id), QUEUE, job_key_prefix + job_id,
                in_progress_key_prefix + job_id, retry_key_prefix + job_id]  # fmt: skip
        args: list[EncodableT] = [
            job_id,
            repr(enqueued),
            self.ttl_ms,
            arq_job,
            ENQUEUED_CHANNEL,
            CHANGED_CHANNEL,
        ]
        answer = await self._scripts["retry"](keys=keys, args=args)
        kind = answer[0].decode()
        if kind == "queued":
            return None
        return RetryRefused(answer[1].decode() if kind == "refused" else kind)

    async def delete(self, job_id: str) -> None:
        """Forget everything of the job. A running one's completion then keeps nothing."""
        keys = [meta_key(job_id), input_key(job_id), mask_key(job_id), QUEUE, job_key_prefix + job_id,
                in_progress_key_prefix + job_id, retry_key_prefix + job_id]  # fmt: skip
        await self._scripts["delete"](keys=keys, args=[job_id, CHANGED_CHANNEL])

    async def mask(self, job_id: str) -> bytes | None:
        data: bytes | None = await self.redis.get(mask_key(job_id))
        return data

    async def image(self, job_id: str) -> bytes | None:
        data: bytes | None = await self.redis.get(input_key(job_id))
        return data

    # The worker's side.

    async def start(self, job_id: str, deadline_ms: float) -> Started | None:
        """Take the job for one try; None when there is nothing to do (deleted, canceled or ended)."""
        keys = [meta_key(job_id), input_key(job_id), RUNNING]
        args: list[EncodableT] = [job_id, repr(now_ms()), deadline_ms, CHANGED_CHANNEL]
        answer = await self._scripts["start"](keys=keys, args=args)
        kind = answer[0].decode()
        if kind in ("gone", "ended"):
            return None
        job = self._job(job_id, _decode(answer[1]), running=True, position=-1)
        return Started(job, answer[2] if kind == "run" else None)

    async def complete(self, job: Job, outcome: Outcome) -> JobStatus | None:
        """End the job with ``outcome`` in one atomic step, unless a cancel or delete came first.

        Returns the job's status afterwards (the outcome's, or CANCELED), or None when it is gone.
        """
        finished = now_ms()
        timings = {**outcome.timings_ms, "total": round(finished - job.created_at, 1)}
        fields = {"timings_ms": json.dumps(timings)}
        if outcome.result is not None:
            fields["result"] = json.dumps(dataclasses.asdict(outcome.result))
        if outcome.error is not None:
            fields["error"] = json.dumps(dataclasses.asdict(outcome.error))
        seconds = {"total": timings["total"] / 1000}
        if job.started_at is not None:
            seconds["queue_wait"] = (job.started_at - job.created_at) / 1000
        if "inference" in timings:
            seconds["inference"] = timings["inference"] / 1000
        status = outcome.status.value
        keys = [meta_key(job.id), input_key(job.id), mask_key(job.id), RUNNING, STATS]
        args: list[EncodableT] = [
            job.id, repr(finished), self.ttl_ms, status, _flat(fields), outcome.mask_png or b"",
            json.dumps(counter_increments(status, seconds)), CHANGED_CHANNEL,
        ]  # fmt: skip
        answer = (await self._scripts["complete"](keys=keys, args=args)).decode()
        return None if answer == "gone" else JobStatus(answer)

    async def release(self, job_id: str) -> bool:
        """The try ended without an outcome: whether the job still wants another (not canceled or gone)."""
        return bool(await self._scripts["release"](keys=[meta_key(job_id), RUNNING], args=[job_id]))

    async def abandon(self, job_id: str, error: JobError) -> bool:
        """arq has ended the job without an outcome of ours: fail it with ``error``, unless it has ended,
        is gone, or arq will run it again. Whether it failed it."""
        keys = [meta_key(job_id), input_key(job_id), QUEUE, in_progress_key_prefix + job_id, RUNNING, STATS]
        args: list[EncodableT] = [
            job_id, repr(now_ms()), self.ttl_ms, json.dumps(dataclasses.asdict(error)), CHANGED_CHANNEL,
        ]  # fmt: skip
        return bool(await self._scripts["abandon"](keys=keys, args=args))

    async def heartbeat(self, worker: WorkerInfo, at_ms: float) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(WORKERS, {worker.id: at_ms})
            pipe.zremrangebyscore(WORKERS, "-inf", at_ms - 60_000)
            pipe.set(worker_key(worker.id), worker.to_json(), px=WORKER_TTL_MS)
            if worker.models:
                pipe.set(MODELS, json.dumps(worker.models))
            await pipe.execute()

    async def forget_worker(self, worker_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(WORKERS, worker_id)
            pipe.delete(worker_key(worker_id))
            await pipe.execute()

    # Webhook deliveries, made by the workers.

    async def claim_deliveries(self, lease_ms: float, limit: int) -> list[Delivery]:
        """The deliveries due now, each leased for ``lease_ms`` to the caller."""
        lease = secrets.token_hex(8)
        claimed = await self._scripts["claim"](
            keys=[DELIVERIES], args=[repr(now_ms()), lease_ms, limit, lease]
        )
        deliveries = []
        for raw_id, raw_fields in claimed:
            fields = _decode(raw_fields)
            snapshot = _decode([item.encode() for item in json.loads(fields["snapshot"])])
            job = self._job(fields["job_id"], snapshot, running="status" not in snapshot, position=-1)
            body = fields.get("body")
            deliveries.append(Delivery(raw_id.decode(), fields["type"], fields["url"], fields["owner"],
                                       float(fields["created"]), int(fields["attempts"]), job,
                                       body.encode() if body is not None else None, lease))  # fmt: skip
        return deliveries

    async def record_delivery(
        self, delivery: Delivery, state: str, status: int | None, next_ms: float, body: bytes
    ) -> None:
        """An attempt at ``delivery`` ended: ``state`` is 'pending' (try again at ``next_ms``), 'delivered' or
        'failed' (given up)."""
        keys = [delivery_key(delivery.id), DELIVERIES, STATS]
        args: list[EncodableT] = [
            delivery.id,
            state,
            "" if status is None else status,
            next_ms,
            body,
            self.ttl_ms,
            delivery.lease,
        ]
        await self._scripts["record"](keys=keys, args=args)

    # What operators see.

    async def queue_stats(self) -> QueueStats:
        now = now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(QUEUE)
            pipe.zcount(RUNNING, now, "+inf")
            pipe.hmget(STATS, ["finished:succeeded", "finished:failed", "finished:canceled"])
            in_queue, running, finished = await pipe.execute()
        workers = [dataclasses.asdict(w) for w in await self.live_workers()]
        for worker in workers:
            del worker["models"]  # /v1/models shows them, summed over workers
        succeeded, failed, canceled = (int(float(v or 0)) for v in finished)
        return QueueStats(max(0, in_queue - running), running, succeeded, failed, canceled, workers)

    async def live_workers(self) -> list[WorkerInfo]:
        """Every worker whose heartbeat is recent, as it last described itself and its TorchServe."""
        ids = await self.redis.zrangebyscore(WORKERS, now_ms() - WORKER_TTL_MS, "+inf")
        infos = await self.redis.mget([worker_key(w.decode()) for w in ids]) if ids else []
        return [WorkerInfo(**json.loads(info)) for info in infos if info]

    async def models(self) -> list[dict[str, Any]] | None:
        """Each model version that live workers' TorchServes serve, with their workers summed. While no
        worker is alive (scaled to zero): the last catalog a worker reported, with no workers. None if no
        worker ever reported one."""
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for worker in await self.live_workers():
            for model in worker.models:
                key = (model["name"], model["version"])
                if key in merged:
                    merged[key]["workers"] += model["workers"]
                    merged[key]["workers_ready"] += model["workers_ready"]
                else:
                    merged[key] = dict(model)
        if merged:
            return list(merged.values())
        last = await self.redis.get(MODELS)
        if last is None:
            return None
        return [{**model, "workers": 0, "workers_ready": 0} for model in json.loads(last)]

    async def counters(self) -> tuple[dict[str, float], int, int]:
        """(every counter and histogram bucket, jobs in arq's queue, jobs running), for /metrics."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(STATS)
            pipe.zcard(QUEUE)
            pipe.zcount(RUNNING, now_ms(), "+inf")
            raw, in_queue, running = await pipe.execute()
        return {k.decode(): float(v) for k, v in raw.items()}, in_queue, running

    def _job(self, job_id: str, fields: dict[str, str], running: bool, position: int) -> Job:
        """The job from its stored fields and what arq's keys say about it (see load)."""
        created = float(fields["created_at"])
        finished = float(fields["finished_at"]) if "finished_at" in fields else None
        if "status" in fields:
            status = JobStatus(fields["status"])
        elif running:
            status = JobStatus.RUNNING
        elif position >= 0:
            status = JobStatus.QUEUED
        else:
            status = JobStatus.FAILED  # neither queued, running nor ended: see below
        error = JobError(**json.loads(fields["error"])) if "error" in fields else None
        if status is JobStatus.FAILED and error is None:
            # arq dropped the job without our outcome: it stayed queued past its TTL, or arq gave up on it
            # after its worker died too many times (the worker's log says which).
            error = JobError("expired", "the job ended without an outcome: it expired or its worker gave up")
        target = fields.get("target_class_ids")
        return Job(
            id=job_id,
            status=status,
            model=fields["model"],
            params=json.loads(fields["params"]),
            owner=fields.get("owner", ""),
            content_type=fields["content_type"],
            created_at=created,
            expires_at=(finished or created) + self.ttl_ms,
            attempts=int(fields.get("attempts", 0)),
            started_at=float(fields["started_at"]) if "started_at" in fields else None,
            finished_at=finished,
            position=position if status is JobStatus.QUEUED else None,
            result=Result(**json.loads(fields["result"])) if "result" in fields else None,
            error=error,
            timings_ms=json.loads(fields.get("timings_ms", "{}")),
            image_path=fields.get("image_path"),
            target_class_ids=json.loads(target) if target else None,
            webhook=fields.get("webhook"),
            webhook_events=tuple(json.loads(fields.get("webhook_events", "[]"))),
            deliveries=json.loads(fields.get("deliveries", "{}")),
        )


def counter_increments(status: str, seconds: dict[str, float]) -> list[tuple[str, float]]:
    """The counter and histogram-bucket increments for one job that ended with ``status``."""
    increments: list[tuple[str, float]] = [(f"finished:{status}", 1)]
    for name, value in seconds.items():
        index = bisect.bisect_left(BUCKETS, value)
        bucket = repr(BUCKETS[index]) if index < len(BUCKETS) else "+Inf"
        increments += [(f"{name}:bucket:{bucket}", 1), (f"{name}:sum", value)]
    return increments
