"""What every route needs: the services built in the lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
from arq.connections import ArqRedis
from starlette.requests import Request

from gateway.app.catalog import ModelCatalog
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


def services(request: Request) -> Services:
    svc: Services = request.state.services
    return svc
