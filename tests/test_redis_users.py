"""Redis's users, one per role, with the Kubernetes manifest's own rules, on a real Redis: each role reaches
what it needs and is refused the rest. That the rules are enough is shown by the whole suite: the session
stack's gateways and workers log in as their users, and its Redis must have refused none of their commands
(tests/conftest.py). The sentinels' side is in tests/test_sentinel.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import AuthenticationError, ResponseError

from gateway.jobs import keys
from tests.harness.processes import free_port
from tests.harness.redis_users import GATEWAY, KEDA, REDIS_USERS, WORKER, RedisUser
from tests.harness.servers import RedisServer, Stack

# KEDA's redis and redis-sentinel scalers count a list with this script (pkg/scalers/redis_scaler.go).
KEDA_SCRIPT = """
local listName = KEYS[1]
local listType = redis.call('type', listName).ok
local cmd = {
    zset = 'zcard',
    set = 'scard',
    list = 'llen',
    hash = 'hlen',
    none = 'llen'
}

return redis.call(cmd[listType], listName)
"""

# What nobody but the operators may do: each would hand Redis, its files or its data to whoever holds the
# password (CONFIG SET dir + SAVE writes files anywhere; REPLICAOF copies every job elsewhere). DEBUG and
# MODULE are off for every user by Redis's own defaults.
REDIS_OWN = [
    ("CONFIG", "SET", "dir", "/tmp"),
    ("CONFIG", "GET", "requirepass"),
    ("REPLICAOF", "127.0.0.1", "1"),
    ("FLUSHALL",),
    ("KEYS", "*"),
    ("ACL", "SETUSER", "intruder", "on", ">x", "+@all", "~*"),
    ("CLIENT", "LIST"),
    ("CLIENT", "KILL", "TYPE", "normal"),
    ("MONITOR",),
    ("SAVE",),
    ("SHUTDOWN", "NOSAVE"),
]


@pytest.fixture
def server(redis_binary: str, tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(free_port(), tmp_path, users=tuple(REDIS_USERS.values())) as running:
        yield running


def login(server: RedisServer, user: RedisUser) -> Any:
    return redis.Redis(port=server.port, username=user.name, password=user.password, socket_timeout=5)


def assert_refused(client: Any, *command: str) -> None:
    """Redis's ACL refuses ``command``: NOPERM, or the same refusal of a call inside a script."""
    with pytest.raises(ResponseError, match=r"no permissions|can't access|can't run"):
        client.execute_command(*command)


@pytest.mark.parametrize("user", [GATEWAY, WORKER], ids=lambda u: u.name)
def test_the_gateway_and_the_worker_reach_the_job_store_and_nothing_of_redis(
    server: RedisServer, user: RedisUser
) -> None:
    with login(server, user) as client:
        job = keys.job("j_" + "0" * 32)
        client.hset(job, "status", "queued")
        client.zadd(keys.QUEUE, {"j_" + "0" * 32: 1})
        assert client.eval("return redis.call('hget', KEYS[1], 'status')", 1, job) == b"queued"
        assert client.publish(keys.CHANGED_CHANNEL, "j_" + "0" * 32) == 0
        client.execute_command("WAIT", "0", "0")
        for attempt in REDIS_OWN:
            assert_refused(client, *attempt)
        # Nobody else's keys or channels, not even from a script.
        assert_refused(client, "SET", "elsewhere", "1")
        assert_refused(client, "EVAL", "return redis.call('get', 'elsewhere')", "0")
        assert_refused(client, "PUBLISH", "elsewhere", "1")
        # INFO: a submission reads Redis's memory in its step (a full store refuses work), and arq logs it.
        assert client.info("memory")["maxmemory"] >= 0
    with server.client() as admin:
        assert admin.ping(), "Redis is still up: SHUTDOWN was refused"


def test_keda_counts_the_backlog_and_reads_nothing_else(server: RedisServer) -> None:
    with login(server, KEDA) as keda:
        assert keda.eval(KEDA_SCRIPT, 1, keys.BACKLOG) == 0  # no backlog yet: LLEN of a missing key
        with server.client() as admin:
            admin.zadd(keys.BACKLOG, {"j_a": 1, "j_b": 2})
            admin.hset(keys.job("j_a"), "status", "queued")
        assert keda.eval(KEDA_SCRIPT, 1, keys.BACKLOG) == 2
        for attempt in (
            ("ZADD", keys.BACKLOG, "3", "j_c"),
            ("DEL", keys.BACKLOG),
            ("ZRANGE", keys.BACKLOG, "0", "-1"),  # which jobs: not KEDA's business
            ("HGETALL", keys.job("j_a")),
            ("EVAL", KEDA_SCRIPT, "1", keys.job("j_a")),
            ("EVAL", "return redis.call('zadd', KEYS[1], 3, 'j_c')", "1", keys.BACKLOG),
            ("SUBSCRIBE", keys.CHANGED_CHANNEL),
            *REDIS_OWN,
        ):
            assert_refused(keda, *attempt)
    with server.client() as admin:
        assert admin.zcard(keys.BACKLOG) == 2


def test_a_role_needs_its_own_password(server: RedisServer) -> None:
    for user, password in ((GATEWAY, WORKER.password), (WORKER, ""), (KEDA, GATEWAY.password)):
        client = redis.Redis(port=server.port, username=user.name, password=password)
        with client, pytest.raises(AuthenticationError):
            client.ping()


def test_the_stack_logs_in_as_its_users(stack: Stack) -> None:
    with stack.redis.client() as admin:
        users = {client["user"] for client in admin.client_list()}
    assert {GATEWAY.name, WORKER.name} <= users, users
