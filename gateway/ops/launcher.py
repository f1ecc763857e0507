"""``segserve setup`` and ``segserve up``: the whole stack on one machine, from nothing to a ready URL.

``up`` is a small supervisor: it starts Redis (own data dir, AOF on, loopback), TorchServe, the arq
workers and the gateway, each in its own process group; shows their logs with a prefix; waits until
``/readyz`` is green; reports a child that dies; and on Ctrl-C stops them all, leaving nothing behind.
compose.yaml runs the same commands; tests/test_launcher.py keeps the two in step.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from gateway.ops.archive import BuildError, build_archive, model_store
from gateway.ops.setup import SetupError, setup
from gateway.settings import Settings
from gateway.webhooks import new_secret

READY_TIMEOUT_S = 300


def state_dir() -> Path:
    """Redis data, TorchServe's keys and logs, every child's log: ``.segserve`` here, or SEGSERVE_HOME."""
    return Path(os.environ.get("SEGSERVE_HOME", ".segserve")).resolve()


def torchserve_config() -> Path:
    """TorchServe's configuration: the checkout's ``config.properties``, or SEGSERVE_TORCHSERVE_CONFIG."""
    path = Path(os.environ.get("SEGSERVE_TORCHSERVE_CONFIG", "config.properties")).resolve()
    if not path.is_file():
        raise SetupError(
            f"TorchServe's configuration {path} does not exist: run `segserve up` in a checkout of segserve, "
            "or point SEGSERVE_TORCHSERVE_CONFIG at a config.properties"
        )
    return path


def ensure_archive(model: str, store: Path) -> Path:
    """The model's archive, built on first use: published weights online, else random with a warning."""
    archive = store / f"{model}.mar"
    if archive.exists():
        return archive
    weights = os.environ.get("SEGSERVE_WEIGHTS")
    if weights:
        return build_archive(name=model, weights=weights, store=store)
    socket.setdefaulttimeout(60)  # torch.hub's download has no timeout of its own
    try:
        return build_archive(name=model, store=store)
    except BuildError as exc:
        banner = "!" * 78
        print(
            f"{banner}\n{exc}\nWARNING: falling back to RANDOM WEIGHTS. The service works, but its masks are",
            flush=True,
        )
        print(
            f"MEANINGLESS. For real masks: SEGSERVE_WEIGHTS=/path/to/checkpoint.pth, then delete {archive}\n{banner}",
            flush=True,
        )
        return build_archive(name=model, random_seed=0, store=store)
    finally:
        socket.setdefaulttimeout(None)


@dataclass
class Child:
    name: str
    command: list[str]
    cwd: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    # Lines matching this are kept out of the console (still in the child's log file).
    quiet: re.Pattern[str] | None = None
    process: subprocess.Popen[str] | None = None


def stack(
    settings: Settings, home: Path, store: Path, model: str, workers: int, host: str, port: int
) -> list[Child]:
    """The processes of the stack, in start order."""
    redis = urlparse(settings.redis_url)
    redis_dir = home / "redis"
    ts_dir = home / "torchserve"
    redis_dir.mkdir(parents=True, exist_ok=True)
    ts_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    children = [
        Child(
            "redis",
            ["redis-server", "--bind", redis.hostname or "127.0.0.1", "--port", str(redis.port or 6379),
             "--dir", str(redis_dir), "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
        ),
        Child(
            "torchserve",
            [str(bin_dir / "torchserve"), "--start", "--foreground", "--ncs", "--ts-config", str(torchserve_config()),
             "--model-store", str(store), "--models", f"{model}={model}.mar"],
            cwd=ts_dir,  # TorchServe writes key_file.json and logs/ into its working directory
            # TorchServe refuses to start while another one's pid file sits in the temp dir: use our own.
            env={
                "LOG_LOCATION": str(ts_dir / "logs"),
                "METRICS_LOCATION": str(ts_dir / "logs"),
                "TMPDIR": str(ts_dir),
                # Where the gateway and workers look for TorchServe is where it listens.
                "TS_INFERENCE_ADDRESS": settings.torchserve_url,
                "TS_MANAGEMENT_ADDRESS": settings.torchserve_management_url,
            },
            quiet=re.compile(r"\[(DEBUG|INFO ?)\]|^\s*$|^(nvidia|xpu)-smi"),
        ),
    ]  # fmt: skip
    for i in range(workers):
        children.append(Child(f"worker{i + 1}", [str(bin_dir / "segserve"), "worker"]))
    # Event streams stay open until their job ends: on shutdown, uvicorn closes them after 5 s (clients
    # reconnect with Last-Event-ID) instead of waiting for them.
    gateway = [str(bin_dir / "uvicorn"), "gateway.app:app", "--host", host, "--port", str(port),
               "--timeout-graceful-shutdown", "5"]  # fmt: skip
    children.append(Child("gateway", gateway))
    return children


def kept_webhook_secret(home: Path) -> str:
    """The server's webhook secret, made on the first start and kept (readable by its owner only), so the
    keys that callers verify with stay the same across restarts."""
    path = home / "webhook_secret"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(new_secret() + "\n")
        print(f"made a webhook signing secret: {path} (GET /v1/webhooks/secret gives each API key its own)")
    else:
        print(f"webhook signing secret: {path}")
    return path.read_text().strip()


def port_busy(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class Supervisor:
    def __init__(self, children: list[Child], env: dict[str, str], log_dir: Path) -> None:
        self.children = children
        self.env = env
        self.stopping = threading.Event()
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.width = max(len(c.name) for c in children)

    def start(self, child: Child) -> None:
        child.process = subprocess.Popen(
            child.command,
            cwd=child.cwd,
            env={**self.env, **child.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: stopping it stops its children too
        )
        threading.Thread(target=self._pump, args=(child,), daemon=True).start()

    def _pump(self, child: Child) -> None:
        assert child.process is not None and child.process.stdout is not None
        with (self.log_dir / f"{child.name}.log").open("a") as log:
            for line in child.process.stdout:
                log.write(line)
                log.flush()
                if child.quiet is None or not child.quiet.search(line) or "RANDOM WEIGHTS" in line:
                    sys.stdout.write(f"{child.name:>{self.width}} | {line}")
                    sys.stdout.flush()

    def dead(self) -> list[Child]:
        return [c for c in self.children if c.process is not None and c.process.poll() is not None]

    def stop(self) -> None:
        self.stopping.set()
        for child in reversed(self.children):  # the gateway first, Redis last
            self._signal(child, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in reversed(self.children):
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{child.name} did not stop in time; killing it", flush=True)
            self._signal(child, signal.SIGKILL)  # whatever is left in its group (e.g. TorchServe's backends)

    @staticmethod
    def _signal(child: Child, sig: int) -> None:
        if child.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.process.pid, sig)


def wait_ready(url: str, supervisor: Supervisor, timeout: float = READY_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline and not supervisor.stopping.is_set():
        if supervisor.dead():
            return False
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return True
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            match = re.search(r'"detail":"([^"]*)"', detail)
            state = match.group(1) if match else f"HTTP {exc.code}"
            if state != last:
                print(f"   segserve | waiting: {state}", flush=True)
                last = state
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def up(host: str, port: int, workers: int, model: str) -> int:
    settings = Settings.from_env()
    setup()
    home, store = state_dir(), model_store()
    ensure_archive(model, store)
    redis = urlparse(settings.redis_url)
    ts_urls = (settings.torchserve_url, settings.torchserve_management_url)
    for name, h, p in (
        ("Redis", redis.hostname or "127.0.0.1", redis.port or 6379),
        *(("TorchServe", u.hostname or "127.0.0.1", u.port or 80) for u in map(urlparse, ts_urls)),
        ("the gateway", host, port),
    ):
        if port_busy(h, p):
            raise SetupError(f"port {p} on {h} is in use, so {name} cannot start there; stop what holds it")
    env = {
        **os.environ,
        "SEGSERVE_TORCHSERVE_KEY_FILE": str(home / "torchserve" / "key_file.json"),
        "SEGSERVE_DEFAULT_MODEL": model,
        "SEGSERVE_WEBHOOK_SECRET": settings.webhook_secret or kept_webhook_secret(home),
        "PYTHONUNBUFFERED": "1",
    }
    children = stack(settings, home, store, model, workers, host, port)
    supervisor = Supervisor(children, env, home / "logs")
    interrupted = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        interrupted.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    try:
        for child in children:
            supervisor.start(child)
        if not wait_ready(url, supervisor):
            if not interrupted.is_set():
                died = ", ".join(c.name for c in supervisor.dead()) or "nothing died, but /readyz stayed red"
                print(f"segserve did not become ready ({died}); logs in {supervisor.log_dir}", flush=True)
                return 1
            return 0
        print(f"\n  segserve is ready: {url}   (API docs: {url}/docs; Ctrl-C stops everything)\n", flush=True)
        while not interrupted.is_set():
            for child in supervisor.dead():
                code = child.process.returncode if child.process else "?"
                # Workers hold no state, and arq's loop can exit when Redis restarts under it: start
                # them again. Any other child gone means the stack is broken: stop it all.
                if child.name.startswith("worker"):
                    print(f"{child.name} exited with status {code}; starting it again", flush=True)
                    supervisor.start(child)
                    continue
                print(f"{child.name} exited with status {code}; stopping the stack", flush=True)
                return 1
            interrupted.wait(1.0)
        return 0
    finally:
        print("stopping …", flush=True)
        supervisor.stop()
        print("stopped", flush=True)
