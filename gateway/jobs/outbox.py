"""The outbox of webhook deliveries: each is a unit of work in Redis, queued by the step that changed the job
(``shared.lua``'s ``queue_delivery``), leased by a worker for one attempt, and recorded after it."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Literal

from arq.connections import ArqRedis
from redis.typing import EncodableT

from gateway.jobs import keys
from gateway.jobs.records import Job, now_ms
from gateway.jobs.scripts import Scripts

DeliveryState = Literal["pending", "delivered", "failed"]


@dataclass(frozen=True)
class Delivery:
    """A webhook delivery: one event of one job, for its receiver."""

    id: str  # the webhook-id, the same for every attempt
    type: str  # job.started or job.completed
    url: str
    owner: str  # whose key signs it
    created_at: float
    attempts: int
    job: Job  # the job as it was at the event
    body: bytes | None  # as sent at the first attempt, and so at every later one
    lease: str  # this attempt's claim: recording it needs it


def decode(flat: list[bytes]) -> dict[str, str]:
    """A Redis hash as HGETALL answers it inside a script (a flat list), as a dict."""
    return {k.decode(): v.decode() for k, v in zip(flat[::2], flat[1::2], strict=True)}


class Outbox:
    def __init__(self, redis: ArqRedis, scripts: Scripts, ttl_ms: float) -> None:
        self.redis = redis
        self.scripts = scripts
        self.ttl_ms = ttl_ms

    async def claim(
        self, lease_ms: float, limit: int, share: int | None = None, busy: dict[str, int] | None = None
    ) -> list[Delivery]:
        """The deliveries due now, each leased for ``lease_ms`` to the caller: at most ``share`` attempts of
        one owner at once, counting the ``busy`` ones the caller runs already."""
        lease = secrets.token_hex(8)
        args: list[EncodableT] = [
            repr(now_ms()),
            lease_ms,
            limit,
            lease,
            keys.DELIVERY_PREFIX,
            keys.JOB_PREFIX,
            share or limit,
            json.dumps(busy or {}) if busy else "{}",
        ]
        claimed = await self.scripts["claim"](keys=[keys.DELIVERIES], args=args)
        deliveries = []
        for raw_id, raw_fields in claimed:
            fields = decode(raw_fields)
            snapshot = decode([item.encode() for item in json.loads(fields["snapshot"])])
            running = "status" not in snapshot
            job = Job.from_fields(
                fields["job_id"], snapshot, running=running, position=-1, ttl_ms=self.ttl_ms
            )
            body = fields.get("body")
            deliveries.append(
                Delivery(
                    id=raw_id.decode(),
                    type=fields["type"],
                    url=fields["url"],
                    owner=fields["owner"],
                    created_at=float(fields["created"]),
                    attempts=int(fields["attempts"]),
                    job=job,
                    body=body.encode() if body is not None else None,
                    lease=lease,
                )
            )
        return deliveries

    async def record(
        self, delivery: Delivery, state: DeliveryState, status: int | None, next_ms: float, body: bytes
    ) -> None:
        """An attempt at ``delivery`` ended: try again at ``next_ms`` ('pending'), or it is closed."""
        args: list[EncodableT] = [
            delivery.id,
            state,
            "" if status is None else status,
            next_ms,
            body,
            self.ttl_ms,
            delivery.lease,
            keys.JOB_PREFIX,
        ]
        await self.scripts["record"](
            keys=[keys.delivery(delivery.id), keys.DELIVERIES, keys.STATS], args=args
        )
