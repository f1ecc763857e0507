"""Redis's users, one per role, as deploy/kubernetes/base/redis.yaml defines them: read from its scripts, so
that the tests' Redis and sentinels run the very rules a cluster runs, and the suite's gateways and workers
log in as their users."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlparse, urlunparse

import yaml

from tests.harness.processes import ROOT

MANIFEST = ROOT / "deploy" / "kubernetes" / "base" / "redis.yaml"


@dataclass(frozen=True)
class RedisUser:
    name: str
    rules: str  # Redis's ACL rules, after the password

    @property
    def password(self) -> str:
        return f"{self.name}-in-tests"

    def directive(self) -> list[str]:
        """The user as redis-server's ``--user`` options (and a config file's ``user`` line) spell it."""
        return [self.name, "on", f">{self.password}", *self.rules.split()]

    def login(self, url: str) -> str:
        """``url`` (a redis:// URL) with this user's name and password."""
        parts = urlparse(url)
        host = parts.netloc.rpartition("@")[2]
        return urlunparse(parts._replace(netloc=f"{self.name}:{self.password}@{host}"))


def _users(script: str) -> dict[str, RedisUser]:
    (scripts,) = (
        doc["data"]
        for doc in yaml.safe_load_all(MANIFEST.read_text())
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "segserve-redis-scripts"
    )
    rules = dict(re.findall(r"^(\w+_RULES)='([^']*)'$", scripts["common.sh"], re.M))
    found = re.findall(r"^user (\S+) on >\$\w+ \$(\w+_RULES)(.*)$", scripts[script], re.M)
    assert found, f"no users in {script}"
    return {name: RedisUser(name, f"{rules[variable]}{extra}") for name, variable, extra in found}


REDIS_USERS = _users("redis.sh")  # on the primary and the replica
SENTINEL_USERS = _users("sentinel.sh")  # on the sentinels, by the same names and passwords
GATEWAY, WORKER, KEDA = (REDIS_USERS[f"segserve-{role}"] for role in ("gateway", "worker", "keda"))
