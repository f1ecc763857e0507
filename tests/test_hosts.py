"""Many hosts on one machine: each host is a Linux network namespace with its own loopback, its own host name
and one address on a shared bridge, so Redis, TorchServe, the workers and the gateway talk over a network,
and a host can vanish from it. The runner has an address on the bridge too: it submits to the gateway and
receives the webhooks there.

Needs root (iproute2's `ip netns`); skipped, saying why, where namespaces cannot be made.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from standardwebhooks import Webhook

from gateway.client import Client, SegserveError
from tests.harness.images import encode, scene
from tests.harness.processes import BIN, ROOT, spawn, wait_until
from tests.harness.receiver import Received, Receiver
from tests.harness.servers import WEBHOOK_SECRET
from tests.test_sentinel import MASTER, primary_address, sentinel_config

REDIS_PORT, SENTINEL_PORT, GATEWAY_PORT = 6379, 26379, 8000
# The model sees every image with its short side at 520 pixels: square pictures cost the least. A few seeds,
# so that masks differ.
IMAGES = [encode(scene(64, 64, seed=seed)) for seed in range(5)]
LOCK = Path("/tmp/segserve-test-hosts.lock")  # held while a run picks its subnet, so two runs pick two
JobObject = dict[str, Any]


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2, util-linux)"
    probe = f"segserve-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def clean_environment(**settings: str) -> dict[str, str]:
    """This process's environment without any SEGSERVE_ or TS_ setting of its own, plus ``settings``
    (``redis_url="..."`` becomes ``SEGSERVE_REDIS_URL``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEGSERVE_", "TS_"))}
    env.update({f"SEGSERVE_{name.upper()}": value for name, value in settings.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Host:
    """A network namespace with ``address`` on the bridge; ``veth`` is its cable's end at the bridge.

    Its processes run under its own host name (a UTS namespace each), which ``/etc/netns/<netns>/hosts``
    resolves, as ``ip netns exec`` puts that file in place of /etc/hosts for them."""

    name: str
    netns: str
    address: str
    veth: str
    directory: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def command(self, *argv: str) -> list[str]:
        # `ip netns exec` and `unshare` exec, and so does the shell: the process started is argv's own.
        naming = 'hostname "$0" && exec "$@"'
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", naming, self.name, *argv]

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*argv), capture_output=True, text=True, timeout=timeout)

    def spawn(
        self, label: str, argv: list[str], env: dict[str, str], cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside this host, in a process group of its own, its output in ``log(label)``."""
        process = spawn(self.command(*argv), self.log(label), env=env, cwd=cwd or self.directory)
        self.processes[label] = process
        return process

    def log(self, label: str) -> Path:
        return self.directory / f"{label}.log"

    def read_log(self, label: str) -> str:
        """What the process wrote so far ("" when it never started)."""
        path = self.log(label)
        return path.read_text(errors="replace") if path.exists() else ""

    def pids(self) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True)
        return [int(pid) for pid in listed.stdout.split()]

    def kill(self) -> None:
        """SIGKILL every process inside the host, those its processes started included."""
        for _ in range(100):  # a parent killed mid-fork may leave a child born after the listing
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)

    def down(self) -> None:
        """The host vanishes: its cable is pulled first (no goodbye reaches anyone), then it loses power."""
        ip("link", "set", self.veth, "down")
        self.kill()


class Network:
    """A bridge on a private /24 of its own, the runner at .1 on it, and hosts joined to it by veth pairs.
    Every name carries a per-run suffix, so runs side by side (and leftovers of a killed run) never meet."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.suffix = secrets.token_hex(3)
        self.bridge = f"sgb{self.suffix}"
        self.hosts: list[Host] = []
        self.prefix = ""
        try:
            with LOCK.open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self.prefix = self.free_prefix()
                ip("link", "add", self.bridge, "type", "bridge")
                ip("addr", "add", f"{self.runner_address}/24", "dev", self.bridge)
                ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def free_prefix() -> str:
        """10.213.N with no address of this machine in it."""
        used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        for n in range(256):
            if f" 10.213.{n}." not in used:
                return f"10.213.{n}"
        raise RuntimeError("every 10.213.N.0/24 is in use")

    @property
    def runner_address(self) -> str:
        return f"{self.prefix}.1"

    def add(self, name: str) -> Host:
        """A new host: its own namespace, loopback up, one address on the bridge, its name resolvable."""
        number = len(self.hosts) + 2
        host = Host(
            name=name,
            netns=f"segserve-{self.suffix}-{name}",
            address=f"{self.prefix}.{number}",
            veth=f"sg{self.suffix}h{number}",
            directory=self.directory / name,
        )
        host.directory.mkdir()
        self.hosts.append(host)  # before it exists, so close() removes whatever part of it was made
        hosts_file = Path("/etc/netns") / host.netns / "hosts"
        hosts_file.parent.mkdir(parents=True)
        hosts_file.write_text(f"127.0.0.1 localhost\n{host.address} {host.name}\n")
        ip("netns", "add", host.netns)
        ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        ip("link", "set", host.veth, "master", self.bridge, "up")
        ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.netns, "link", "set", "eth0", "up")
        ip("-n", host.netns, "link", "set", "lo", "up")  # 127.0.0.1 inside is the host's own
        return host

    def close(self) -> None:
        for host in reversed(self.hosts):
            host.kill()
            for args in (("netns", "del", host.netns), ("link", "del", host.veth)):
                subprocess.run(["ip", *args], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / host.netns, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def tails(self, lines: int = 25) -> str:
        parts = []
        for host in self.hosts:
            for log in sorted(host.directory.glob("*.log")):
                tail = [line[:300] for line in log.read_text(errors="replace").splitlines()[-lines:]]
                parts.append(f"----- {host.name} ({host.address}) {log.name} -----\n" + "\n".join(tail))
        return "\n".join(parts)

    @contextlib.contextmanager
    def explained(self) -> Iterator[None]:
        """On failure, print the tail of every process's log, so the report says what each host saw."""
        try:
            yield
        except BaseException:
            print(self.tails())
            raise


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    net = Network(tmp_path)
    try:
        yield net
    finally:
        net.close()


# What runs on the hosts.


def start_redis(host: Host, *options: str) -> None:
    """redis-server on the host's bridge address, with the AOF on as the session's Redis has it."""
    host.spawn(
        "redis",
        ["redis-server", "--port", str(REDIS_PORT), "--bind", host.address, "--dir", str(host.directory),
         "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no", *options],
        clean_environment(),
    )  # fmt: skip
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
        [str(BIN / "torchserve"), "--start", "--foreground", "--ncs", "--ts-config", "config.properties",
         "--model-store", str(model_store), "--models", "deeplabv3=deeplabv3.mar"],
        {**clean_environment(), "LOG_LOCATION": str(directory / "logs"), "TMPDIR": str(directory)},
        cwd=directory,
    )  # fmt: skip
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
        [str(BIN / "uvicorn"), "gateway.app:app", "--host", host.address, "--port", str(GATEWAY_PORT),
         "--log-level", "warning"],
        clean_environment(**settings),
    )  # fmt: skip
    url = f"http://{host.address}:{GATEWAY_PORT}"
    wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, 60, "the gateway")
    return url


def live_workers(url: str) -> set[tuple[str, int]]:
    """(host, pid) of each worker whose heartbeat the gateway sees."""
    workers = httpx.get(f"{url}/v1/queue", timeout=5).json()["workers"]
    return {(worker["host"], int(worker["pid"])) for worker in workers}


def get_jobs(url: str, ids: list[str]) -> dict[str, JobObject]:
    def some(chunk: list[str]) -> list[JobObject]:
        with httpx.Client(base_url=url, timeout=30) as client:
            return [client.get(f"/v1/jobs/{job_id}").raise_for_status().json() for job_id in chunk]

    with ThreadPoolExecutor(8) as pool:
        chunks = pool.map(some, [ids[n::8] for n in range(8)])
    return {job["id"]: job for chunk in chunks for job in chunk}


# What the workers' logs say. arq writes one line as it starts a try (→) and one as the try ends: done (←),
# to be tried again (↻), failed (!) or aborted (⊘).
TRY_LINE = re.compile(r"([→←↻!⊘]) (j_[0-9a-f]+):segment")


def tries(log_text: str) -> list[tuple[str, str]]:
    return TRY_LINE.findall(log_text)


def marked(log_text: str, mark: str) -> set[str]:
    return {job_id for seen, job_id in tries(log_text) if seen == mark}


def started_not_ended(log_text: str) -> set[str]:
    """Jobs whose last try in this log started and never ended: what the worker was running when it died."""
    running: set[str] = set()
    for mark, job_id in tries(log_text):
        if mark == "→":
            running.add(job_id)
        else:
            running.discard(job_id)
    return running


# Test 1: a worker host goes down.


@dataclass
class TwoWorkerHosts:
    """Redis on one host, TorchServe and a worker on each of two more, the gateway on a fourth."""

    store: Host
    a: Host
    b: Host
    url: str
    workers: dict[str, int]  # host -> its worker's pid


def start_two_worker_hosts(network: Network, model_store: Path) -> TwoWorkerHosts:
    store, a, b, gateway = (network.add(name) for name in ("redis", "worker-a", "worker-b", "gateway"))
    start_redis(store)
    key_files = {host.name: start_torchserve(host, model_store) for host in (a, b)}  # both start at once
    for host in (a, b):
        wait_for_torchserve(host, key_files[host.name])
    common = {
        "redis_url": f"redis://{store.address}:{REDIS_PORT}/0",
        "webhook_secret": WEBHOOK_SECRET,
        "allowed_url_hosts": network.runner_address,  # the runner's receiver, on a private address
    }
    workers = {
        host.name: start_worker(
            host, key_files[host.name], **common,
            # Four in flight (one batch computing, one waiting) keeps TorchServe's own queue short.
            worker_concurrency="4", max_attempts="20", retry_delay="0.2", retry_max_delay="1",
            # A delivery that A leased is free again 10 s after its longest attempt could have ended.
            url_timeout="3", webhook_retry_delay="0.2",
        ).pid
        for host in (a, b)
    }  # fmt: skip
    url = start_gateway(gateway, **common)
    wait_until(lambda: live_workers(url) == set(workers.items()), 60, "both workers' heartbeats")
    return TwoWorkerHosts(store, a, b, url, workers)


def submit_all(url: str, count: int, webhook: str) -> list[str]:
    """``count`` submissions from 16 clients at once; each must be accepted."""

    def some(numbers: list[int]) -> list[httpx.Response]:
        with httpx.Client(base_url=url, timeout=60) as client:
            return [
                client.post(
                    "/v1/jobs",
                    params={"webhook": webhook},
                    content=IMAGES[n % len(IMAGES)],
                    headers={"Content-Type": "image/jpeg"},
                )
                for n in numbers
            ]

    with ThreadPoolExecutor(16) as pool:
        answers = [
            r for chunk in pool.map(some, [list(range(n, count, 16)) for n in range(16)]) for r in chunk
        ]
    refused = [r.text for r in answers if r.status_code != 202]
    assert not refused, refused[:3]
    ids = [r.json()["id"] for r in answers]
    assert len(set(ids)) == count
    return ids


class CompletionEvents:
    """A receiver of the jobs' webhooks on the runner's bridge address, verifying each as it arrives (a
    signature's timestamp is good for 5 minutes; the run may take longer)."""

    def __init__(self, address: str, signing_key: str) -> None:
        self.key = Webhook(signing_key)
        self.by_job: dict[str, list[Received]] = {}
        self.receiver = Receiver(host=address)
        self.receiver.answer = self.verify_on_arrival
        self.url = f"{self.receiver.url}/hooks"

    def verify_on_arrival(self, n: int, delivery: Received) -> tuple[int, dict[str, str], bytes, float]:
        event = self.key.verify(
            delivery.body, delivery.headers
        )  # raises on a forged one: the answer is a 500
        self.by_job.setdefault(event["data"]["id"], []).append(delivery)
        return 204, {}, b"", 0.0

    def close(self) -> None:
        self.receiver.close()


def assert_each_ended_once(
    jobs: dict[str, JobObject], again: dict[str, JobObject], events: CompletionEvents, stats: dict[str, str]
) -> None:
    """Every job succeeded, and ended once: the store counted one completion per job; each job's completion
    event went out under one webhook-id (repeats of a delivery share it) and says what the API says; and
    nothing changed a second later."""
    assert Counter(job["status"] for job in jobs.values()) == {"succeeded": len(jobs)}, [
        job for job in jobs.values() if job["status"] != "succeeded"
    ][:3]
    assert all((job["result"]["width"], job["result"]["height"]) == (64, 64) for job in jobs.values())
    assert stats.get("finished:succeeded") == str(len(jobs)) and "finished:failed" not in stats, stats
    assert set(events.by_job) == set(jobs), "completion events of jobs nobody submitted"
    for job_id, job in jobs.items():
        recorded = job["webhook"]["deliveries"]["job.completed"]
        assert recorded["state"] == "delivered", (job_id, recorded)
        deliveries = events.by_job[job_id]
        assert {d.headers["webhook-id"] for d in deliveries} == {recorded["id"]}, (job_id, recorded)
        for delivery in deliveries:
            event = json.loads(delivery.body)
            assert event["type"] == "job.completed" and event["data"]["status"] == "succeeded", event
            assert event["data"]["finished_at"] == job["finished_at"], (event, job)
        assert again[job_id]["finished_at"] == job["finished_at"], f"{job_id} ended a second time"


def assert_b_took_over(
    hosts: TwoWorkerHosts, b_log_at_kill: int, jobs: dict[str, JobObject]
) -> tuple[set[str], set[str], set[str]]:
    """From the workers' own logs: A finished jobs before it went down and was running some when it did;
    those came back through arq once their in-progress keys expired, and B ran them to the end. Returns
    (finished by A, running on A when it went down, finished by B after)."""
    a, b = hosts.a, hosts.b
    a_log, b_log = a.read_log("worker"), b.read_log("worker")
    b_after_kill = b_log.encode()[b_log_at_kill:].decode(errors="replace")
    a_finished, interrupted = marked(a_log, "←"), started_not_ended(a_log)
    b_finished_after = marked(b_after_kill, "←")
    assert a_finished, f"{a.name} finished no job before it went down"
    assert interrupted, f"{a.name} was running no job when it went down: the kill proved nothing"
    assert b_finished_after, f"{b.name} finished no job after {a.name} went down"
    assert a_finished | marked(b_log, "←") == set(jobs), "jobs that ended with no worker saying so"
    assert interrupted <= marked(b_after_kill, "→") & b_finished_after, interrupted - b_finished_after
    # Every try the store counted is one a worker logged, and the other way round, but for the jobs that arq
    # gave B again after A died: A's last try may have died before the store heard of it, or after the job
    # ended but before arq heard of that (B's try then finds it ended and counts nothing).
    logged = Counter(job_id for mark, job_id in tries(a_log + b_log) if mark == "→")
    run_again = marked(a_log, "→") & marked(b_after_kill, "→")
    for job_id, job in jobs.items():
        if job_id in run_again:
            assert 1 <= job["attempts"] <= logged[job_id], (job_id, job["attempts"], logged[job_id])
        else:
            assert job["attempts"] == logged[job_id], (job_id, job["attempts"], logged[job_id])
    return a_finished, interrupted, b_finished_after


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 500 inferences on a shared 2-core CPU; the deadlines inside hold at half speed
def test_a_worker_host_goes_down_mid_run_and_the_live_one_takes_over(
    network: Network, model_store: Path
) -> None:
    """Redis on one host; TorchServe with a worker on two others; the gateway on a fourth. 500 jobs are
    submitted, and once 100 have ended, worker host A goes down (link pulled, every process SIGKILLed).
    Every job ends exactly once, succeeded, and host B finishes what A was running."""
    total, ended_before_kill = 500, 100
    with network.explained():
        hosts = start_two_worker_hosts(network, model_store)
        a, b, url = hosts.a, hosts.b, hosts.url
        events = CompletionEvents(
            network.runner_address, httpx.get(f"{url}/v1/webhooks/secret").json()["key"]
        )
        try:
            began = time.monotonic()
            ids = submit_all(url, total, events.url)
            wait_until(
                lambda: len(events.by_job) >= ended_before_kill and marked(a.read_log("worker"), "←"),
                600, f"{ended_before_kill} jobs to end, some on {a.name}",
            )  # fmt: skip
            b_log_at_kill, ended_at_kill = len(b.read_log("worker").encode()), len(events.by_job)
            a.down()
            killed_at = time.monotonic()
            wait_for_every_end(events, total, hosts)
            jobs = wait_until(
                lambda: all_delivered(get_jobs(url, ids)), 120, "every delivery recorded (none to send again)"
            )
            took = time.monotonic() - began
            time.sleep(1)
            again = get_jobs(url, ids)
        finally:
            events.close()
        with redis_client(hosts.store) as client:
            stats = {k.decode(): v.decode() for k, v in client.hgetall("segserve:stats").items()}
        assert_each_ended_once(jobs, again, events, stats)
        a_finished, interrupted, b_finished = assert_b_took_over(hosts, b_log_at_kill, jobs)
        # The gateway sees the live host's worker only, once A's heartbeat has lapsed.
        wait_until(lambda: live_workers(url) == {(b.name, hosts.workers[b.name])}, 60, f"{b.name} alone")
        print(
            f"{total} jobs in {took:.0f} s; {a.name} went down after {ended_at_kill} had ended "
            f"({len(a_finished)} by {a.name}) while running {len(interrupted)}; {b.name} finished "
            f"{len(b_finished)} after it, the last {time.monotonic() - killed_at:.0f} s after the kill"
        )


def wait_for_every_end(events: CompletionEvents, total: int, hosts: TwoWorkerHosts) -> None:
    try:
        wait_until(lambda: len(events.by_job) == total, 600, f"all {total} jobs' completion events")
    except TimeoutError as exc:
        b_finished = len(marked(hosts.b.read_log("worker"), "←"))
        raise AssertionError(
            f"{total - len(events.by_job)} of {total} jobs never ended after {hosts.a.name} went down; "
            f"{hosts.b.name}'s worker finished {b_finished} tries in all"
        ) from exc


def all_delivered(jobs: dict[str, JobObject]) -> dict[str, JobObject] | None:
    done = all(job["webhook"]["deliveries"]["job.completed"]["state"] == "delivered" for job in jobs.values())
    return jobs if done else None


# Test 2: the Redis primary is killed.


def start_replicated_redis(network: Network) -> list[Host]:
    """A primary and two replicas (so that one is left to confirm writes after a failover), a sentinel beside
    each; returns the three hosts, the primary first, once the sentinels know each other and the replicas."""
    hosts = [network.add(name) for name in ("redis-1", "redis-2", "redis-3")]
    primary, *replicas = hosts
    start_redis(primary)
    for replica in replicas:
        start_redis(replica, "--replicaof", primary.address, str(REDIS_PORT))

    def replicas_online() -> bool:
        with redis_client(primary) as client:
            info = client.info("replication")
        return sum(info.get(f"slave{n}", {}).get("state") == "online" for n in range(2)) == 2

    wait_until(replicas_online, 60, "both replicas in sync")
    for host in hosts:
        start_sentinel(host, primary)

    def sentinels_agree() -> bool:
        for host in hosts:
            with redis_client(host, SENTINEL_PORT) as sentinel:
                state = sentinel.sentinel_master(MASTER)
            if (state["num-other-sentinels"], state["num-slaves"]) != (2, 2):
                return False
        return True

    # Sentinels find each other through the primary; a failover needs a quorum that knows the others.
    wait_until(sentinels_agree, 60, "three sentinels that know each other and both replicas")
    return hosts


class Load:
    """Clients submitting steadily (each one job per ``every`` seconds, about what one CPU host computes, so
    the queue stays short), counting what was accepted (202) and what was refused."""

    def __init__(self, url: str, clients: int = 4, every: float = 2.0) -> None:
        self.url = url
        self.every = every
        self.accepted: list[str] = []
        self.refused: list[SegserveError] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.submit, args=(n,)) for n in range(clients)]
        for thread in self.threads:
            thread.start()

    def submit(self, n: int) -> None:
        with Client(self.url, retries=0) as client:
            while not self.stop.is_set():
                try:
                    self.accepted.append(client.submit(IMAGES[n % len(IMAGES)])["id"])
                except SegserveError as exc:  # a client would try again; this one counts it
                    self.refused.append(exc)
                self.stop.wait(self.every)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


@pytest.mark.slow
def test_the_redis_primary_killed_under_load_loses_no_accepted_job(
    network: Network, model_store: Path
) -> None:
    """Redis's primary on one host, a replica on each of two more, a sentinel beside each; TorchServe and a
    worker on a fourth host, the gateway on a fifth, both finding the primary through the sentinels. The
    primary's redis-server is SIGKILLed under load: Sentinel promotes a replica, submissions meanwhile may
    answer 503, and every job answered 202 succeeds."""
    with network.explained():
        primary, *replicas = redis_hosts = start_replicated_redis(network)
        worker_host, gateway = network.add("worker"), network.add("gateway")
        key_file = start_torchserve(worker_host, model_store)
        wait_for_torchserve(worker_host, key_file)
        # The URL names the first primary: only its database may be used, so following it would be a bug.
        common = {
            "redis_url": f"redis://{primary.address}:{REDIS_PORT}/0",
            "redis_sentinels": ",".join(f"{host.address}:{SENTINEL_PORT}" for host in redis_hosts),
            "redis_sentinel_master": MASTER,
        }
        worker = start_worker(worker_host, key_file, max_attempts="50", **common)
        url = start_gateway(gateway, redis_min_replicas="1", **common)  # a 202 means a replica has the job
        wait_until(
            lambda: live_workers(url) == {(worker_host.name, worker.pid)}, 60, "the worker's heartbeat"
        )

        load = Load(url)
        try:
            wait_until(lambda: len(load.accepted) >= 30, 300, "jobs accepted before the failover")
            os.kill(primary.processes["redis"].pid, signal.SIGKILL)
            wait_until(
                lambda: primary_address(replicas[0].address, SENTINEL_PORT)[0] != primary.address,
                120, "Sentinel to promote a replica",
            )  # fmt: skip
            promoted = primary_address(replicas[0].address, SENTINEL_PORT)[0]
            count = len(load.accepted)
            wait_until(lambda: len(load.accepted) >= count + 30, 300, "jobs accepted after the failover")
        finally:
            load.close()

        assert promoted in {replica.address for replica in replicas}
        not_503 = [str(exc) for exc in load.refused if exc.status != 503]
        assert not not_503, not_503[:3]
        with Client(url) as client:
            deadline = time.monotonic() + 600
            ended = {
                job_id: client.wait(job_id, max_seconds=max(1, deadline - time.monotonic()))
                for job_id in load.accepted
            }
        assert Counter(job["status"] for job in ended.values()) == {"succeeded": len(ended)}, [
            job for job in ended.values() if job["status"] != "succeeded"
        ][:3]
        time.sleep(1)
        again = get_jobs(url, load.accepted)
        assert all(again[job_id]["finished_at"] == job["finished_at"] for job_id, job in ended.items())
        codes = Counter(exc.code for exc in load.refused)
        print(
            f"{len(ended)} accepted ({count} before the failover), all succeeded once; "
            f"{len(load.refused)} refused with 503 meanwhile {dict(codes)}"
        )
