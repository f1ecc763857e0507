"""The gateway in-process (Starlette's TestClient runs its lifespan) against a real Redis, with no model
server: submissions, reads, errors, cancel, delete, the compatibility routes and the service routes. A job is
completed here through the job store, as a worker would complete it."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from arq.connections import ArqRedis
from PIL import Image
from starlette.testclient import TestClient

from gateway.jobs import Fleet, ModelInfo, Outcome, Result, WorkerInfo, now_ms
from tests.harness.images import encode, scene
from tests.harness.jobs import directory_store
from tests.harness.processes import LOOPBACK_CLIENT, free_port
from tests.harness.servers import RedisServer

IMAGE = encode(scene(32, 24))
JPEG = {"Content-Type": "image/jpeg"}


@pytest.fixture
def env(fresh_redis: RedisServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> RedisServer:
    monkeypatch.setenv("SEGSERVE_REDIS_URL", fresh_redis.url)
    monkeypatch.setenv("SEGSERVE_BLOB_URL", str(tmp_path / "blobs"))
    return fresh_redis


@pytest.fixture
def api(env: RedisServer) -> Iterator[TestClient]:
    from gateway.app import app

    with TestClient(app, client=LOOPBACK_CLIENT) as client:
        yield client


def test_without_keys_only_this_machine_is_served(env: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail closed: a keyless gateway that other hosts can reach serves them only when the operator says so."""
    from gateway.app import app

    with TestClient(app, client=("203.0.113.7", 40000)) as remote:
        refused = remote.post("/v1/jobs", content=IMAGE, headers=JPEG)
        assert refused.status_code == 403 and refused.json()["code"] == "anonymous_remote", refused.text
        assert remote.get("/v1/queue").status_code == 403 and remote.get("/healthz").status_code == 200
    with TestClient(app, client=("::ffff:127.0.0.1", 40000)) as mapped:
        assert mapped.post("/v1/jobs", content=IMAGE, headers=JPEG).status_code == 202
    monkeypatch.setenv("SEGSERVE_ALLOW_ANONYMOUS_REMOTE", "true")
    with TestClient(app, client=("203.0.113.7", 40000)) as remote:
        assert remote.post("/v1/jobs", content=IMAGE, headers=JPEG).status_code == 202


def complete(redis: RedisServer, job_id: str, mask: Image.Image, overlay: bytes | None = None) -> None:
    """Take and complete the job as a worker would, through the job store (blobs where the app keeps them)."""

    async def run() -> None:
        store = directory_store(redis.url, Path(os.environ["SEGSERVE_BLOB_URL"]))
        started = await store.start(job_id, deadline_ms=4e12)
        assert started is not None
        classes = [{"id": 0, "name": "__background__", "pixels": 768, "fraction": 1.0}]
        png = encode(mask, "PNG")
        outcome = Outcome.succeeded(Result(32, 24, classes), png, {"inference": 3.0}, overlay)
        await store.complete(started, outcome)
        await store.redis.aclose()

    asyncio.run(run())


def assert_problem(response, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert {"type", "title", "status", "detail", "code"} <= set(body) and body["code"] == code


def test_three_ways_in(api: TestClient) -> None:
    raw = api.post("/v1/jobs?classes=cat,dog&threshold=0.5", content=IMAGE, headers=JPEG)
    assert raw.status_code == 202 and raw.headers["location"] == f"/v1/jobs/{raw.json()['id']}"
    assert raw.json()["params"] == {"classes": [8, 12], "threshold": 0.5, "overlay": False}
    assert raw.json()["status"] == "queued" and raw.json()["position"] == 0
    form = api.post("/v1/jobs", files={"image": ("a.jpg", IMAGE, "image/jpeg")}, data={"classes": "person"})
    assert form.status_code == 202 and form.json()["params"]["classes"] == [15]
    as_json = api.post("/v1/jobs", json={"image": base64.b64encode(IMAGE).decode(), "threshold": 0.25})
    assert as_json.status_code == 202 and as_json.json()["position"] == 2
    assert api.get(f"/v1/jobs/{raw.json()['id']}").json()["status"] == "queued"


def test_bad_submissions_are_problems(api: TestClient) -> None:
    assert_problem(api.post("/v1/jobs", content=b"%PDF-1.4", headers=JPEG), 415, "not_an_image")
    assert_problem(
        api.post("/v1/jobs", content=IMAGE, headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    assert_problem(api.post("/v1/jobs?threshold=7", content=IMAGE, headers=JPEG), 422, "invalid_parameter")
    assert_problem(api.post("/v1/jobs?classes=unicorn", content=IMAGE, headers=JPEG), 422, "unknown_class")
    assert_problem(api.post("/v1/jobs", json={"image": "***"}), 422, "invalid_base64")
    assert_problem(
        api.post("/v1/jobs", content=b"{", headers={"Content-Type": "application/json"}), 422, "invalid_body"
    )
    bomb = encode(Image.new("1", (30000, 30000)), "PNG")
    assert_problem(
        api.post("/v1/jobs", content=bomb, headers={"Content-Type": "image/png"}), 422, "too_many_pixels"
    )
    assert_problem(api.get("/v1/jobs/j_" + "0" * 32), 404, "job_not_found")
    assert_problem(api.get("/v1/jobs/nonsense"), 404, "job_not_found")


def test_body_limit_and_queue_bound(env: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGSERVE_MAX_BODY_BYTES", "1000")
    monkeypatch.setenv("SEGSERVE_MAX_QUEUED", "1")
    from gateway.app import app

    with TestClient(app, client=LOOPBACK_CLIENT) as api:
        assert_problem(api.post("/v1/jobs", content=b"x" * 2000, headers=JPEG), 413, "body_too_large")
        in_a_form = {"image": ("big.jpg", b"x" * 1500, "image/jpeg")}  # the form's own limit has headroom
        assert_problem(api.post("/v1/jobs", files=in_a_form), 413, "body_too_large")
        assert api.post("/v1/jobs", content=IMAGE, headers=JPEG).status_code == 202
        full = api.post("/v1/jobs", content=IMAGE, headers=JPEG)
        assert_problem(full, 429, "queue_full")
        assert full.headers["retry-after"].isdigit()


def test_idempotency_key(api: TestClient) -> None:
    first = api.post("/v1/jobs", content=IMAGE, headers={**JPEG, "Idempotency-Key": "k1"})
    again = api.post("/v1/jobs", content=IMAGE, headers={**JPEG, "Idempotency-Key": "k1"})
    assert (first.status_code, again.status_code) == (202, 200) and first.json()["id"] == again.json()["id"]
    assert_problem(
        api.post("/v1/jobs", content=IMAGE, headers={**JPEG, "Idempotency-Key": "x" * 300}),
        422,
        "invalid_parameter",
    )


def test_a_completed_job_serves_its_mask_and_the_overlay_it_asked_for(
    api: TestClient, env: RedisServer
) -> None:
    job = api.post("/v1/jobs?overlay=true", content=IMAGE, headers=JPEG).json()
    assert job["params"]["overlay"] is True
    assert_problem(api.get(f"/v1/jobs/{job['id']}/mask.png"), 409, "job_not_succeeded")
    assert_problem(api.get(f"/v1/jobs/{job['id']}/overlay.png"), 409, "job_not_succeeded")
    complete(env, job["id"], Image.new("P", (32, 24)), overlay=encode(Image.new("RGB", (32, 24)), "PNG"))
    done = api.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and done["result"]["mask_url"] == f"/v1/jobs/{job['id']}/mask.png"
    mask = api.get(done["result"]["mask_url"])
    assert mask.status_code == 200 and Image.open(io.BytesIO(mask.content)).size == (32, 24)
    assert mask.headers["content-length"] == str(len(mask.content))
    overlay = api.get(done["result"]["overlay_url"])
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(overlay.content)).size == (32, 24)
    assert_problem(api.post(f"/v1/jobs/{job['id']}/cancel"), 409, "job_finished")
    waited = api.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=5"})
    assert waited.json()["status"] == "succeeded"
    plain = api.post("/v1/jobs", content=IMAGE, headers=JPEG).json()
    complete(env, plain["id"], Image.new("P", (32, 24)))
    assert "overlay_url" not in api.get(f"/v1/jobs/{plain['id']}").json()["result"]
    assert_problem(api.get(f"/v1/jobs/{plain['id']}/overlay.png"), 409, "overlay_not_requested")
    assert_problem(api.post("/v1/jobs?overlay=maybe", content=IMAGE, headers=JPEG), 422, "invalid_parameter")


def test_cancel_and_delete(api: TestClient) -> None:
    job = api.post("/v1/jobs", content=IMAGE, headers=JPEG).json()
    canceled = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert_problem(api.get(f"/v1/jobs/{job['id']}"), 404, "job_not_found")
    assert_problem(api.delete(f"/v1/jobs/{job['id']}"), 404, "job_not_found")


def test_prefer_wait_answers_202_when_the_job_does_not_end(api: TestClient) -> None:
    response = api.post("/v1/jobs", content=IMAGE, headers={**JPEG, "Prefer": "wait=0.3"})
    assert response.status_code == 202 and response.headers["preference-applied"] == "wait=0.3"


def test_api_keys_keep_jobs_apart(env: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGSERVE_API_KEYS", "alice-key,bob-key")
    from gateway.app import app

    with TestClient(app, client=LOOPBACK_CLIENT) as api:
        assert_problem(api.post("/v1/jobs", content=IMAGE, headers=JPEG), 401, "unauthorized")
        alice = {**JPEG, "Authorization": "Bearer alice-key"}
        job = api.post("/v1/jobs", content=IMAGE, headers=alice).json()
        assert api.get(f"/v1/jobs/{job['id']}", headers=alice).status_code == 200
        assert_problem(
            api.get(f"/v1/jobs/{job['id']}", headers={"Authorization": "Bearer bob-key"}),
            404,
            "job_not_found",
        )
        assert api.get("/healthz").status_code == 200


def test_compatibility_routes(
    api: TestClient, env: RedisServer, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "cat.jpg").write_bytes(IMAGE)
    monkeypatch.setenv("SEGSERVE_IMAGE_ROOT", str(tmp_path))
    from gateway.app import app

    with TestClient(app, client=LOOPBACK_CLIENT) as compat:
        answer = compat.post("/predict", json={"image_path": "cat.jpg", "target_class_ids": [15, 0]}).json()
        assert answer["success"] is True and answer["status"] == f"/job_status/{answer['job_id']}"
        assert compat.get(f"/job_status/{answer['job_id']}").json()["status"] == "queued"
        assert compat.get(f"/predict/{answer['job_id']}").status_code == 202
        complete(env, answer["job_id"], Image.new("P", (32, 24)))
        status = compat.get(f"/job_status/{answer['job_id']}").json()
        assert status["status"] == "finished"
        assert status["result"]["predictions"] == [
            {"class_id": 15, "pix_count": 0},
            {"class_id": 0, "pix_count": 768},
        ]
        assert status["result"]["image_path"] == "cat.jpg"
        assert compat.get("/predict/j_" + "0" * 32).json() == {"error": "Prediction ID not found."}
        assert compat.post("/predict", json={"image_path": "../etc/passwd"}).status_code == 403


def test_service_routes(api: TestClient) -> None:
    api.post("/v1/jobs", content=IMAGE, headers=JPEG)
    queue = api.get("/v1/queue").json()
    assert queue["queued"] == 1 and queue["workers"] == []
    metrics = api.get("/metrics").text
    assert "segserve_jobs_submitted_total 1.0" in metrics and "segserve_queue_depth 1.0" in metrics
    # Scaled to zero, with no model server: the gateway still takes jobs, and says what is missing.
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "degraded", ready.text
    checks = ready.json()["checks"]
    assert (
        checks["redis"] == "ok"
        and checks["torchserve"].startswith("unknown")
        and checks["workers"].startswith("none alive")
    )
    assert_problem(api.get("/v1/models"), 503, "backend_unavailable")
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/predict"} <= set(paths)
    assert api.get("/").status_code == 200 and api.get("/docs").status_code == 200


def model_entry(workers_ready: int, version: str = "1.0") -> ModelInfo:
    return ModelInfo("deeplabv3", version, True, 2, workers_ready, engine="onnxruntime")


def beat(redis: RedisServer, host: str, backend: str, models: list[ModelInfo], at_ms: float) -> None:
    """A worker's heartbeat, as a worker on another host sends it, through the job store."""

    async def run() -> None:
        redis_client = ArqRedis.from_url(redis.url)
        info = WorkerInfo(f"{host}:1", host, 1, "", "", 8, backend, models)
        await Fleet(redis_client).heartbeat(info, at_ms)
        await redis_client.aclose()

    asyncio.run(run())


def test_models_and_readiness_come_from_the_workers_heartbeats(api: TestClient, env: RedisServer) -> None:
    """The gateway reaches no TorchServe: each worker reports the one beside it, from any host."""
    beat(env, "host-a", "down", [], now_ms())
    assert api.get("/readyz").json()["checks"]["torchserve"] == "down"
    assert_problem(api.get("/v1/models"), 503, "backend_unavailable")

    beat(env, "host-b", "ok", [model_entry(2), model_entry(1, "2.0")], now_ms())
    beat(env, "host-c", "ok", [model_entry(1)], now_ms())
    ready = api.get("/readyz").json()
    assert ready["status"] == "ready" and ready["checks"]["workers"] == "ok: 3 alive", ready
    time.sleep(2.1)  # past SEGSERVE_MODELS_CACHE_SECONDS
    models = {m["version"]: m for m in api.get("/v1/models").json()["models"]}
    assert models["1.0"]["workers_ready"] == 3 and models["2.0"]["workers_ready"] == 1
    assert models["1.0"]["engine"] == "onnxruntime"
    assert "models" not in api.get("/v1/queue").json()["workers"][0]
    assert_problem(api.post("/v1/jobs?model=nosuch", content=IMAGE, headers=JPEG), 404, "model_not_found")

    # Every worker gone (scaled to zero): the last catalog stands, with no workers, and jobs still queue.
    stale = now_ms() - 60_000
    for host in ("host-a", "host-b", "host-c"):
        beat(env, host, "ok", [model_entry(1)], stale)
    time.sleep(2.1)
    [model] = api.get("/v1/models").json()["models"]
    assert model["workers"] == 0 and model["workers_ready"] == 0
    assert api.get("/readyz").json()["checks"]["torchserve"].startswith("unknown")
    assert api.post("/v1/jobs", content=IMAGE, headers=JPEG).status_code == 202


def test_a_heartbeat_from_a_newer_worker_still_reads() -> None:
    """Workers and gateways are upgraded one by one: a field this version does not know is left out."""
    model = model_entry(1)
    newer = (
        WorkerInfo("h:1", "h", 1, "", "", 8, "ok", [model]).to_json().replace('"name"', '"later": 1, "name"')
    )
    assert WorkerInfo.from_json(newer).models == [model]


def test_redis_down_is_503(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGSERVE_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    from gateway.app import app

    with TestClient(app, client=LOOPBACK_CLIENT) as api:
        assert_problem(api.post("/v1/jobs", content=IMAGE, headers=JPEG), 503, "redis_unavailable")
        assert_problem(api.get("/readyz"), 503, "not_ready")
