"""The suite's fixtures: real components (tests/harness), really started, each on free loopback ports: Redis,
TorchServe with a random-weights archive, arq workers and uvicorn, once per test session where they can be
shared."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from gateway.jobs import JobStore
from tests.harness.jobs import directory_store
from tests.harness.kubernetes import DEPLOY, OVERLAYS, Rendered, render
from tests.harness.processes import free_port, wait_until
from tests.harness.receiver import Receiver
from tests.harness.redis_users import REDIS_USERS
from tests.harness.s3 import CephS3
from tests.harness.servers import (
    RedisServer,
    Stack,
    TorchServeServer,
    build_model_store,
    isolated_env,
    stack_env,
)

# Tests that start TorchServe (directly or through a stack) are the slow tier: `pytest -m "not slow"` skips
# them and runs the rest (Redis, Sentinels, the S3 server, the gateway alone), in-process where it can. A test
# that starts TorchServe without one of these fixtures carries the mark itself.
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


@pytest.fixture(scope="session")
def redis_server(redis_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session stack's Redis, with the Kubernetes manifest's users: its gateways and workers log in as
    theirs, so every test of the stack runs on those rules, and none of its commands may be refused."""
    with RedisServer(
        free_port(), tmp_path_factory.mktemp("redis"), users=tuple(REDIS_USERS.values())
    ) as server:
        yield server
        with server.client() as redis:
            refused = redis.acl_log()
        assert not refused, f"Redis refused segserve's users: {refused}"


@pytest.fixture(scope="session")
def job_redis(redis_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of the fast tier's own, flushed by each test that uses it; with the manifest's users, as the
    stack's has them, for the fast tier's gateways."""
    with RedisServer(
        free_port(), tmp_path_factory.mktemp("job-redis"), users=tuple(REDIS_USERS.values())
    ) as server:
        yield server


@pytest.fixture
def fresh_redis(job_redis: RedisServer) -> RedisServer:
    with job_redis.client() as redis:
        redis.flushall()
    return job_redis


@pytest.fixture
async def store(fresh_redis: RedisServer, tmp_path: Path) -> AsyncIterator[JobStore]:
    """A job store on a flushed Redis, its blobs in a directory of the test's own."""
    job_store = directory_store(fresh_redis.url, tmp_path / "blobs", result_ttl_s=60, max_queued=100)
    yield job_store
    await job_store.redis.aclose()


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The archive that every TorchServe of the session serves."""
    return build_model_store(tmp_path_factory.mktemp("model_store"))


@pytest.fixture(scope="session")
def torchserve(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServeServer]:
    """TorchServe started from the project's config.properties, with its ports moved to free ones."""
    with TorchServeServer.on_free_ports(tmp_path_factory.mktemp("torchserve"), model_store) as server:
        yield server


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


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephS3]:
    """Ceph's RADOS Gateway, a real S3 API server, once per session; each test takes a bucket of its own."""
    if not shutil.which("radosgw"):
        pytest.fail(
            "Ceph's RADOS Gateway is not installed: run `segserve setup --with-s3` (the README's test command does)"
        )
    server = CephS3(tmp_path_factory.mktemp("ceph"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, Rendered]:
    """An overlay of deploy/kubernetes, rendered by `kubectl kustomize`: (its name, its objects)."""
    return request.param, Rendered(render(DEPLOY / "overlays" / request.param))


@pytest.fixture(scope="module")
def rendered(overlay: tuple[str, Rendered]) -> Rendered:
    return overlay[1]
