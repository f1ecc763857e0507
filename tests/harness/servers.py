"""The servers segserve runs on, really started on free loopback ports: redis-server, TorchServe with a
random-weights archive, and a stack of uvicorn gateways and arq workers in front of them."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import httpx

from gateway.ops.launcher import torchserve_command
from tests.harness.processes import BIN, ROOT, free_port, spawn, stop_process, wait_until
from tests.harness.redis_users import GATEWAY, WORKER, RedisUser

SEED = 7  # of the archive's random weights, so a test can make the same model again
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"the tests' webhook secret, 32 b.").decode()


S = TypeVar("S", bound="Server")  # typing.Self is Python 3.11's; the project supports 3.10


class Server:
    """A server run as one process group: ``with`` starts it, and stops it and all it started."""

    process: subprocess.Popen[bytes] | None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def __enter__(self: S) -> S:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def redis_command(address: str, port: int, directory: Path, *options: str) -> list[str]:
    """redis-server with its AOF synced at every write, so that a test that kills it loses nothing."""
    durable = ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
    return [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        address,
        "--dir",
        str(directory),
        *durable,
        *options,
    ]


@dataclass
class RedisServer(Server):
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    options: tuple[str, ...] = ()  # more of redis-server's options, e.g. ("--replicaof", "127.0.0.1", "6379")
    password: str = ""  # set: clients and replicas need it (requirepass, masterauth)
    users: tuple[RedisUser, ...] = ()  # beside the default user, which stays the tests' own

    @property
    def url(self) -> str:
        credentials = f":{self.password}@" if self.password else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def as_user(self, url: str, user: RedisUser) -> str:
        """``url`` logged in as ``user``, where it names this Redis and this Redis has that user."""
        parts = urlparse(url)
        if user in self.users and parts.port == self.port and not parts.username:
            return user.login(url)
        return url

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                *redis_command("127.0.0.1", self.port, self.directory, *self.options),
                *(("--requirepass", self.password, "--masterauth", self.password) if self.password else ()),
                *(option for user in self.users for option in ("--user", *user.directive())),
            ],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(self.ping, 10, "redis-server")

    def ping(self) -> bool:
        with self.client() as client:
            return bool(client.ping())

    def client(self, db: int = 0):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(port=self.port, db=db, socket_connect_timeout=1, password=self.password or None)


@dataclass
class GatewayServer(Server):
    """A gateway (uvicorn) alone on a Redis, with no TorchServe or worker: the real process, for what the
    gateway answers by itself (bad input, authentication, the URL guard) in the fast tier."""

    redis: RedisServer
    blobs: Path
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = self.port or free_port()
        env = {
            **os.environ,
            "SEGSERVE_REDIS_URL": self.redis.as_user(self.redis.url, GATEWAY),
            "SEGSERVE_BLOB_URL": str(self.blobs),
            "SEGSERVE_TORCHSERVE_MANAGEMENT_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens
            "SEGSERVE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            **self.env,
        }
        command = [str(BIN / "uvicorn"), "gateway.app:app", "--host", self.host, "--port", str(self.port)]
        self.process = spawn(command, self.log_dir / f"gateway-{self.port}.log", cwd=ROOT, env=env)
        wait_until(self.healthy, 30, "the gateway")

    def healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"the gateway exited with {self.process.returncode}; see {self.log_dir}")
        return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200


def build_model_store(store: Path) -> Path:
    """A random-weights archive in ``store``, built by the project's own builder, as `segserve build-model`
    does."""
    from gateway.ops.archive import ServingConfig, build_archive

    # One worker taking batches of up to 4, whatever the machine, so the tests see TorchServe batch.
    serving = ServingConfig(batch_size=4, workers=1)
    build_archive(random_seed=SEED, store=store, serving=serving, log=lambda *a: None)
    return store


@dataclass
class TorchServeServer(Server):
    directory: Path
    inference: int
    management: int
    metrics: int
    model_store: Path
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def on_free_ports(cls, directory: Path, model_store: Path) -> TorchServeServer:
        """TorchServe configured by the project's config.properties, with its ports moved to free ones."""
        server = cls(directory, free_port(), free_port(), free_port(), model_store)
        config = (ROOT / "config.properties").read_text()
        for name, port in (
            ("inference", server.inference),
            ("management", server.management),
            ("metrics", server.metrics),
        ):
            config = re.sub(rf"(?m)^{name}_address=.*$", f"{name}_address=http://127.0.0.1:{port}", config)
        # Backend workers listen on unix sockets named by port: keep clear of a stack running beside the tests.
        config += f"\ninitial_worker_port={20000 + server.inference % 20000}\n"
        config = re.sub(
            r"(?m)^grpc_(inference|management)_port=.*$", lambda m: f"grpc_{m[1]}_port={free_port()}", config
        )
        (directory / "config.properties").write_text(config)
        return server

    def start(self) -> None:
        self.process = spawn(
            torchserve_command("config.properties", self.model_store, "deeplabv3=deeplabv3.mar"),
            self.directory / "torchserve.out",
            cwd=self.directory,
            env={**os.environ, "LOG_LOCATION": str(self.directory / "logs"), "TMPDIR": str(self.directory)},
        )
        try:
            wait_until(
                lambda: self.key_file.exists() and self.ready_workers() >= 1, 180, "TorchServe's model"
            )
        except TimeoutError:
            print((self.directory / "torchserve.out").read_text()[-5000:])
            self.stop()
            raise

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.inference}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management}"

    @property
    def key_file(self) -> Path:
        return self.directory / "key_file.json"

    def key(self, kind: str) -> str:
        return str(json.loads(self.key_file.read_text())[kind]["key"])

    def headers(self, kind: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key(kind)}"}

    def manage(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        return httpx.request(method, self.management_url + path, headers=self.headers("management"), **kwargs)  # type: ignore[arg-type]

    def ready_workers(self, model: str = "deeplabv3") -> int:
        response = self.manage("GET", f"/models/{model}", timeout=5)
        if response.status_code != 200:
            return 0
        return sum(1 for w in response.json()[0]["workers"] if w["status"] == "READY")


@dataclass
class Stack:
    """A gateway (uvicorn) and arq workers against the session's Redis and TorchServe."""

    redis: RedisServer
    torchserve: TorchServeServer
    env: dict[str, str]
    port: int = 0
    gateway: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log_dir: Path = Path(".")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env_of(self, user: RedisUser, extra_env: dict[str, str]) -> dict[str, str]:
        """The environment of a process that logs in to Redis as ``user`` (where the stack's Redis has it)."""
        env = {**self.env, **extra_env}
        env["SEGSERVE_REDIS_URL"] = self.redis.as_user(env["SEGSERVE_REDIS_URL"], user)
        return env

    def start_gateway(self, port: int | None = None, **extra_env: str) -> None:
        self.port = port or free_port()
        self.gateway = spawn(
            [str(BIN / "uvicorn"), "gateway.app:app", "--port", str(self.port), "--log-level", "warning"],
            self.log_dir / f"gateway-{self.port}.log",
            cwd=ROOT,
            env=self.env_of(GATEWAY, extra_env),
        )
        wait_until(lambda: httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200, 30, "the gateway")

    def start_worker(
        self, command: tuple[str, ...] = ("segserve", "worker"), **extra_env: str
    ) -> subprocess.Popen[bytes]:
        n = len(self.workers)
        worker = spawn(
            [str(BIN / command[0]), *command[1:]],
            self.log_dir / f"worker-{n}.log",
            cwd=ROOT,
            env=self.env_of(WORKER, extra_env),
        )
        self.workers.append(worker)
        return worker

    def wait_ready(self, timeout: float = 60) -> None:
        wait_until(
            lambda: httpx.get(f"{self.url}/readyz", timeout=5).json()["status"] == "ready", timeout, "/readyz"
        )

    def stop(self) -> None:
        for worker in self.workers:
            stop_process(worker)
        if self.gateway is not None:
            stop_process(self.gateway)


def stack_env(redis: RedisServer, torchserve: TorchServeServer, blobs: Path) -> dict[str, str]:
    """The environment of a gateway and workers on ``redis`` and ``torchserve``, with blobs in ``blobs``."""
    return {
        **os.environ,
        "SEGSERVE_REDIS_URL": redis.url,
        "SEGSERVE_BLOB_URL": str(blobs),
        "SEGSERVE_TORCHSERVE_URL": torchserve.inference_url,
        "SEGSERVE_TORCHSERVE_MANAGEMENT_URL": torchserve.management_url,
        "SEGSERVE_TORCHSERVE_KEY_FILE": str(torchserve.key_file),
        "SEGSERVE_INFERENCE_TIMEOUT": "20",
        "SEGSERVE_RETRY_DELAY": "0.2",
        "SEGSERVE_RETRY_MAX_DELAY": "1",
        "SEGSERVE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "SEGSERVE_WEBHOOK_RETRY_DELAY": "0.1",
        "SEGSERVE_ALLOWED_URL_HOSTS": "127.0.0.1",  # the tests' receivers
        "PYTHONUNBUFFERED": "1",
    }


def side_by_side_env(home: Path) -> dict[str, str]:
    """The environment of a `segserve up` beside another stack: its own state directory and free ports,
    TorchServe's own (metrics, gRPC, backend workers) included, which the other one's TorchServe may hold."""
    return {
        **os.environ,
        "SEGSERVE_HOME": str(home),
        "SEGSERVE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "SEGSERVE_TORCHSERVE_URL": f"http://127.0.0.1:{free_port()}",
        "SEGSERVE_TORCHSERVE_MANAGEMENT_URL": f"http://127.0.0.1:{free_port()}",
        "TS_METRICS_ADDRESS": f"http://127.0.0.1:{free_port()}",
        "TS_GRPC_INFERENCE_PORT": str(free_port()),
        "TS_GRPC_MANAGEMENT_PORT": str(free_port()),
        "TS_INITIAL_WORKER_PORT": str(free_port()),
    }


_databases = iter(range(1, 16))  # 0: the session's stack


def isolated_env(stack: Stack, **extra: str) -> dict[str, str]:
    """The stack's environment with a Redis database and a blob directory no other test uses."""
    database = next(_databases)
    return {
        **stack.env,
        "SEGSERVE_REDIS_URL": stack.redis.url.rsplit("/", 1)[0] + f"/{database}",
        "SEGSERVE_BLOB_URL": str(stack.log_dir.parent / f"blobs-db{database}"),
        **extra,
    }


def start_segserve_up(
    directory: Path, env: dict[str, str], port: int, *options: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """`segserve up` run in ``directory``, in a process group of its own, its output in ``directory/up.log``;
    returned once it says it is ready. If it exits or stalls instead, it is stopped and its log raised."""
    log = directory / "up.log"
    process = spawn([str(BIN / "segserve"), "up", "--port", str(port), *options], log, cwd=directory, env=env)
    try:
        wait_until(
            lambda: "segserve is ready" in log.read_text() or process.poll() is not None, 240, "segserve up"
        )
        assert process.poll() is None, log.read_text()[-3000:]
    except BaseException:
        stop_process(process)
        raise
    return process, log
