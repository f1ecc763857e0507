"""Webhook deliveries: each worker process also delivers the events that the job store has queued.

A delivery is a unit of work in Redis (see gateway/jobs/lua/webhook.lua), leased while an attempt runs,
so it outlives any process and survives a Redis restart with the AOF. An attempt that times out, cannot
connect or gets a non-2xx answer is tried again with exponential backoff and jitter (a ``Retry-After``
answer wins), until SEGSERVE_WEBHOOK_RETRY_SECONDS have passed since the event; ``410 Gone`` stops it.
Deliveries run beside the jobs and never delay or fail them.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections import Counter
from datetime import datetime, timezone

import httpx
from redis.exceptions import RedisError

from gateway import urls
from gateway.jobs import Delivery, DeliveryState, JobStore, iso, now_ms
from gateway.retrying import backoff, retry_after
from gateway.settings import Settings
from gateway.webhooks import signed_headers, signing_key

logger = logging.getLogger(__name__)
IN_FLIGHT = 16  # deliveries one process attempts at once
OWNER_SHARE = 4  # of them, the most for one owner (API key): a hanging receiver holds only its own
MAX_DELAY_S = 3600.0  # the longest wait between two attempts


class Deliverer:
    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.allowed = urls.allowed_hosts(settings.allowed_url_hosts)
        # An attempt is bounded by urls.deadline; its lease outlasts that, and past it the delivery is free again.
        self.lease_ms = (urls.deadline(settings.url_timeout) + 10) * 1000
        self.busy: Counter[str] = Counter()  # attempts running now, per owner

    async def run(self) -> None:
        in_flight: set[asyncio.Task[None]] = set()
        async with urls.client(self.settings.url_timeout) as http:
            while True:
                claimed: list[Delivery] = []
                try:
                    if len(in_flight) < IN_FLIGHT:
                        free = IN_FLIGHT - len(in_flight)
                        claimed = await self.store.outbox.claim(
                            self.lease_ms, free, OWNER_SHARE, dict(self.busy)
                        )
                except RedisError as exc:  # Redis restarting: the deliveries wait there
                    logger.warning("webhook deliveries paused: %s", exc)
                    await asyncio.sleep(1)
                except Exception:  # never let this loop end: deliveries would stop for the process's life
                    logger.exception("webhook deliveries: claiming failed")
                    await asyncio.sleep(1)
                for delivery in claimed:
                    task = asyncio.create_task(self.attempt(http, delivery))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    self.busy[delivery.owner] += 1
                    task.add_done_callback(functools.partial(self.release, delivery.owner))
                await asyncio.sleep(0.05 if claimed else 0.2)

    def release(self, owner: str, _: object = None) -> None:
        self.busy[owner] -= 1
        if not self.busy[owner]:
            del self.busy[owner]

    async def attempt(self, http: httpx.AsyncClient, delivery: Delivery) -> None:
        """One attempt, recorded, whatever happens in it (an error of ours counts as a failed attempt)."""
        body = b""
        try:
            body = delivery.body or render(delivery)
            state, status, delay = await self.send(http, delivery, body)
        except Exception:
            logger.exception(
                "webhook %s: the attempt failed unexpectedly; it will be tried again", delivery.id
            )
            state, status, delay = "pending", None, self.backoff(delivery.attempts + 1)
        if state == "pending" and now_ms() + delay * 1000 > delivery.created_at + self.give_up_after_ms:
            state = "failed"  # retried for as long as it may be
        if state != "delivered":
            logger.info("webhook %s for %s: %s (HTTP %s)", delivery.id, delivery.job.id, state, status)
        try:
            await self.store.outbox.record(delivery, state, status, now_ms() + delay * 1000, body)
        except RedisError as exc:  # the lease runs out, and the delivery comes back
            logger.warning("webhook %s: the attempt could not be recorded: %s", delivery.id, exc)

    @property
    def give_up_after_ms(self) -> float:
        return self.settings.webhook_retry_seconds * 1000

    async def send(
        self, http: httpx.AsyncClient, delivery: Delivery, body: bytes
    ) -> tuple[DeliveryState, int | None, float]:
        """(state, the receiver's status, seconds until the next attempt if any)."""
        key = signing_key(self.settings.webhook_secret, delivery.owner)
        headers = signed_headers(key, delivery.id, body, datetime.now(timezone.utc))
        try:
            answer = await urls.request(
                http, "POST", delivery.url, self.allowed, None, content=body, headers=headers
            )
        except urls.UrlRefused:
            return "failed", None, 0.0  # its host now resolves to a refused address: never sent
        except urls.FetchFailed:
            return "pending", None, self.backoff(delivery.attempts + 1)
        if 200 <= answer.status < 300:
            return "delivered", answer.status, 0.0
        if answer.status == 410:
            return "failed", answer.status, 0.0  # the receiver says: stop
        # Retry-After may ask for longer than the backoff, never for less.
        later = retry_after(answer.headers.get("retry-after"), MAX_DELAY_S) or 0.0
        return "pending", answer.status, max(later, self.backoff(delivery.attempts + 1))

    def backoff(self, attempt: int) -> float:
        """Exponential, with jitter so that receivers coming back are not hit by every sender at once."""
        return backoff(attempt, self.settings.webhook_retry_delay, MAX_DELAY_S, jitter=True)


def render(delivery: Delivery) -> bytes:
    """The body: the event, when it happened, and the job as it was then."""
    event = {"type": delivery.type, "timestamp": iso(delivery.created_at), "data": delivery.job.to_api()}
    return json.dumps(event, separators=(",", ":")).encode()
