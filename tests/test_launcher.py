"""`segserve up` from start to Ctrl-C, compose.yaml against the launcher, and the archive builder's checks."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
import yaml

from gateway.handlers.deeplabv3.engines import build_model
from gateway.ops.archive import (
    BuildError,
    build_archive,
    calibrate_batch_norm,
    check_published_hash,
)
from gateway.ops.launcher import LOG_CONFIG, REDIS_MAXMEMORY, stack
from gateway.settings import Settings, env_table
from gateway.webhooks import signing_key
from tests.harness.images import encode, scene
from tests.harness.processes import BIN, ROOT, free_port, wait_until
from tests.harness.servers import side_by_side_env, start_segserve_up


def assert_one_job_succeeds(port: int) -> None:
    response = httpx.post(
        f"http://127.0.0.1:{port}/v1/jobs",
        content=encode(scene(64, 48)),
        headers={"Content-Type": "image/jpeg", "Prefer": "wait=30"},
        timeout=60,
    )
    assert response.json()["status"] == "succeeded", response.text


@pytest.mark.slow  # it starts TorchServe, with no fixture of the slow tier
def test_segserve_up_serves_and_leaves_nothing_behind(tmp_path: Path) -> None:
    port = free_port()
    env = side_by_side_env(tmp_path / "home")
    # Weights from a local checkpoint, so nothing is downloaded: `segserve up` builds the archive itself, into
    # an empty model store. It runs from outside the checkout.
    weights = tmp_path / "deeplabv3-local.pth"
    torch.manual_seed(1)
    torch.save(calibrate_batch_norm(build_model("mobilenet_v3_large")).state_dict(), weights)
    env["SEGSERVE_WEIGHTS"] = str(weights)
    env["SEGSERVE_MODEL_STORE"] = str(tmp_path / "store")
    env["SEGSERVE_TORCHSERVE_CONFIG"] = str(ROOT / "config.properties")
    up, log = start_segserve_up(tmp_path, env, port, "--workers", "2")
    try:
        descendants = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in descendants)
        assert "redis-server" in names and "org.pytorch.serve.ModelServer" in names
        assert names.count("segserve worker") == 2 and "gateway.app:app" in names
        assert_one_job_succeeds(port)
        refused = httpx.get(f"http://127.0.0.1:{port}/v1/webhooks/secret")  # no keys: never served
        assert refused.status_code == 403 and refused.json()["code"] == "secret_needs_key"
        kept = (tmp_path / "home" / "webhook_secret").read_text().strip()
        assert signing_key(kept, "").startswith("whsec_")
        assert f"{tmp_path / 'home' / 'webhook_secret'}" in log.read_text()
        # The supervisor stays small: the archive is built in a process of its own, so it never holds torch.
        assert psutil.Process(up.pid).memory_info().rss < 150 << 20

        # A dependency that crashes is started again, as compose's restart policy would; the stack stays up.
        for name in ("redis-server", "gateway.app:app"):
            (victim,) = [p for p in psutil.Process(up.pid).children() if name in " ".join(p.cmdline())]
            victim.kill()
            wait_until(
                lambda name=name: (
                    "starting it again" in log.read_text()
                    and any(name in " ".join(p.cmdline()) for p in psutil.Process(up.pid).children())
                ),
                60,
                f"{name} again",
            )
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").json()["status"] == "ready",
            120,
            "ready again",
        )
        assert_one_job_succeeds(port)
        assert up.poll() is None
        descendants = psutil.Process(up.pid).children(recursive=True)

        text = log.read_text()
        for prefix in ("redis |", "torchserve |", "worker1 |", "worker2 |", "gateway |"):
            assert prefix in text, prefix
        assert "built " in text and "deeplabv3-local.pth (unverified)" in text  # the build's own report
        up.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert up.wait(timeout=60) == 0
        time.sleep(1)
        left = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert left == [], [p.cmdline() for p in left]
        assert "stopped" in log.read_text()
        assert (tmp_path / "home" / "redis" / "appendonlydir").is_dir(), "Redis ran without its AOF"
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)


def test_compose_runs_what_the_launcher_runs(tmp_path: Path) -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "torchserve", "worker", "gateway"}
    assert [name for name, s in services.items() if "ports" in s] == ["gateway"]

    launched = {
        child.name.rstrip("0123456789"): child.command
        for child in stack(Settings(), tmp_path, tmp_path / "model_store", "deeplabv3", 1, "127.0.0.1", 8000)
    }

    def program(command: list[str]) -> list[str]:
        """The command without paths, which differ between a checkout and a container."""
        return [Path(part).name if part.startswith("/") else part for part in command]

    assert program(services["worker"]["command"]) == program(launched["worker"])
    assert program(services["gateway"]["command"])[:2] == program(launched["gateway"])[:2]
    for command in (services["gateway"]["command"], launched["gateway"]):
        assert command[command.index("--timeout-graceful-shutdown") + 1] == "5"  # event streams end
    assert program(services["torchserve"]["command"]) == program(launched["torchserve"])
    torchserve = services["torchserve"]["command"]  # the image holds the checkout at /app
    assert torchserve[torchserve.index("--log-config") + 1] == f"/app/{LOG_CONFIG.relative_to(ROOT)}"
    redis_command = services["redis"]["command"]
    assert (
        redis_command[redis_command.index("--appendonly") + 1]
        == "yes"
        == launched["redis"][launched["redis"].index("--appendonly") + 1]
    )
    for command in (redis_command, launched["redis"]):  # metadata only, and a full Redis refuses new jobs
        assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
        assert command[command.index("--maxmemory") + 1] == REDIS_MAXMEMORY
    assert "redis-data:/data" in services["redis"]["volumes"]
    blobs = services["gateway"]["environment"]["SEGSERVE_BLOB_URL"]
    for name in ("worker", "gateway"):  # one store, both see it
        assert f"blobs:{blobs}" in services[name]["volumes"]
    assert services["worker"]["deploy"]["replicas"] >= 1
    assert {s["restart"] for s in services.values()} == {"unless-stopped"}  # as the launcher restarts them

    known = {name for name, _ in env_table()}
    for name in ("worker", "gateway"):
        environment = services[name]["environment"]
        assert set(environment) <= known, set(environment) - known
        assert environment["SEGSERVE_REDIS_URL"].startswith("redis://redis:")
    assert "driver: nvidia" in (ROOT / "compose.yaml").read_text()  # the GPU reservation, ready to uncomment


def test_published_hash_is_checked(tmp_path: Path) -> None:
    content = b"pretend checkpoint"
    digest = hashlib.sha256(content).hexdigest()
    good = tmp_path / f"deeplabv3_mobilenet_v3_large-{digest[:8]}.pth"
    good.write_bytes(content)
    assert check_published_hash(good) is True
    bad = tmp_path / "deeplabv3_mobilenet_v3_large-fc3c493d.pth"
    bad.write_bytes(content)
    with pytest.raises(BuildError, match="does not match its published SHA-256"):
        check_published_hash(bad)
    assert check_published_hash(tmp_path / "my-own-weights.pth") is False


def test_build_model_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="unknown variant"):
        build_archive(variant="vgg", random_seed=0, store=tmp_path)
    with pytest.raises(BuildError, match="not found"):
        build_archive(weights=str(tmp_path / "nope.pth"), store=tmp_path)
    result = subprocess.run(
        [
            str(BIN / "segserve"),
            "build-model",
            "--weights",
            str(tmp_path / "nope.pth"),
            "--model-store",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "weights file not found" in result.stderr


def test_the_image_compose_builds_leaves_state_and_secrets_out() -> None:
    """compose builds with `COPY . .`: the state directory (webhook secret, TorchServe's keys, Redis's AOF,
    customers' images), archives, the venv and the history must not go into the image."""
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert "COPY . ." in (ROOT / "compose.yaml").read_text()
    assert {".segserve/", ".venv/", ".git/", "model_store/*.mar", "key_file.json"} <= ignored


def test_compose_ships_safe(tmp_path: Path) -> None:
    """With no API keys, compose publishes the gateway on loopback only, and no other port at all; what
    holds secrets and customers' images stays out of the image."""
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    published = {name: s.get("ports", []) for name, s in services.items() if s.get("ports")}
    keyed = any("SEGSERVE_API_KEYS" in str(s.get("environment", "")) for s in services.values())
    assert list(published) == ["gateway"] and (
        keyed or all(p.startswith("127.0.0.1:") for p in published["gateway"])
    )
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".segserve/", ".venv/", "model_store/*.mar", ".git/", "key_file.json"} <= set(ignored)
