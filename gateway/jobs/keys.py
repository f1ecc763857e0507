"""Every name segserve gives to something it stores: Redis keys and channels, and blob names.

They are spelled here and nowhere else: the Lua scripts get each key, or the prefix it is made from, as an
argument. arq's own keys are arq's (``arq.constants``), named here so every module takes them from one place.
"""

from __future__ import annotations

import re
import secrets

from arq.constants import default_queue_name, in_progress_key_prefix, job_key_prefix, retry_key_prefix

# A job's id: the name of everything it owns.
JOB_ID = re.compile(r"^j_[0-9a-f]{32}$")


def valid_id(job_id: str) -> bool:
    return bool(JOB_ID.match(job_id))


def new_job_id() -> str:
    return "j_" + secrets.token_hex(16)  # 128 random bits


# arq's: its queue (a sorted set of job ids, by when they may run), a job's record, its running try, its tries.
QUEUE = default_queue_name
ARQ_JOB_PREFIX = job_key_prefix
IN_PROGRESS_PREFIX = in_progress_key_prefix
ARQ_RETRY_PREFIX = retry_key_prefix

JOB_PREFIX = "segserve:job:"  # hash: a job's facts and, once it has ended, its outcome
RUNNING = "segserve:running"  # sorted set: job id -> deadline of its try (ms); stale entries age out
PENDING = "segserve:pending"  # hash: job id -> bytes of its input, for each job accepted and not yet ended
BLOB_EXPIRY = "segserve:blob-expiry"  # sorted set: job id -> when its blobs may go, if the job is gone (ms)
STATS = "segserve:stats"  # hash of counters, histogram buckets and the pending bytes, shared by all processes
WORKERS = "segserve:workers"  # sorted set: worker id -> last heartbeat (ms)
WORKER_PREFIX = "segserve:worker:"  # a worker's last heartbeat, as JSON
MODELS = "segserve:models"  # the last model catalog a worker reported: /v1/models while none is alive
DELIVERIES = "segserve:deliveries"  # sorted set: webhook delivery id -> when it is due (ms)
DELIVERY_PREFIX = "segserve:delivery:"  # hash: one webhook delivery
# What every ending of a job touches, in this order in each ending script: its counters, its input's bytes
# leaving the pending sum, and the webhook deliveries it schedules.
ENDING = (STATS, PENDING, DELIVERIES)
IDEMPOTENCY_PREFIX = "segserve:idempotency:"  # <owner>:<Idempotency-Key> -> the first job's id
ORPHAN_SWEEP_LOCK = "segserve:orphan-sweep"  # held by the one worker that lists the blob store

# Fair sharing between API keys (owners): each owner's jobs wait in a queue of their own until the dispatch step
# hands them to arq's queue, a few at a time, in weighted fair order (see lua/shared.lua's dispatch).
WAITING_PREFIX = "segserve:waiting:"  # sorted set per owner: its jobs not yet handed to arq, in their order
DISPATCHED_PREFIX = (
    "segserve:dispatched:"  # set per owner: its jobs in arq's queue (waiting there or running)
)
TENANT_PREFIX = "segserve:tenant:"  # hash per owner: weight, limits, its fair-order pass, its rate bucket
JOBS_OF_PREFIX = "segserve:jobs-of:"  # sorted set per owner: its jobs by creation, for GET /v1/jobs
ACTIVE = "segserve:active"  # sorted set: owner with jobs waiting -> its pass (the lowest goes next)
BACKLOG = "segserve:backlog"  # sorted set: every job accepted and not ended -> created (ms); KEDA counts it
DEADLINES = "segserve:deadlines"  # sorted set: job not started yet -> when it expires unstarted (ms)

# A job id, whenever that job's state changed; "<id> running" when it started (STARTED).
CHANGED_CHANNEL = "segserve:changed"
STARTED = "running"  # the change a job's start publishes after its id: it has not ended
ENQUEUED_CHANNEL = "segserve:enqueued"  # wakes idle workers at once instead of at their next poll

PENDING_BYTES = "pending_bytes"  # the field of STATS that sums PENDING
FLEET_SLOTS = "fleet_slots"  # the field of STATS: jobs the live workers take at once, as their heartbeats say


def job(job_id: str) -> str:
    return JOB_PREFIX + job_id


def job_and_arq(job_id: str) -> list[str]:
    """The job's hash, then arq's queue and arq's keys for it: the first keys of every step that may move the
    job in or out of arq (the Lua scripts read them as KEYS[1] to KEYS[5])."""
    return [job(job_id), QUEUE, arq_job(job_id), in_progress(job_id), arq_retry(job_id)]


def arq_job(job_id: str) -> str:
    return ARQ_JOB_PREFIX + job_id


def in_progress(job_id: str) -> str:
    return IN_PROGRESS_PREFIX + job_id


def arq_retry(job_id: str) -> str:
    return ARQ_RETRY_PREFIX + job_id


def waiting(owner: str) -> str:
    return WAITING_PREFIX + owner


def dispatched(owner: str) -> str:
    return DISPATCHED_PREFIX + owner


def tenant(owner: str) -> str:
    return TENANT_PREFIX + owner


def jobs_of(owner: str) -> str:
    return JOBS_OF_PREFIX + owner


def layout() -> dict[str, str]:
    """Every key and prefix the scripts' shared steps use, as one argument (``S`` in lua/shared.lua)."""
    return {
        "queue": QUEUE,
        "arq_job": ARQ_JOB_PREFIX,
        "arq_retry": ARQ_RETRY_PREFIX,
        "in_progress": IN_PROGRESS_PREFIX,
        "job": JOB_PREFIX,
        "running": RUNNING,
        "pending": PENDING,
        "stats": STATS,
        "due": DELIVERIES,
        "delivery": DELIVERY_PREFIX,
        "waiting": WAITING_PREFIX,
        "dispatched": DISPATCHED_PREFIX,
        "tenant": TENANT_PREFIX,
        "jobs_of": JOBS_OF_PREFIX,
        "active": ACTIVE,
        "backlog": BACKLOG,
        "deadlines": DEADLINES,
        "changed": CHANGED_CHANNEL,
        "started": STARTED,
        "enqueued": ENQUEUED_CHANNEL,
    }


def worker(worker_id: str) -> str:
    return WORKER_PREFIX + worker_id


def delivery(delivery_id: str) -> str:
    return DELIVERY_PREFIX + delivery_id


def idempotency(owner: str, key: str) -> str:
    return f"{IDEMPOTENCY_PREFIX}{owner}:{key}"


# Blobs: a job's input, mask and overlay, each under a prefix of its own (an S3 lifecycle rule can name it).
INPUTS, MASKS, OVERLAYS = "inputs/", "masks/", "overlays/"


def input_blob(job_id: str) -> str:
    return INPUTS + job_id


def mask_blob(job_id: str) -> str:
    return f"{MASKS}{job_id}.png"


def overlay_blob(job_id: str) -> str:
    return f"{OVERLAYS}{job_id}.png"


def blobs_of(job_id: str) -> tuple[str, ...]:
    """Every blob a job may have."""
    return input_blob(job_id), mask_blob(job_id), overlay_blob(job_id)


def job_of_blob(name: str) -> str | None:
    """The id of the job a blob belongs to; None for a name segserve does not give."""
    for prefix in (INPUTS, MASKS, OVERLAYS):
        if name.startswith(prefix):
            return name[len(prefix) :].removesuffix(".png") or None
    return None
