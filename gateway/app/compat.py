"""The routes of the FastAPI + RQ service that segserve replaces, answered in its shapes, so its clients
keep working unchanged. Jobs are ordinary segserve jobs; only the way in and the answers differ."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.app.auth import authenticate
from gateway.app.errors import Problem, queue_refusal
from gateway.app.params import parse_classes, parse_threshold, parse_wait
from gateway.app.submission import image_memory
from gateway.app.uploads import body_too_large, read_body, store_bytes
from gateway.app.web import services
from gateway.jobs import Job, JobParams, JobStatus, QueueFull, Submission

DEFAULT_CLASS_IDS = [8, 17]  # cat and sheep: what the original service counted when asked for nothing
RQ_STATUS = {
    JobStatus.QUEUED: "queued",
    JobStatus.RUNNING: "started",
    JobStatus.SUCCEEDED: "finished",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELED: "failed",
    JobStatus.EXPIRED: "failed",
}


def resolve_image_path(root: str, image_path: Any) -> Path:
    """``image_path`` inside the configured root, symlinks resolved; 403 outside it or when off."""
    if not root:
        raise Problem(
            403, "image_root_disabled", "reading images by path is off (SEGSERVE_IMAGE_ROOT is unset)"
        )
    if not isinstance(image_path, str) or not image_path or "\x00" in image_path:
        raise Problem(422, "invalid_parameter", "image_path must be a non-empty string")
    base = Path(root).resolve()
    candidate = (base / image_path).resolve()
    if not candidate.is_relative_to(base):
        raise Problem(403, "path_outside_root", "image_path is outside the image root")
    if not candidate.exists():
        raise Problem(404, "image_not_found", f"no image at {image_path!r}")
    return candidate


def read_image_file(path: Path, limit: int) -> bytes:
    """The file's bytes, read in one opening that cannot be swapped: no symlink as the last step, no FIFO or
    device (O_NONBLOCK keeps a FIFO from hanging the open; fstat refuses it), and never past ``limit``, even
    for a file that grows while it is read. Blocking: run it in a thread."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise Problem(404, "image_not_found", "no image at image_path") from exc
    except OSError as exc:
        raise Problem(403, "path_outside_root", "image_path cannot be opened as a regular file") from exc
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Problem(404, "image_not_found", "image_path is not a regular file")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise body_too_large(limit, "the image")
    return data


async def predict(request: Request) -> Response:
    svc = services(request)
    owner = authenticate(request)
    try:
        payload = json.loads(await read_body(request, 1 << 20))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise Problem(422, "invalid_body", "the body is not valid JSON") from exc
    if not isinstance(payload, dict):
        raise Problem(422, "invalid_body", 'expected {"image_path": ..., "target_class_ids": [...]}')
    class_ids = payload.get("target_class_ids") or DEFAULT_CLASS_IDS
    if not isinstance(class_ids, list) or not all(type(c) is int for c in class_ids):
        raise Problem(422, "invalid_parameter", "target_class_ids must be a list of integers")
    params = JobParams(parse_classes(class_ids), parse_threshold(payload.get("threshold")))
    limit = svc.settings.max_body_bytes
    async with image_memory(svc, limit):
        path = await run_in_threadpool(resolve_image_path, svc.settings.image_root, payload.get("image_path"))
        image = await run_in_threadpool(read_image_file, path, limit)
        stored = await store_bytes(svc.store, image, svc.settings.max_pixels)
    submission = Submission(
        job_id=stored.job_id,
        model=svc.settings.default_model,
        params=params,
        content_type=stored.content_type,
        input_bytes=stored.size,
        width=stored.width,
        height=stored.height,
        owner=owner,
        image_path=payload["image_path"],
        target_class_ids=class_ids,
    )
    try:
        job, _, _ = await svc.store.submit(submission, limits=svc.tenants.limits(svc.tenants.of(owner)))
    except QueueFull as exc:
        raise queue_refusal(exc.limit, exc.retry_after_s) from None
    wait = parse_wait(None, request.headers.get("async_mode"))
    if wait > 0:
        done = await svc.waiters.wait_for_end(svc.store, job.id, owner, wait)
        if done is not None and done.status.is_terminal():
            return JSONResponse({"job_id": job.id, **rq_result(done)})
    return JSONResponse(
        {
            "success": True,
            "job_id": job.id,
            "status": f"/job_status/{job.id}",
            "position_in_queue": job.position or 0,
        }
    )


def rq_result(job: Job) -> dict[str, Any]:
    """The original's result object for a finished job."""
    requested = job.target_class_ids or job.params.classes or []
    succeeded = job.status is JobStatus.SUCCEEDED
    pixels = {c["id"]: c["pixels"] for c in job.result.classes} if job.result else {}
    error = job.error.message if job.error and job.status is JobStatus.FAILED else None
    if job.status is JobStatus.CANCELED:
        error = "the job was canceled"
    if job.status is JobStatus.EXPIRED:
        error = "no worker started the job in time"
    return {
        "image_path": job.image_path,
        "model_name": job.model,
        "predictions": [{"class_id": c, "pix_count": pixels.get(c, 0)} for c in requested]
        if succeeded
        else [],
        "processing_time_ms": job.timings_ms.get("total"),
        "success": succeeded,
        "error_message": error,
    }


async def load(request: Request) -> Job | None:
    owner = authenticate(request)
    return await services(request).store.load(request.path_params["job_id"], owner)


async def job_status(request: Request) -> Response:
    job = await load(request)
    if job is None:
        return JSONResponse({"error": "Job not found."}, status_code=404)
    result = rq_result(job) if job.status.is_terminal() else None
    return JSONResponse(
        {
            "job_id": job.id,
            "status": RQ_STATUS[job.status],
            "result": result,
            "error_message": result["error_message"] if result else None,
        }
    )


async def prediction(request: Request) -> Response:
    job = await load(request)
    if job is None:
        return JSONResponse({"error": "Prediction ID not found."}, status_code=404)
    if not job.status.is_terminal():
        return JSONResponse({"error": "Prediction is still being processed."}, status_code=202)
    return JSONResponse(rq_result(job))


routes = [
    Route("/predict", predict, methods=["POST"]),
    Route("/predict/{job_id}", prediction, methods=["GET"]),
    Route("/job_status/{job_id}", job_status, methods=["GET"]),
]
