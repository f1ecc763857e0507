"""The HTTP gateway: validates, stores the input, enqueues, answers. It never imports torch.

Run: ``uvicorn gateway.app:app``. The contract is ../shared/API.md, described at ``/openapi.json``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml
from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gateway import compat, images, jobs, metrics
from gateway.errors import EXCEPTION_HANDLERS, Problem, job_not_found, problem_response
from gateway.params import parse_classes, parse_model, parse_threshold, parse_wait
from gateway.settings import Settings
from gateway.torchserve import BackendUnavailable, ModelCatalog, ModelNotFound, TorchServe
from gateway.web import Services, authenticate, load_api_keys, read_body, services

STATIC = Path(__file__).parent / "static"


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    settings = Settings.from_env()
    # No ping here: the gateway starts, and answers 503, while Redis is still coming up.
    redis = ArqRedis(
        connection_pool=ConnectionPool.from_url(
            settings.redis_url, socket_connect_timeout=2, socket_timeout=10
        ),
        job_serializer=jobs.serialize,
        job_deserializer=jobs.deserialize,
    )
    torchserve = TorchServe(
        settings.torchserve_url, settings.torchserve_management_url, settings.key_file, timeout=10.0
    )
    services = Services(
        settings=settings,
        redis=redis,
        store=jobs.JobStore(redis, settings.result_ttl, settings.max_queued),
        # Its own connection, with no read timeout: the subscription is quiet for as long as no job ends.
        waiters=jobs.Waiters(ArqRedis.from_url(settings.redis_url, socket_connect_timeout=2)),
        torchserve=torchserve,
        catalog=ModelCatalog(torchserve, settings.models_cache_seconds),
        api_keys=load_api_keys(settings),
        openapi=yaml.safe_load((STATIC / "openapi.yaml").read_text()),
    )
    await services.waiters.start()
    try:
        yield {"services": services}
    finally:
        await services.waiters.stop()
        await services.waiters.redis.aclose()
        await torchserve.aclose()
        await redis.aclose()


async def parse_submission(request: Request, settings: Settings) -> tuple[bytes, dict[str, Any]]:
    """The image and the raw parameters, from raw bytes, multipart form or JSON."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        body = await read_body(request, settings.max_body_bytes * 4 // 3 + 65536)
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Problem(422, "invalid_body", "the body is not valid JSON") from exc
        if not isinstance(payload, dict) or not isinstance(payload.get("image"), str):
            raise Problem(422, "invalid_body", 'expected {"image": "<base64>", ...}')
        try:
            image = base64.b64decode(payload["image"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Problem(422, "invalid_base64", "image is not valid base64") from exc
        if len(image) > settings.max_body_bytes:
            raise Problem(
                413, "body_too_large", f"the image is over the limit of {settings.max_body_bytes} bytes"
            )
        return image, payload
    if content_type == "multipart/form-data":
        await read_body(request, settings.max_body_bytes + 65536)
        try:
            form = await request.form(max_files=1, max_fields=16)
        except Exception as exc:  # python-multipart's errors for malformed bodies have no common base
            raise Problem(422, "invalid_body", "the multipart body cannot be parsed") from exc
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise Problem(422, "missing_image", "the form has no file field named 'image'")
        image = await upload.read()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        await form.close()
        return image, {**dict(request.query_params), **fields}
    if content_type in images.CONTENT_TYPES or content_type == "application/octet-stream":
        return await read_body(request, settings.max_body_bytes), dict(request.query_params)
    raise Problem(
        415,
        "unsupported_media_type",
        f"unsupported content type {content_type or '(none)'!r}; send image bytes, multipart/form-data "
        "with a file field 'image', or JSON with base64 'image'",
    )


async def check_model(svc: Services, model: str) -> None:
    if await svc.catalog.known(model) is False:
        raise Problem(404, "model_not_found", f"unknown model {model!r}; see GET /v1/models")


def job_response(
    job: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> JSONResponse:
    job.pop("_meta", None)
    return JSONResponse(job, status_code=status, headers=headers)


async def submit_job(request: Request) -> Response:
    svc = services(request)
    owner = authenticate(request)
    wait = parse_wait(request.headers.get("prefer"), request.headers.get("async_mode"))
    image, raw = await parse_submission(request, svc.settings)
    params = {
        "classes": parse_classes(raw.get("classes")),
        "threshold": parse_threshold(raw.get("threshold")),
    }
    model = parse_model(raw.get("model"), svc.settings.default_model)
    content_type, _, _ = images.check_image(image, svc.settings.max_pixels)
    await check_model(svc, model)
    idempotency = request.headers.get("idempotency-key")
    if idempotency is not None and not 0 < len(idempotency) <= 255:
        raise Problem(422, "invalid_parameter", "Idempotency-Key must be 1 to 255 characters")
    try:
        job, created = await svc.store.submit(
            jobs.Submission(model, params, image, content_type, owner), idempotency
        )
    except jobs.QueueFull:
        raise Problem(429, "queue_full", "the queue is full; try again later", {"Retry-After": "5"}) from None
    headers = {"Location": f"/v1/jobs/{job['id']}"}
    if wait > 0:
        headers["Preference-Applied"] = f"wait={wait:g}"
        ended = await jobs.wait_for_end(svc.store, svc.waiters, job["id"], owner, wait)
        if ended is None:  # deleted in the meantime
            raise job_not_found()
        job = ended
    finished = jobs.JobStatus(job["status"]).is_terminal()
    return job_response(job, 200 if (finished and wait > 0) or not created else 202, headers)


async def load_job(request: Request) -> tuple[Services, str, dict[str, Any]]:
    svc = services(request)
    owner = authenticate(request)
    job_id = request.path_params["job_id"]
    job = await svc.store.load(job_id, owner) if jobs.valid_id(job_id) else None
    if job is None:
        raise job_not_found()
    return svc, job_id, job


async def get_job(request: Request) -> Response:
    svc, job_id, job = await load_job(request)
    wait = parse_wait(request.headers.get("prefer"), None)
    if wait > 0 and not jobs.JobStatus(job["status"]).is_terminal():  # long polling, as on submission
        job = await jobs.wait_for_end(svc.store, svc.waiters, job_id, job["_meta"]["owner"], wait) or job
    return job_response(job)


def not_succeeded(job: dict[str, Any]) -> Problem:
    return Problem(
        409, "job_not_succeeded", f"the job is {job['status']}; its mask exists once it has succeeded"
    )


async def get_mask(request: Request) -> Response:
    svc, job_id, job = await load_job(request)
    mask = await svc.store.mask(job_id) if job["status"] == "succeeded" else None
    if mask is None:
        raise not_succeeded(job)
    return Response(mask, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


async def get_overlay(request: Request) -> Response:
    svc, job_id, job = await load_job(request)
    mask = await svc.store.mask(job_id) if job["status"] == "succeeded" else None
    image = await svc.store.image(job_id) if mask is not None else None
    if mask is None or image is None:
        raise not_succeeded(job)
    picture = await run_in_threadpool(images.overlay, image, mask)
    return Response(picture, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


async def cancel_job(request: Request) -> Response:
    svc, job_id, job = await load_job(request)
    outcome = await svc.store.cancel(job_id)
    if outcome == "finished":
        raise Problem(409, "job_finished", f"the job has already {job['status']}")
    canceled = await svc.store.load(job_id, job["_meta"].get("owner", ""))
    if canceled is None:
        raise job_not_found()
    if canceled["status"] != "canceled":
        raise Problem(409, "job_finished", f"the job has already {canceled['status']}")
    return job_response(canceled)


async def delete_job(request: Request) -> Response:
    svc, job_id, _ = await load_job(request)
    await svc.store.delete(job_id)
    return Response(status_code=204)


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


async def queue(request: Request) -> Response:
    svc = services(request)
    authenticate(request)
    return JSONResponse(await svc.store.queue_stats())


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    svc = services(request)
    checks: dict[str, str] = {}
    try:
        await svc.redis.ping()
        checks["redis"] = "ok"
        stats = await svc.store.queue_stats()
        checks["workers"] = (
            f"{len(stats['workers'])} alive" if stats["workers"] else "down: no worker heartbeat"
        )
    except (RedisConnectionError, RedisTimeoutError, OSError):
        checks["redis"] = "down"
        checks["workers"] = "unknown: Redis is down"
    checks["torchserve"] = await torchserve_state(svc)
    down = [name for name, state in checks.items() if state != "ok" and not state.endswith("alive")]
    if down:
        return problem_response(
            503, "not_ready", f"not ready: {', '.join(down)} down", extra={"checks": checks}
        )
    return JSONResponse({"status": "ready", "checks": checks})


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
    body = await metrics.render(services(request).redis)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


async def openapi(request: Request) -> Response:
    authenticate(request)
    return JSONResponse(services(request).openapi)


async def docs(request: Request) -> Response:
    return HTMLResponse((STATIC / "docs.html").read_text())


async def index(request: Request) -> Response:
    return HTMLResponse((STATIC / "index.html").read_text())


async def redis_down(request: Request, exc: Exception) -> Response:
    return problem_response(
        503, "redis_unavailable", "the job store (Redis) does not answer; try again shortly"
    )


def swagger_ui_dir() -> str:
    import swagger_ui_bundle

    return str(swagger_ui_bundle.swagger_ui_path)


routes = [
    Route("/v1/jobs", submit_job, methods=["POST"]),
    Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/v1/jobs/{job_id}", delete_job, methods=["DELETE"]),
    Route("/v1/jobs/{job_id}/mask.png", get_mask, methods=["GET"]),
    Route("/v1/jobs/{job_id}/overlay.png", get_overlay, methods=["GET"]),
    Route("/v1/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/queue", queue, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", prometheus, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/docs", docs, methods=["GET"]),
    Mount("/docs/static", app=StaticFiles(directory=swagger_ui_dir()), name="swagger-ui"),
    Route("/", index, methods=["GET"]),
    *compat.routes,
]

app = Starlette(
    routes=routes,
    lifespan=lifespan,
    exception_handlers={
        **EXCEPTION_HANDLERS,
        RedisConnectionError: redis_down,
        RedisTimeoutError: redis_down,
    },
)
