"""A Python client for segserve's job API, async (``AsyncClient``) and sync (``Client``).

    from gateway.client import Client

    with Client("http://127.0.0.1:8000") as segserve:
        job = segserve.segment("cat.jpg", classes=["cat"])   # submit and wait for the end
        open("cat-mask.png", "wb").write(segserve.mask(job["id"]))

429 and 503 answers, and connection failures, are retried with backoff, honouring ``Retry-After``.
Waiting for a job listens to its live events (Server-Sent Events); ``wait(..., poll=True)`` long-polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal
from httpx_sse import EventSource, ServerSentEvent
from standardwebhooks import Webhook

from gateway.retrying import backoff, retry_after
from gateway.status import is_terminal

T = TypeVar("T")
CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}
MAX_WAIT = 60
MAX_RETRY_AFTER = 300.0  # the longest a server's Retry-After makes a call wait before its next try


class SegserveError(Exception):
    """An error answer from the API (problem details), or a service that stayed unreachable."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


def verify_webhook(body: bytes | str, headers: Mapping[str, str], key: str) -> dict[str, Any]:
    """A webhook delivery's event, once its signature checks out with ``key`` (from ``webhook_secret()``).

    Raises ``standardwebhooks.webhooks.WebhookVerificationError`` for a forged, altered or stale delivery.
    The ``webhook-id`` header stays the same across retries of one event: use it to ignore repeats.
    """
    event: dict[str, Any] = Webhook(key).verify(body, dict(headers))
    return event


def problem(response: httpx.Response) -> SegserveError:
    """The API's error answer (RFC 9457 problem details) as an exception."""
    try:
        details = response.json()
    except ValueError:
        details = {}
    code, detail = details.get("code", "http_error"), details.get("detail", response.text[:200])
    return SegserveError(response.status_code, str(code), str(detail))


async def status_events(response: httpx.Response) -> AsyncIterator[ServerSentEvent]:
    """The ``status`` events of a job's event stream, read as the SSE standard says (by httpx-sse: a
    multi-line ``data`` joined with newlines, comments skipped); each one's data is the job, in JSON."""
    async for event in EventSource(response).aiter_sse():
        if event.event == "status" and event.data:
            yield event


def content_type_of(path: Path) -> str:
    return CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")


class AsyncClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = MAX_WAIT + 15,
        retries: int = 6,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout)
        self.retries = retries

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(1, self.retries + 2):
            try:
                response = await self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                await self._pause_or_give_up(attempt, exc)
                continue
            if response.status_code in (429, 503) and attempt <= self.retries:
                await self._pause(attempt, response.headers.get("retry-after"))
                continue
            if response.status_code >= 400:
                raise problem(response)
            return response
        raise AssertionError("unreachable")

    async def _pause(self, attempt: int, retry_after_header: str | None = None) -> None:
        """Wait before trying again: as long as the server asked (``Retry-After``), else the backoff."""
        asked = retry_after(retry_after_header, MAX_RETRY_AFTER)
        await asyncio.sleep(asked if asked is not None else backoff(attempt, 0.5, 10.0, jitter=True))

    async def _pause_or_give_up(self, attempt: int, exc: httpx.TransportError) -> None:
        """After a failed connection: wait, or raise once the tries are spent."""
        if attempt > self.retries:
            raise SegserveError(503, "unreachable", f"{self._http.base_url}: {exc}") from exc
        await self._pause(attempt)

    async def submit(
        self,
        image: str | Path | bytes,
        *,
        classes: Sequence[str | int] | None = None,
        threshold: float | None = None,
        model: str | None = None,
        wait: float = 0,
        idempotency_key: str | None = None,
        webhook: str | None = None,
        webhook_events: Sequence[str] = ("completed",),
        overlay: bool = False,
    ) -> dict[str, Any]:
        """Submit one image (a path or its bytes); with ``wait``, hold up to that many seconds for the end.
        With ``webhook``, the server POSTs the job's events (``start``, ``completed``) there, signed. With
        ``overlay``, the worker also draws the mask over the image (``overlay()`` fetches it)."""
        if isinstance(image, bytes):
            body, content_type = image, "application/octet-stream"
        else:
            path = Path(image)
            body = await asyncio.to_thread(path.read_bytes)
            content_type = content_type_of(path)
        params: dict[str, str] = {}
        if classes:
            params["classes"] = ",".join(map(str, classes))
        if threshold is not None:
            params["threshold"] = repr(float(threshold))
        if model:
            params["model"] = model
        if webhook:
            params["webhook"] = webhook
            params["webhook_events_filter"] = ",".join(webhook_events)
        if overlay:
            params["overlay"] = "true"
        headers = {"Content-Type": content_type}
        if wait > 0:
            headers["Prefer"] = f"wait={min(wait, MAX_WAIT):g}"
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        response = await self._request("POST", "/v1/jobs", content=body, params=params, headers=headers)
        job: dict[str, Any] = response.json()
        return job

    async def get(self, job_id: str, wait: float = 0) -> dict[str, Any]:
        headers = {"Prefer": f"wait={min(wait, MAX_WAIT):g}"} if wait > 0 else {}
        job: dict[str, Any] = (await self._request("GET", f"/v1/jobs/{job_id}", headers=headers)).json()
        return job

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """The job at each change of its state, live from the server (Server-Sent Events), until it ends
        or is deleted. A dropped connection is resumed where it left off, no event twice."""
        last_event_id = ""
        for attempt in range(1, self.retries + 2):
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                async with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise problem(response)
                    async for event in status_events(response):
                        last_event_id = event.id
                        yield json.loads(event.data)
                    return  # the server closes the stream after the end
            except httpx.TransportError as exc:
                await self._pause_or_give_up(attempt, exc)

    async def wait(
        self, job_id: str, max_seconds: float | None = None, *, poll: bool = False
    ) -> dict[str, Any]:
        """The job once it has ended, or as it stands after ``max_seconds``. It listens to the job's live
        events; ``poll=True`` long-polls instead (for proxies that do not pass event streams)."""
        if poll:
            return await self._poll(job_id, max_seconds)

        async def last_event() -> dict[str, Any]:
            last: dict[str, Any] | None = None
            async for job in self.events(job_id):
                last = job
            if last is None or not is_terminal(last["status"]):  # the stream closed early: the job is gone
                return await self.get(job_id)  # which answers 404
            return last

        try:
            return await asyncio.wait_for(last_event(), max_seconds)
        except asyncio.TimeoutError:
            return await self.get(job_id)

    async def _poll(self, job_id: str, max_seconds: float | None) -> dict[str, Any]:
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        job = await self.get(job_id)
        while not is_terminal(job["status"]):
            left = MAX_WAIT if deadline is None else deadline - time.monotonic()
            if left <= 0:
                break
            job = await self.get(job_id, wait=min(left, MAX_WAIT))
        return job

    async def segment(self, image: str | Path | bytes, **params: Any) -> dict[str, Any]:
        """Submit and wait for the end."""
        job = await self.submit(image, wait=MAX_WAIT, **params)
        return job if is_terminal(job["status"]) else await self.wait(job["id"])

    async def mask(self, job_id: str) -> bytes:
        return (await self._request("GET", f"/v1/jobs/{job_id}/mask.png")).content

    async def overlay(self, job_id: str) -> bytes:
        return (await self._request("GET", f"/v1/jobs/{job_id}/overlay.png")).content

    async def retry(self, job_id: str) -> dict[str, Any]:
        """Queue a failed or canceled job again, under its own id."""
        job: dict[str, Any] = (await self._request("POST", f"/v1/jobs/{job_id}/retry")).json()
        return job

    async def cancel(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = (await self._request("POST", f"/v1/jobs/{job_id}/cancel")).json()
        return job

    async def delete(self, job_id: str) -> None:
        await self._request("DELETE", f"/v1/jobs/{job_id}")

    async def jobs(self, status: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """This key's jobs, newest first (of ``status`` only, when given), following the pages to the end
        or until ``limit`` jobs."""
        found: list[dict[str, Any]] = []
        cursor = None
        while limit is None or len(found) < limit:
            query = {k: v for k, v in (("status", status), ("cursor", cursor)) if v}
            page = (await self._request("GET", "/v1/jobs", params={**query, "limit": 200})).json()
            found += page["jobs"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        return found if limit is None else found[:limit]

    async def cancel_queued(self) -> int:
        """Cancel every queued job of this key; how many were canceled."""
        return int((await self._request("POST", "/v1/jobs/cancel")).json()["canceled"])

    async def webhook_secret(self) -> str:
        """The key this API key's webhook deliveries are signed with: give it to ``verify_webhook``."""
        return str((await self._request("GET", "/v1/webhooks/secret")).json()["key"])

    async def models(self) -> dict[str, Any]:
        models: dict[str, Any] = (await self._request("GET", "/v1/models")).json()
        return models

    async def queue(self) -> dict[str, Any]:
        queue: dict[str, Any] = (await self._request("GET", "/v1/queue")).json()
        return queue


class Client:
    """The same calls, blocking: an AsyncClient run on an event loop in a background thread."""

    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, **kwargs: Any
    ) -> None:
        self._stack = contextlib.ExitStack()
        self._portal: BlockingPortal = self._stack.enter_context(start_blocking_portal())
        self._async = self._portal.call(functools.partial(_make_client, base_url, api_key, **kwargs))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._portal.call(self._async.aclose)
        self._stack.close()

    def _call(self, method: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        result: T = self._portal.call(functools.partial(method, *args, **kwargs))
        return result

    def submit(self, image: str | Path | bytes, **params: Any) -> dict[str, Any]:
        return self._call(self._async.submit, image, **params)

    def get(self, job_id: str, wait: float = 0) -> dict[str, Any]:
        return self._call(self._async.get, job_id, wait)

    def wait(self, job_id: str, max_seconds: float | None = None, *, poll: bool = False) -> dict[str, Any]:
        return self._call(self._async.wait, job_id, max_seconds, poll=poll)

    def retry(self, job_id: str) -> dict[str, Any]:
        return self._call(self._async.retry, job_id)

    def segment(self, image: str | Path | bytes, **params: Any) -> dict[str, Any]:
        return self._call(self._async.segment, image, **params)

    def mask(self, job_id: str) -> bytes:
        return self._call(self._async.mask, job_id)

    def overlay(self, job_id: str) -> bytes:
        return self._call(self._async.overlay, job_id)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call(self._async.cancel, job_id)

    def delete(self, job_id: str) -> None:
        self._call(self._async.delete, job_id)

    def jobs(self, status: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        return self._call(self._async.jobs, status, limit)

    def cancel_queued(self) -> int:
        return self._call(self._async.cancel_queued)

    def webhook_secret(self) -> str:
        return self._call(self._async.webhook_secret)

    def models(self) -> dict[str, Any]:
        return self._call(self._async.models)

    def queue(self) -> dict[str, Any]:
        return self._call(self._async.queue)


async def _make_client(base_url: str, api_key: str | None, **kwargs: Any) -> AsyncClient:
    return AsyncClient(base_url, api_key, **kwargs)  # created on the portal's loop, where it will run
