"""How every process reaches the job store's Redis: one URL, or the primary that Redis Sentinel names.

With SEGSERVE_REDIS_SENTINELS set, the URL's host and port are not used (its user, password and database are;
the user and password are the sentinels' too):
the sentinels are asked for the primary of SEGSERVE_REDIS_SENTINEL_MASTER, and asked again after a
failover. arq's worker gets the same through its own Sentinel support.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from datetime import datetime
from typing import Any
from urllib.parse import urlparse

from arq.connections import ArqRedis, RedisSettings
from redis.asyncio import ConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.settings import Settings


def serialize(obj: Any) -> bytes:
    """arq's serializer: JSON, so nothing in Redis can make a worker run code (pickle could)."""
    return json.dumps(obj, separators=(",", ":"), default=_describe).encode()


def deserialize(data: bytes) -> Any:
    return json.loads(data)


def _describe(obj: Any) -> Any:
    if isinstance(obj, BaseException):  # arq serializes exceptions of its own
        return f"{type(obj).__name__}: {obj}"
    if isinstance(obj, datetime):
        return obj.isoformat()
    raise TypeError(f"cannot serialize {type(obj).__name__}")


PIPELINE_NOREPLICAS = re.compile(r"of pipeline caused error: \('NOREPLICAS [^']*',\)$")


def no_replicas(exc: BaseException) -> bool:
    """Whether Redis refused a write for want of replicas in sync (``min-replicas-to-write``): a primary
    cut off from its replicas, or a new one whose replicas are still syncing. redis-py has no class of its
    own for it, and in a pipeline it writes the command before Redis's words, which then end the message."""
    message = str(exc)
    return isinstance(exc, ResponseError) and (
        message.startswith("NOREPLICAS ") or PIPELINE_NOREPLICAS.search(message) is not None
    )


def unavailable(exc: BaseException) -> bool:
    """Whether Redis cannot take a step now but will again: it restarts or fails over, it is full, or it has
    no replica in sync. The step is tried again later; any other error is a bug to raise."""
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, OutOfMemoryError)) or no_replicas(exc)


def sentinels(settings: Settings) -> list[tuple[str, int]]:
    """The sentinels' addresses, from ``host:port,host:port``."""
    found = []
    for entry in filter(None, (e.strip() for e in settings.redis_sentinels.split(","))):
        host, _, port = entry.rpartition(":")
        if not host or not (port.isascii() and port.isdigit()):
            raise ValueError(f"SEGSERVE_REDIS_SENTINELS: {entry!r} is not host:port")
        found.append((host.strip("[]"), int(port)))
    return found


def connect(settings: Settings, **options: Any) -> ArqRedis:
    """A client of the job store; ``options`` are redis-py's connection options (timeouts)."""
    addresses = sentinels(settings)
    if not addresses:
        return ArqRedis(
            connection_pool=ConnectionPool.from_url(settings.redis_url, **options),
            job_serializer=serialize,
            job_deserializer=deserialize,
        )
    url = urlparse(settings.redis_url)
    database = int(url.path.strip("/") or 0)
    # A sentinel's host that vanishes must cost a lookup seconds: the next sentinel is asked then. Sentinels
    # that require a login (so that nobody else can re-point the master name) take the URL's user and password.
    username = url.username or None
    sentinel_options: dict[str, Any] = {
        "socket_connect_timeout": 2,
        "socket_timeout": 2,
        "socket_keepalive": True,
    }
    if url.password:
        sentinel_options.update(username=username, password=url.password)
    sentinel = Sentinel(addresses, sentinel_kwargs=sentinel_options, **options)  # type: ignore[no-untyped-call]
    primary: ArqRedis = sentinel.master_for(
        settings.redis_sentinel_master,
        redis_class=ArqRedis,
        db=database,
        username=username,
        password=url.password,
    )
    primary.job_serializer, primary.job_deserializer = serialize, deserialize
    return primary


async def close(redis: ArqRedis) -> None:
    """Close a client from ``connect`` with its pool and, behind Sentinel, the connections that asked the
    sentinels where the primary is: closing the primary's client alone leaves those open."""
    await redis.aclose(close_connection_pool=True)  # a pool passed in is not closed by default
    manager = getattr(redis.connection_pool, "sentinel_manager", None)
    for sentinel in manager.sentinels if manager is not None else ():
        await sentinel.aclose()


async def stop(task: asyncio.Task[Any]) -> None:
    """Cancel a background loop and wait for it to end. A cancellation that lands inside a redis-py command
    with a socket timeout can be swallowed (redis/redis-py#2551; measured here: 1 worker shutdown in 10
    hung on it), and the loop then goes on as if nothing happened: so cancel again until it ends."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if not task.cancelled():
        task.result()  # an error it ended with is the caller's


def deadlines(settings: Settings) -> dict[str, Any]:
    """redis-py's options that give every call a deadline: a Redis that hangs (SIGSTOP, or a host gone with
    no reset, which the kernel's keepalive finds) fails a call within ``redis_timeout``, never later. The read
    timeout outlasts the longest WAIT a submission sends for its replicas."""
    wait_seconds = settings.redis_replica_timeout_ms / 1000 if settings.redis_min_replicas else 0.0
    return {
        "socket_connect_timeout": settings.redis_timeout,
        "socket_timeout": max(settings.redis_timeout, wait_seconds + 1.0),
        "socket_keepalive": True,
    }


def worker_connection(settings: Settings) -> ArqRedis:
    """``segserve worker``'s client, with what arq's own Sentinel pool lacks: read and connect timeouts
    and retries. A primary whose host vanishes (silence, no reset) then costs a command seconds, not
    forever, and the retry reconnects to the primary Sentinel has promoted."""
    redis = connect(
        settings,
        **deadlines(settings),
        # Few retries: a job's try must see the error well inside its time limit, and come back later.
        # Only failed connections: a timed-out command may have run, and some steps must run once.
        retry=Retry(
            ExponentialBackoff(cap=1.0, base=0.1), retries=4, supported_errors=(RedisConnectionError,)
        ),
    )
    redis.expires_extra_ms = settings.result_ttl * 1000
    return redis


def worker_redis_settings(settings: Settings) -> RedisSettings:
    """arq's settings for the same Redis. Commands retry with backoff for ~30 s, so a worker rides out a
    Redis restart instead of ending."""
    base = dataclasses.replace(
        RedisSettings.from_dsn(settings.redis_url),
        conn_retries=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=20),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    addresses = sentinels(settings)
    if not addresses:
        return base
    return dataclasses.replace(
        base,
        host=addresses,
        sentinel=True,
        sentinel_master=settings.redis_sentinel_master,
    )
