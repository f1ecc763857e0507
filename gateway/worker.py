"""The arq worker: takes jobs from Redis and forwards many at once to TorchServe, which batches them.

Run it with arq's CLI: ``arq gateway.worker.WorkerSettings``; ``--check`` tells whether one is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import AsyncGenerator
from typing import Any, ClassVar

import arq.worker
from arq import Retry
from arq.connections import ArqRedis, RedisSettings
from arq.worker import func
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway import jobs, metrics
from gateway.settings import Settings
from gateway.torchserve import BackendUnavailable, InputRejected, ModelNotFound, TorchServe

logger = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 2.0
# Set when a job may be waiting: a gateway enqueued one, or a slot of ours came free.
_wake: asyncio.Event | None = None


async def poll_until_woken(step: float = 0.5) -> AsyncGenerator[float, None]:
    """Replaces arq's fixed-interval poll: look at the queue as soon as there may be work, else every ``step``.

    arq's worker sleeps ``poll_delay`` between looks at the queue. A short delay costs CPU that the model on
    the same machine needs (measured: 20 ms more per inference at 2 ms), a long one adds latency to every
    job. Gateways publish on ``segserve:enqueued``; ``step`` stays as the bound for deferred retries.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        yield loop.time() - start
        if _wake is None:
            await asyncio.sleep(step)
            continue
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(_wake.wait(), step)
        _wake.clear()


arq.worker.poll = poll_until_woken  # arq's Worker.main looks `poll` up in its module at run time


async def listen_for_jobs(redis: Any) -> None:
    global _wake
    _wake = asyncio.Event()
    while True:
        try:
            async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(jobs.ENQUEUED_CHANNEL)
                _wake.set()  # whatever arrived while we were not listening
                async for _ in pubsub.listen():
                    _wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis restarting: poll on the timer meanwhile
            logger.warning("job notifications interrupted (%s); reconnecting", exc)
            await asyncio.sleep(0.5)


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
    ctx["settings"] = settings
    ctx["torchserve"] = TorchServe(
        settings.torchserve_url,
        settings.torchserve_management_url,
        settings.key_file,
        timeout=settings.inference_timeout,
        max_connections=settings.worker_concurrency * 2,
    )
    ctx["worker_id"] = f"{socket.gethostname()}:{os.getpid()}"
    ctx["heartbeat"] = asyncio.create_task(heartbeat(ctx))
    # Its own connection: a subscription holds it, and arq's pool must not lose one to it.
    ctx["listener_redis"] = ArqRedis.from_url(settings.redis_url)
    ctx["listener"] = asyncio.create_task(listen_for_jobs(ctx["listener_redis"]))


async def shutdown(ctx: dict[str, Any]) -> None:
    for task in (ctx["heartbeat"], ctx["listener"]):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await ctx["listener_redis"].aclose()
    await ctx["redis"].zrem(jobs.WORKERS, ctx["worker_id"])
    await ctx["torchserve"].aclose()


async def heartbeat(ctx: dict[str, Any]) -> None:
    """Each worker says it is alive every few seconds, for ``/v1/queue`` and ``/readyz``."""
    redis = ctx["redis"]
    worker_id = ctx["worker_id"]
    host, pid = worker_id.rsplit(":", 1)
    started = jobs.now_ms()
    while True:
        now = jobs.now_ms()
        info = {
            "id": worker_id,
            "host": host,
            "pid": int(pid),
            "started_at": jobs.iso(started),
            "last_seen": jobs.iso(now),
            "concurrency": ctx["settings"].worker_concurrency,
        }
        try:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.zadd(jobs.WORKERS, {worker_id: now})
                pipe.zremrangebyscore(jobs.WORKERS, "-inf", now - 60_000)
                pipe.set(jobs.worker_key(worker_id), json.dumps(info), px=10_000)
                await pipe.execute()
        except Exception as exc:  # Redis restarting: say so, keep beating
            logger.warning("heartbeat failed: %s", exc)
        await asyncio.sleep(HEARTBEAT_SECONDS)


def backoff(settings: Settings, attempt: int) -> float:
    return float(min(settings.retry_delay * 2 ** (attempt - 1), settings.retry_max_delay))


async def segment(ctx: dict[str, Any], job_id: str) -> dict[str, Any]:
    """Run one job. The returned outcome is what arq stores as the job's result."""
    redis = ctx["redis"]
    settings: Settings = ctx["settings"]
    attempt: int = ctx["job_try"]
    started = jobs.now_ms()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(jobs.meta_key(job_id))
        pipe.get(jobs.input_key(job_id))
        raw_meta, image = await pipe.execute()
    meta = {k.decode(): v.decode() for k, v in raw_meta.items()}
    if not meta or "canceled_at" in meta:
        return await finish(ctx, job_id, meta, {"status": "canceled"})
    if image is None:
        error = {"code": "expired", "message": "the job's input expired or was deleted before it ran"}
        return await finish(ctx, job_id, meta, {"status": "failed", "error": error})

    async with redis.pipeline(transaction=False) as pipe:
        pipe.hset(jobs.meta_key(job_id), mapping={"started_at": repr(started), "attempts": attempt})
        pipe.zadd(jobs.RUNNING, {job_id: started + settings.inference_timeout * 1000 + 10_000})
        await pipe.execute()
    meta["started_at"] = repr(started)
    params = json.loads(meta["params"])
    request_started = time.perf_counter()
    try:
        prediction = await ctx["torchserve"].predict(
            meta["model"], image, params.get("classes"), params.get("threshold", 0.0), meta["content_type"]
        )
    except BackendUnavailable as exc:
        if attempt < settings.max_attempts:
            delay = backoff(settings, attempt)
            logger.info("%s: backend unavailable (%s), try %d again in %.1fs", job_id, exc, attempt, delay)
            await redis.zrem(jobs.RUNNING, job_id)
            raise Retry(defer=delay) from exc
        error = {"code": "backend_unavailable", "message": f"model server unavailable after {attempt} tries"}
        return await finish(ctx, job_id, meta, {"status": "failed", "error": error})
    except ModelNotFound:
        error = {"code": "model_not_found", "message": f"model {meta['model']!r} is not served"}
        return await finish(ctx, job_id, meta, {"status": "failed", "error": error})
    except InputRejected as exc:
        return await finish(
            ctx, job_id, meta, {"status": "failed", "error": {"code": exc.code, "message": exc.message}}
        )

    result = {"width": prediction.width, "height": prediction.height, "classes": prediction.classes}
    outcome = {
        "status": "succeeded",
        "result": result,
        "timings_ms": {
            "backend": round((time.perf_counter() - request_started) * 1000, 1),  # the TorchServe request
            "inference": round(prediction.timings_ms.get("inference", 0.0), 1),  # its forward pass
        },
    }
    return await finish(ctx, job_id, meta, outcome, mask=prediction.mask_png)


async def finish(
    ctx: dict[str, Any], job_id: str, meta: dict[str, str], outcome: dict[str, Any], mask: bytes | None = None
) -> dict[str, Any]:
    """Store what the job leaves behind and complete its outcome; arq then records it as the result."""
    redis = ctx["redis"]
    ttl_ms = ctx["settings"].result_ttl * 1000
    finished = jobs.now_ms()
    ctx["segserve_finished"] = True
    # Canceled or deleted while it ran: its result is discarded.
    current = await redis.hmget(jobs.meta_key(job_id), ["id", "canceled_at"])
    if current[0] is None or current[1] is not None:
        outcome = {"status": "canceled"}
        mask = None
    status = outcome["status"]
    created = float(meta.get("created_at", finished))
    started = float(meta["started_at"]) if "started_at" in meta else None
    timings = {**outcome.pop("timings_ms", {}), "total": round(finished - created, 1)}
    async with redis.pipeline(transaction=True) as pipe:
        if mask is not None:
            pipe.set(jobs.mask_key(job_id), mask, px=ttl_ms)
        if status == "succeeded":  # the input stays for overlay.png until the job expires
            pipe.pexpire(jobs.input_key(job_id), ttl_ms)
        else:
            pipe.delete(jobs.input_key(job_id))
        if current[0] is not None:
            pipe.pexpire(jobs.meta_key(job_id), ttl_ms)
        pipe.zrem(jobs.RUNNING, job_id)
        if status != "canceled":  # a cancel counted itself
            seconds = {"total": timings["total"] / 1000}
            if started is not None:
                seconds["queue_wait"] = (started - created) / 1000
            if "inference" in timings:
                seconds["inference"] = timings["inference"] / 1000
            metrics.record_finished(pipe, status, seconds)
        await pipe.execute()
    return {**outcome, "finished_at": finished, "expires_at": finished + ttl_ms, "timings_ms": timings}


async def after_job_end(ctx: dict[str, Any]) -> None:
    """arq has stored the result: now wake whoever waits for this job, and look for the next one."""
    if _wake is not None:
        _wake.set()
    if ctx.pop("segserve_finished", False):
        await ctx["redis"].publish(jobs.DONE_CHANNEL, ctx["job_id"])


def _settings() -> Settings:
    # arq's CLI reads WorkerSettings' class attributes, so these few settings are read at import.
    return Settings.from_env()


_s = _settings()


class WorkerSettings:
    functions: ClassVar = [func(segment, name=jobs.FUNCTION, max_tries=_s.max_attempts + 3)]
    on_startup = startup
    on_shutdown = shutdown
    after_job_end = after_job_end
    # Ride out a Redis restart: commands retry with backoff for ~30 s instead of ending the worker.
    redis_settings = dataclasses.replace(
        RedisSettings.from_dsn(_s.redis_url),
        conn_retries=30,
        retry=RedisRetry(ExponentialBackoff(cap=2.0, base=0.1), retries=20),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    max_jobs = _s.worker_concurrency
    # One try: the model call's own timeout plus a margin. After a SIGKILL the job runs again once
    # arq's in-progress key expires, job_timeout + 10 s later, so this stays tight.
    job_timeout = int(_s.inference_timeout) + 5
    keep_result = _s.result_ttl
    poll_delay = _s.worker_poll_delay
    health_check_interval = 2  # `arq ... --check` then fails within ~3 s of the last worker stopping
    job_serializer = staticmethod(jobs.serialize)
    job_deserializer = staticmethod(jobs.deserialize)
    expires_extra_ms = _s.result_ttl * 1000
