"""The arq worker process: settings for arq's CLI, the hooks that build each worker's clients, and a
Worker that wakes when there is work instead of looking at the queue on a timer."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import logging.config
import os
import socket
from typing import Any, ClassVar

from arq.constants import default_queue_name, health_check_key_suffix
from arq.typing import WorkerCoroutine
from arq.worker import Function, Worker, func, get_kwargs
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.budget import MemoryBudget
from gateway.jobs import (
    ENQUEUED_CHANNEL,
    FUNCTION,
    JobError,
    JobStore,
    ModelInfo,
    WorkerInfo,
    deserialize,
    iso,
    now_ms,
    serialize,
)
from gateway.jobs.channels import follow
from gateway.jobs.connection import close, stop, unavailable, worker_connection, worker_redis_settings
from gateway.settings import Settings
from gateway.torchserve import BackendUnavailable, ModelNotFound, TorchServe
from gateway.worker.deliveries import Deliverer
from gateway.worker.segment import segment
from gateway.worker.state import WorkerState, state_of
from gateway.worker.sweeper import Sweeper

logger = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 2.0


def show_logs_like_arq() -> None:
    """arq's CLI sets up only arq's logger: ours (retries, token refreshes) go beside its job lines."""
    ours, arqs = logging.getLogger("gateway"), logging.getLogger("arq")
    if not ours.handlers:
        for handler in arqs.handlers:
            ours.addHandler(handler)
        ours.setLevel(arqs.level)


async def startup(ctx: dict[str, Any]) -> None:
    show_logs_like_arq()
    settings = Settings.from_env()
    store = JobStore.from_settings(ctx["redis"], settings)
    torchserve = TorchServe(
        settings.torchserve_url,
        settings.torchserve_management_url,
        settings.key_file,
        timeout=settings.inference_timeout,
        max_connections=settings.worker_concurrency * 2,
    )
    info = WorkerInfo(
        id=f"{socket.gethostname()}:{os.getpid()}",
        host=socket.gethostname(),
        pid=os.getpid(),
        started_at=iso(now_ms()) or "",
        last_seen="",
        concurrency=settings.worker_concurrency,
    )
    # Until TorchServe says how many it computes at once, it takes as many as it may.
    state = WorkerState(
        settings,
        store,
        torchserve,
        info,
        MemoryBudget(settings.worker_image_bytes),
        in_flight=settings.worker_concurrency,
    )
    ctx["state"] = state
    state.loops.append(asyncio.create_task(heartbeat(state)))
    state.loops.append(asyncio.create_task(Sweeper(store, settings).run()))
    if settings.webhook_secret:
        state.loops.append(asyncio.create_task(Deliverer(store, settings).run()))
    else:
        logger.warning("SEGSERVE_WEBHOOK_SECRET is unset: this worker delivers no webhooks")


async def shutdown(ctx: dict[str, Any]) -> None:
    state = state_of(ctx)
    for loop in state.loops:  # a delivery cut short is leased, and comes back to a worker
        await stop(loop)
    with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
        await state.store.fleet.forget_worker(state.info.id)
    await state.torchserve.aclose()


# What a job reads when arq ended it without an outcome of ours.
GAVE_UP = JobError(
    "worker_error",
    "the worker gave up on the job (a try ran past its time limit, or its worker died too often)",
)


async def after_job_end(ctx: dict[str, Any]) -> None:
    """arq has ended a try. A job it ended without our outcome fails with a code, instead of vanishing."""
    state = state_of(ctx)
    if ctx["job_id"] in state.ended:  # the try's own outcome is written, or the job needed none
        state.ended.discard(ctx["job_id"])
        return
    if await state.store.abandon(ctx["job_id"], GAVE_UP):
        logger.warning("%s: arq ended the job without an outcome; it failed with worker_error", ctx["job_id"])


async def heartbeat(state: WorkerState) -> None:
    """Each worker says every few seconds that it is alive, and what its TorchServe serves: gateways
    read this for ``/v1/queue``, ``/v1/models`` and ``/readyz`` instead of reaching TorchServe. It also
    sets how many jobs the worker takes at once (``in_flight_limit``)."""
    cap = state.settings.worker_concurrency
    while True:
        try:  # whatever goes wrong, say so and keep beating (Redis restarting, an odd answer)
            backend, models = await describe_backend(state.torchserve)
            state.in_flight = in_flight_limit(models, cap) or state.in_flight  # none ready: as it was
            now = now_ms()
            beat = dataclasses.replace(
                state.info,
                last_seen=iso(now) or "",
                backend=backend,
                models=models,
                concurrency=state.in_flight,
            )
            await state.store.fleet.heartbeat(beat, now)
        except Exception as exc:
            logger.warning("heartbeat failed: %s", exc)
        await asyncio.sleep(HEARTBEAT_SECONDS)


def in_flight_limit(models: list[ModelInfo], cap: int) -> int | None:
    """Jobs to keep inside TorchServe: what its ready workers compute now and next (2 × workers × batch
    size), at most ``cap``. The rest wait in Redis, where their queue position is true, so ``running``
    means computing or next, instead of waiting unseen in TorchServe's own queue."""
    computing = sum(m.workers_ready * (m.batch_size or 1) for m in models)
    return min(cap, 2 * computing) if computing else None


async def describe_backend(torchserve: TorchServe) -> tuple[str, list[ModelInfo]]:
    """("ok", its models), or why it cannot compute; bounded, so a hung TorchServe never stops the beat."""
    if not await torchserve.ping():
        return "down", []
    try:
        described = await asyncio.wait_for(torchserve.models(), HEARTBEAT_SECONDS)
        return "ok", [ModelInfo.from_api(model) for model in described]
    except (BackendUnavailable, ModelNotFound, asyncio.TimeoutError):
        return "down: its management API does not answer", []


class SegserveWorker(Worker):
    """arq's Worker, woken when a gateway enqueues a job or one of its own job slots frees.

    arq's worker sleeps ``poll_delay`` between looks at the queue. A short delay costs CPU that the model on
    the same machine needs (measured: 20 ms more per inference at 2 ms), a long one adds latency to every
    job. Gateways publish on ``keys.ENQUEUED_CHANNEL``; ``poll_delay`` stays as the bound for deferred retries.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.look_every = self.poll_delay_s
        self.poll_delay_s = 0  # arq's loop then goes straight on; _poll_iteration waits instead
        self.work_may_wait = asyncio.Event()
        self.work_may_wait.set()
        self._listener: asyncio.Task[None] | None = None

    async def finish_job(self, job_id: str, *args: Any, **kwargs: Any) -> None:
        """arq's end of a try deletes the job's in-progress key and its record: for a try fenced off (stalled
        past its lease), those belong to the newer try that runs now, and are left to it."""
        if "state" in self.ctx and job_id in state_of(self.ctx).stale:
            state_of(self.ctx).stale.discard(job_id)
            return
        await super().finish_job(job_id, *args, **kwargs)

    async def run_job(self, job_id: str, score: int) -> None:
        """arq's own steps around a try (its count before, its queue entry after) write to Redis too. When
        Redis cannot take them (failing over, out of memory, its replicas still syncing), the worker goes on
        instead of ending, and the job runs again once arq's in-progress key for it expires."""
        try:
            await super().run_job(job_id, score)
        except (RedisConnectionError, RedisTimeoutError, ResponseError) as exc:
            if not unavailable(exc):
                raise
            if "state" in self.ctx:
                state_of(self.ctx).ended.discard(job_id)  # no after_job_end comes for this try
            logger.warning(
                "%s: arq could not record its try (%s); it runs again within %g s",
                job_id,
                exc,
                self.in_progress_timeout_s,
            )

    async def main(self) -> None:
        await self._wait_for_redis()
        await super().main()

    async def _wait_for_redis(self, seconds: int = 60) -> None:
        """A worker may start before Redis (compose, a pod, a Redis still loading its AOF): wait for it, as
        arq's own pool does, instead of exiting at once."""
        for _ in range(seconds - 1):
            try:
                await self.pool.ping()
                return
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning("the job store does not answer yet (%s); waiting", exc)
                await asyncio.sleep(1)

    async def _poll_iteration(self) -> None:
        if "state" in self.ctx:  # arq reads max_jobs before each take
            self.max_jobs = state_of(self.ctx).in_flight
        if self._listener is None:
            # A gap means jobs may have come meanwhile: look at once.
            self._listener = asyncio.create_task(
                follow(self.pool, ENQUEUED_CHANNEL, self._wake, self.work_may_wait.set)
            )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.work_may_wait.wait(), self.look_every)
        self.work_may_wait.clear()
        try:
            await super()._poll_iteration()
        except (RedisConnectionError, RedisTimeoutError, ResponseError) as exc:
            # Redis restarting, Sentinel failing over, the new primary's replicas still syncing (arq's own
            # health key is a write): wait for it instead of ending.
            if not unavailable(exc):
                raise
            logger.warning("the job store does not answer (%s); trying again", exc)
            await asyncio.sleep(1)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # A job stays in the queue until its try ends, so each look at the queue lists the jobs this worker
        # runs first; arq would ask Redis about each of them (4 round trips a job) before it reaches one it
        # can take. Those are known here.
        job_ids = [job_id for job_id in job_ids if job_id.decode() not in self.tasks]
        try:
            await super().start_jobs(job_ids)
        except WatchError as exc:
            # The connection went while arq watched the key of a job it had taken a slot for (Sentinel
            # failing over): give the slot back, and let _poll_iteration wait for Redis.
            self.job_counter -= 1
            self.sem.release()
            raise RedisConnectionError(str(exc)) from exc

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self.work_may_wait.set()  # a slot is free: take the next job now

    def _wake(self, _job_id: bytes) -> None:
        self.work_may_wait.set()

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        """arq gives up on a job before running it (too many tries): it fails with a code, as in after_job_end."""
        await super().finish_failed_job(job_id, result_data)
        await state_of(self.ctx).store.abandon(job_id, GAVE_UP)

    async def close(self) -> None:
        if self._listener is not None:
            await stop(self._listener)
        await super().close()


_settings = (
    Settings.from_env()
)  # arq's CLI reads WorkerSettings' class attributes, so these are read at import


class WorkerSettings:
    """For ``arq gateway.worker.WorkerSettings`` (and ``--check``), and for ``segserve worker``."""

    functions: ClassVar[list[Function | WorkerCoroutine]] = [
        func(segment, name=FUNCTION, max_tries=_settings.max_attempts + 3)
    ]
    on_startup = startup
    on_shutdown = shutdown
    after_job_end = after_job_end
    redis_settings = worker_redis_settings(_settings)  # one Redis, or Sentinel's primary
    max_jobs = _settings.worker_concurrency
    # One try: the model call's own timeout plus a margin. After a SIGKILL the job runs again once
    # arq's in-progress key expires, job_timeout + 10 s later, so this stays tight.
    job_timeout = int(_settings.inference_timeout) + 5
    keep_result = 0  # outcomes live in the job store (gateway.jobs)
    poll_delay = _settings.worker_poll_delay
    health_check_interval = 2  # `arq ... --check` then fails within ~3 s of the last worker stopping
    # One health key per host (a Kubernetes pod, a compose container): its `--check` is about itself.
    health_check_key = f"{default_queue_name}{health_check_key_suffix}:{socket.gethostname()}"
    # On SIGTERM (Kubernetes scaling down) take no new job and let the running ones end.
    job_completion_wait = job_timeout
    job_serializer = staticmethod(serialize)
    job_deserializer = staticmethod(deserialize)
    expires_extra_ms = _settings.result_ttl * 1000


def check() -> int:
    """``segserve worker --check``: arq's ``--check`` (0 while this host's worker beats its health key), on
    segserve's own connection. arq's logs in to the primary but not to the sentinels, so behind sentinels that
    require a login (docs/kubernetes.md) only this one can ask them where the primary is."""

    async def beating() -> bool:
        redis = worker_connection(_settings)
        try:
            return bool(await redis.exists(WorkerSettings.health_check_key))
        finally:
            await close(redis)

    try:
        alive = asyncio.run(beating())
    except (RedisConnectionError, RedisTimeoutError) as exc:
        print(f"Redis did not answer: {exc}")
        return 1
    print(f"{'alive' if alive else 'no heartbeat'}: {WorkerSettings.health_check_key}")
    return 0 if alive else 1


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's, where it is installed (pyproject installs it but on Windows): measured, it takes each job
    a tenth less of the worker's CPU than asyncio's own loop (docs/performance.md)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main() -> None:
    """``segserve worker``: one worker process, with arq's logging, until SIGINT or SIGTERM."""
    from arq.logs import default_log_config

    logging.config.dictConfig(default_log_config(verbose=False))
    asyncio.set_event_loop(new_event_loop())  # arq's Worker runs on the loop set here
    SegserveWorker(**get_kwargs(dict(vars(WorkerSettings))), redis_pool=worker_connection(_settings)).run()
