"""A job's states, shared by the server and the SDK (which imports nothing of the server's)."""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"  # not started before its deadline (queue_timeout)

    def is_terminal(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


def is_terminal(status: str) -> bool:
    """Whether a job whose ``status`` the API gave has ended: its state will not change again."""
    return JobStatus(status).is_terminal()
