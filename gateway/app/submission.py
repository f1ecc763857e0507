"""How a submission arrives (raw bytes, a form, JSON with the image inline or by URL), and every check it
passes before it becomes a job: size, parameters, image header, webhook URL, model."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from gateway import urls
from gateway.app import images
from gateway.app.errors import Problem
from gateway.app.params import parse_classes, parse_events_filter, parse_model, parse_threshold
from gateway.app.web import Services, read_body
from gateway.jobs import Submission


async def read_submission(request: Request, svc: Services, owner: str) -> Submission:
    """The job to make from this request, every part of it checked; a Problem otherwise."""
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
    return Submission(model, params, image, content_type, owner, webhook=webhook, webhook_events=events)


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
