"""Jobs made as a gateway makes them, for tests that drive the job store directly: the input goes to the blob
store first, then the job into Redis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from arq.connections import ArqRedis
from obstore.store import LocalStore

from gateway.jobs import (
    Blobs,
    Job,
    JobParams,
    JobStore,
    OwnerLimits,
    StoreConfig,
    Submission,
    keys,
    new_job_id,
)


def directory_blobs(directory: Path, min_free_bytes: int = 0) -> Blobs:
    return Blobs(LocalStore(directory, mkdir=True), directory, min_free_bytes)


def directory_store(redis_url: str, directory: Path, **config: Any) -> JobStore:
    """A job store on ``redis_url`` whose blobs are in ``directory``; ``config``: StoreConfig's fields."""
    return JobStore(ArqRedis.from_url(redis_url), directory_blobs(directory), StoreConfig(**config))


async def submit(
    store: JobStore,
    image: bytes,
    owner: str = "",
    idempotency: str | None = None,
    limits: OwnerLimits | None = None,
    **fields: Any,
) -> Job:
    """Store ``image`` and queue its job, within the owner's ``limits``; ``fields``: more of Submission's
    (webhook, params, priority, …)."""
    job_id = new_job_id()
    await store.blobs.put(keys.input_blob(job_id), image)
    sub = Submission(
        job_id=job_id,
        model=fields.pop("model", "deeplabv3"),
        params=fields.pop("params", JobParams()),
        content_type="image/jpeg",
        input_bytes=len(image),
        width=fields.pop("width", 32),
        height=fields.pop("height", 24),
        owner=owner,
        **fields,
    )
    job, _, _ = await store.submit(sub, idempotency, limits)
    return job
