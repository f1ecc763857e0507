"""A plain, non-editable install of segserve runs from anywhere: the gateway, a worker and arq's --check find
everything they need (Lua scripts, pages, the OpenAPI, the handler) inside the installed package."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.harness.images import encode, scene
from tests.harness.processes import BIN, ROOT, free_port, spawn, stop_process, wait_until
from tests.harness.servers import RedisServer

LOCAL_ONLY = (
    ".git",
    ".venv",
    ".segserve",
    "build",
    "*.egg-info",
    "__pycache__",
    "*_cache",
    "model_store",
    "tests",
)


@pytest.mark.slow
def test_a_plain_install_runs_outside_the_checkout(fresh_redis: RedisServer, tmp_path: Path) -> None:
    pip = [str(BIN / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    # From a copy: a build in the checkout would leave build/ there, whose stale files could hide a gap.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*LOCAL_ONLY))
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(source)], check=True)
    wheel = next((tmp_path / "dist").glob("segserve-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The installed copy comes first on the path: nothing is read from the checkout.
    env = {**os.environ, "PYTHONPATH": str(site), "SEGSERVE_REDIS_URL": fresh_redis.url}
    python = str(BIN / "python")
    where = subprocess.run(
        [
            python,
            "-c",
            "import gateway, gateway.ops.archive as a; print(gateway.__file__); print(a.handler_package())",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(line.startswith(str(site)) for line in where), where
    # The handler's whole package, which build-model ships in each archive.
    assert {"handler.py", "catalog.py", "engines.py", "images.py", "masks.py"} <= {
        p.name for p in Path(where[1]).iterdir()
    }, where

    port = free_port()
    gateway = spawn(
        [python, "-m", "uvicorn", "gateway.app:app", "--port", str(port)],
        tmp_path / "gateway.log",
        cwd=elsewhere,
        env=env,
    )
    worker = spawn([python, "-m", "gateway.cli", "worker"], tmp_path / "worker.log", cwd=elsewhere, env=env)
    check = [
        python,
        "-c",
        "import sys; from arq.cli import cli; sys.argv[1:] = ['gateway.worker.WorkerSettings', '--check']; cli()",
    ]
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/v1/queue").json()["workers"], 30, "the worker's heartbeat")
        assert subprocess.run(check, cwd=elsewhere, env=env, capture_output=True).returncode == 0
        job = httpx.post(
            f"{url}/v1/jobs", content=encode(scene(32, 24)), headers={"Content-Type": "image/jpeg"}
        ).json()
        assert httpx.get(f"{url}/v1/jobs/{job['id']}").json()["id"] == job["id"]
        assert "/v1/jobs" in httpx.get(f"{url}/openapi.json").json()["paths"]
        assert httpx.get(f"{url}/").status_code == 200 and httpx.get(f"{url}/docs").status_code == 200
    finally:
        stop_process(worker)
        stop_process(gateway)
    assert "Traceback" not in (tmp_path / "gateway.log").read_text() + (tmp_path / "worker.log").read_text()
