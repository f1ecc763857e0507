"""What every route needs: the services built in the lifespan, and authentication."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from arq.connections import ArqRedis
from starlette.requests import Request

from gateway.app.catalog import ModelCatalog
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
