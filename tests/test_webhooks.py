"""Webhooks, image URLs and the URL guard, against a real Redis and real HTTP receivers on loopback.

The deliverer runs here in-process, as each worker runs it; jobs move through their states with the job
store, as workers move them. Nothing here sends a packet beyond loopback: refused URLs are refused before
any connection."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import gzip
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from starlette.testclient import TestClient

from gateway import urls
from gateway.jobs import Job, JobStatus, JobStore, Outcome, Result
from gateway.jobs.connection import stop
from gateway.settings import Settings
from gateway.tenants import load as load_tenants
from gateway.webhooks import signing_key
from gateway.worker.deliveries import OWNER_SHARE, Deliverer
from tests.harness.images import encode, scene
from tests.harness.jobs import submit as submit_image
from tests.harness.processes import eventually, free_port
from tests.harness.receiver import Receiver
from tests.harness.servers import WEBHOOK_SECRET, RedisServer

IMAGE = encode(scene(32, 24))
RESULT = Result(32, 24, [{"id": 0, "name": "__background__", "pixels": 768, "fraction": 1.0}])
SETTINGS = Settings(
    webhook_secret=WEBHOOK_SECRET, webhook_retry_delay=0.2, allowed_url_hosts="127.0.0.1", url_timeout=1.0
)


@pytest.fixture
async def deliverer(store: JobStore) -> AsyncIterator[Deliverer]:
    running = Deliverer(store, SETTINGS)
    task = asyncio.create_task(running.run())
    yield running
    await stop(task)


async def submit(store: JobStore, url: str, events: tuple[str, ...] = ("completed",), owner: str = "") -> Job:
    return await submit_image(store, IMAGE, owner, webhook=url, webhook_events=events)


async def run_to_the_end(store: JobStore, job: Job) -> None:
    """A worker's try, start to end, and arq's bookkeeping around it."""
    await store.redis.set(in_progress_key_prefix + job.id, b"1")
    started = await store.start(job.id, deadline_ms=4e12)
    assert started is not None
    await store.complete(started, Outcome.succeeded(RESULT, b"PNG", {}))
    await store.redis.delete(in_progress_key_prefix + job.id, job_key_prefix + job.id)
    await store.redis.zrem("arq:queue", job.id)


async def delivered(
    store: JobStore, job_id: str, kind: str, owner: str = "", state: str = "delivered"
) -> dict:  # type: ignore[type-arg]
    """The job's delivery of ``kind`` once it has reached ``state``, as the job object shows it."""
    deadline, last = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        job = await store.load(job_id, owner)
        last = job.deliveries.get(kind) if job else None
        if last and last["state"] == state:
            return last  # type: ignore[no-any-return]
        await asyncio.sleep(0.05)
    raise AssertionError(f"the {kind} delivery never became {state}; last seen: {last}")


async def test_signed_deliveries_of_start_and_end_in_order(
    store: JobStore, deliverer: Deliverer, receiver: Receiver
) -> None:
    job = await submit(store, receiver.url + "/hook", ("start", "completed"), owner="alice")
    await run_to_the_end(store, job)
    await eventually(lambda: len(receiver.received) >= 2, "two deliveries")
    started, completed = receiver.received[:2]
    alice = Webhook(signing_key(WEBHOOK_SECRET, "alice"))
    events = [alice.verify(r.body, r.headers) for r in (started, completed)]
    assert [e["type"] for e in events] == ["job.started", "job.completed"]
    assert [e["data"]["status"] for e in events] == ["running", "succeeded"]
    assert events[1]["data"]["result"]["width"] == 32 and events[1]["data"]["id"] == job.id
    assert started.headers["webhook-id"] != completed.headers["webhook-id"]
    assert started.path == "/hook" and started.headers["Content-Type"] == "application/json"
    with pytest.raises(WebhookVerificationError):  # another key's secret
        Webhook(signing_key(WEBHOOK_SECRET, "bob")).verify(completed.body, completed.headers)
    changed = bytearray(completed.body)
    changed[10] ^= 1  # one byte
    with pytest.raises(WebhookVerificationError):
        alice.verify(bytes(changed), completed.headers)
    await delivered(store, job.id, "job.completed", owner="alice")
    shown = (await store.load(job.id, "alice")).to_api()  # type: ignore[union-attr]
    assert shown["webhook"]["url"] == receiver.url + "/hook"
    assert shown["webhook"]["events_filter"] == ["start", "completed"]
    deliveries = shown["webhook"]["deliveries"]
    assert {kind: d["state"] for kind, d in deliveries.items()} == {
        "job.started": "delivered",
        "job.completed": "delivered",
    }
    assert deliveries["job.completed"]["id"] == completed.headers["webhook-id"]
    assert len(receiver.received) == 2, "each event once"


async def test_only_the_events_asked_for(store: JobStore, deliverer: Deliverer, receiver: Receiver) -> None:
    job = await submit(store, receiver.url)
    await run_to_the_end(store, job)
    delivery = await delivered(store, job.id, "job.completed")
    assert [json.loads(r.body)["type"] for r in receiver.received] == ["job.completed"]
    assert delivery["last_status"] == 200 and delivery["attempts"] == 1


async def test_each_delivery_checks_the_url_again(store: JobStore, receiver: Receiver) -> None:
    """A host allowed at submission that resolves to a refused address by delivery time (DNS rebinding, or
    the operator's allow list shrank) gets nothing: the delivery fails without a connection."""
    job = await submit(store, receiver.url + "/hook")
    await run_to_the_end(store, job)
    stricter = Deliverer(store, dataclasses.replace(SETTINGS, allowed_url_hosts=""))
    task = asyncio.create_task(stricter.run())
    try:
        delivery = await delivered(store, job.id, "job.completed", state="failed")
    finally:
        await stop(task)
    assert delivery["attempts"] == 1 and delivery["last_status"] is None
    assert receiver.received == [], "a refused URL is never sent to"


async def test_a_500_is_retried_with_growing_delays_under_one_id(
    store: JobStore, deliverer: Deliverer, receiver: Receiver
) -> None:
    receiver.answer = lambda n, request: (500 if n < 3 else 200, {}, b"", 0.0)
    job = await submit(store, receiver.url)
    await run_to_the_end(store, job)
    await eventually(lambda: len(receiver.received) == 4, "four attempts")
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1
    assert len({r.body for r in receiver.received}) == 1  # the same event every time
    gaps = [b.at - a.at for a, b in zip(receiver.received, receiver.received[1:], strict=False)]
    for attempt, gap in enumerate(
        gaps, start=1
    ):  # at least half of delay x 2^(attempt - 1): the jitter's floor
        assert gap >= SETTINGS.webhook_retry_delay * 2 ** (attempt - 1) * 0.5 * 0.95, gaps
    delivery = await delivered(store, job.id, "job.completed")
    assert delivery["attempts"] == 4 and delivery["last_status"] == 200


async def test_retry_after_is_honoured(store: JobStore, deliverer: Deliverer, receiver: Receiver) -> None:
    receiver.answer = lambda n, request: (
        (503, {"Retry-After": "1"}, b"", 0.0) if n == 0 else (204, {}, b"", 0.0)
    )
    await run_to_the_end(store, await submit(store, receiver.url))
    await eventually(lambda: len(receiver.received) == 2, "the second attempt")
    assert receiver.received[1].at - receiver.received[0].at >= 0.95


async def test_410_stops_the_deliveries(store: JobStore, deliverer: Deliverer, receiver: Receiver) -> None:
    receiver.answer = lambda n, request: (410, {}, b"", 0.0)
    job = await submit(store, receiver.url)
    await run_to_the_end(store, job)
    delivery = await delivered(store, job.id, "job.completed", state="failed")
    assert delivery["last_status"] == 410 and delivery["attempts"] == 1
    assert await store.redis.zcard("segserve:deliveries") == 0, "nothing scheduled after a 410"
    assert len(receiver.received) == 1


async def test_a_receiver_that_hangs_is_timed_out_and_tried_again(
    store: JobStore, deliverer: Deliverer, receiver: Receiver
) -> None:
    receiver.answer = lambda n, request: (200, {}, b"", 3.0 if n == 0 else 0.0)  # url_timeout is 1 s
    job = await submit(store, receiver.url)
    await run_to_the_end(store, job)
    await eventually(lambda: len(receiver.received) == 2, "the attempt after the timeout")
    assert receiver.received[0].headers["webhook-id"] == receiver.received[1].headers["webhook-id"]


async def test_every_event_has_its_own_id_and_body(
    store: JobStore, deliverer: Deliverer, receiver: Receiver
) -> None:
    """Failed, retried, canceled: two completions of one job, each its own event for the receiver."""
    job = await submit(store, receiver.url)
    await store.redis.set(in_progress_key_prefix + job.id, b"1")
    started = await store.start(job.id, deadline_ms=4e12)
    assert started is not None
    await store.complete(started, Outcome.failed("invalid_image", "broken"))
    await store.redis.delete(in_progress_key_prefix + job.id, job_key_prefix + job.id)
    await store.redis.zrem("arq:queue", job.id)
    await delivered(store, job.id, "job.completed")
    assert await store.retry(job.id) is None
    assert await store.cancel(job.id) is JobStatus.CANCELED
    await eventually(lambda: len(receiver.received) == 2, "the second completion")
    first, second = (json.loads(r.body) for r in receiver.received)
    assert receiver.received[0].headers["webhook-id"] != receiver.received[1].headers["webhook-id"]
    assert (first["data"]["status"], second["data"]["status"]) == ("failed", "canceled")


async def test_delete_forgets_the_deliveries_too(store: JobStore, receiver: Receiver) -> None:
    job = await submit(store, receiver.url)
    await run_to_the_end(store, job)
    assert await store.redis.zcard("segserve:deliveries") == 1
    await store.delete(job.id)
    assert (
        await store.redis.zcard("segserve:deliveries") == 0
        and await store.redis.keys("segserve:delivery:*") == []
    )


async def test_an_attempt_past_its_lease_records_nothing(store: JobStore, receiver: Receiver) -> None:
    job = await submit(store, receiver.url)
    await run_to_the_end(store, job)
    (stale,) = await store.outbox.claim(lease_ms=0, limit=10)  # its lease is over at once
    (current,) = await store.outbox.claim(lease_ms=60_000, limit=10)
    await store.outbox.record(stale, "failed", 500, 0, b"{}")  # too late: someone else holds it
    await store.outbox.record(current, "delivered", 200, 0, b"{}")
    done = await store.load(job.id)
    assert done is not None and done.deliveries["job.completed"]["state"] == "delivered"
    assert done.deliveries["job.completed"]["attempts"] == 1


async def test_deliveries_survive_the_deliverer(store: JobStore, receiver: Receiver) -> None:
    """A delivery is work in Redis: no deliverer running when the job ends, it goes out once one starts."""
    job = await submit(store, receiver.url)
    await run_to_the_end(store, job)
    assert await store.redis.zcard("segserve:deliveries") == 1
    task = asyncio.create_task(Deliverer(store, SETTINGS).run())
    try:
        await eventually(lambda: receiver.received, "the delivery")
    finally:
        await stop(task)


async def test_deliveries_survive_a_redis_restart(
    store: JobStore, fresh_redis: RedisServer, receiver: Receiver
) -> None:
    job = await submit(store, receiver.url)
    await run_to_the_end(store, job)
    fresh_redis.stop()
    fresh_redis.start()  # from its append-only file
    task = asyncio.create_task(Deliverer(store, SETTINGS).run())
    try:
        await eventually(lambda: receiver.received, "the delivery after the restart")
    finally:
        await stop(task)
    assert json.loads(receiver.received[0].body)["data"]["id"] == job.id


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/",
        "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:9/",
        "http://localhost:9/",
        "http://0.0.0.0:9/",
        "http://[::ffff:127.0.0.1]:9/",
        "http://2130706433:9/",
        "http://0x7f.1:9/",
        "http://100.100.100.200/latest/meta-data/",
        "http://[2002:7f00:1::]:9/",
        "http://224.0.0.1:9/",
        "http://[fe80::1]:9/",
    ],
)
async def test_the_guard_refuses_non_public_addresses(url: str) -> None:
    with pytest.raises(urls.UrlRefused):
        await urls.resolve(url, frozenset())


async def test_the_guard_lets_listed_hosts_through_and_pins_the_address() -> None:
    resolved = await urls.resolve("http://localhost:8080/x", urls.allowed_hosts("LOCALHOST:8080"))
    assert resolved.host in ("127.0.0.1", "::1") and resolved.port == 8080 and resolved.path == "/x"
    with pytest.raises(urls.UrlRefused):
        await urls.resolve("http://localhost:8081/x", urls.allowed_hosts("localhost:8080"))
    for bad in ("ftp://example.com/", "/relative", "http://", "javascript:alert(1)"):
        with pytest.raises(urls.UrlRefused):
            urls.check_syntax(bad)


@pytest.fixture
def api(
    fresh_redis: RedisServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Callable[..., TestClient]]:
    """The gateway in-process, with webhooks on, two API keys, and the settings a test adds."""
    monkeypatch.setenv("SEGSERVE_REDIS_URL", fresh_redis.url)
    monkeypatch.setenv("SEGSERVE_BLOB_URL", str(tmp_path / "blobs"))
    monkeypatch.setenv("SEGSERVE_TORCHSERVE_MANAGEMENT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("SEGSERVE_WEBHOOK_SECRET", WEBHOOK_SECRET)
    monkeypatch.setenv("SEGSERVE_API_KEYS", "alice-key,bob-key")
    from gateway.app import app

    with contextlib.ExitStack() as clients:

        def start(**env: str) -> TestClient:
            for name, value in env.items():
                monkeypatch.setenv(name, value)
            return clients.enter_context(TestClient(app, headers=ALICE))

        yield start


ALICE = {"Authorization": "Bearer alice-key"}
IMAGE_B64 = base64.b64encode(IMAGE).decode()
REFUSED = [
    "http://127.0.0.1:9/",
    "http://localhost:9/",
    "http://169.254.169.254/",
    "http://[::1]:9/",
    "http://10.0.0.1/",
]


def test_webhooks_and_image_urls_to_non_public_addresses_are_refused(api: Callable[..., TestClient]) -> None:
    client = api()
    for url in REFUSED:
        for body in ({"image": IMAGE_B64, "webhook": url}, {"image_url": url}):
            refused = client.post("/v1/jobs", json=body)
            assert refused.status_code == 422 and refused.json()["code"] == "url_not_allowed", (
                body,
                refused.text,
            )
    query = "?webhook=http%3A%2F%2F127.0.0.1%3A9%2F&webhook_events_filter=start"
    refused = client.post(f"/v1/jobs{query}", content=IMAGE, headers={"Content-Type": "image/jpeg"})
    assert refused.status_code == 422 and refused.json()["code"] == "url_not_allowed"


def test_webhook_parameters_are_checked(api: Callable[..., TestClient], receiver: Receiver) -> None:
    client = api(SEGSERVE_ALLOWED_URL_HOSTS="127.0.0.1")
    for body, code in [
        ({"webhook": "notaurl"}, "url_not_allowed"),
        ({"webhook": "ftp://127.0.0.1/"}, "url_not_allowed"),
        ({"webhook": receiver.url, "webhook_events_filter": ["end"]}, "invalid_parameter"),
    ]:
        answer = client.post("/v1/jobs", json={"image": IMAGE_B64, **body})
        assert answer.status_code == 422 and answer.json()["code"] == code, (body, answer.text)
    form = client.post(
        "/v1/jobs",
        files={"image": ("a.jpg", IMAGE, "image/jpeg")},
        data={"webhook": receiver.url, "webhook_events_filter": "start,completed"},
    )
    assert form.status_code == 202, form.text
    assert form.json()["webhook"] == {
        "url": receiver.url,
        "events_filter": ["start", "completed"],
        "deliveries": {},
    }
    assert receiver.received == [], "a submission sends nothing to the receiver"


def test_images_by_url(api: Callable[..., TestClient], receiver: Receiver) -> None:
    client = api(SEGSERVE_ALLOWED_URL_HOSTS="127.0.0.1", SEGSERVE_MAX_BODY_BYTES="2000")
    elsewhere = Receiver()  # where a redirect points
    try:
        answers = {
            "/cat.jpg": (200, {}, IMAGE, 0.0),
            "/missing.jpg": (404, {}, b"", 0.0),
            "/moved.jpg": (302, {"Location": f"{elsewhere.url}/cat.jpg"}, b"", 0.0),
            "/huge.jpg": (200, {}, b"\xff" * 5000, 0.0),
            "/zipped.jpg": (200, {"Content-Encoding": "gzip"}, gzip.compress(b"\0" * 100_000), 0.0),
        }
        receiver.answer = lambda n, request: answers[request.path]
        job = client.post("/v1/jobs", json={"image_url": f"{receiver.url}/cat.jpg", "classes": "cat"})
        assert job.status_code == 202 and job.json()["params"]["classes"] == [8], job.text
        for path, status, code in [
            ("/missing.jpg", 422, "fetch_failed"),
            ("/moved.jpg", 422, "fetch_failed"),
            ("/huge.jpg", 413, "body_too_large"),
            ("/zipped.jpg", 422, "fetch_failed"),
        ]:
            answer = client.post("/v1/jobs", json={"image_url": f"{receiver.url}{path}"})
            assert answer.status_code == status and answer.json()["code"] == code, (path, answer.text)
        assert elsewhere.received == [], "a redirect is not followed"
        gone = client.post("/v1/jobs", json={"image_url": f"http://127.0.0.1:{free_port()}/nothing-listens"})
        assert gone.status_code == 422 and gone.json()["code"] == "fetch_failed"
    finally:
        elsewhere.close()


def test_webhook_secrets_are_per_key(api: Callable[..., TestClient]) -> None:
    client = api()
    alice_key = client.get("/v1/webhooks/secret").json()["key"]
    bob = client.get("/v1/webhooks/secret", headers={"Authorization": "Bearer bob-key"}).json()["key"]
    (alice,) = load_tenants(Settings(api_keys="alice-key")).by_digest.values()
    # the key the worker signs alice's deliveries with
    assert alice_key == signing_key(WEBHOOK_SECRET, alice.owner)
    assert alice_key.startswith("whsec_") and alice_key != bob and WEBHOOK_SECRET not in (alice_key, bob)
    assert client.get("/v1/webhooks/secret", headers={"Authorization": ""}).status_code == 401


def test_webhooks_off_without_a_server_secret(
    api: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SEGSERVE_WEBHOOK_SECRET")
    client = api()
    assert client.get("/v1/webhooks/secret").json()["code"] == "webhooks_disabled"
    answer = client.post("/v1/jobs", json={"image": IMAGE_B64, "webhook": "https://example.com/hook"})
    assert answer.status_code == 422 and answer.json()["code"] == "webhooks_disabled"


async def test_a_keys_hanging_receiver_delays_only_that_keys_deliveries(
    store: JobStore, deliverer: Deliverer, receiver: Receiver
) -> None:
    """40 events of a key whose receiver hangs (past url_timeout, every time) are due before 5 of another
    key's: the other's arrive while the hanging key holds only its share of the slots."""
    hanging = Receiver()
    hanging.answer = lambda n, request: (200, {}, b"", 3.0)
    try:
        slow = [await submit(store, hanging.url, owner="hangs") for _ in range(40)]
        quick = [await submit(store, receiver.url, owner="quick") for _ in range(5)]
        for job in slow + quick:
            await run_to_the_end(store, job)
        await eventually(lambda: len(receiver.received) == 5, "the other key's deliveries")
        # First come, first served, all 16 slots would have gone to the hanging key's first attempts.
        assert len(hanging.received) <= 2 * OWNER_SHARE, len(hanging.received)
    finally:
        hanging.close()
