"""The job protocol: every Redis read and write of a job, on typed records, and the blobs that go with it.

Gateways submit, read, cancel and delete; workers start and complete; both go through ``JobStore``. Its bounds
and refusals are in ``bounds``, job ids and key names in ``keys``, the image bytes in ``blobs``, webhook
deliveries in ``outbox``, heartbeats and counters in ``fleet``, per-key dispatch in ``fairness``.
"""

from gateway.jobs.blobs import Blobs, BlobStoreError, BlobStoreFull
from gateway.jobs.bounds import NotReplicated, QueueFull, RetryRefused, StaleTry, StoreConfig
from gateway.jobs.connection import deserialize, serialize
from gateway.jobs.fairness import Admission, OwnerLimits
from gateway.jobs.fleet import BUCKETS, HISTOGRAMS, Counters, Fleet
from gateway.jobs.keys import ENQUEUED_CHANNEL, new_job_id, valid_id
from gateway.jobs.outbox import Delivery, DeliveryState, Outbox
from gateway.jobs.records import (
    Job,
    JobError,
    JobParams,
    JobStatus,
    ModelInfo,
    Outcome,
    Priority,
    QueueStats,
    Result,
    Submission,
    WorkerInfo,
    failure_code,
    iso,
    now_ms,
)
from gateway.jobs.store import FUNCTION, JobStore
from gateway.jobs.waiting import Waiters

__all__ = [
    "BUCKETS",
    "ENQUEUED_CHANNEL",
    "FUNCTION",
    "HISTOGRAMS",
    "Admission",
    "BlobStoreError",
    "BlobStoreFull",
    "Blobs",
    "Counters",
    "Delivery",
    "DeliveryState",
    "Fleet",
    "Job",
    "JobError",
    "JobParams",
    "JobStatus",
    "JobStore",
    "ModelInfo",
    "NotReplicated",
    "Outbox",
    "Outcome",
    "OwnerLimits",
    "Priority",
    "QueueFull",
    "QueueStats",
    "Result",
    "RetryRefused",
    "StaleTry",
    "StoreConfig",
    "Submission",
    "Waiters",
    "WorkerInfo",
    "deserialize",
    "failure_code",
    "iso",
    "new_job_id",
    "now_ms",
    "serialize",
    "valid_id",
]
