"""The job API over HTTP, held to docs/api.md: uvicorn, arq workers, Redis and TorchServe, all real."""

from __future__ import annotations

import base64
import io
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from standardwebhooks import Webhook

from gateway.app.params import VOC_CLASSES
from gateway.status import is_terminal
from gateway.webhooks import signing_key
from tests.harness.images import encode, scene
from tests.harness.processes import BIN, ROOT, free_port, wait_until
from tests.harness.receiver import Received, Receiver
from tests.harness.servers import WEBHOOK_SECRET, Stack, isolated_env

SMALL = encode(scene(64, 48))


def submit(client: httpx.Client, body: bytes = SMALL, query: str = "", **headers: str) -> httpx.Response:
    return client.post(f"/v1/jobs{query}", content=body, headers={"Content-Type": "image/jpeg", **headers})


def wait_done(client: httpx.Client, job_id: str, timeout: float = 60) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if is_terminal(job["status"]):
            return job  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise TimeoutError(job_id)


def assert_problem(response: httpx.Response, status: int, code: str | None = None) -> dict:  # type: ignore[type-arg]
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert {"type", "title", "status", "detail", "code"} <= set(body)
    assert body["status"] == status
    assert "Traceback" not in response.text
    if code:
        assert body["code"] == code
    return body  # type: ignore[no-any-return]


def parse_time(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@pytest.fixture
def gateway(stack: Stack) -> Iterator[object]:
    """Another gateway process on the same Redis and workers, with settings of the test's choosing."""
    extra: list[Stack] = []
    clients: list[httpx.Client] = []

    def start(**env: str) -> httpx.Client:
        other = Stack(stack.redis, stack.torchserve, stack.env, log_dir=stack.log_dir)
        other.start_gateway(**env)
        extra.append(other)
        clients.append(httpx.Client(base_url=other.url, timeout=60))
        return clients[-1]

    yield start
    for c in clients:
        c.close()
    for other in extra:
        other.stop()


def test_submit_poll_and_fetch_mask(client: httpx.Client) -> None:
    body = encode(scene(200, 150), "PNG")
    response = client.post(
        "/v1/jobs?classes=cat,0&threshold=0&overlay=true", content=body, headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["id"].startswith("j_") and len(job["id"]) == 34
    assert job["status"] in ("queued", "running")
    assert job["params"] == {"classes": [8, 0], "threshold": 0.0, "overlay": True}
    assert job["model"] == "deeplabv3"
    job = wait_done(client, job["id"])
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1
    assert "position" not in job and "error" not in job
    assert {"queued", "backend", "inference", "total"} <= set(job["timings_ms"])
    assert job["started_at"] and job["finished_at"] and job["expires_at"]
    result = job["result"]
    assert (result["width"], result["height"]) == (200, 150)
    assert result["mask_url"] == f"/v1/jobs/{job['id']}/mask.png"
    assert sum(c["fraction"] for c in result["classes"]) == pytest.approx(1, abs=1e-3)
    assert {c["id"] for c in result["classes"]} <= {0, 8}
    assert all(c["name"] == VOC_CLASSES[c["id"]] for c in result["classes"])

    mask_response = client.get(result["mask_url"])
    assert mask_response.status_code == 200 and mask_response.headers["content-type"] == "image/png"
    mask = Image.open(io.BytesIO(mask_response.content))
    assert mask.mode == "P" and mask.size == (200, 150)
    counts = dict(zip(*np.unique(np.asarray(mask), return_counts=True), strict=True))
    assert {int(k): int(v) for k, v in counts.items()} == {c["id"]: c["pixels"] for c in result["classes"]}

    overlay_response = client.get(result["overlay_url"])
    assert overlay_response.status_code == 200
    overlay = Image.open(io.BytesIO(overlay_response.content)).convert("RGB")
    assert overlay.size == (200, 150)
    original = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    labels = np.asarray(mask)
    assert (np.asarray(overlay)[labels == 0] == original[labels == 0]).all()  # background is left as it is


def test_multipart_and_json_submissions(client: httpx.Client) -> None:
    form = client.post(
        "/v1/jobs",
        files={"image": ("a.png", encode(scene(80, 60), "PNG"), "image/png")},
        data={"classes": "dog,person", "threshold": "0.25"},
    )
    assert form.status_code == 202, form.text
    assert form.json()["params"] == {"classes": [12, 15], "threshold": 0.25, "overlay": False}
    payload = {"image": base64.b64encode(SMALL).decode(), "classes": ["cat", 12], "threshold": 0.5}
    as_json = client.post("/v1/jobs", json=payload)
    assert as_json.status_code == 202, as_json.text
    assert as_json.json()["params"] == {"classes": [8, 12], "threshold": 0.5, "overlay": False}
    for response in (form, as_json):
        assert wait_done(client, response.json()["id"])["status"] == "succeeded"


def test_prefer_wait_answers_when_the_job_ends(client: httpx.Client) -> None:
    lags = []
    for _ in range(5):
        response = submit(client, Prefer="wait=30")
        received = time.time()
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["status"] == "succeeded"
        assert response.headers["preference-applied"] == "wait=30"
        lags.append(received - parse_time(job["finished_at"]))
    assert min(lags) >= 0
    # Woken by the job's end, not by the 5 s re-read that guards against a lost notification.
    assert sorted(lags)[len(lags) // 2] < 2.5, f"answers came {lags} s after the jobs ended"


def test_prefer_wait_times_out_with_202(client: httpx.Client) -> None:
    for _ in range(4):
        submit(client)  # something ahead, so the next one cannot end within 0.1 s
    response = submit(client, Prefer="wait=0.1")
    assert response.status_code == 202
    assert response.json()["status"] in ("queued", "running")
    wait_done(client, response.json()["id"])


def test_async_mode_false_waits(client: httpx.Client) -> None:
    response = submit(client, async_mode="false")
    assert response.status_code == 200
    assert response.json()["status"] == "succeeded"


def test_idempotency_key_returns_the_first_job(client: httpx.Client) -> None:
    first = submit(client, **{"Idempotency-Key": "order-17"})
    again = submit(client, **{"Idempotency-Key": "order-17"})
    other = submit(client, **{"Idempotency-Key": "order-18"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert other.json()["id"] != first.json()["id"]
    for job_id in {first.json()["id"], other.json()["id"]}:
        wait_done(client, job_id)


def test_cancel_queued_running_and_finished(client: httpx.Client, stack: Stack) -> None:
    ids = [submit(client).json()["id"] for _ in range(12)]
    last = ids[-1]
    canceled = client.post(f"/v1/jobs/{last}/cancel")
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] == "canceled"
    running = wait_until(
        lambda: next(
            (i for i in ids[:-1] if client.get(f"/v1/jobs/{i}").json()["status"] == "running"), None
        ),
        30,
        "a running job",
        interval=0.01,
    )
    assert client.post(f"/v1/jobs/{running}/cancel").json()["status"] == "canceled"
    for job_id in ids[:-1]:
        wait_done(client, job_id)
    time.sleep(0.5)
    never_ran = client.get(f"/v1/jobs/{last}").json()
    assert (
        never_ran["status"] == "canceled" and never_ran["attempts"] == 0 and never_ran["started_at"] is None
    )
    discarded = client.get(f"/v1/jobs/{running}").json()
    assert discarded["status"] == "canceled" and "result" not in discarded
    assert_problem(client.get(f"/v1/jobs/{running}/mask.png"), 409, "job_not_succeeded")
    finished = next(i for i in ids[:-1] if i != running)
    assert client.get(f"/v1/jobs/{finished}").json()["status"] == "succeeded"
    assert_problem(client.post(f"/v1/jobs/{finished}/cancel"), 409, "job_finished")


def test_delete_forgets_the_job(client: httpx.Client, stack: Stack) -> None:
    job = submit(client, Prefer="wait=30").json()
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert_problem(client.get(f"/v1/jobs/{job['id']}"), 404, "job_not_found")
    assert_problem(client.get(f"/v1/jobs/{job['id']}/mask.png"), 404)
    with stack.redis.client() as redis:
        keys = redis.keys(f"*{job['id']}*")
    assert keys == [], keys


def test_errors_are_problem_details(client: httpx.Client) -> None:
    assert_problem(client.get("/v1/jobs/j_" + "0" * 32), 404, "job_not_found")
    assert_problem(client.get("/v1/jobs/" + "x" * 10_000), 404)
    assert_problem(client.get("/v1/jobs/%E2%98%83"), 404)
    assert_problem(client.get("/no/such/route"), 404)
    assert_problem(submit(client, query="?model=nosuchmodel"), 404, "model_not_found")
    assert_problem(client.post("/v1/jobs", content=b"hello", headers={"Content-Type": "text/plain"}), 415)
    assert_problem(submit(client, b"this is not an image"), 415, "not_an_image")
    assert_problem(submit(client, b""), 415)
    assert_problem(
        client.post("/v1/jobs", content=encode(scene(20, 20), "GIF"), headers={"Content-Type": "image/png"}),
        415,
    )
    for query in ("?threshold=2", "?threshold=-1", "?threshold=nan", "?threshold=abc"):
        assert_problem(submit(client, query=query), 422, "invalid_parameter")
    assert_problem(submit(client, query="?classes=cat,unicorn"), 422, "unknown_class")
    assert_problem(client.post("/v1/jobs", json={"image": "%%% not base64 %%%"}), 422, "invalid_base64")
    assert_problem(
        client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}), 422
    )
    bad_form = client.post(
        "/v1/jobs", content=b"--x\r\ngarbage", headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert bad_form.status_code == 422
    bomb = encode(Image.new("L", (30000, 30000)), "PNG", optimize=True)
    assert_problem(
        client.post("/v1/jobs", content=bomb, headers={"Content-Type": "image/png"}), 422, "too_many_pixels"
    )
    pending = submit(client).json()
    assert_problem(client.get(f"/v1/jobs/{pending['id']}/mask.png"), 409, "job_not_succeeded")
    assert_problem(client.get(f"/v1/jobs/{pending['id']}/overlay.png"), 409)
    wait_done(client, pending["id"])
    assert client.get("/v1/jobs", params={"x": "y" * 20_000}).status_code in (200, 414)  # unknown: ignored
    assert_problem(client.delete("/v1/jobs"), 405, "method_not_allowed")


def test_undecodable_image_fails_the_job_with_a_code(client: httpx.Client) -> None:
    whole = encode(scene(300, 200))
    truncated = whole[: len(whole) // 2]
    job = submit(client, truncated, Prefer="wait=30").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_image"
    assert job["attempts"] == 1
    assert "result" not in job
    assert submit(client, Prefer="wait=30").json()["status"] == "succeeded"


def test_body_limit_is_enforced_while_reading(gateway) -> None:  # type: ignore[no-untyped-def]
    small = gateway(SEGSERVE_MAX_BODY_BYTES="50000")
    body = encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)), "PNG"
    )
    assert len(body) > 50000
    assert_problem(
        small.post("/v1/jobs", content=body, headers={"Content-Type": "image/png"}), 413, "body_too_large"
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must bite on the stream itself
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    streamed = small.post("/v1/jobs", content=chunks(), headers={"Content-Type": "image/png"})
    assert_problem(streamed, 413, "body_too_large")


def test_queue_full_is_429_with_retry_after(gateway) -> None:  # type: ignore[no-untyped-def]
    full = gateway(SEGSERVE_MAX_QUEUED="0")
    response = full.post("/v1/jobs", content=SMALL, headers={"Content-Type": "image/jpeg"})
    assert_problem(response, 429, "queue_full")
    assert int(response.headers["retry-after"]) > 0


def test_redis_unreachable_is_503(gateway) -> None:  # type: ignore[no-untyped-def]
    nowhere = gateway(SEGSERVE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert_problem(nowhere.post("/v1/jobs", content=SMALL, headers={"Content-Type": "image/jpeg"}), 503)
    assert_problem(nowhere.get("/v1/jobs/j_" + "0" * 32), 503, "redis_unavailable")
    assert nowhere.get("/healthz").status_code == 200
    body = assert_problem(nowhere.get("/readyz"), 503, "not_ready")
    assert body["checks"]["redis"] == "down"


def test_api_keys(gateway) -> None:  # type: ignore[no-untyped-def]
    keyed = gateway(SEGSERVE_API_KEYS="alpha-key,beta-key")
    assert_problem(
        keyed.post("/v1/jobs", content=SMALL, headers={"Content-Type": "image/jpeg"}), 401, "unauthorized"
    )
    assert_problem(keyed.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    alpha = {"Authorization": "Bearer alpha-key", "Content-Type": "image/jpeg", "Prefer": "wait=30"}
    job = keyed.post("/v1/jobs", content=SMALL, headers=alpha).json()
    assert job["status"] == "succeeded"
    assert (
        keyed.get(f"/v1/jobs/{job['id']}", headers={"Authorization": "Bearer alpha-key"}).status_code == 200
    )
    assert_problem(keyed.get(f"/v1/jobs/{job['id']}", headers={"Authorization": "Bearer beta-key"}), 404)
    for path in ("/healthz", "/metrics"):
        assert keyed.get(path).status_code == 200


def test_service_routes(client: httpx.Client, stack: Stack) -> None:
    models = client.get("/v1/models").json()
    [model] = models["models"]
    assert models["default_model"] == "deeplabv3"
    assert model["name"] == "deeplabv3" and model["default"] is True
    assert model["batch_size"] >= 1 and model["workers"] >= 1 and model["device"] == "cpu"
    assert model["random_weights"] is True and "meaningless" in model["weights"]

    queue = client.get("/v1/queue").json()
    assert {"queued", "running", "succeeded", "failed", "workers"} <= set(queue)
    assert len(queue["workers"]) >= 1 and queue["workers"][0]["pid"] > 0

    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.json()["checks"]["torchserve"] == "ok" and ready.json()["checks"]["workers"].startswith("ok")

    submit(client, Prefer="wait=30")
    metrics = client.get("/metrics").text
    for name in (
        'segserve_jobs_finished_total{status="succeeded"}',
        "segserve_jobs_submitted_total",
        "segserve_queue_depth",
        "segserve_job_inference_seconds_bucket",
        "segserve_job_queue_wait_seconds_count",
        "segserve_job_total_seconds_sum",
    ):
        assert name in metrics, name
    succeeded = float(
        next(
            line.split()[-1]
            for line in metrics.splitlines()
            if line.startswith('segserve_jobs_finished_total{status="succeeded"}')
        )
    )
    assert succeeded >= 1

    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    for path in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/mask.png",
        "/v1/jobs/{job_id}/overlay.png",
        "/v1/jobs/{job_id}/cancel",
        "/v1/models",
        "/v1/queue",
        "/healthz",
        "/readyz",
        "/metrics",
        "/predict",
        "/predict/{job_id}",
        "/job_status/{job_id}",
    ):
        assert path in spec["paths"], path
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    assert client.get("/docs/static/swagger-ui-bundle.js").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text


JOBS = 100  # five per client: enough for every client to queue behind the others


def test_100_jobs_from_20_clients_each_succeed_once(
    client: httpx.Client, stack: Stack, receiver: Receiver
) -> None:
    """...and each sends its signed start and completed webhooks, once each, in order."""

    def succeeded() -> int:
        with stack.redis.client() as redis:
            return int(redis.hget("segserve:stats", "finished:succeeded") or 0)

    before = succeeded()
    bodies = [encode(scene(48 + i % 5, 40, seed=i)) for i in range(JOBS)]
    # Verified as a receiver does, on arrival: a signature's timestamp is good for 5 minutes, and the whole
    # run may take longer on a slow machine.
    assert client.get("/v1/webhooks/secret").json()["code"] == "secret_needs_key"  # no keys: never served
    key = Webhook(signing_key(WEBHOOK_SECRET, ""))
    events: dict[str, list[str]] = {}

    def verify_on_arrival(n: int, delivery: Received) -> tuple[int, dict[str, str], bytes, float]:
        event = key.verify(delivery.body, delivery.headers)  # raises, so the answer is an error, on a bad one
        events.setdefault(event["data"]["id"], []).append(event["type"])
        return 204, {}, b"", 0.0

    receiver.answer = verify_on_arrival

    def one(body: bytes) -> tuple[dict, dict]:  # type: ignore[type-arg]
        with httpx.Client(base_url=stack.url, timeout=120) as c:
            query = f"?webhook={receiver.url}/hooks&webhook_events_filter=start,completed"
            accepted = submit(c, body, query)
            assert accepted.status_code == 202, accepted.text
            return accepted.json(), wait_done(c, accepted.json()["id"], timeout=300)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, bodies))
    ids = [accepted["id"] for accepted, _ in results]
    assert len(set(ids)) == JOBS
    positions = [accepted.get("position", 0) for accepted, _ in results]
    assert all(p >= 0 for p in positions) and max(positions) > 0
    for _accepted, done in results:
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 1
    assert succeeded() - before == JOBS
    with ThreadPoolExecutor(20) as pool:
        masks = list(pool.map(lambda i: client.get(f"/v1/jobs/{i}/mask.png").status_code, ids))
    assert set(masks) == {200}

    wait_until(lambda: sum(map(len, events.values())) >= 2 * JOBS, 240, "every verified webhook delivery")
    assert events == {job_id: ["job.started", "job.completed"] for job_id in ids}
    assert len({d.headers["webhook-id"] for d in receiver.received}) == 2 * JOBS


def test_position_counts_jobs_ahead(stack: Stack) -> None:
    idle = Stack(
        stack.redis,
        stack.torchserve,
        isolated_env(stack),
        log_dir=stack.log_dir,
    )
    idle.start_gateway()  # no worker yet: the queue stands still
    try:
        with httpx.Client(base_url=idle.url, timeout=60) as c:
            accepted = [submit(c).json() for _ in range(5)]
            assert [job["position"] for job in accepted] == [0, 1, 2, 3, 4]
            assert [c.get(f"/v1/jobs/{job['id']}").json()["position"] for job in accepted] == [0, 1, 2, 3, 4]
            assert c.post(f"/v1/jobs/{accepted[1]['id']}/cancel").json()["status"] == "canceled"
            assert [c.get(f"/v1/jobs/{job['id']}").json().get("position") for job in accepted] == [
                0,
                None,
                1,
                2,
                3,
            ]
            idle.start_worker()
            for job in accepted[:1] + accepted[2:]:
                assert wait_done(c, job["id"])["status"] == "succeeded"
    finally:
        idle.stop()


def test_worker_keeps_only_what_torchserve_computes_soon(stack: Stack) -> None:
    """TorchServe here computes one batch of up to 4 at a time: the worker keeps 2 × 1 × 4 jobs in it, not
    its cap of 20, and the rest wait in Redis where their position is true."""
    own = Stack(
        stack.redis,
        stack.torchserve,
        isolated_env(stack, SEGSERVE_WORKER_CONCURRENCY="20"),
        log_dir=stack.log_dir,
    )
    own.start_gateway()
    own.start_worker()
    try:
        with httpx.Client(base_url=own.url, timeout=60) as c:
            limit = 8  # TorchServe here has one ready worker with batches of 4 (the model_store fixture)
            wait_until(
                lambda: [w["concurrency"] for w in c.get("/v1/queue").json()["workers"]] == [limit],
                60,
                "the worker's heartbeat with the limit its TorchServe sets",
            )
            [model] = c.get("/v1/models").json()["models"]
            assert 2 * model["workers_ready"] * model["batch_size"] == limit
            ids = [submit(c).json()["id"] for _ in range(30)]
            most_running, deadline = 0, time.monotonic() + 600
            while (
                (queue := c.get("/v1/queue").json())["queued"] or queue["running"]
            ) and time.monotonic() < deadline:
                most_running = max(most_running, queue["running"])
                time.sleep(0.05)
            assert 0 < most_running <= limit
            assert all(wait_done(c, i)["status"] == "succeeded" for i in ids)
    finally:
        own.stop()


def test_compatibility_routes(gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "images"
    root.mkdir()
    (root / "cat.jpg").write_bytes(encode(scene(120, 90)))
    (tmp_path / "secret.jpg").write_bytes(encode(scene(10, 10)))
    (root / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    compat = gateway(SEGSERVE_IMAGE_ROOT=str(root))

    accepted = compat.post(
        "/predict", json={"image_path": "cat.jpg", "target_class_ids": [3, 0, 8], "threshold": 0.0}
    )
    assert accepted.status_code == 200, accepted.text
    body = accepted.json()
    assert set(body) == {"success", "job_id", "status", "position_in_queue"}
    assert body["success"] is True and body["status"] == f"/job_status/{body['job_id']}"
    assert isinstance(body["position_in_queue"], int)
    job_id = body["job_id"]

    wait_until(
        lambda: compat.get(f"/job_status/{job_id}").json()["status"] == "finished", 60, "the compat job"
    )
    status = compat.get(f"/job_status/{job_id}").json()
    assert set(status) == {"job_id", "status", "result", "error_message"}
    result = status["result"]
    assert set(result) == {
        "image_path",
        "model_name",
        "predictions",
        "processing_time_ms",
        "success",
        "error_message",
    }
    assert result["image_path"] == "cat.jpg" and result["success"] is True and result["error_message"] is None
    assert [p["class_id"] for p in result["predictions"]] == [3, 0, 8]
    v1 = compat.get(f"/v1/jobs/{job_id}").json()
    pixels = {c["id"]: c["pixels"] for c in v1["result"]["classes"]}
    assert [p["pix_count"] for p in result["predictions"]] == [pixels.get(c, 0) for c in (3, 0, 8)]
    assert compat.get(f"/predict/{job_id}").json() == result

    waited = compat.post(
        "/predict", json={"image_path": "cat.jpg", "target_class_ids": []}, headers={"async_mode": "false"}
    )
    assert waited.status_code == 200
    assert [p["class_id"] for p in waited.json()["predictions"]] == [8, 17]

    pending = compat.post("/predict", json={"image_path": "cat.jpg"}).json()["job_id"]
    early = compat.get(f"/predict/{pending}")
    if early.status_code == 202:
        assert early.json() == {"error": "Prediction is still being processed."}
    assert compat.get("/predict/j_" + "1" * 32).json() == {"error": "Prediction ID not found."}
    assert compat.get("/predict/j_" + "1" * 32).status_code == 404

    for path in ("../secret.jpg", str(tmp_path / "secret.jpg"), "link.jpg", "/etc/passwd"):
        assert_problem(compat.post("/predict", json={"image_path": path}), 403)
    assert_problem(compat.post("/predict", json={"image_path": "missing.jpg"}), 404)


def test_compat_predict_is_off_without_an_image_root(client: httpx.Client) -> None:
    assert_problem(client.post("/predict", json={"image_path": "cat.jpg"}), 403, "image_root_disabled")


def test_arq_check_tells_the_truth(stack: Stack) -> None:
    env = isolated_env(stack)  # a queue of its own
    check = [str(BIN / "arq"), "gateway.worker.WorkerSettings", "--check"]
    assert subprocess.run(check, env=env, cwd=ROOT, capture_output=True).returncode != 0
    worker = Stack(stack.redis, stack.torchserve, env, log_dir=stack.log_dir)
    process = worker.start_worker(("arq", "gateway.worker.WorkerSettings"))  # the operators' command
    try:
        wait_until(
            lambda: subprocess.run(check, env=env, cwd=ROOT, capture_output=True).returncode == 0,
            30,
            "--check 0",
        )
    finally:
        worker.stop()
    assert process.returncode is not None
    wait_until(
        lambda: subprocess.run(check, env=env, cwd=ROOT, capture_output=True).returncode != 0,
        20,
        "--check != 0 once the worker is gone",
    )


def test_gateway_does_not_import_torch() -> None:
    code = "import sys, gateway.app, gateway.worker; sys.exit('torch' in sys.modules)"
    assert subprocess.run([str(BIN / "python"), "-c", code], cwd=ROOT).returncode == 0
