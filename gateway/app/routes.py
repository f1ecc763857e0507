"""The job routes of ``/v1``: submit, read, wait, live events, mask and overlay, cancel, retry, delete."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway import urls
from gateway.app import images
from gateway.app.errors import Problem, job_not_found
from gateway.app.params import parse_classes, parse_events_filter, parse_model, parse_threshold, parse_wait
from gateway.app.web import Services, authenticate, read_body, services
from gateway.jobs import Job, JobStatus, QueueFull, Submission


async def parse_submission(request: Request, svc: Services) -> tuple[bytes, dict[str, Any]]:
    """The image and the raw parameters, from raw bytes, multipart form or JSON (with the image inline or
    by URL)."""
    settings = svc.settings
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        body = await read_body(request, settings.max_body_bytes * 4 // 3 + 65536)
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Problem(422, "invalid_body", "the body is not valid JSON") from exc
        if isinstance(payload, dict) and isinstance(payload.get("image_url"), str) and "image" not in payload:
            return await fetch_image(svc, payload["image_url"]), payload
        if not isinstance(payload, dict) or not isinstance(payload.get("image"), str):
            raise Problem(
                422, "invalid_body", 'expected {"image": "<base64>", ...} or {"image_url": "https://…", ...}'
            )
        try:
            image = base64.b64decode(payload["image"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Problem(422, "invalid_base64", "image is not valid base64") from exc
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


def refused(exc: urls.UrlRefused) -> Problem:
    return Problem(422, "url_not_allowed", str(exc))


async def fetch_image(svc: Services, url: str) -> bytes:
    """The image at ``url``, fetched under the URL guard, the size limit and the timeout: at submission, so a
    URL that cannot be fetched is a 422 now rather than a failed job later."""
    limit = svc.settings.max_body_bytes
    try:
        answer = await urls.request(svc.http, "GET", url, svc.allowed_url_hosts, limit)
    except urls.UrlRefused as exc:
        raise refused(exc) from exc
    except urls.TooLarge as exc:
        raise Problem(
            413, "body_too_large", f"the image at image_url is over the limit of {limit} bytes"
        ) from exc
    except urls.FetchFailed as exc:
        raise Problem(422, "fetch_failed", f"cannot fetch image_url: {exc}") from exc
    if 300 <= answer.status < 400:
        raise Problem(
            422, "fetch_failed", f"image_url answered {answer.status}, a redirect: redirects are not followed"
        )
    if answer.status != 200:
        raise Problem(422, "fetch_failed", f"image_url answered HTTP {answer.status}")
    return answer.body


async def check_webhook(svc: Services, raw: dict[str, Any]) -> tuple[str | None, tuple[str, ...]]:
    """The submission's webhook and its events, checked now: the URL's syntax and the URL guard."""
    url, events = raw.get("webhook"), parse_events_filter(raw.get("webhook_events_filter"))
    if url is None or url == "":
        return None, events
    if not svc.settings.webhook_secret:
        raise Problem(
            422, "webhooks_disabled", "this server sends no webhooks: SEGSERVE_WEBHOOK_SECRET is unset"
        )
    if not isinstance(url, str):
        raise Problem(422, "invalid_parameter", "webhook must be an absolute http(s) URL")
    try:
        await urls.resolve(url, svc.allowed_url_hosts)
    except urls.UrlRefused as exc:
        raise refused(exc) from exc
    except urls.FetchFailed as exc:
        raise Problem(422, "url_not_allowed", f"webhook: {exc}") from exc
    return url, events


async def check_model(svc: Services, model: str) -> None:
    if await svc.catalog.known(model) is False:
        raise Problem(404, "model_not_found", f"unknown model {model!r}; see GET /v1/models")


def job_response(job: Job, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(job.to_api(), status_code=status, headers=headers)


async def submit_job(request: Request) -> Response:
    svc = services(request)
    owner = authenticate(request)
    wait = parse_wait(request.headers.get("prefer"), request.headers.get("async_mode"))
    image, raw = await parse_submission(request, svc)
    if len(image) > svc.settings.max_body_bytes:  # a JSON or multipart body holds more than its image
        limit = svc.settings.max_body_bytes
        raise Problem(413, "body_too_large", f"the image is over the limit of {limit} bytes")
    params = {
        "classes": parse_classes(raw.get("classes")),
        "threshold": parse_threshold(raw.get("threshold")),
    }
    model = parse_model(raw.get("model"), svc.settings.default_model)
    content_type, _, _ = images.check_image(image, svc.settings.max_pixels)
    webhook, events = await check_webhook(svc, raw)
    await check_model(svc, model)
    idempotency = request.headers.get("idempotency-key")
    if idempotency is not None and not 0 < len(idempotency) <= 255:
        raise Problem(422, "invalid_parameter", "Idempotency-Key must be 1 to 255 characters")
    try:
        submission = Submission(
            model, params, image, content_type, owner, webhook=webhook, webhook_events=events
        )
        job, created = await svc.store.submit(submission, idempotency)
    except QueueFull:
        raise Problem(429, "queue_full", "the queue is full; try again later", {"Retry-After": "5"}) from None
    headers = {"Location": f"/v1/jobs/{job.id}"}
    if wait > 0:
        headers["Preference-Applied"] = f"wait={wait:g}"
        ended = await svc.waiters.wait_for_end(svc.store, job.id, owner, wait)
        if ended is None:  # deleted in the meantime
            raise job_not_found()
        job = ended
    finished = job.status.is_terminal()
    return job_response(job, 200 if (finished and wait > 0) or not created else 202, headers)


async def load_job(request: Request) -> tuple[Services, Job]:
    svc = services(request)
    job = await svc.store.load(request.path_params["job_id"], authenticate(request))
    if job is None:
        raise job_not_found()
    return svc, job


async def get_job(request: Request) -> Response:
    svc, job = await load_job(request)
    wait = parse_wait(request.headers.get("prefer"), None)
    if wait > 0 and not job.status.is_terminal():  # long polling, as on submission
        job = await svc.waiters.wait_for_end(svc.store, job.id, job.owner, wait) or job
    return job_response(job)


def not_succeeded(job: Job) -> Problem:
    return Problem(
        409, "job_not_succeeded", f"the job is {job.status.value}; its mask exists once it has succeeded"
    )


async def get_mask(request: Request) -> Response:
    svc, job = await load_job(request)
    mask = await svc.store.mask(job.id) if job.status is JobStatus.SUCCEEDED else None
    if mask is None:
        raise not_succeeded(job)
    return Response(mask, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


async def get_overlay(request: Request) -> Response:
    svc, job = await load_job(request)
    mask = await svc.store.mask(job.id) if job.status is JobStatus.SUCCEEDED else None
    image = await svc.store.image(job.id) if mask is not None else None
    if mask is None or image is None:
        raise not_succeeded(job)
    picture = await run_in_threadpool(images.overlay, image, mask)
    return Response(picture, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


async def cancel_job(request: Request) -> Response:
    svc, job = await load_job(request)
    status = await svc.store.cancel(job.id)
    if status is None:
        raise job_not_found()
    if status is not JobStatus.CANCELED:
        raise Problem(409, "job_finished", f"the job has already {status.value}")
    canceled = await svc.store.load(job.id, job.owner)
    if canceled is None:
        raise job_not_found()
    return job_response(canceled)


async def retry_job(request: Request) -> Response:
    svc, job = await load_job(request)
    refused = await svc.store.retry(job.id)
    if refused is None:
        queued = await svc.store.load(job.id, job.owner)
        if queued is None:
            raise job_not_found()
        return job_response(queued, 202, {"Location": f"/v1/jobs/{job.id}"})
    if refused.reason == "missing":
        raise job_not_found()
    if refused.reason == "no_input":
        raise Problem(409, "job_input_expired", "the job's input has expired, so it cannot run again")
    if refused.reason == "ending":
        detail = "the job was canceled while it ran, and that try is still ending; retry in a moment"
        raise Problem(409, "job_not_retryable", detail, {"Retry-After": "1"})
    detail = f"only a failed or canceled job can be retried; this one is {job.status.value}"
    raise Problem(409, "job_not_retryable", detail)


async def job_events(request: Request) -> Response:
    """Server-Sent Events: the job at each change of its state, then the stream closes after its end."""
    svc, job = await load_job(request)
    resumed_after = request.headers.get("last-event-id", "")

    async def stream() -> AsyncIterator[str]:
        last = resumed_after
        async for current in svc.waiters.changes(svc.store, job.id, job.owner):
            if current is None:  # deleted or expired
                return
            if current.event_id == last:
                yield ": nothing new\n\n"  # a comment keeps proxies from closing a quiet stream
                continue
            last = current.event_id
            yield f"id: {last}\nevent: status\ndata: {json.dumps(current.to_api())}\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


async def delete_job(request: Request) -> Response:
    svc, job = await load_job(request)
    await svc.store.delete(job.id)
    return Response(status_code=204)


routes = [
    Route("/v1/jobs", submit_job, methods=["POST"]),
    Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/v1/jobs/{job_id}", delete_job, methods=["DELETE"]),
    Route("/v1/jobs/{job_id}/mask.png", get_mask, methods=["GET"]),
    Route("/v1/jobs/{job_id}/overlay.png", get_overlay, methods=["GET"]),
    Route("/v1/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
    Route("/v1/jobs/{job_id}/retry", retry_job, methods=["POST"]),
    Route("/v1/jobs/{job_id}/events", job_events, methods=["GET"]),
]
