"""Every error the API answers with, as RFC 9457 problem details, mapped to HTTP statuses in one place."""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

PROBLEM_TYPE = "https://segserve.dev/problems/"


class Problem(Exception):
    """An error answer: ``status`` for HTTP, ``code`` for programs, ``detail`` for people."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}


def unauthorized(detail: str = "missing or invalid API key") -> Problem:
    return Problem(401, "unauthorized", detail, {"WWW-Authenticate": 'Bearer realm="segserve"'})


def anonymous_remote() -> Problem:
    return Problem(
        403,
        "anonymous_remote",
        "this gateway has no API keys and serves callers on its own machine only: set SEGSERVE_API_KEYS, "
        "or SEGSERVE_ALLOW_ANONYMOUS_REMOTE=true to serve every host without keys",
    )


def job_not_found() -> Problem:
    return Problem(404, "job_not_found", "no such job (unknown, expired or deleted)")


def queue_refusal(limit: str, retry_after_s: int = 5) -> Problem:
    """A bound refused a job: the backlog's ('queue', 'bytes', 'memory') or the calling key's own
    ('key_queue', 'key_rate')."""
    retry = {"Retry-After": str(retry_after_s)}
    if limit == "bytes":
        detail = "the inputs of the jobs waiting have reached the byte budget (SEGSERVE_MAX_QUEUED_BYTES); try again later"
        return Problem(429, "queue_bytes_full", detail, retry)
    if limit == "memory":
        return job_store_full()
    if limit == "key_queue":
        detail = "this API key has as many jobs queued and running as it may; try again when some have ended"
        return Problem(429, "key_queue_full", detail, retry)
    if limit == "key_rate":
        detail = "this API key submits faster than its rate allows; try again after Retry-After seconds"
        return Problem(429, "key_rate_limited", detail, retry)
    return Problem(429, "queue_full", "the queue is full; try again later", retry)


def job_store_full() -> Problem:
    detail = "the job store (Redis) is near its memory limit and takes no new jobs; try again later"
    return Problem(503, "job_store_full", detail, {"Retry-After": "5"})


TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def problem_response(
    status: int,
    code: str,
    detail: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE + code,
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "code": code,
        **(extra or {}),
    }
    return JSONResponse(body, status_code=status, headers=headers, media_type="application/problem+json")


async def handle_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(exc.status, exc.code, exc.detail, exc.headers)


async def handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    status = exc.status_code if exc.status_code in TITLES else 400
    detail = exc.detail if isinstance(exc.detail, str) else TITLES.get(status, "error")
    return problem_response(status, code, detail, dict(exc.headers or {}))


async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log (Starlette's ServerErrorMiddleware logs it), never to the client.
    return problem_response(500, "internal_error", "the server failed to handle this request")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    Problem: handle_problem,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
