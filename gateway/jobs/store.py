"""Every step of a job's life: submit, load, cancel, retry, delete, start, complete, and the sweep of its blobs.

arq is the queue: a job is queued while it is in arq's queue and running while arq's in-progress key for it
exists. The job's hash (``keys.job``) holds the rest (model, parameters, owner, times) and, once it has ended,
its outcome; arq keeps no results of its own (``keep_result = 0``). Image bytes never enter Redis: inputs,
masks and overlays are blobs (``gateway.jobs.blobs``), which this store writes and deletes with their job.
Each step that writes Redis is one Lua script in ``lua/``, so concurrent gateways and workers cannot
interleave within it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from dataclasses import asdict

from arq.connections import ArqRedis
from arq.jobs import serialize_job
from redis.typing import EncodableT

from gateway.jobs import keys
from gateway.jobs.blobs import Blobs
from gateway.jobs.bounds import NotReplicated, QueueFull, RetryRefused, StaleTry, StoreConfig
from gateway.jobs.connection import serialize
from gateway.jobs.fairness import Admission, FairView, OwnerLimits, layout
from gateway.jobs.fleet import Fleet, counter_increments
from gateway.jobs.outbox import Outbox, decode
from gateway.jobs.records import Job, JobError, JobStatus, Outcome, Priority, Submission, now_ms
from gateway.jobs.scripts import Scripts
from gateway.settings import Settings

logger = logging.getLogger(__name__)
FUNCTION = "segment"
# Admission stops while Redis uses more than this share of its maxmemory: the rest is room for the later
# steps of the jobs it holds (start, complete, deliveries), which may not be refused.
MEMORY_SHARE = 0.9
SWEEP_LEASE_MS = 60_000
LIST_LOOK_AT = 1000  # GET /v1/jobs looks at most at this many of an owner's jobs per page


class JobStore:
    """The job protocol, for gateways and workers alike; ``outbox`` and ``fleet`` share its Redis client."""

    def __init__(self, redis: ArqRedis, blobs: Blobs, config: StoreConfig | None = None) -> None:
        self.redis = redis
        self.blobs = blobs
        self.config = config or StoreConfig()
        self.scripts = Scripts(redis)
        self.outbox = Outbox(redis, self.scripts, self.config.ttl_ms)
        self.fleet = Fleet(redis)
        self.layout = layout(self.config.ttl_ms, self.config.min_window)
        self.view = FairView(redis, self.scripts, self.layout)

    @classmethod
    def from_settings(cls, redis: ArqRedis, settings: Settings) -> JobStore:
        return cls(redis, Blobs.from_settings(settings), StoreConfig.from_settings(settings))

    # The gateway's side.

    async def submit(
        self, sub: Submission, idempotency: str | None = None, limits: OwnerLimits | None = None
    ) -> tuple[Job, bool, Admission]:
        """Queue a job whose input the caller has put in the blob store, within the backlog's bounds and its
        owner's ``limits``; (job, created, how the owner's bounds stand). A repeated idempotency key returns
        the first job. When the job is not queued (a repeat, a bound, too few replicas), its input is deleted;
        QueueFull or NotReplicated say why."""
        created = now_ms()
        fields = sub.to_fields(created)
        config, limits = self.config, limits or OwnerLimits()
        wait_ms = min(config.longest_wait_ms, sub.queue_timeout_ms or config.longest_wait_ms)
        arq_job = serialize_job(FUNCTION, (sub.job_id,), {}, None, int(created), serializer=serialize)
        step_keys = [keys.arq_job(sub.job_id), keys.job(sub.job_id), keys.BLOB_EXPIRY]
        if idempotency:
            step_keys.append(keys.idempotency(sub.owner, idempotency))
        args: list[EncodableT] = [
            sub.job_id,
            repr(created),
            config.max_queued,
            arq_job,
            flat(fields),
            sub.input_bytes,
            config.max_queued_bytes,
            MEMORY_SHARE,
            sub.owner,
            repr(sub.priority.queue_score(created)),
            repr(created + wait_ms),
            limits.to_json(),
            self.layout,
        ]
        if config.min_replicas:
            # WAIT counts the replicas that have this connection's writes: it goes on the submit's connection.
            async with self.redis.pipeline(transaction=False) as pipe:
                await self.scripts["submit"](keys=step_keys, args=args, client=pipe)
                pipe.execute_command("WAIT", config.min_replicas, config.replica_timeout_ms)
                answer, *confirmed = await pipe.execute()
        else:  # one round trip: a pipeline with a script asks Redis first whether it has the script
            answer, confirmed = await self.scripts["submit"](keys=step_keys, args=args), []
        kind = answer[0].decode()
        if kind == "full":
            await self.discard_input(sub.job_id)
            raise QueueFull(answer[1].decode(), max(1, math.ceil(int(answer[2]) / 1000)))
        if kind == "existing":
            first = await self.load(answer[1].decode(), sub.owner)
            if first is None:  # the first job was deleted in between: start afresh
                return await self.submit(sub, idempotency, limits)
            await self.discard_input(sub.job_id)
            return first, False, Admission(queued=-1, tokens=-1)
        if confirmed and int(confirmed[0]) < config.min_replicas:
            # Not on enough replicas to survive a failover: take it back, and let the client try again.
            await self.delete(sub.job_id)
            raise NotReplicated(
                f"the job store's replicas did not confirm the job in {config.replica_timeout_ms} ms"
            )
        in_arq, place, tokens, queued = (int(n) for n in answer[1:])
        position = await self.position(sub.owner, in_arq, place)
        job = Job.from_fields(sub.job_id, fields, running=False, position=position, ttl_ms=config.ttl_ms)
        return self.with_eta(job), True, Admission(queued=queued, tokens=tokens)

    async def position(self, owner: str, in_arq: int, place: int) -> int:
        """Jobs that start before a queued job: ``in_arq`` when it is in arq's queue already, else counted
        from its ``place`` in its owner's queue under the fair order; -1 when it is in neither."""
        if in_arq >= 0:
            return in_arq
        if place < 0:
            return -1
        return (await self.view.order(owner)).position(owner, place)

    def with_eta(self, job: Job) -> Job:
        if job.position is None:
            return job
        return dataclasses.replace(job, eta_seconds=self.view.eta_seconds(job.position))

    async def admission(self, owner: str, limits: OwnerLimits) -> Admission:
        """How the owner's own limits stand before it submits; QueueFull when one refuses it already."""
        args: list[EncodableT] = [owner, limits.to_json(), repr(now_ms()), self.layout]
        refused, retry_ms, tokens, queued = await self.scripts["admit"](args=args)
        if refused:
            raise QueueFull(refused.decode(), max(1, math.ceil(int(retry_ms) / 1000)))
        return Admission(queued=int(queued), tokens=int(tokens))

    async def discard_input(self, job_id: str) -> None:
        """The input of a job that was not made; a failure here leaves it to the sweeper."""
        try:
            await self.blobs.delete([keys.input_blob(job_id)])
        except Exception as exc:
            logger.warning("%s: its input stays until the sweeper removes it: %s", job_id, exc)

    async def load(self, job_id: str, owner: str = "") -> Job | None:
        """The job; None when unknown, expired, deleted or another key's."""
        if not keys.valid_id(job_id):
            return None
        step_keys = [keys.job(job_id), keys.in_progress(job_id), keys.QUEUE]
        args = [job_id, keys.IN_PROGRESS_PREFIX, keys.WAITING_PREFIX]
        state = await self.scripts["load"](keys=step_keys, args=args)
        if not state:
            return None
        raw_meta, running, in_arq, place = state
        fields = decode(raw_meta)
        if fields.get("owner", "") != owner:
            return None
        position = await self.position(owner, int(in_arq), int(place))
        return self.with_eta(Job.from_fields(job_id, fields, bool(running), position, self.config.ttl_ms))

    async def cancel(self, job_id: str) -> JobStatus | None:
        """The job's status after the cancel: CANCELED, or how it had already ended; None when unknown."""
        step_keys = [*keys.job_and_arq(job_id), *keys.ENDING]
        args: list[EncodableT] = [
            job_id,
            repr(now_ms()),
            keys.CHANGED_CHANNEL,
            self.config.ttl_ms,
            keys.DELIVERY_PREFIX,
            self.layout,
        ]
        answer = (await self.scripts["cancel"](keys=step_keys, args=args)).decode()
        return None if answer == "missing" else JobStatus(answer)

    async def retry(self, job_id: str, limits: OwnerLimits | None = None) -> RetryRefused | None:
        """Queue a failed, canceled or expired job again under its own id, at the back of its owner's queue;
        None when it is queued, else why not. QueueFull when a bound refuses it, as it would a new job."""
        enqueued = now_ms()
        config, limits = self.config, limits or OwnerLimits()
        arq_job = serialize_job(FUNCTION, (job_id,), {}, None, int(enqueued), serializer=serialize)
        step_keys = keys.job_and_arq(job_id)
        priority = await self.redis.hget(keys.job(job_id), "priority")  # type: ignore[misc]
        score = Priority(priority.decode() if priority else "normal").queue_score(enqueued)
        args: list[EncodableT] = [
            job_id,
            repr(enqueued),
            arq_job,
            config.max_queued,
            config.max_queued_bytes,
            MEMORY_SHARE,
            limits.to_json(),
            repr(score),
            self.layout,
        ]
        answer = await self.scripts["retry"](keys=step_keys, args=args)
        kind = answer[0].decode()
        if kind == "queued":
            return None
        if kind == "full":
            raise QueueFull(answer[1].decode(), max(1, math.ceil(int(answer[2]) / 1000)))
        return RetryRefused(answer[1].decode() if kind == "refused" else kind)

    async def delete(self, job_id: str) -> None:
        """Forget everything of the job, its blobs too. A running one's completion then keeps nothing."""
        step_keys = [
            *keys.job_and_arq(job_id),
            keys.STATS,
            keys.PENDING,
            keys.BLOB_EXPIRY,
            keys.DELIVERIES,
        ]
        look_again = now_ms() + self.config.try_ms  # after any running try, which may still write a mask
        args: list[EncodableT] = [
            job_id,
            keys.CHANGED_CHANNEL,
            keys.DELIVERY_PREFIX,
            look_again,
            repr(now_ms()),
            self.layout,
        ]
        await self.scripts["delete"](keys=step_keys, args=args)
        try:
            await self.blobs.delete(keys.blobs_of(job_id))
        except Exception as exc:
            logger.warning("%s: deleted; its blobs go at the sweeper's next look: %s", job_id, exc)

    async def list_jobs(
        self, owner: str, status: JobStatus | None, before_ms: float | None, limit: int
    ) -> tuple[list[Job], float | None]:
        """A page of the owner's jobs, newest first, created before ``before_ms``; and where the next page
        starts (None at the end). A page may hold fewer than ``limit`` jobs when a status filter skips many."""
        args: list[EncodableT] = [
            owner,
            "+inf" if before_ms is None else repr(before_ms),
            limit,
            status.value if status else "",
            LIST_LOOK_AT,
            self.layout,
        ]
        last, *ids = await self.scripts["list"](args=args)
        loaded = await asyncio.gather(*(self.load(raw.decode(), owner) for raw in ids))
        jobs = [job for job in loaded if job is not None and (status is None or job.status is status)]
        return jobs, float(last) if last else None

    async def cancel_queued(self, owner: str) -> int:
        """Cancel every job of the owner that has not started; how many were canceled."""
        canceled, before = 0, None
        while True:
            jobs, before = await self.list_jobs(owner, JobStatus.QUEUED, before, 200)
            for job in jobs:
                canceled += await self.cancel(job.id) is JobStatus.CANCELED
            if before is None:
                return canceled

    async def tick(self) -> tuple[int, int]:
        """End the jobs whose deadline to start has passed, and dispatch; (expired, handed to arq)."""
        expired, handed = await self.scripts["tick"](args=[repr(now_ms()), 500, self.layout])
        return int(expired), int(handed)

    # The worker's side.

    async def start(self, job_id: str, deadline_ms: float) -> Job | None:
        """Take the job for one try; None when there is nothing to do (deleted, canceled or ended)."""
        step_keys = [keys.job(job_id), keys.RUNNING, keys.DELIVERIES]
        args: list[EncodableT] = [
            job_id,
            repr(now_ms()),
            deadline_ms,
            keys.CHANGED_CHANNEL,
            keys.DELIVERY_PREFIX,
            self.layout,
        ]
        answer = await self.scripts["start"](keys=step_keys, args=args)
        if answer[0].decode() != "run":
            return None
        return Job.from_fields(
            job_id, decode(answer[1]), running=True, position=-1, ttl_ms=self.config.ttl_ms
        )

    async def input(self, job: Job) -> bytes | None:
        """The job's input image; None when it is gone from the blob store."""
        return await self.blobs.get(keys.input_blob(job.id))

    async def complete(self, job: Job, outcome: Outcome) -> JobStatus | None:
        """End the job with ``outcome`` in one atomic step, unless a cancel or delete came first.

        The outcome's mask and overlay are written to the blob store first, so a succeeded job always has them;
        they are removed again when the step keeps nothing. A succeeded job's input goes at once: nothing can
        run it again. Returns the job's status afterwards (the outcome's, or CANCELED), or None when it is gone.
        """
        # The blobs' names are the job's, not the try's: a try fenced off writes none of them. A newer try
        # that starts between this look and the step below writes its own outcome over them after it.
        current = await self.redis.hget(keys.job(job.id), "attempts")  # type: ignore[misc]
        if current is not None and int(current) != job.attempts:
            raise StaleTry(job.id)
        written = []
        if outcome.mask_png is not None:
            written.append(keys.mask_blob(job.id))
            await self.blobs.put(written[-1], outcome.mask_png)
        overlay = None
        if outcome.overlay_png is not None:
            overlay = keys.overlay_blob(job.id)
            written.append(overlay)
            await self.blobs.put(overlay, outcome.overlay_png)
        finished = now_ms()
        timings = {**outcome.timings_ms, "total": round(finished - job.created_at, 1)}
        fields = outcome.to_fields(timings, written[0] if outcome.mask_png is not None else None, overlay)
        seconds = {"total": timings["total"] / 1000}
        if job.started_at is not None:
            seconds["queue_wait"] = (job.started_at - job.created_at) / 1000
        if "inference" in timings:
            seconds["inference"] = timings["inference"] / 1000
        status = outcome.status.value
        step_keys = [keys.job(job.id), keys.RUNNING, *keys.ENDING]
        args: list[EncodableT] = [
            job.id,
            repr(finished),
            self.config.ttl_ms,
            status,
            flat(fields),
            json.dumps(counter_increments(status, seconds)),
            keys.CHANGED_CHANNEL,
            keys.DELIVERY_PREFIX,
            self.layout,
            job.attempts,
        ]
        answer = (await self.scripts["complete"](keys=step_keys, args=args)).decode()
        if answer == "stale":  # the newer try started meanwhile: what was written is its to overwrite
            raise StaleTry(job.id)
        if answer == "gone":
            await self.blobs.delete(keys.blobs_of(job.id))
            return None
        if answer != status:  # canceled meanwhile: it keeps its input, for a retry, and nothing else
            await self.blobs.delete(written)
        elif outcome.status is JobStatus.SUCCEEDED:
            await self.blobs.delete([keys.input_blob(job.id)])
        return JobStatus(answer)

    async def release(self, job: Job) -> bool:
        """The try ended without an outcome: whether the job still wants another (not canceled or gone, and
        no newer try started meanwhile)."""
        step_keys = [keys.job(job.id), keys.RUNNING]
        answer = await self.scripts["release"](keys=step_keys, args=[job.id, job.attempts])
        if answer < 0:
            raise StaleTry(job.id)
        return bool(answer)

    async def abandon(self, job_id: str, error: JobError) -> bool:
        """arq has ended the job without an outcome of ours: fail it with ``error``, unless it has ended,
        is gone, or arq will run it again. Whether it failed it."""
        step_keys = [
            keys.job(job_id),
            keys.QUEUE,
            keys.in_progress(job_id),
            keys.RUNNING,
            *keys.ENDING,
        ]
        args: list[EncodableT] = [
            job_id,
            repr(now_ms()),
            self.config.ttl_ms,
            json.dumps(asdict(error)),
            keys.CHANGED_CHANNEL,
            keys.DELIVERY_PREFIX,
            self.layout,
        ]
        return bool(await self.scripts["abandon"](keys=step_keys, args=args))

    # Blobs whose job is gone.

    async def sweep_expired(self, limit: int = 200) -> int:
        """Delete the blobs of jobs that have gone since they were submitted; how many jobs' blobs went."""
        step_keys = [keys.BLOB_EXPIRY, keys.PENDING, keys.STATS]
        args: list[EncodableT] = [repr(now_ms()), limit, keys.JOB_PREFIX, SWEEP_LEASE_MS]
        gone = [raw.decode() for raw in await self.scripts["sweep"](keys=step_keys, args=args)]
        if gone:
            await self.blobs.delete(name for job_id in gone for name in keys.blobs_of(job_id))
            await self.redis.zrem(keys.BLOB_EXPIRY, *gone)
        return len(gone)

    async def pending_bytes(self) -> int:
        """Bytes of the inputs of jobs accepted and not yet ended, as admission counts them."""
        counted: bytes | None = await self.redis.hget(keys.STATS, keys.PENDING_BYTES)  # type: ignore[misc]
        return int(counted or 0)


def flat(fields: dict[str, str]) -> str:
    """A hash's fields as the scripts take them: one flat JSON list, for HSET's arguments."""
    return json.dumps([item for pair in fields.items() for item in pair])
