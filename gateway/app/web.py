"""What every route needs: the services built in the lifespan, and authentication."""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from arq.connections import ArqRedis
from starlette.requests import Request

from gateway.app.errors import unauthorized
from gateway.budget import MemoryBudget
from gateway.jobs import JobStore, Waiters
from gateway.settings import Settings


@dataclass
class Services:
    settings: Settings
    redis: ArqRedis
    store: JobStore
    waiters: Waiters
    catalog: ModelCatalog
    api_keys: dict[str, str]  # sha256(key) -> owner id
    openapi: dict[str, Any]
    http: httpx.AsyncClient  # for the URLs clients give us (gateway.urls)
    allowed_url_hosts: frozenset[str]
    image_memory: MemoryBudget  # the image bytes this gateway holds at once


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


def load_api_keys(settings: Settings) -> dict[str, str]:
    """Keys from SEGSERVE_API_KEYS and/or a file (one per line); kept only as SHA-256 digests."""
    keys = [k.strip() for k in settings.api_keys.split(",") if k.strip()]
    if settings.api_keys_file:
        lines = Path(settings.api_keys_file).read_text().splitlines()
        keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    digests = [hashlib.sha256(k.encode()).hexdigest() for k in keys]
    return {digest: digest[:16] for digest in digests}


def services(request: Request) -> Services:
    svc: Services = request.state.services
    return svc


def authenticate(request: Request) -> str:
    """The caller's owner id ("" when no API keys are configured); 401 for a missing or wrong key."""
    keys = services(request).api_keys
    if not keys:
        return ""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise unauthorized()
    digest = hashlib.sha256(token.strip().encode()).hexdigest()
    for known, owner in keys.items():
        if hmac.compare_digest(known, digest):
            return owner
    raise unauthorized()
