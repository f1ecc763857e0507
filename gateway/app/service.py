"""The service routes: models, queue, health and readiness, metrics, the API description and the pages."""

from __future__ import annotations

import dataclasses
from importlib.resources import files

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.app import metrics
from gateway.app.errors import Problem, problem_response
from gateway.app.web import Services, authenticate, services
from gateway.torchserve import BackendUnavailable, ModelNotFound
from gateway.webhooks import signing_key

STATIC = files("gateway.app").joinpath("static")


async def list_models(request: Request) -> Response:
    svc = services(request)
    authenticate(request)
    try:
        models = await svc.catalog.list()
    except (BackendUnavailable, ModelNotFound) as exc:
        raise Problem(
            503, "backend_unavailable", "the model server's management API does not answer"
        ) from exc
    return JSONResponse({"default_model": svc.settings.default_model, "models": models})


async def webhook_secret(request: Request) -> Response:
    """The caller's own webhook signing key: its deliveries verify with it, and with no other."""
    svc = services(request)
    owner = authenticate(request)
    if not svc.settings.webhook_secret:
        raise Problem(
            404, "webhooks_disabled", "this server sends no webhooks: SEGSERVE_WEBHOOK_SECRET is unset"
        )
    return JSONResponse({"key": signing_key(svc.settings.webhook_secret, owner)})


async def queue(request: Request) -> Response:
    svc = services(request)
    authenticate(request)
    return JSONResponse(dataclasses.asdict(await svc.store.queue_stats()))


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """200 while the gateway can accept jobs, which needs Redis alone: with no worker alive (a deployment
    scaled to zero) or TorchServe away, jobs wait in the queue. The body names each part's state, and says
    "ready" when all are up, "degraded" otherwise; 503 only when Redis does not answer."""
    svc = services(request)
    checks: dict[str, str] = {}
    try:
        await svc.redis.ping()
        checks["redis"] = "ok"
        workers = (await svc.store.queue_stats()).workers
        checks["workers"] = f"ok: {len(workers)} alive" if workers else "none alive: jobs wait in the queue"
    except (RedisConnectionError, RedisTimeoutError, OSError):
        checks["redis"] = "down"
        checks["workers"] = "unknown: Redis is down"
    checks["torchserve"] = await torchserve_state(svc)
    if checks["redis"] != "ok":
        return problem_response(503, "not_ready", "not ready: Redis is down", extra={"checks": checks})
    up = all(state.startswith("ok") for state in checks.values())
    return JSONResponse({"status": "ready" if up else "degraded", "checks": checks})


async def torchserve_state(svc: Services) -> str:
    if not await svc.torchserve.ping():
        return "down"
    try:
        models = await svc.catalog.list()
    except (BackendUnavailable, ModelNotFound):
        return "down: its management API does not answer"
    model = svc.settings.default_model
    if not any(m["name"] == model and m["workers_ready"] for m in models):
        return f"down: model {model!r} has no ready worker"
    return "ok"


async def prometheus(request: Request) -> Response:
    body = await metrics.render(services(request).store)
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
