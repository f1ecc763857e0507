"""The job store's bounds and timing (``StoreConfig``), and the ways its steps refuse: a full queue, a try
overtaken by a newer one, a job that too few replicas confirmed, a retry that cannot be."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.settings import Settings


class QueueFull(Exception):
    """A bound refuses a job: ``limit`` is 'queue' (jobs), 'bytes' (pending inputs), 'memory' (Redis near its
    maxmemory), or the owner's own 'key_queue' (its jobs) or 'key_rate' (its submissions a second).
    ``retry_after_s``: when to try again."""

    def __init__(self, limit: str, retry_after_s: int = 5) -> None:
        super().__init__(limit)
        self.limit = limit
        self.retry_after_s = retry_after_s


class StaleTry(Exception):
    """A try stalled past its lease (a paused or partitioned worker) while a newer try started: the step was
    refused, and the newer try's state is untouched. arq's own end of the stale try must leave it alone too."""


class NotReplicated(Exception):
    """Fewer replicas than asked for confirmed a new job in time."""


@dataclass(frozen=True)
class RetryRefused:
    """Why a job cannot be queued again: 'active' (queued or running), 'succeeded', 'ending' (canceled
    while it ran, and that try has not ended yet), 'no_input' (its input is gone) or 'missing'."""

    reason: str


@dataclass(frozen=True)
class StoreConfig:
    """The job store's bounds and timing, from the settings of the same names."""

    result_ttl_s: int = 3600
    max_queued: int = 1000
    max_queued_bytes: int = 4 << 30
    min_replicas: int = 0
    replica_timeout_ms: int = 1000
    try_ms: float = 75_000  # the longest a try may run: a deleted job's blobs are looked at again after it
    min_window: int = 8  # arq's queue is filled to twice the live workers' slots, and at least to this

    @classmethod
    def from_settings(cls, settings: Settings) -> StoreConfig:
        return cls(
            result_ttl_s=settings.result_ttl,
            max_queued=settings.max_queued,
            max_queued_bytes=settings.max_queued_bytes,
            min_replicas=settings.redis_min_replicas,
            replica_timeout_ms=settings.redis_replica_timeout_ms,
            try_ms=(settings.inference_timeout + 15) * 1000,
            min_window=settings.worker_concurrency,
        )

    @property
    def ttl_ms(self) -> int:
        return self.result_ttl_s * 1000

    @property
    def longest_wait_ms(self) -> int:
        """How long a job may wait to start when it names no queue_timeout: it ends 'expired' before its
        metadata's TTL could remove it unseen."""
        return max(self.ttl_ms * 9 // 10, self.ttl_ms - 10_000)
