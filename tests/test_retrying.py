"""The one backoff and the one Retry-After reader that every retry loop uses, and the SDK's event reader."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from gateway.client.sdk import status_events
from gateway.retrying import backoff, retry_after

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def test_backoff_doubles_from_the_first_delay_up_to_its_cap() -> None:
    assert [backoff(attempt, 0.5, 5.0) for attempt in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff(0, 0.5, 5.0) == 0.5  # "no failure yet" waits as the first
    assert backoff(10_000, 0.5, 5.0) == 5.0  # no overflow however many attempts


def test_backoff_with_jitter_stays_between_half_and_all_of_the_delay() -> None:
    delays = {backoff(3, 1.0, 60.0, jitter=True) for _ in range(200)}
    assert all(2.0 <= delay <= 4.0 for delay in delays)
    assert len(delays) > 1  # spread, so that senders that failed together do not return together


def test_retry_after_reads_delta_seconds_and_http_dates() -> None:
    assert retry_after("7", 60) == 7.0
    assert retry_after(" 7 ", 60) == 7.0
    assert retry_after("7000", 60) == 60.0  # bounded
    in_30_s = format_datetime(NOW + timedelta(seconds=30), usegmt=True)
    assert in_30_s.endswith("GMT")
    assert retry_after(in_30_s, 60, now=NOW) == 30.0
    assert retry_after(format_datetime(NOW - timedelta(hours=1), usegmt=True), 60, now=NOW) == 0.0
    assert retry_after("Fri, 02 Jan 2026 03:04:35 GMT", 60, now=NOW) == 30.0


def test_retry_after_is_none_when_absent_or_malformed() -> None:
    for value in (None, "", "soon", "-5", "1.5", "٣", "Someday, 99 Foo 2026"):
        assert retry_after(value, 60, now=NOW) is None, value


async def test_the_sdk_joins_multi_line_data_with_newlines() -> None:
    """A server may split one event's data over several `data:` lines (SSE: joined with "\\n")."""
    stream = (
        ": a comment, ignored\n\n"
        'id: 1\nevent: status\ndata: {"status":\ndata:  "queued"}\n\n'
        "event: other\ndata: not a status event\n\n"
        "id: 2\r\nevent: status\r\ndata: first line\r\ndata: second line\r\n\r\n"
    )

    async def events(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            for chunk in (stream[:40], stream[40:]):  # an event cut across two chunks
                yield chunk

        return StreamingResponse(body(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/events", events)])
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test")
    async with http, http.stream("GET", "/events") as response:
        read = [(event.id, event.data) async for event in status_events(response)]
    assert read == [("1", '{"status":\n "queued"}'), ("2", "first line\nsecond line")]
