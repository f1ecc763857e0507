"""The job protocol: every Redis read and write of a job, on typed records.

Gateways submit, read, cancel and delete; workers start and complete; both go through ``JobStore``.
"""

from gateway.jobs.records import (
    Job,
    JobError,
    JobStatus,
    Outcome,
    QueueStats,
    Result,
    Submission,
    WorkerInfo,
    iso,
)
from gateway.jobs.store import (
    BUCKETS,
    ENQUEUED_CHANNEL,
    FUNCTION,
    HISTOGRAMS,
    Delivery,
    JobStore,
    NotReplicated,
    QueueFull,
    Started,
    deserialize,
    now_ms,
    serialize,
    valid_id,
)
from gateway.jobs.waiting import Waiters

__all__ = [
    "BUCKETS",
    "ENQUEUED_CHANNEL",
    "FUNCTION",
    "HISTOGRAMS",
    "Delivery",
    "Job",
    "JobError",
    "JobStatus",
    "JobStore", "NotReplicated",
    "Outcome",
    "QueueFull",
    "QueueStats",
    "Result",
    "Started",
    "Submission",
    "Waiters",
    "WorkerInfo",
    "deserialize",
    "iso",
    "now_ms",
    "serialize",
    "valid_id",
]  # fmt: skip
