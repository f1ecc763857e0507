"""``segserve setup`` and ``segserve up``: the whole stack on one machine, from nothing to a ready URL.

``up`` is a small supervisor (it never imports torch: the archive is built by a process of its own): it
starts Redis (own data dir, AOF on, loopback), TorchServe, the arq workers and the gateway, each in its own
process group; shows their logs with a prefix; waits until ``/readyz`` says every part is ready; restarts a
child that exits, with backoff, as compose's ``restart: unless-stopped`` does; and on Ctrl-C stops them all,
leaving nothing behind. compose.yaml runs the same commands; tests/test_launcher.py keeps the two in step.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
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

from gateway.ops.archive import BuildError, model_store
from gateway.ops.setup import SetupError, setup
from gateway.retrying import backoff
from gateway.settings import Settings
from gateway.webhooks import new_secret

READY_TIMEOUT_S = 300
# Redis holds job metadata only (images are blobs): a few kB a job, so 256 MB keep tens of thousands of jobs
# (docs/storage.md sizes it). noeviction: a full Redis refuses new jobs; it never drops accepted ones.
REDIS_MAXMEMORY = "256mb"
# TorchServe's logging: what operators read, without its lines for every inference (the file says why).
LOG_CONFIG = Path(__file__).with_name("log4j2.xml")
QUICK_EXIT_S = 10.0  # a child that exits sooner than this after its start failed "at once"
QUICK_EXITS = 5  # so many such exits in a row, and the stack stops


def state_dir() -> Path:
    """Redis data, blobs, TorchServe's keys and logs, every child's log: ``.segserve`` here, or SEGSERVE_HOME."""
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
    """The model's archive, built on first use by `segserve build-model` in a process of its own, so that
    this supervisor never holds torch: published weights online, else random ones with a warning."""
    archive = store / f"{model}.mar"
    if archive.exists():
        return archive
    build = [sys.executable, "-m", "gateway.cli", "build-model", "--name", model, "--model-store", str(store)]
    weights = os.environ.get("SEGSERVE_WEIGHTS")
    attempt = subprocess.run(
        [*build, "--weights", weights] if weights else build, stderr=subprocess.PIPE, text=True
    )
    if attempt.returncode == 0:
        return archive
    if weights:
        raise BuildError(attempt.stderr.strip().removeprefix("error: "))
    banner = "!" * 78
    print(
        f"{banner}\n{attempt.stderr.strip()}\nWARNING: falling back to RANDOM WEIGHTS. The service works, "
        f"but its masks are\nMEANINGLESS. For real masks: SEGSERVE_WEIGHTS=/path/to/checkpoint.pth, then "
        f"delete {archive}\n{banner}",
        flush=True,
    )
    if subprocess.run([*build, "--random-weights"]).returncode != 0:
        raise BuildError("`segserve build-model --random-weights` failed; see above")
    return archive


@dataclass
class Child:
    name: str
    command: list[str]
    cwd: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    # Lines matching this are kept out of the console (still in the child's log file).
    quiet: re.Pattern[str] | None = None
    process: subprocess.Popen[str] | None = None
    started_at: float = 0.0
    quick_exits: int = 0  # exits in a row, each soon after its start
    restart_at: float | None = None


def torchserve_command(config: Path | str, model_store: Path | str, models: str) -> list[str]:
    """TorchServe in the foreground (the caller supervises it), without its config snapshots, with
    segserve's logging (``LOG_CONFIG``), serving ``models`` (``name=archive.mar``) from ``model_store``: as
    ``segserve up`` and the tests run it."""
    torchserve = Path(sys.executable).parent / "torchserve"
    return [
        str(torchserve),
        "--start",
        "--foreground",
        "--ncs",
        "--ts-config",
        str(config),
        "--log-config",
        str(LOG_CONFIG),
        "--model-store",
        str(model_store),
        "--models",
        models,
    ]


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
            [
                "redis-server",
                "--bind",
                redis.hostname or "127.0.0.1",
                "--port",
                str(redis.port or 6379),
                "--dir",
                str(redis_dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--maxmemory",
                REDIS_MAXMEMORY,
                "--maxmemory-policy",
                "noeviction",
            ],
        ),
        Child(
            "torchserve",
            torchserve_command(torchserve_config(), store, f"{model}={model}.mar"),
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
    ]
    for i in range(workers):
        children.append(Child(f"worker{i + 1}", [str(bin_dir / "segserve"), "worker"]))
    # Event streams stay open until their job ends: on shutdown, uvicorn closes them after 5 s (clients
    # reconnect with Last-Event-ID) instead of waiting for them.
    gateway = [
        str(bin_dir / "uvicorn"),
        "gateway.app:app",
        "--host",
        host,
        "--port",
        str(port),
        "--timeout-graceful-shutdown",
        "5",
    ]
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


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name
        return host == "localhost"


def port_busy(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class Supervisor:
    """Starts the children, restarts one that exits (as compose's ``restart: unless-stopped`` does), and gives
    up only on a child that exits soon after each start QUICK_EXITS times in a row: that one cannot run here.
    The restart waits grow from 0.5 s to 30 s while a child keeps failing, and reset once it stays up."""

    def __init__(self, children: list[Child], env: dict[str, str], log_dir: Path) -> None:
        self.children = children
        self.env = env
        self.stopping = threading.Event()
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.width = max(len(c.name) for c in children)

    def start(self, child: Child) -> None:
        child.started_at = time.monotonic()
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

    def tend(self) -> str | None:
        """Restart what exited, when its wait is over; why to give up, when a child cannot stay up."""
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restart_at = None
                    self.start(child)
                continue
            if child.process is None or child.process.poll() is None:
                continue
            quick = now - child.started_at < QUICK_EXIT_S
            child.quick_exits = child.quick_exits + 1 if quick else 0
            if child.quick_exits >= QUICK_EXITS:
                return f"{child.name} exited {QUICK_EXITS} times in a row right after starting"
            delay = backoff(child.quick_exits, 0.5, 30.0)
            code = child.process.returncode
            print(f"{child.name} exited with status {code}; starting it again in {delay:g} s", flush=True)
            child.restart_at = now + delay
        return None

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


def wait_ready(url: str, supervisor: Supervisor, timeout: float = READY_TIMEOUT_S) -> str | None:
    """None once every part is ready; else why not."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline and not supervisor.stopping.is_set():
        if failure := supervisor.tend():
            return failure
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:  # 503: Redis is not up yet
            answer = json.loads(exc.read() or b"{}")
        except (urllib.error.URLError, OSError, ValueError):
            answer = {}
        if answer.get("status") == "ready":
            return None
        state = ", ".join(
            f"{part} {s}" for part, s in answer.get("checks", {}).items() if not s.startswith("ok")
        )
        if state and state != last:
            print(f"   segserve | waiting: {state}", flush=True)
            last = state
        time.sleep(0.5)
    return f"not ready after {timeout:g} s ({last or '/readyz does not answer'})"


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
        # Inputs, masks and overlays: in the state directory, unless SEGSERVE_BLOB_URL names a bucket.
        "SEGSERVE_BLOB_URL": os.environ.get("SEGSERVE_BLOB_URL") or str(home / "blobs"),
        "PYTHONUNBUFFERED": "1",
    }
    keyless = not (settings.api_keys.strip(",") or settings.api_keys_file)
    if keyless and not settings.allow_anonymous_remote and not loopback(host):
        print(
            f"no API keys: callers from other hosts than this one get 403 anonymous_remote on {host}; set "
            "SEGSERVE_API_KEYS (or SEGSERVE_ALLOW_ANONYMOUS_REMOTE=true on a trusted network)",
            flush=True,
        )
    children = stack(settings, home, store, model, workers, host, port)
    supervisor = Supervisor(children, env, home / "logs")
    interrupted = supervisor.stopping  # set by Ctrl-C (SIGINT) or SIGTERM, and by stop()

    def on_signal(signum: int, frame: object) -> None:
        interrupted.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    try:
        for child in children:
            supervisor.start(child)
        failure = wait_ready(url, supervisor)
        if failure and not interrupted.is_set():
            print(f"segserve did not become ready: {failure}; logs in {supervisor.log_dir}", flush=True)
            return 1
        if not interrupted.is_set():
            print(
                f"\n  segserve is ready: {url}   (API docs: {url}/docs; Ctrl-C stops everything)\n",
                flush=True,
            )
        while not interrupted.is_set():
            if failure := supervisor.tend():
                print(f"{failure}; stopping the stack", flush=True)
                return 1
            interrupted.wait(0.5)
        return 0
    finally:
        print("stopping …", flush=True)
        supervisor.stop()
        print("stopped", flush=True)
