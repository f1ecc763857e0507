"""API keys and what each may use: its name, its weight in the fair share, and its limits.

Keys come from ``SEGSERVE_API_KEYS`` (comma-separated) and/or ``SEGSERVE_API_KEYS_FILE``: a TOML file with
a ``[defaults]`` table and one ``[[key]]`` table per key (docs/tenancy.md), or a plain file with one key per
line. Either is parsed strictly, and a list that names no key is an error, never "no authentication". The
file is read again when it changes (``Tenants.refresh``), without a restart. Keys are kept only as SHA-256
digests; a job's owner is the first 16 hex digits of its key's digest.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gateway.jobs.fairness import OwnerLimits

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib
from gateway.settings import Settings

logger = logging.getLogger(__name__)
ANONYMOUS = ""  # the owner of every job when no keys are configured
LIMIT_FIELDS = {"weight", "max_queued", "max_running", "rate", "burst"}


class KeysError(ValueError):
    """The keys are unusable as configured: the message says where and why."""


@dataclass(frozen=True)
class Tenant:
    """One API key's holder, as the keys say."""

    owner: str  # what its jobs carry: the first 16 hex digits of the key's SHA-256
    name: str  # for people: metrics labels, logs, `segserve jobs`
    weight: float = 1.0
    max_queued: int | None = None  # None: the default share of SEGSERVE_MAX_QUEUED
    max_running: int | None = None  # None: the default share of the workers' slots
    rate: float = 0.0  # submissions a second; 0: no limit
    burst: int | None = None  # submissions at once above the rate; None: one second's worth, at least 1


@dataclass(frozen=True)
class Tenants:
    """Every key, by digest, with the settings that turn each one's limits into numbers."""

    by_digest: dict[str, Tenant]
    settings: Settings
    source_mtime: float | None = None  # of the keys file, when one is read
    checked_at: float = field(default=0.0, compare=False)

    @property
    def required(self) -> bool:
        """Whether a request must carry a key: false only when none is configured at all."""
        return bool(self.by_digest)

    def find(self, token: str) -> Tenant | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        found = None
        for known, tenant in self.by_digest.items():  # compare every one: the time says nothing of the key
            if hmac.compare_digest(known, digest):
                found = tenant
        return found

    def of(self, owner: str) -> Tenant:
        for tenant in self.by_digest.values():
            if tenant.owner == owner:
                return tenant
        return Tenant(owner, "anonymous" if owner == ANONYMOUS else owner)

    def limits(self, tenant: Tenant) -> OwnerLimits:
        """The tenant's limits as numbers. With two or more keys, a key that names no limit may hold half
        the backlog (SEGSERVE_KEY_QUEUE_SHARE) and half the workers' slots (SEGSERVE_KEY_RUNNING_SHARE), so no
        one key can fill either; with one key or none, that one has everything."""
        shared = len(self.by_digest) > 1
        settings = self.settings
        max_queued = tenant.max_queued
        if max_queued is None:
            max_queued = math.floor(settings.max_queued * settings.key_queue_share) if shared else 0
        burst = tenant.burst or max(1, math.ceil(tenant.rate)) if tenant.rate > 0 else 0
        return OwnerLimits(
            weight=tenant.weight,
            max_queued=max(1, max_queued) if shared or tenant.max_queued is not None else 0,
            max_running=tenant.max_running or 0,
            running_share=settings.key_running_share if shared and tenant.max_running is None else 1.0,
            rate=tenant.rate,
            burst=burst,
        )

    def refresh(self, now: float) -> Tenants:
        """These keys, or the file's again if it has changed since (checked every keys_reload_seconds). A
        file that no longer parses keeps the keys read before, and says why in the log."""
        settings = self.settings
        if not settings.api_keys_file or now - self.checked_at < settings.keys_reload_seconds:
            return self
        try:
            mtime = os.stat(settings.api_keys_file).st_mtime
            if mtime == self.source_mtime:
                return replace(self, checked_at=now)
            reloaded = load(settings)
        except (OSError, KeysError) as exc:
            logger.error("keeping the keys read before: %s", exc)
            return replace(self, checked_at=now)
        logger.info("read %d API keys from %s", len(reloaded.by_digest), settings.api_keys_file)
        return replace(reloaded, checked_at=now)


def load(settings: Settings) -> Tenants:
    """Every key the settings name; KeysError when any is malformed, or the list names none."""
    tenants: list[tuple[str, Tenant]] = []
    if settings.api_keys:
        listed = [key.strip() for key in settings.api_keys.split(",")]
        if not any(listed):
            raise KeysError("SEGSERVE_API_KEYS is set but names no key; unset it to turn authentication off")
        for key in listed:
            if key:
                tenants.append(plain(key))
    mtime = None
    if settings.api_keys_file:
        mtime, from_file = read_file(Path(settings.api_keys_file))
        tenants += from_file
    by_digest: dict[str, Tenant] = {}
    names: set[str] = set()
    for digest, tenant in tenants:
        if digest in by_digest:
            raise KeysError(f"the key of {tenant.name!r} is listed twice")
        if tenant.name in names:
            raise KeysError(f"two keys are named {tenant.name!r}")
        by_digest[digest] = tenant
        names.add(tenant.name)
    return Tenants(by_digest, settings, mtime)


def read_file(path: Path) -> tuple[float, list[tuple[str, Tenant]]]:
    try:
        mtime = path.stat().st_mtime
        text = path.read_text()
    except OSError as exc:
        raise KeysError(f"SEGSERVE_API_KEYS_FILE: {exc}") from exc
    found = from_toml(path, text) if path.suffix == ".toml" else from_lines(path, text)
    if not found:
        raise KeysError(f"{path} names no key; remove SEGSERVE_API_KEYS_FILE to turn authentication off")
    return mtime, found


def plain(key: str, name: str | None = None, where: str = "SEGSERVE_API_KEYS") -> tuple[str, Tenant]:
    if any(c.isspace() or not c.isprintable() for c in key):
        raise KeysError(f"{where}: a key is printable characters without spaces")
    digest = hashlib.sha256(key.encode()).hexdigest()
    return digest, Tenant(digest[:16], name or digest[:16])


def from_lines(path: Path, text: str) -> list[tuple[str, Tenant]]:
    """One key per line; blank lines and lines starting with ``#`` (after spaces) are skipped."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            found.append(plain(stripped, where=f"{path}:{number}"))
    return found


def from_toml(path: Path, text: str) -> list[tuple[str, Tenant]]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeysError(f"{path}: {exc}") from exc
    unknown = set(document) - {"defaults", "key"}
    if unknown:
        raise KeysError(f"{path}: unknown tables {sorted(unknown)}; expected [defaults] and [[key]]")
    defaults = document.get("defaults", {})
    checked_limits(defaults, f"{path} [defaults]", allowed=LIMIT_FIELDS)
    found = []
    for index, entry in enumerate(document.get("key", [])):
        where = f"{path} [[key]] #{index + 1}"
        if not isinstance(entry, dict):
            raise KeysError(f"{where}: expected a table")
        checked_limits(entry, where, allowed=LIMIT_FIELDS | {"name", "key", "sha256"})
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 64:
            raise KeysError(f"{where}: name must be a non-empty string of at most 64 characters")
        if ("key" in entry) == ("sha256" in entry):
            raise KeysError(f"{where} ({name}): give exactly one of key or sha256")
        if "key" in entry:
            if not isinstance(entry["key"], str):
                raise KeysError(f"{where} ({name}): key must be a string")
            digest, _ = plain(entry["key"], where=f"{where} ({name})")
        else:
            digest = str(entry["sha256"]).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise KeysError(f"{where} ({name}): sha256 must be 64 hex digits")
        merged = {**defaults, **{k: v for k, v in entry.items() if k in LIMIT_FIELDS}}
        found.append((digest, Tenant(owner=digest[:16], name=name, **merged)))
    return found


def checked_limits(table: Any, where: str, allowed: set[str]) -> None:
    if not isinstance(table, dict):
        raise KeysError(f"{where}: expected a table")
    unknown = set(table) - allowed
    if unknown:
        raise KeysError(f"{where}: unknown fields {sorted(unknown)}; known: {sorted(allowed)}")
    for name in ("max_queued", "max_running", "burst"):
        if name in table and (type(table[name]) is not int or table[name] < 1):
            raise KeysError(f"{where}: {name} must be a whole number of at least 1")
    for name in ("weight", "rate"):
        value = table.get(name, 1)
        if type(value) not in (int, float) or not 0 < value < 1e6:
            raise KeysError(f"{where}: {name} must be a number above 0")
