"""Real components, really started: redis-server, TorchServe with a random-weights archive, arq workers
and uvicorn, each on free loopback ports, once per test session."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from tests.s3_server import CephS3

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SEED = 7


WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"the tests' webhook secret, 32 b.").decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def wait_until(check, timeout: float, what: str, interval: float = 0.2):  # type: ignore[no-untyped-def]
    """Poll ``check`` until it returns something true; on timeout, say what it last raised or returned."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception as exc:
            value, last = None, exc
        else:
            last = value
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    """Stop a process started with start_new_session=True, and everything in its group."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=5)


def spawn(command: list[str], log: Path, **kwargs: object) -> subprocess.Popen[bytes]:
    """Start a process in its own group, its output appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )  # type: ignore[call-overload, no-any-return]


def scene(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    """A synthetic picture with large shapes, so masks have several regions."""
    image = Image.new("RGB", (width, height), (30 + seed * 40 % 200, 120, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.15, height * 0.2, width * 0.45, height * 0.85), fill=(250, 200, 10))
    draw.rectangle((width * 0.55, height * 0.1, width * 0.95, height * 0.6), fill=(20, 20, 20))
    draw.polygon([(0, height), (width, height * 0.6), (width, height)], fill=(200, 30, 30))
    return image


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# Tests that start TorchServe (directly or through a stack) are the slow tier: `pytest -m "not slow"` skips
# them and runs what needs only Redis, in-process where it can.
SLOW_FIXTURES = {"model_store", "torchserve", "stack", "isolated", "client", "gateway", "api", "handler"}
SLOW_FIXTURES.add("exported_model")  # tests/test_engines.py: a model exported once per session


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def redis_binary() -> str:
    path = shutil.which("redis-server")
    if not path:
        pytest.fail("redis-server is not installed: run `segserve setup` (the README's test command does)")
    return path


@dataclass
class RedisServer:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    options: tuple[str, ...] = ()  # more of redis-server's options, e.g. ("--replicaof", "127.0.0.1", "6379")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", *self.options],
            stdout=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        wait_until(self.ping, 10, "redis-server")

    def ping(self) -> bool:
        with self.client() as client:
            return bool(client.ping())

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def client(self, db: int = 0):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(port=self.port, db=db, socket_connect_timeout=1)


@pytest.fixture(scope="session")
def redis_server(redis_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def job_redis(redis_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of the fast tier's own, flushed by each test that uses it."""
    server = RedisServer(free_port(), tmp_path_factory.mktemp("job-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fresh_redis(job_redis: RedisServer) -> RedisServer:
    with job_redis.client() as redis:
        redis.flushall()
    return job_redis


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weights archive, built by the project's own builder, as `segserve build-model` does."""
    from gateway.ops.archive import ServingConfig, build_archive

    store = tmp_path_factory.mktemp("model_store")
    # One worker taking batches of up to 4, whatever the machine, so the tests see TorchServe batch.
    serving = ServingConfig(batch_size=4, workers=1)
    build_archive(random_seed=SEED, store=store, serving=serving, log=lambda *a: None)
    return store


@dataclass
class TorchServeServer:
    directory: Path
    inference: int
    management: int
    metrics: int
    model_store: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = spawn(
            [str(BIN / "torchserve"), "--start", "--foreground", "--ncs", "--ts-config", "config.properties",
             "--model-store", str(self.model_store), "--models", "deeplabv3=deeplabv3.mar"],
            self.directory / "torchserve.out", cwd=self.directory,
            env={**os.environ, "LOG_LOCATION": str(self.directory / "logs"), "TMPDIR": str(self.directory)},
        )  # fmt: skip
        try:
            wait_until(
                lambda: self.key_file.exists() and self.ready_workers() >= 1, 180, "TorchServe's model"
            )
        except TimeoutError:
            print((self.directory / "torchserve.out").read_text()[-5000:])
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

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


@pytest.fixture(scope="session")
def torchserve(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServeServer]:
    """TorchServe started from the project's config.properties, with its ports moved to free ones."""
    directory = tmp_path_factory.mktemp("torchserve")
    server = TorchServeServer(directory, free_port(), free_port(), free_port(), model_store)
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
    server.start()
    yield server
    server.stop()


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

    def start_gateway(self, port: int | None = None, **extra_env: str) -> None:
        self.port = port or free_port()
        self.gateway = spawn(
            [str(BIN / "uvicorn"), "gateway.app:app", "--port", str(self.port), "--log-level", "warning"],
            self.log_dir / f"gateway-{self.port}.log",
            cwd=ROOT,
            env={**self.env, **extra_env},
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
            env={**self.env, **extra_env},
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


@pytest.fixture(scope="session")
def stack(
    redis_server: RedisServer, torchserve: TorchServeServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    running = Stack(
        redis_server, torchserve, stack_env(redis_server, torchserve, tmp_path_factory.mktemp("blobs"))
    )
    running.log_dir = tmp_path_factory.mktemp("logs")
    running.start_gateway()
    running.start_worker()
    running.wait_ready()
    yield running
    running.stop()


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


@pytest.fixture
def isolated(stack: Stack) -> Iterator[Stack]:
    """A gateway and one worker on a fresh Redis database, with quick retries and a tight job timeout."""
    env = isolated_env(
        stack,
        # Job timeout 25 s: a killed worker's job runs again 35 s later. Tighter, a machine at half speed (a
        # TorchServe warming up after a restart) times every try out while it still computes the last ones.
        SEGSERVE_INFERENCE_TIMEOUT="20",
        SEGSERVE_MAX_ATTEMPTS="200",
        SEGSERVE_RETRY_DELAY="0.2",
        SEGSERVE_RETRY_MAX_DELAY="1",
    )
    own = Stack(stack.redis, stack.torchserve, env, log_dir=stack.log_dir)
    own.start_gateway()
    own.start_worker()
    wait_until(lambda: httpx.get(f"{own.url}/v1/queue").json()["workers"], 30, "the worker's heartbeat")
    yield own
    own.stop()


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=90) as c:
        yield c


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()


class Receiver:
    """A real HTTP server (on loopback unless ``host`` names another address) that records what it receives
    and answers as the test says: ``answer(n, request)`` gives the n-th request's (status, headers, body,
    seconds to wait first)."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.received: list[Received] = []
        self.answer: Callable[[int, Received], tuple[int, dict[str, str], bytes, float]] = lambda n, request: (
            200,
            {},
            b"",
            0.0,
        )
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def handle_one(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                request = Received(self.path, dict(self.headers), self.rfile.read(length), time.monotonic())
                with lock:
                    receiver.received.append(request)
                    n = len(receiver.received) - 1
                status, headers, body, wait = receiver.answer(n, request)
                time.sleep(wait)
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = handle_one

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that gave up on a slow answer (as the tests make it) is not an error here

        lock = threading.Lock()
        self.host = host
        self.server = Server((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephS3]:
    """Ceph's RADOS Gateway, a real S3 API server, once per session; each test takes a bucket of its own."""
    from tests.s3_server import CephS3

    if not shutil.which("radosgw"):
        pytest.fail(
            "Ceph's RADOS Gateway is not installed: run `segserve setup --with-s3` (the README's test command does)"
        )
    server = CephS3(tmp_path_factory.mktemp("ceph"))
    server.start()
    yield server
    server.stop()
