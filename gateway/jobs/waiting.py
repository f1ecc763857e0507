"""Waiting for jobs to change: one pub/sub subscription per gateway wakes every request that waits."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from arq.connections import ArqRedis

from gateway.jobs.channels import follow
from gateway.jobs.connection import close, stop
from gateway.jobs.keys import CHANGED_CHANNEL, STARTED
from gateway.jobs.records import Job, JobStatus
from gateway.jobs.store import JobStore

QUIET_SECONDS = 15.0  # a stream of changes says it is alive at least this often
MIN_INTERVAL = 0.1  # and re-reads a job at most this often


ANY_JOB = "*"  # watchers of every change: a queued job's position moves when any job ahead changes


class Waiters:
    """Wakes requests that wait for jobs to change, from one subscription to the changed channel."""

    def __init__(self, redis: ArqRedis) -> None:
        self.redis = redis  # its own connection: a subscription holds it
        self._events: dict[str, set[asyncio.Event]] = {}
        self._ends: dict[str, set[asyncio.Event]] = {}  # woken by changes that may end the job
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # A gap wakes everyone: they read the state again, so that nothing that changed meanwhile is missed.
        self._task = asyncio.create_task(follow(self.redis, CHANGED_CHANNEL, self._wake, self._wake_all))

    async def stop(self) -> None:
        if self._task is not None:
            await stop(self._task)
        await close(self.redis)

    def _wake(self, message: bytes) -> None:
        job_id, _, change = message.decode().partition(" ")
        for key in (job_id, ANY_JOB):
            for event in self._events.get(key, ()):
                event.set()
        if change != STARTED:
            for event in self._ends.get(job_id, ()):
                event.set()

    def _wake_all(self) -> None:
        for watchers in (self._events, self._ends):
            for events in watchers.values():
                for event in events:
                    event.set()

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str, *, ends_only: bool = False) -> AsyncIterator[asyncio.Event]:
        """An event set when the job (or, for ANY_JOB, any job) may have changed, or with ``ends_only``
        may have ended; register before reading the state to miss nothing."""
        watchers = self._ends if ends_only else self._events
        event = asyncio.Event()
        watchers.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            events = watchers.get(job_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del watchers[job_id]

    async def changes(self, store: JobStore, job_id: str, owner: str) -> AsyncIterator[Job | None]:
        """The job now, then again whenever it may have changed (any job's change can move its queue
        position) or QUIET_SECONDS pass, until it has ended or is gone (None)."""
        async with self.watch(job_id) as own, self.watch(ANY_JOB) as anything:
            while True:
                own.clear()  # before reading, so a change during the read is not lost
                anything.clear()
                job = await store.load(job_id, owner)
                yield job
                if job is None or job.status.is_terminal():
                    return
                # A queued job's position moves with any job's change; past the queue, only its own matter.
                changed = anything if job.status is JobStatus.QUEUED else own
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), QUIET_SECONDS)
                await asyncio.sleep(MIN_INTERVAL)  # at most this often, however busy the queue

    async def wait_for_end(self, store: JobStore, job_id: str, owner: str, timeout: float) -> Job | None:
        """The job once it has ended, or as it stands after ``timeout`` seconds; None once it is gone."""
        deadline = time.monotonic() + timeout
        # Woken when it may have ended, not when it starts: a read a job saved.
        async with self.watch(job_id, ends_only=True) as event:
            while True:
                event.clear()  # before reading, so a notification during the read is not lost
                job = await store.load(job_id, owner)
                remaining = deadline - time.monotonic()
                if job is None or job.status.is_terminal() or remaining <= 0:
                    return job
                # The notification is what wakes us; the 5 s bound only guards against a lost message.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, 5.0))
