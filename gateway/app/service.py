"""The service routes: models, queue, health and readiness, metrics, the API description and the pages."""

from __future__ import annotations

import asyncio
import dataclasses
from importlib.resources import files

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.app import metrics
from gateway.app.auth import authenticate
from gateway.app.errors import Problem, problem_response
from gateway.app.web import Services, services
from gateway.jobs import WorkerInfo
from gateway.webhooks import signing_key

STATIC = files("gateway.app").joinpath("static")
PROBE_SECONDS = 2.0


async def list_models(request: Request) -> Response:
    svc = services(request)
    authenticate(request)
    models = await svc.catalog.list()
    if models is None:
        raise Problem(503, "backend_unavailable", "no worker has reported its models yet")
    return JSONResponse(
        {"default_model": svc.settings.default_model, "models": [model.to_api() for model in models]}
    )


async def webhook_secret(request: Request) -> Response:
    """The caller's own webhook signing key: its deliveries verify with it, and with no other."""
    svc = services(request)
    owner = authenticate(request)
    if not svc.settings.webhook_secret:
        raise Problem(
            404, "webhooks_disabled", "this server sends no webhooks: SEGSERVE_WEBHOOK_SECRET is unset"
        )
    if not owner:  # no API keys: anyone who reaches the gateway could then forge its deliveries
        raise Problem(
            403,
            "secret_needs_key",
            "the webhook signing key is served only to API keys; with none configured, derive it from "
            "SEGSERVE_WEBHOOK_SECRET (gateway.webhooks.signing_key(secret, ''))",
        )
    return JSONResponse({"key": signing_key(svc.settings.webhook_secret, owner)})


async def queue(request: Request) -> Response:
    svc = services(request)
    authenticate(request)
    # Host names and pids are the operator's: with API keys, callers are tenants and see neither.
    stats = await svc.store.fleet.queue_stats(show_hosts=not svc.tenants.required)
    return JSONResponse(dataclasses.asdict(stats))


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """200 while the gateway can serve, which needs Redis alone: with no worker alive (a deployment scaled to
    zero) or TorchServe away, jobs wait in the queue; with the blob store away, jobs can still be read. The
    body names each part's state, and says "ready" when all are up, "degraded" otherwise; 503 only when Redis
    does not answer."""
    svc = services(request)
    blobs = await blob_state(svc)
    try:
        await svc.redis.ping()
        workers = await svc.store.fleet.live_workers()
    except (RedisConnectionError, RedisTimeoutError, OSError):
        checks = {
            "redis": "down",
            "blobs": blobs,
            "workers": "unknown: Redis is down",
            "torchserve": "unknown: Redis is down",
        }
        return problem_response(503, "not_ready", "not ready: Redis is down", extra={"checks": checks})
    checks = {
        "redis": "ok",
        "blobs": blobs,
        "workers": f"ok: {len(workers)} alive" if workers else "none alive: jobs wait in the queue",
        "torchserve": torchserve_state(workers, svc.settings.default_model),
    }
    up = all(state.startswith("ok") for state in checks.values())
    return JSONResponse({"status": "ready" if up else "degraded", "checks": checks})


async def blob_state(svc: Services) -> str:
    """The blob store's state, "ok" when it answers (and lets us in) within a probe's patience."""
    try:
        return await asyncio.wait_for(svc.store.blobs.health(), PROBE_SECONDS)
    except asyncio.TimeoutError:
        return f"down: no answer in {PROBE_SECONDS:g} s"


def torchserve_state(workers: list[WorkerInfo], model: str) -> str:
    """As the workers see the TorchServe beside each of them: "ok" when one can compute ``model``."""
    if not workers:
        return "unknown: no worker alive to report it"
    for worker in workers:
        if worker.backend == "ok" and any(m.name == model and m.workers_ready for m in worker.models):
            return "ok"
    backends = {w.backend for w in workers} - {"ok"}
    return backends.pop() if backends else f"down: model {model!r} has no ready worker"


async def prometheus(request: Request) -> Response:
    svc = services(request)
    body = await metrics.render(svc.store, svc.tenants)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


async def openapi(request: Request) -> Response:
    authenticate(request)
    return JSONResponse(services(request).openapi)


async def docs(request: Request) -> Response:
    return HTMLResponse((STATIC / "docs.html").read_text())


async def index(request: Request) -> Response:
    return HTMLResponse((STATIC / "index.html").read_text())


def swagger_ui_dir() -> str:
    import swagger_ui_bundle

    return str(swagger_ui_bundle.swagger_ui_path)


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/queue", queue, methods=["GET"]),
    Route("/v1/webhooks/secret", webhook_secret, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", prometheus, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/docs", docs, methods=["GET"]),
    Mount("/docs/static", app=StaticFiles(directory=swagger_ui_dir()), name="swagger-ui"),
    Route("/", index, methods=["GET"]),
]
