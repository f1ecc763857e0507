"""The HTTP gateway: validates, stores the input, enqueues, answers. It never imports torch.

Run: ``uvicorn gateway.app:app``. The contract is docs/api.md, described at ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib.resources import files
from typing import Any

import yaml
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from gateway import urls
from gateway.app import compat, routes, service
from gateway.app.catalog import ModelCatalog
from gateway.app.errors import EXCEPTION_HANDLERS, job_store_full, problem_response
from gateway.app.web import Services
from gateway.budget import MemoryBudget
from gateway.jobs import BlobStoreError, BlobStoreFull, JobStore, Waiters
from gateway.jobs.connection import close, connect, deadlines, no_replicas, stop
from gateway.settings import Settings
from gateway.tenants import load as load_tenants
from gateway.webhooks import signing_key

logger = logging.getLogger(__name__)
TICK_SECONDS = 1.0


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    settings = Settings.from_env()
    # No ping here: the gateway starts, and answers 503, while Redis is still coming up.
    redis = connect(settings, **deadlines(settings))
    store = JobStore.from_settings(redis, settings)
    services = Services(
        settings=settings,
        redis=redis,
        store=store,
        catalog=ModelCatalog(store, settings.models_cache_seconds),
        # Its own connection, with no read timeout: the subscription is quiet for as long as no job ends.
        waiters=Waiters(
            connect(settings, socket_connect_timeout=settings.redis_timeout, socket_keepalive=True)
        ),
        tenants=load_tenants(settings),  # malformed keys, or a list that names none, stop the start
        openapi=yaml.safe_load(files("gateway.app").joinpath("static", "openapi.yaml").read_text()),
        http=urls.client(settings.url_timeout),
        allowed_url_hosts=urls.allowed_hosts(settings.allowed_url_hosts),
        image_memory=MemoryBudget(settings.gateway_image_bytes),
    )
    if settings.webhook_secret:
        signing_key(settings.webhook_secret, "")  # a malformed secret stops the start, with what is wrong
    await services.waiters.start()
    ticker = asyncio.create_task(tick(store))
    try:
        yield {"services": services}
    finally:
        await stop(ticker)
        await services.waiters.stop()
        await services.http.aclose()
        await close(redis)


async def tick(store: JobStore) -> None:
    """Every second: expire the jobs whose deadline to start has passed, and dispatch, so that a queued job
    never waits behind a free slot (each gateway does it; the step is atomic, so any number may)."""
    while True:
        await asyncio.sleep(TICK_SECONDS)
        try:
            await store.tick()
        except Exception as exc:  # Redis away: the next tick tries again
            logger.warning("the job store's tick failed: %s", exc)


async def redis_down(request: Request, exc: Exception) -> Response:
    return problem_response(
        503,
        "redis_unavailable",
        "the job store (Redis) does not answer; try again shortly",
        {"Retry-After": "1"},
    )


async def redis_refused(request: Request, exc: Exception) -> Response:
    """A primary without replicas in sync takes no writes (min-replicas-to-write): away for a failover."""
    if no_replicas(exc):
        return await redis_down(request, exc)
    raise exc


async def redis_full(request: Request, exc: Exception) -> Response:
    problem = job_store_full()
    return problem_response(problem.status, problem.code, problem.detail, problem.headers)


async def blob_store_down(request: Request, exc: Exception) -> Response:
    if isinstance(exc, BlobStoreFull):
        return problem_response(503, "blob_store_full", f"{exc}; try again later", {"Retry-After": "30"})
    return problem_response(
        503,
        "blob_store_unavailable",
        "the blob store does not answer; try again shortly",
        {"Retry-After": "5"},
    )


app = Starlette(
    routes=[*routes.routes, *service.routes, *compat.routes],
    lifespan=lifespan,
    exception_handlers={
        **EXCEPTION_HANDLERS,
        RedisConnectionError: redis_down,
        RedisTimeoutError: redis_down,
        OutOfMemoryError: redis_full,
        ResponseError: redis_refused,
        BlobStoreError: blob_store_down,
    },
)
