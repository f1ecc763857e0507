"""Who is calling: the bearer API key, checked against the keys (gateway.tenants), and what that key may do."""

from __future__ import annotations

import ipaddress
import time

from starlette.requests import Request

from gateway.app.errors import anonymous_remote, unauthorized
from gateway.app.web import services
from gateway.tenants import ANONYMOUS, Tenant


def caller(request: Request) -> Tenant:
    """The calling key's tenant (the anonymous one when no keys are configured); 401 for a missing or wrong
    key."""
    svc = services(request)
    svc.tenants = svc.tenants.refresh(time.monotonic())
    tenants = svc.tenants
    if not tenants.required:
        if not svc.settings.allow_anonymous_remote and not from_loopback(request):
            raise anonymous_remote()  # fail closed: keyless is for one machine unless said otherwise
        return tenants.of(ANONYMOUS)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized()
    tenant = tenants.find(token.strip())
    if tenant is None:
        raise unauthorized()
    return tenant


def from_loopback(request: Request) -> bool:
    try:
        address = ipaddress.ip_address(request.client.host if request.client else "")
    except ValueError:  # no address at all
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return (mapped or address).is_loopback


def authenticate(request: Request) -> str:
    """The caller's owner id ("" when no API keys are configured); 401 for a missing or wrong key."""
    return caller(request).owner
