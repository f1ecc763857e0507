"""What every route needs: the services built in the lifespan."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from arq.connections import ArqRedis
from starlette.requests import Request

from gateway.budget import MemoryBudget
from gateway.jobs import JobStore, Waiters
from gateway.settings import Settings
from gateway.tenants import Tenants


@dataclass
class Services:
    settings: Settings
    redis: ArqRedis
    store: JobStore
    waiters: Waiters
    catalog: ModelCatalog
    tenants: Tenants  # the API keys, read again when their file changes (gateway.app.auth)
    openapi: dict[str, Any]
    http: httpx.AsyncClient  # for the URLs clients give us (gateway.urls)
    allowed_url_hosts: frozenset[str]
    image_memory: MemoryBudget  # the image bytes this gateway holds at once
    streams: dict[str, int] = field(default_factory=dict)  # live event streams open, per owner


class ModelCatalog:
    """The models the workers' TorchServes serve (``JobStore.models``), cached for a few seconds, since
    every submission checks its model here."""

    def __init__(self, store: JobStore, ttl: float) -> None:
        self.store = store
        self.ttl = ttl
        self._models: list[dict[str, Any]] | None = None
        self._fetched = -math.inf

    async def list(self) -> list[dict[str, Any]] | None:
        """None while no worker has ever reported its models."""
        if time.monotonic() - self._fetched > self.ttl:
            self._models = await self.store.fleet.models()
            self._fetched = time.monotonic()
        return self._models

    async def known(self, name: str) -> bool | None:
        """Whether a worker serves ``name``; None when none has said yet (the job waits for one)."""
        models = await self.list()
        return None if models is None else any(m["name"] == name for m in models)


def services(request: Request) -> Services:
    svc: Services = request.state.services
    return svc
