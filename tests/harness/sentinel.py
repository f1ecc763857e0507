"""Redis with replicas and Sentinel, on loopback or on the hosts of a network (tests/harness/hosts.py): the
sentinels' configuration, and what a test asks them and the primary."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.processes import free_port, stop_process, wait_until
from tests.harness.redis_users import REDIS_USERS, SENTINEL_USERS
from tests.harness.servers import RedisServer

MASTER = "segserve"


# On the primary (and a replica once promoted): no write is taken while no replica is in sync (lagging under
# 10 s), so a primary cut off from its replicas stops accepting what the failover would drop.
MIN_REPLICAS = ("--min-replicas-to-write", "1", "--min-replicas-max-lag", "10")


def sentinel_config(
    port: int, bind: str, directory: Path, primary: tuple[str, int], password: str = ""
) -> str:
    """A sentinel of three (quorum 2) watching ``primary``: it calls the primary down after 1 s of silence, so
    a failover takes seconds, not the default minute. With ``password``, the Redis and the sentinels need it,
    and nobody without it can re-point the master name (SENTINEL MONITOR, SENTINEL SET); segserve's users, as
    the Kubernetes manifest has them, may only ask where the primary is."""
    host, primary_port = primary
    config = (
        f"port {port}\nbind {bind}\ndir {directory}\n"
        f"sentinel monitor {MASTER} {host} {primary_port} 2\n"
        f"sentinel down-after-milliseconds {MASTER} 1000\n"
        f"sentinel failover-timeout {MASTER} 10000\n"
    )
    if password:
        config += (
            f"protected-mode yes\nrequirepass {password}\n"
            f"sentinel auth-pass {MASTER} {password}\nsentinel sentinel-pass {password}\n"
        )
        config += "".join(f"user {' '.join(user.directive())}\n" for user in SENTINEL_USERS.values())
    return config


def primary_address(host: str, port: int, password: str = "") -> tuple[str, int]:
    """The primary that the sentinel at ``host:port`` names now."""
    import redis

    options: dict[str, Any] = {"socket_connect_timeout": 1, "socket_timeout": 2, "password": password or None}
    with redis.Redis(host=host, port=port, **options) as sentinel:
        address, primary_port = sentinel.execute_command("SENTINEL", "get-master-addr-by-name", MASTER)
    return address.decode(), int(primary_port)


def online_replicas(primary: Any, replicas: int = 2) -> int:
    """How many of the first ``replicas`` replicas of the primary (a redis.Redis) are in sync with it."""
    replication = primary.info("replication")
    return sum(replication.get(f"slave{n}", {}).get("state") == "online" for n in range(replicas))


@dataclass
class ReplicatedRedis:
    """A primary, two replicas (so that one is left to confirm writes after a failover), and three sentinels
    watching them, all on loopback."""

    primary: RedisServer
    replicas: list[RedisServer]
    sentinel_ports: list[int]
    sentinels: list[subprocess.Popen[bytes]] = field(default_factory=list)
    password: str = ""

    @classmethod
    def start(cls, directory: Path, password: str = "") -> ReplicatedRedis:
        """The primary and its replicas, once both replicas are in sync; then the sentinels. With ``password``,
        they also have segserve's users, as the Kubernetes manifest has them."""
        users = tuple(REDIS_USERS.values()) if password else ()
        (directory / "primary").mkdir()
        primary = RedisServer(
            free_port(), directory / "primary", options=MIN_REPLICAS, password=password, users=users
        )
        primary.start()
        replicas = []
        for n in range(2):
            (directory / f"replica{n}").mkdir()
            follow = ("--replicaof", "127.0.0.1", str(primary.port), *MIN_REPLICAS)
            replicas.append(
                RedisServer(
                    free_port(), directory / f"replica{n}", options=follow, password=password, users=users
                )
            )
            replicas[-1].start()

        def in_sync() -> bool:
            with primary.client() as client:
                return online_replicas(client) == 2

        wait_until(in_sync, 30, "the replicas to sync")
        servers = cls(primary, replicas, [free_port() for _ in range(3)], password=password)
        servers.start_sentinels(directory)
        return servers

    @property
    def addresses(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def start_sentinels(self, directory: Path) -> None:
        for port in self.sentinel_ports:
            conf = directory / f"sentinel-{port}.conf"
            primary = ("127.0.0.1", self.primary.port)
            conf.write_text(sentinel_config(port, "127.0.0.1", directory, primary, self.password))
            self.sentinels.append(
                subprocess.Popen(
                    ["redis-server", str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )

    def primary_port(self) -> int:
        return primary_address("127.0.0.1", self.sentinel_ports[0], self.password)[1]

    def stop(self) -> None:
        # SIGKILL: on SIGTERM a primary waits up to 10 s for replicas that are already gone.
        processes = [*self.sentinels, *(s.process for s in (*self.replicas, self.primary) if s.process)]
        for process in processes:
            stop_process(process, signal.SIGKILL)
