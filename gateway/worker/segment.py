"""One job, one try: take it, send its image to the model server, complete it with the outcome."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from arq import Retry
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.jobs import Job, JobStore, Outcome, Result, now_ms
from gateway.settings import Settings
from gateway.torchserve import BackendUnavailable, InputRejected, ModelNotFound, TorchServe

logger = logging.getLogger(__name__)


def backoff(settings: Settings, attempt: int) -> float:
    return float(min(settings.retry_delay * 2 ** (attempt - 1), settings.retry_max_delay))


async def segment(ctx: dict[str, Any], job_id: str) -> None:
    """arq's job function. The outcome goes into the job store; arq keeps no result of its own. A job store
    that does not answer (Redis restarting, Sentinel failing over) makes this try run again later, so the
    job is not failed for it."""
    try:
        await one_try(ctx, job_id)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        delay = backoff(ctx["settings"], ctx["job_try"])
        logger.warning("%s: the job store does not answer (%s), try again in %.1fs", job_id, exc, delay)
        raise Retry(defer=delay) from exc


async def one_try(ctx: dict[str, Any], job_id: str) -> None:
    store: JobStore = ctx["store"]
    settings: Settings = ctx["settings"]
    attempt: int = ctx["job_try"]
    deadline = now_ms() + (settings.inference_timeout + 10) * 1000
    started = await store.start(job_id, deadline)
    if started is None:  # deleted, canceled or already ended: nothing to do
        return
    if started.image is None:
        outcome = Outcome.failed("expired", "the job's input expired before it ran")
    else:
        try:
            # Our own bound, inside arq's job timeout: the outcome is ours to write, not arq's to drop.
            outcome = await asyncio.wait_for(
                predict(ctx["torchserve"], started.job, started.image), settings.inference_timeout
            )
        except (BackendUnavailable, asyncio.TimeoutError) as exc:
            reason = str(exc) or f"no answer in {settings.inference_timeout:g} s"
            if attempt < settings.max_attempts:
                if not await store.release(job_id):
                    return  # canceled or deleted meanwhile: no next try
                delay = backoff(settings, attempt)
                logger.info(
                    "%s: backend unavailable (%s), try %d again in %.1fs", job_id, reason, attempt, delay
                )
                raise Retry(defer=delay) from exc
            message = f"model server unavailable after {attempt} tries ({reason})"
            outcome = Outcome.failed("backend_unavailable", message)
        except Exception:  # a bug of ours must fail this job, not lose it
            logger.exception("%s: unexpected error", job_id)
            outcome = Outcome.failed("internal_error", "the worker failed to process this job")
    await store.complete(started.job, outcome)


async def predict(torchserve: TorchServe, job: Job, image: bytes) -> Outcome:
    """The model server's answer as an outcome; BackendUnavailable when it is worth trying again."""
    request_started = time.perf_counter()
    classes, threshold = job.params.get("classes"), job.params.get("threshold", 0.0)
    try:
        prediction = await torchserve.predict(job.model, image, classes, threshold, job.content_type)
    except ModelNotFound:
        return Outcome.failed("model_not_found", f"model {job.model!r} is not served")
    except InputRejected as exc:
        return Outcome.failed(exc.code, exc.message)
    timings = {
        "backend": round((time.perf_counter() - request_started) * 1000, 1),  # the TorchServe request
        "inference": round(prediction.timings_ms.get("inference", 0.0), 1),  # its forward pass
    }
    result = Result(prediction.width, prediction.height, prediction.classes)
    return Outcome.succeeded(result, prediction.mask_png, timings)
