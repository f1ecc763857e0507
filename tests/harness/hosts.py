"""What runs on the hosts of a network (tests/harness/namespaces.py): Redis and Sentinel on a host's bridge
address; TorchServe, an arq worker and a gateway as segserve's deployment runs them, each from a clean
environment, so that nothing of the runner's own settings leaks in."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import httpx
import redis

from gateway.ops.launcher import torchserve_command
from tests.harness.namespaces import Host
from tests.harness.processes import BIN, ROOT, wait_until
from tests.harness.sentinel import sentinel_config
from tests.harness.servers import redis_command

REDIS_PORT, SENTINEL_PORT, GATEWAY_PORT = 6379, 26379, 8000


def clean_environment(**settings: str) -> dict[str, str]:
    """This process's environment without any SEGSERVE_ or TS_ setting of its own, plus ``settings``
    (``redis_url="..."`` becomes ``SEGSERVE_REDIS_URL``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEGSERVE_", "TS_"))}
    env.update({f"SEGSERVE_{name.upper()}": value for name, value in settings.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_redis(host: Host, *options: str) -> None:
    """redis-server on the host's bridge address, with the AOF on as the session's Redis has it."""
    host.spawn(
        "redis",
        redis_command(host.address, REDIS_PORT, host.directory, "--protected-mode", "no", *options),
        clean_environment(),
    )
    wait_until(lambda: redis_client(host).ping(), 30, f"redis-server on {host.name}")


def redis_client(host: Host, port: int = REDIS_PORT) -> redis.Redis:
    return redis.Redis(host=host.address, port=port, socket_connect_timeout=1, socket_timeout=5)


def start_sentinel(host: Host, primary: Host) -> None:
    conf = host.directory / "sentinel.conf"  # Sentinel rewrites it with what it learns
    conf.write_text(
        sentinel_config(SENTINEL_PORT, host.address, host.directory, (primary.address, REDIS_PORT))
        + "protected-mode no\n"
    )
    host.spawn("sentinel", ["redis-server", str(conf), "--sentinel"], clean_environment())


def unused_socket_port() -> int:
    """TorchServe's backends listen on unix sockets, /tmp/.ts.sock.<port>: paths, which namespaces share,
    so each TorchServe needs ports of its own there (one per backend worker)."""
    while True:
        port = 40000 + secrets.randbelow(20000)
        if not any(Path(f"/tmp/.ts.sock.{port + n}").exists() for n in range(8)):
            return port


def start_torchserve(host: Host, model_store: Path) -> Path:
    """TorchServe from the project's config.properties, on the host's own 127.0.0.1:8080/8081 (the same
    ports on every host: loopback is private to each). Returns its key file."""
    directory = host.directory / "torchserve"
    directory.mkdir()
    config = (ROOT / "config.properties").read_text() + f"\ninitial_worker_port={unused_socket_port()}\n"
    (directory / "config.properties").write_text(config)
    host.spawn(
        "torchserve",
        torchserve_command("config.properties", model_store, "deeplabv3=deeplabv3.mar"),
        {**clean_environment(), "LOG_LOCATION": str(directory / "logs"), "TMPDIR": str(directory)},
        cwd=directory,
    )
    return directory / "key_file.json"  # TorchServe writes its tokens into its working directory


# Asked from inside the host: its TorchServe answers nobody else.
READY_PROBE = """
import json, sys, httpx
key = json.load(open(sys.argv[1]))["management"]["key"]
answer = httpx.get("http://127.0.0.1:8081/models/deeplabv3", headers={"Authorization": "Bearer " + key}, timeout=5)
sys.exit(0 if answer.status_code == 200 and any(w["status"] == "READY" for w in answer.json()[0]["workers"]) else 1)
"""


def wait_for_torchserve(host: Host, key_file: Path) -> None:
    def ready() -> bool:
        return (
            key_file.exists()
            and host.run(str(BIN / "python"), "-c", READY_PROBE, str(key_file)).returncode == 0
        )

    wait_until(ready, 300, f"{host.name}'s TorchServe")


def start_worker(host: Host, key_file: Path, **settings: str) -> subprocess.Popen[bytes]:
    """`segserve worker` against its host's own TorchServe, started in a directory of its own: it needs no
    file of the checkout."""
    env = clean_environment(
        torchserve_url="http://127.0.0.1:8080",
        torchserve_management_url="http://127.0.0.1:8081",
        torchserve_key_file=str(key_file),
        # A try may take 20 s: at half speed a request can wait behind a whole batch in TorchServe's queue.
        # Job timeout 25 s, so a dead host's jobs run again 35 s later (arq's in-progress key).
        inference_timeout="20",
        **settings,
    )
    return host.spawn("worker", [str(BIN / "segserve"), "worker"], env)


def start_gateway(host: Host, **settings: str) -> str:
    """uvicorn on the host's bridge address, with the job store's settings only (no TorchServe on its host)."""
    host.spawn(
        "gateway",
        [
            str(BIN / "uvicorn"),
            "gateway.app:app",
            "--host",
            host.address,
            "--port",
            str(GATEWAY_PORT),
            "--log-level",
            "warning",
        ],
        clean_environment(
            **{"allow_anonymous_remote": "true", **settings}
        ),  # the tests call from another host
    )
    url = f"http://{host.address}:{GATEWAY_PORT}"
    wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, 60, "the gateway")
    return url
