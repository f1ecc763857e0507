"""One job, one try: take it, send its input to the model server, complete it with the outcome."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from arq import Retry
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.budget import BudgetTimeout
from gateway.jobs import BlobStoreError, Job, Outcome, Result, StaleTry, failure_code, now_ms
from gateway.jobs.connection import unavailable
from gateway.retrying import backoff
from gateway.settings import Settings
from gateway.torchserve import BackendUnavailable, InputRejected, ModelNotFound, TorchServe
from gateway.worker.overlay import draw_overlay, memory_needed
from gateway.worker.state import WorkerState, state_of

logger = logging.getLogger(__name__)
# The job store or the blob store cannot take this try's step now (Redis restarting or failing over, Redis
# out of memory, a bucket that does not answer): the try runs again later, and the job is not failed for it.
STORES_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OutOfMemoryError, BlobStoreError)


def try_later(settings: Settings, job_id: str, attempt: int, why: object) -> Retry:
    """arq's Retry for this try, deferred by the backoff for its attempt."""
    delay = backoff(attempt, settings.retry_delay, settings.retry_max_delay)
    logger.info("%s: %s; try %d again in %.1fs", job_id, why, attempt, delay)
    return Retry(defer=delay)


async def segment(ctx: dict[str, Any], job_id: str) -> None:
    """arq's job function. The outcome goes into the job store; arq keeps no result of its own."""
    state = state_of(ctx)
    attempt: int = ctx["job_try"]
    try:
        await one_try(state, job_id, attempt)
    except StaleTry:
        # Stalled past the lease: a newer try owns the job now, and arq's end of this one must not touch it.
        logger.warning("%s: try %d was overtaken by a newer one; its outcome is dropped", job_id, attempt)
        state.stale.add(job_id)
    except (*STORES_UNAVAILABLE, ResponseError) as exc:
        if not (isinstance(exc, BlobStoreError) or unavailable(exc)):
            raise
        raise try_later(state.settings, job_id, attempt, f"a store does not answer ({exc})") from exc
    else:
        state.ended.add(job_id)  # after_job_end has nothing to fail: one call to Redis a job saved


def memory_of(job: Job) -> int:
    """The image bytes a try of the job holds: its input, the answer with its mask, and its overlay if asked."""
    pixels = job.width * job.height
    return job.input_bytes + pixels + (memory_needed(job.width, job.height) if job.params.overlay else 0)


async def one_try(state: WorkerState, job_id: str, attempt: int) -> None:
    settings, store = state.settings, state.store
    deadline = now_ms() + (settings.inference_timeout + 10) * 1000
    job = await store.start(job_id, deadline)
    if job is None:  # deleted, canceled or already ended: nothing to do
        return
    try:
        async with state.image_memory.hold(memory_of(job), timeout=settings.inference_timeout / 2):
            outcome = await outcome_of(state, job, attempt)
            if outcome is not None:
                await store.complete(job, outcome)  # inside the hold: the outcome holds the mask and overlay
    except (BudgetTimeout, BlobStoreError) as exc:
        # Busy with other images, or the blob store does not answer: this try ends, the job waits.
        if not await store.release(job):
            return  # canceled or deleted meanwhile: no next try
        raise try_later(settings, job_id, attempt, exc) from exc


async def outcome_of(state: WorkerState, job: Job, attempt: int) -> Outcome | None:
    """The try's outcome; None when the job was canceled or deleted while its backend was away (no next try).
    Retry when it is worth trying again later."""
    settings = state.settings
    image = await state.store.input(job)
    if image is None:
        return Outcome.input_missing()
    try:
        # Our own bound, inside arq's job timeout: the outcome is ours to write, not arq's to drop.
        outcome = await asyncio.wait_for(predict(state.torchserve, job, image), settings.inference_timeout)
        if job.params.overlay and outcome.mask_png is not None:
            overlay = await asyncio.to_thread(draw_overlay, image, outcome.mask_png)
            outcome = Outcome.succeeded(outcome.result, outcome.mask_png, outcome.timings_ms, overlay)  # type: ignore[arg-type]
        return outcome
    except (BackendUnavailable, asyncio.TimeoutError) as exc:
        reason = str(exc) or f"no answer in {settings.inference_timeout:g} s"
        if attempt < settings.max_attempts:
            if not await state.store.release(job):
                return None
            raise try_later(settings, job.id, attempt, f"backend unavailable ({reason})") from exc
        message = f"model server unavailable after {attempt} tries ({reason})"
        return Outcome.failed("backend_unavailable", message)
    except STORES_UNAVAILABLE:
        raise
    except Exception:  # a bug of ours must fail this job, not lose it
        logger.exception("%s: unexpected error", job.id)
        return Outcome.failed("internal_error", "the worker failed to process this job")


async def predict(torchserve: TorchServe, job: Job, image: bytes) -> Outcome:
    """The model server's answer as an outcome; BackendUnavailable when it is worth trying again."""
    request_started = time.perf_counter()
    params = job.params
    try:
        prediction = await torchserve.predict(
            job.model, image, params.classes, params.threshold, job.content_type
        )
    except ModelNotFound:
        return Outcome.failed("model_not_found", f"model {job.model!r} is not served")
    except InputRejected as exc:
        return Outcome.failed(failure_code(exc.code), exc.message)
    timings = {
        "backend": round((time.perf_counter() - request_started) * 1000, 1),  # the TorchServe request
        "inference": round(prediction.timings_ms.get("inference", 0.0), 1),  # its forward pass
    }
    result = Result(prediction.width, prediction.height, prediction.classes)
    return Outcome.succeeded(result, prediction.mask_png, timings)
