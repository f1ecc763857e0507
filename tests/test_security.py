"""Nobody let in: API keys, the compatibility route's image root, TorchServe's tokens, nothing executable
in Redis, nothing internal in answers."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from gateway.jobs import new_job_id
from gateway.settings import Settings
from gateway.tenants import load as load_tenants
from tests.harness.images import encode, scene
from tests.harness.processes import free_port
from tests.harness.servers import Stack

SMALL = encode(scene(48, 32))


def test_api_keys_are_kept_only_as_digests(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# operators\nfile-key-1\n\nfile-key-2\n")
    stored = load_tenants(Settings(api_keys="env-key", api_keys_file=str(keys_file))).by_digest
    assert len(stored) == 3
    shown = json.dumps({digest: vars(tenant) for digest, tenant in stored.items()})
    assert not any(k in shown for k in ("env-key", "file-key-1", "file-key-2"))


def test_keys_from_a_file_guard_every_route_but_health_and_hide_the_hosts(
    stack: Stack, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("only-key\n")
    guarded = Stack(stack.redis, stack.torchserve, stack.env, log_dir=stack.log_dir)
    guarded.start_gateway(SEGSERVE_API_KEYS_FILE=str(keys_file))
    try:
        with httpx.Client(base_url=guarded.url, timeout=60) as client:
            for method, path in (
                ("GET", "/v1/models"),
                ("GET", "/v1/queue"),
                ("GET", "/openapi.json"),
                ("GET", "/v1/jobs/j_" + "0" * 32),
                ("POST", "/predict"),
                ("GET", "/job_status/x"),
            ):
                assert client.request(method, path).status_code == 401, path
            for path in ("/healthz", "/readyz", "/metrics"):
                assert client.get(path).status_code == 200, path
            headers = {"Authorization": "Bearer only-key", "Content-Type": "image/jpeg", "Prefer": "wait=30"}
            assert client.post("/v1/jobs", content=SMALL, headers=headers).json()["status"] == "succeeded"
            # A tenant learns how many workers there are and how busy, never where they run.
            workers = client.get("/v1/queue", headers=headers).json()["workers"]
            open_workers = httpx.get(f"{stack.url}/v1/queue").json()[
                "workers"
            ]  # no keys: the operator's stack
            assert workers and {"host", "pid"}.isdisjoint(workers[0])
            assert open_workers[0]["host"] and str(open_workers[0]["pid"]) not in json.dumps(workers)
    finally:
        guarded.stop()


def test_no_pickle_in_redis(stack: Stack) -> None:
    """arq's job records are JSON (its results would be too, but it keeps none: outcomes are the job's own)."""
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        ids = [
            client.post("/v1/jobs", content=SMALL, headers={"Content-Type": "image/jpeg"}).json()["id"]
            for _ in range(3)
        ]
        with stack.redis.client() as redis:
            records = [redis.get(f"arq:job:{job_id}") for job_id in ids]  # read while the jobs are queued
        for job_id in ids:
            client.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=30"})
    records = [r for r in records if r is not None]
    assert records, "every job ended before its record could be read"
    for record in records:
        assert not record.startswith(b"\x80")  # pickle's protocol marker
        json.loads(record)
    with stack.redis.client() as redis:
        assert redis.keys("arq:result:*") == []


def test_worker_picks_up_a_rotated_torchserve_token(stack: Stack) -> None:
    old = stack.torchserve.key("inference")
    api = {"Authorization": f"Bearer {stack.torchserve.key('API')}"}
    rotated = httpx.get(f"{stack.torchserve.management_url}/token", params={"type": "inference"}, headers=api)
    assert rotated.status_code == 200
    assert stack.torchserve.key("inference") != old
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        job = client.post(
            "/v1/jobs", content=SMALL, headers={"Content-Type": "image/jpeg", "Prefer": "wait=30"}
        ).json()
    assert job["status"] == "succeeded" and job["attempts"] == 1


def test_answers_reveal_nothing_internal(stack: Stack) -> None:
    redis_port = free_port()
    blind = Stack(stack.redis, stack.torchserve, stack.env, log_dir=stack.log_dir)
    blind.start_gateway(SEGSERVE_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0")
    try:
        answers = [
            httpx.get(f"{blind.url}/v1/jobs/j_" + "0" * 32),
            httpx.post(f"{blind.url}/v1/jobs", content=SMALL, headers={"Content-Type": "image/jpeg"}),
            httpx.get(f"{blind.url}/readyz"),
            httpx.get(f"{stack.url}/v1/jobs/nope"),
        ]
    finally:
        blind.stop()
    for answer in answers:
        assert "Traceback" not in answer.text and str(redis_port) not in answer.text
        assert str(stack.torchserve.inference) not in answer.text


def test_job_ids_are_unguessable() -> None:
    ids = {new_job_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 34 and i.startswith("j_") for i in ids)
    digits = "".join(i[2:] for i in ids)
    counts = [digits.count(c) for c in "0123456789abcdef"]
    assert max(counts) / min(counts) < 1.1  # uniform over all 16 hex digits: 128 random bits per id
