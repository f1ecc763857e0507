"""The job routes of ``/v1``: submit, read, wait, live events, mask and overlay, cancel, retry, delete."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.app.auth import authenticate, caller
from gateway.app.errors import Problem, job_not_found, queue_refusal
from gateway.app.params import format_cursor, parse_cursor, parse_limit, parse_status_filter, parse_wait
from gateway.app.quotas import ratelimit_headers
from gateway.app.submission import read_submission
from gateway.app.web import Services, services
from gateway.jobs import Admission, Job, JobStatus, NotReplicated, OwnerLimits, QueueFull


def job_response(job: Job, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(job.to_api(), status_code=status, headers=headers)


async def submit_job(request: Request) -> Response:
    svc = services(request)
    tenant = caller(request)
    owner, limits = tenant.owner, svc.tenants.limits(tenant)
    wait = parse_wait(request.headers.get("prefer"), request.headers.get("async_mode"))
    idempotency = request.headers.get("idempotency-key")
    if idempotency is not None and not 0 < len(idempotency) <= 255:
        raise Problem(422, "invalid_parameter", "Idempotency-Key must be 1 to 255 characters")
    admission = await admit(svc, owner, limits)  # before the image is read: a refusal costs no upload
    submission = await read_submission(request, svc, owner)
    try:
        job, created, admission = await svc.store.submit(submission, idempotency, limits)
    except QueueFull as exc:
        raise refusal(exc, limits, admission) from None
    except NotReplicated as exc:
        raise Problem(503, "not_replicated", f"{exc}; try again", {"Retry-After": "1"}) from None
    headers = {"Location": f"/v1/jobs/{job.id}", **ratelimit_headers(limits, admission)}
    if wait > 0:
        headers["Preference-Applied"] = f"wait={wait:g}"
        ended = await svc.waiters.wait_for_end(svc.store, job.id, owner, wait)
        if ended is None:  # deleted in the meantime
            raise job_not_found()
        job = ended
    finished = job.status.is_terminal()
    return job_response(job, 200 if (finished and wait > 0) or not created else 202, headers)


async def admit(svc: Services, owner: str, limits: OwnerLimits) -> Admission:
    try:
        return await svc.store.admission(owner, limits)
    except QueueFull as exc:
        raise refusal(exc, limits, Admission(queued=limits.max_queued, tokens=0)) from None


def refusal(exc: QueueFull, limits: OwnerLimits, admission: Admission) -> Problem:
    """The refusal's problem, with the key's RateLimit fields: nothing left of the limit that was hit."""
    problem = queue_refusal(exc.limit, exc.retry_after_s)
    if exc.limit == "key_rate":
        admission = Admission(admission.queued, tokens=0)
    elif exc.limit == "key_queue":
        admission = Admission(limits.max_queued, admission.tokens)
    problem.headers.update(ratelimit_headers(limits, admission))
    return problem


async def list_jobs(request: Request) -> Response:
    """The calling key's jobs, newest first: ``status`` filters, ``limit`` sizes a page, and ``cursor`` (the
    previous page's ``next_cursor``) continues."""
    svc = services(request)
    owner = authenticate(request)
    status = parse_status_filter(request.query_params.get("status"))
    limit = parse_limit(request.query_params.get("limit"))
    before = parse_cursor(request.query_params.get("cursor"))
    jobs, after = await svc.store.list_jobs(owner, status, before, limit)
    next_cursor = None if after is None else format_cursor(after)
    return JSONResponse({"jobs": [job.to_api() for job in jobs], "next_cursor": next_cursor})


async def cancel_jobs(request: Request) -> Response:
    """Cancel every queued job of the calling key (running ones go on: cancel each by its id)."""
    svc = services(request)
    owner = authenticate(request)
    return JSONResponse({"canceled": await svc.store.cancel_queued(owner)})


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


async def blob_response(svc: Services, name: str) -> Response:
    """A result PNG: a redirect to a signed URL when the store signs and the setting asks for it (large
    results then skip the gateway), else streamed from the store in small chunks."""
    seconds = svc.settings.blob_presign_seconds
    if seconds > 0 and svc.store.blobs.signs:
        url = await svc.store.blobs.sign(name, seconds)
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    blob = await svc.store.blobs.stream(name)
    if blob is None:
        raise Problem(404, "result_not_found", "the job's result is no longer in the blob store")
    headers = {"Content-Length": str(blob.size), "Cache-Control": "private, max-age=3600"}
    return StreamingResponse(blob.chunks, media_type="image/png", headers=headers)


async def get_mask(request: Request) -> Response:
    svc, job = await load_job(request)
    if job.status is not JobStatus.SUCCEEDED or job.mask is None:
        raise not_succeeded(job)
    return await blob_response(svc, job.mask)


async def get_overlay(request: Request) -> Response:
    svc, job = await load_job(request)
    if job.status is not JobStatus.SUCCEEDED:
        raise not_succeeded(job)
    if job.overlay is None:
        detail = "the job was submitted without overlay=true, so no overlay was drawn"
        raise Problem(409, "overlay_not_requested", detail)
    return await blob_response(svc, job.overlay)


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
    limits = svc.tenants.limits(svc.tenants.of(job.owner))
    try:
        refused = await svc.store.retry(job.id, limits)
    except QueueFull as exc:
        raise refusal(exc, limits, Admission(queued=-1, tokens=-1)) from None
    if refused is None:
        queued = await svc.store.load(job.id, job.owner)
        if queued is None:
            raise job_not_found()
        return job_response(queued, 202, {"Location": f"/v1/jobs/{job.id}"})
    if refused.reason == "missing":
        raise job_not_found()
    if refused.reason == "no_input":
        raise Problem(409, "job_input_expired", "the job's input is gone, so it cannot run again")
    if refused.reason == "ending":
        detail = "the job was canceled while it ran, and that try is still ending; retry in a moment"
        raise Problem(409, "job_not_retryable", detail, {"Retry-After": "1"})
    detail = f"only a failed, canceled or expired job can be retried; this one is {job.status.value}"
    raise Problem(409, "job_not_retryable", detail)


async def job_events(request: Request) -> Response:
    """Server-Sent Events: the job at each change of its state, then the stream closes after its end."""
    svc, job = await load_job(request)
    resumed_after = request.headers.get("last-event-id", "")
    streams = svc.streams.get(job.owner, 0)
    if streams >= svc.settings.key_max_streams:
        detail = f"this API key has {streams} live event streams open here, as many as it may; close one"
        raise Problem(429, "too_many_streams", detail, {"Retry-After": "5"})
    svc.streams[job.owner] = streams + 1

    async def stream() -> AsyncIterator[str]:
        last = resumed_after
        try:
            async for current in svc.waiters.changes(svc.store, job.id, job.owner):
                if current is None:  # deleted or expired
                    return
                if current.event_id == last:
                    yield ": nothing new\n\n"  # a comment keeps proxies from closing a quiet stream
                    continue
                last = current.event_id
                yield f"id: {last}\nevent: status\ndata: {json.dumps(current.to_api())}\n\n"
        finally:
            svc.streams[job.owner] -= 1
            if not svc.streams[job.owner]:
                del svc.streams[job.owner]

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


async def delete_job(request: Request) -> Response:
    svc, job = await load_job(request)
    await svc.store.delete(job.id)
    return Response(status_code=204)


routes = [
    Route("/v1/jobs", submit_job, methods=["POST"]),
    Route("/v1/jobs", list_jobs, methods=["GET"]),
    Route("/v1/jobs/cancel", cancel_jobs, methods=["POST"]),
    Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/v1/jobs/{job_id}", delete_job, methods=["DELETE"]),
    Route("/v1/jobs/{job_id}/mask.png", get_mask, methods=["GET"]),
    Route("/v1/jobs/{job_id}/overlay.png", get_overlay, methods=["GET"]),
    Route("/v1/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
    Route("/v1/jobs/{job_id}/retry", retry_job, methods=["POST"]),
    Route("/v1/jobs/{job_id}/events", job_events, methods=["GET"]),
]
