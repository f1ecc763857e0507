"""Break real processes with jobs in flight; afterwards every accepted job has exactly one final state.

Each test runs its own gateway and workers on a Redis database of its own, beside the session's stack,
and puts back whatever shared process (Redis, TorchServe) it breaks.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass

import httpx
import psutil

from gateway.client import Client
from gateway.settings import Settings
from tests.harness.images import encode, scene
from tests.harness.processes import free_port, stop_process, wait_until
from tests.harness.receiver import Receiver
from tests.harness.servers import Stack, isolated_env

SMALL = encode(scene(64, 48))


def submit_many(url: str, n: int) -> list[str]:
    with httpx.Client(base_url=url, timeout=30) as client:
        return [
            client.post("/v1/jobs", content=SMALL, headers={"Content-Type": "image/jpeg"}).json()["id"]
            for _ in range(n)
        ]


def final_states(url: str, ids: list[str], within: float) -> dict[str, dict]:  # type: ignore[type-arg]
    with Client(url) as client:
        deadline = time.monotonic() + within
        return {
            job_id: client.wait(job_id, max_seconds=max(1, deadline - time.monotonic())) for job_id in ids
        }


def assert_all_succeeded_once(url: str, ids: list[str], within: float = 240) -> dict[str, dict]:  # type: ignore[type-arg]
    jobs = final_states(url, ids, within)
    assert {j["status"] for j in jobs.values()} == {"succeeded"}, [
        j for j in jobs.values() if j["status"] != "succeeded"
    ]
    time.sleep(1)
    again = final_states(url, ids, 5)
    for job_id in ids:  # nothing ran a second time behind our back
        assert again[job_id]["finished_at"] == jobs[job_id]["finished_at"]
    return jobs


def test_sigkill_worker_mid_job(isolated: Stack) -> None:
    ids = submit_many(isolated.url, 4)
    running = wait_until(
        lambda: next(
            (i for i in ids if httpx.get(f"{isolated.url}/v1/jobs/{i}").json()["status"] == "running"), None
        ),
        30,
        "a running job",
        interval=0.01,
    )
    stop_process(isolated.workers[0], signal.SIGKILL)
    isolated.start_worker()
    # arq runs the killed try again once its in-progress key expires: job timeout (25 s) + 10 s later.
    jobs = assert_all_succeeded_once(isolated.url, ids, within=240)
    assert jobs[running]["attempts"] == 2


def test_torchserve_outage_then_recovery(isolated: Stack, stack: Stack) -> None:
    ids = submit_many(isolated.url, 5)
    stack.torchserve.stop()
    try:
        ids += submit_many(isolated.url, 3)
        # Still ready to accept jobs (they wait), once the worker's heartbeat has said TorchServe is down.
        down = wait_until(
            lambda: (r := httpx.get(f"{isolated.url}/readyz")).json()["checks"]["torchserve"] != "ok" and r,
            15,
            "/readyz to name TorchServe",
        )
        assert down.status_code == 200 and down.json()["status"] == "degraded"
        assert down.json()["checks"]["torchserve"].startswith("down")
        time.sleep(20)
        states = {httpx.get(f"{isolated.url}/v1/jobs/{i}").json()["status"] for i in ids[5:]}
        assert states <= {"queued", "running"}
    finally:
        stack.torchserve.start()  # with new tokens: the workers must pick them up
    assert_all_succeeded_once(isolated.url, ids)
    wait_until(lambda: httpx.get(f"{isolated.url}/readyz").json()["status"] == "ready", 15, "ready again")


def test_backend_unavailable_past_the_retry_bound(stack: Stack) -> None:
    env = isolated_env(stack, SEGSERVE_TORCHSERVE_URL="http://127.0.0.1:9", SEGSERVE_MAX_ATTEMPTS="3")
    nowhere = Stack(stack.redis, stack.torchserve, env, log_dir=stack.log_dir)
    nowhere.start_gateway()
    nowhere.start_worker()
    try:
        with Client(nowhere.url) as client:
            job = client.segment(SMALL)
        assert job["status"] == "failed" and job["error"]["code"] == "backend_unavailable"
        assert job["attempts"] == 3
    finally:
        nowhere.stop()


def test_redis_restart_keeps_queued_jobs_and_results(isolated: Stack, stack: Stack) -> None:
    done = submit_many(isolated.url, 2)
    finished = assert_all_succeeded_once(isolated.url, done)
    stop_process(isolated.workers.pop())  # nothing takes the next jobs: they stay queued
    queued = submit_many(isolated.url, 3)
    stack.redis.stop()
    stack.redis.start()
    with Client(isolated.url) as client:
        for job_id in done:
            assert client.get(job_id)["result"] == finished[job_id]["result"]
            assert client.mask(job_id).startswith(b"\x89PNG")
        assert {client.get(i)["status"] for i in queued} == {"queued"}
    isolated.start_worker()
    assert_all_succeeded_once(isolated.url, queued)
    # The session's gateway rode out the restart. Its worker may have exited: arq's loop has no retry
    # around its WATCH transactions, so `segserve up` and compose.yaml start workers again; do the same.
    if stack.workers[-1].poll() is not None:
        stack.start_worker()
    with Client(stack.url) as client:
        assert client.segment(SMALL)["status"] == "succeeded"


def test_gateway_restart_while_clients_poll(isolated: Stack) -> None:
    ids = submit_many(isolated.url, 6)
    results: dict[str, str] = {}

    def poll(job_id: str) -> None:
        with Client(isolated.url, retries=20) as client:
            results[job_id] = client.wait(job_id, max_seconds=120)["status"]

    threads = [threading.Thread(target=poll, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    time.sleep(0.5)
    port = isolated.port
    assert isolated.gateway is not None
    stop_process(isolated.gateway)
    time.sleep(1)
    isolated.start_gateway(port=port)
    for t in threads:
        t.join(timeout=150)
    assert results == dict.fromkeys(ids, "succeeded")


def test_killing_torchserves_backend_mid_batch(isolated: Stack, stack: Stack) -> None:
    assert stack.torchserve.process is not None
    backends = [
        p
        for p in psutil.Process(stack.torchserve.process.pid).children(recursive=True)
        if "model_service_worker" in " ".join(p.cmdline())
    ]
    assert backends
    ids = submit_many(isolated.url, 6)
    wait_until(
        lambda: any(httpx.get(f"{isolated.url}/v1/jobs/{i}").json()["status"] == "running" for i in ids),
        30,
        "a job in TorchServe",
        interval=0.01,
    )
    time.sleep(0.1)
    for backend in backends:
        backend.send_signal(signal.SIGKILL)
    jobs = assert_all_succeeded_once(isolated.url, ids, within=240)
    assert max(j["attempts"] for j in jobs.values()) >= 2, "no job was hit by the kill"
    wait_until(lambda: stack.torchserve.ready_workers() >= 1, 120, "TorchServe's worker back")


def test_webhooks_outlive_a_receiver_down_and_killed_processes(isolated: Stack) -> None:
    """The receiver is down for 12 s; meanwhile the worker is killed (SIGKILL) and the gateway restarted.
    Once it is up, every event arrives, once, and each job's start before its end."""
    down_since = time.monotonic()
    port = free_port()  # nothing listens here yet: every attempt is refused
    query = {"webhook": f"http://127.0.0.1:{port}/hook", "webhook_events_filter": "start,completed"}
    with httpx.Client(base_url=isolated.url, timeout=30) as client:
        ids = [
            client.post(
                "/v1/jobs", params=query, content=SMALL, headers={"Content-Type": "image/jpeg"}
            ).json()["id"]
            for _ in range(6)
        ]
    assert_all_succeeded_once(isolated.url, ids)
    stop_process(isolated.workers.pop(), signal.SIGKILL)
    isolated.start_worker()
    assert isolated.gateway is not None
    stop_process(isolated.gateway)
    isolated.start_gateway(isolated.port)
    time.sleep(max(0.0, 12 - (time.monotonic() - down_since)))
    receiver = Receiver(port)
    try:
        wait_until(lambda: len(receiver.received) >= 12, 120, "every event, once the receiver is up")
        time.sleep(1)  # anything more would arrive now
        kinds: dict[str, list[str]] = {}
        for delivery in receiver.received:
            event = json.loads(delivery.body)
            kinds.setdefault(event["data"]["id"], []).append(event["type"])
        assert kinds == {job_id: ["job.started", "job.completed"] for job_id in ids}
        with Client(isolated.url) as client:
            for job_id in ids:
                deliveries = client.get(job_id)["webhook"]["deliveries"]
                assert {d["state"] for d in deliveries.values()} == {"delivered"}, deliveries
                # The start was tried while the receiver was down; the end waited for it, in order.
                assert deliveries["job.started"]["attempts"] > 1, deliveries
    finally:
        receiver.close()


@dataclass(frozen=True)
class Answer:
    sent: float  # time.monotonic() when it was sent
    seconds: float  # until it was answered
    response: httpx.Response


def steady_load(url: str, answers: list[Answer], done: threading.Event) -> None:
    """Submissions one after another, five a second, until ``done``."""
    with httpx.Client(base_url=url, timeout=60) as client:
        while not done.is_set():
            sent = time.monotonic()
            response = client.post("/v1/jobs", content=SMALL, headers={"Content-Type": "image/jpeg"})
            answers.append(Answer(sent, time.monotonic() - sent, response))
            time.sleep(0.2)


def test_a_frozen_redis_gets_fast_503s_and_every_accepted_job_succeeds(isolated: Stack, stack: Stack) -> None:
    """Redis stopped with SIGSTOP (it holds its connections and answers nothing, as a vanished host does)
    under a steady load: every submission meanwhile is answered within the deadline, with a 503 that says
    when to come back, and the gateway takes jobs again by itself once Redis thaws."""
    bound = Settings().redis_timeout + 5  # the deadline, and slack for a slow machine
    answers: list[Answer] = []
    done = threading.Event()
    loader = threading.Thread(target=steady_load, args=(isolated.url, answers, done))
    loader.start()
    redis = psutil.Process(stack.redis.process.pid)  # type: ignore[union-attr]
    try:
        time.sleep(1)
        redis.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        time.sleep(15)
    finally:
        redis.send_signal(signal.SIGCONT)
    thawed = time.monotonic()
    try:
        wait_until(lambda: answers[-1].sent > thawed and answers[-1].response.status_code == 202, 30, "a 202")
    finally:
        done.set()
        loader.join()
    recovered = next(a.sent + a.seconds for a in answers if a.sent > thawed and a.response.status_code == 202)
    during = [a for a in answers if frozen <= a.sent < thawed]
    refused = [a.response for a in during if a.response.status_code == 503]
    assert refused, "submissions met the frozen Redis"
    assert {r.json()["code"] for r in refused} == {"redis_unavailable"}
    assert all(r.headers["Retry-After"].isdigit() for r in refused)
    assert {a.response.status_code for a in answers} <= {202, 503}
    slowest = max(a.seconds for a in during)
    assert slowest < bound, (slowest, bound)
    print(
        f"frozen 15 s: {len(during)} submissions, {len(refused)} answered 503, slowest {slowest:.2f} s;"
        f" 202 again {recovered - thawed:.2f} s after the thaw"
    )
    accepted = [a.response.json()["id"] for a in answers if a.response.status_code == 202]
    assert_all_succeeded_once(isolated.url, accepted)
