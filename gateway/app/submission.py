"""How a submission arrives (raw bytes, a form, JSON with the image inline or by URL), and every check it
passes before it becomes a job: size, parameters, webhook URL and model first, then the image itself, once
it is in the blob store (see uploads)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from gateway import urls
from gateway.app import images, uploads
from gateway.app.errors import Problem
from gateway.app.params import (
    parse_classes,
    parse_events_filter,
    parse_model,
    parse_overlay,
    parse_priority,
    parse_queue_timeout,
    parse_threshold,
)
from gateway.app.uploads import STREAM_MEMORY, StoredImage, body_too_large
from gateway.app.web import Services
from gateway.budget import BudgetTimeout
from gateway.jobs import JobParams, Priority, Submission

# A JSON body holds its image three times at the peak: the body, the base64 string, the decoded bytes.
JSON_COPIES = 3
MEMORY_WAIT_S = 5.0  # how long a request waits for the gateway's image memory before it is asked to come back
FORM_OVERHEAD = 65536  # a form's fields and boundaries, beside its image


@dataclass(frozen=True)
class Asked:
    """A submission's parameters, checked."""

    model: str
    params: JobParams
    webhook: str | None
    webhook_events: tuple[str, ...]
    priority: Priority
    queue_timeout_ms: int | None


async def read_submission(request: Request, svc: Services, owner: str) -> Submission:
    """The job to make from this request, every part of it checked and its input stored; a Problem
    otherwise (and nothing stored)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        stored, asked = await from_json(request, svc)
    elif content_type == "multipart/form-data":
        stored, asked = await from_form(request, svc)
    elif content_type in images.CONTENT_TYPES or content_type == "application/octet-stream":
        stored, asked = await from_raw(request, svc)
    else:
        raise Problem(
            415,
            "unsupported_media_type",
            f"unsupported content type {content_type or '(none)'!r}; send image bytes, multipart/form-data "
            "with a file field 'image', or JSON with base64 'image'",
        )
    return Submission(
        job_id=stored.job_id,
        model=asked.model,
        params=asked.params,
        content_type=stored.content_type,
        input_bytes=stored.size,
        width=stored.width,
        height=stored.height,
        owner=owner,
        webhook=asked.webhook,
        webhook_events=asked.webhook_events,
        priority=asked.priority,
        queue_timeout_ms=asked.queue_timeout_ms,
    )


@contextlib.asynccontextmanager
async def image_memory(svc: Services, nbytes: int) -> AsyncIterator[None]:
    """Hold ``nbytes`` of the gateway's image memory; 503 when it stays taken (other large images)."""
    try:
        async with svc.image_memory.hold(nbytes, MEMORY_WAIT_S):
            yield
    except BudgetTimeout:
        raise Problem(
            503,
            "gateway_busy",
            "this gateway is busy with other images; try again shortly",
            {"Retry-After": "2"},
        ) from None


async def from_raw(request: Request, svc: Services) -> tuple[StoredImage, Asked]:
    """Raw image bytes, parameters in the query string: checked first, then the body streams to the store."""
    asked = await check_parameters(svc, dict(request.query_params))
    limit = svc.settings.max_body_bytes
    uploads.refuse_declared(request, limit)
    async with image_memory(svc, STREAM_MEMORY):
        stored = await uploads.store_stream(
            svc.store, request.stream(), limit, svc.settings.max_pixels, uploads.declared_length(request) or 0
        )
    return stored, asked


async def from_form(request: Request, svc: Services) -> tuple[StoredImage, Asked]:
    """A form with a file field ``image``; its other fields (else the query string) are the parameters."""
    settings = svc.settings
    async with image_memory(svc, STREAM_MEMORY):
        limited = uploads.size_limited(request, settings.max_body_bytes + FORM_OVERHEAD)
        try:
            form = await limited.form(max_files=1, max_fields=16)
        except Problem:
            raise
        except Exception as exc:  # python-multipart's errors for malformed bodies have no common base
            raise Problem(422, "invalid_body", "the multipart body cannot be parsed") from exc
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise Problem(422, "missing_image", "the form has no file field named 'image'")
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            asked = await check_parameters(svc, {**dict(request.query_params), **fields})
            chunks = uploads.file_chunks(upload)
            stored = await uploads.store_stream(
                svc.store, chunks, settings.max_body_bytes, settings.max_pixels, upload.size or 0
            )
        finally:
            await form.close()
    return stored, asked


async def from_json(request: Request, svc: Services) -> tuple[StoredImage, Asked]:
    """JSON with the image as base64 (``image``) or by URL (``image_url``); the other members are the
    parameters."""
    settings = svc.settings
    limit = settings.max_body_bytes * 4 // 3 + 65536
    async with image_memory(svc, JSON_COPIES * min(uploads.declared_length(request) or limit, limit)):
        payload = parse_json(await uploads.read_body(request, limit))
        by_url = isinstance(payload.get("image_url"), str) and "image" not in payload
        if not by_url and not isinstance(payload.get("image"), str):
            raise Problem(
                422, "invalid_body", 'expected {"image": "<base64>", ...} or {"image_url": "https://…", ...}'
            )
        asked = await check_parameters(svc, payload)
        if by_url:
            async with image_memory(svc, settings.max_body_bytes):
                image = await fetch_image(svc, payload["image_url"])
                return await uploads.store_bytes(svc.store, image, settings.max_pixels), asked
        try:
            image = base64.b64decode(payload.pop("image"), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Problem(422, "invalid_base64", "image is not valid base64") from exc
        if len(image) > settings.max_body_bytes:
            raise body_too_large(settings.max_body_bytes, "the image")
        return await uploads.store_bytes(svc.store, image, settings.max_pixels), asked


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise Problem(422, "invalid_body", "the body is not valid JSON") from exc
    if not isinstance(payload, dict):
        raise Problem(
            422, "invalid_body", 'expected {"image": "<base64>", ...} or {"image_url": "https://…", ...}'
        )
    return payload


async def check_parameters(svc: Services, raw: dict[str, Any]) -> Asked:
    params = JobParams(
        classes=parse_classes(raw.get("classes")),
        threshold=parse_threshold(raw.get("threshold")),
        overlay=parse_overlay(raw.get("overlay")),
    )
    model = parse_model(raw.get("model"), svc.settings.default_model)
    priority = parse_priority(raw.get("priority"))
    queue_timeout = parse_queue_timeout(raw.get("queue_timeout"), svc.store.config.longest_wait_ms / 1000)
    webhook, events = await check_webhook(svc, raw)
    await check_model(svc, model)
    return Asked(model, params, webhook, events, priority, queue_timeout)


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
        raise body_too_large(limit, "the image at image_url") from exc
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
