"""Each worker also removes blobs whose job is gone: soon after a job expires or is deleted (the blob
expiries the job store keeps in Redis), and now and then whatever a crash left with no job at all (by listing
the blob store; one worker of the fleet at a time). An S3 lifecycle rule is the backstop (docs/storage.md)."""

from __future__ import annotations

import asyncio
import logging
import random
import time

from gateway.jobs import JobStore
from gateway.settings import Settings

logger = logging.getLogger(__name__)
EXPIRED_EVERY_S = 5.0
BATCH = 200


class Sweeper:
    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.orphans_every_s = settings.blob_sweep_seconds
        # Not every worker of a fleet that starts at once looks at the same moment.
        self.next_orphan_sweep = time.monotonic() + random.uniform(30, 90)

    async def run(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except Exception as exc:  # never let this loop end: blobs would stay for the process's life
                logger.warning("blob sweep: %s; trying again later", exc)
            await asyncio.sleep(EXPIRED_EVERY_S)

    async def sweep_once(self) -> None:
        while await self.store.sweep_expired(BATCH) == BATCH:
            pass  # more are due: go on
        if time.monotonic() >= self.next_orphan_sweep:
            self.next_orphan_sweep = time.monotonic() + self.orphans_every_s
            orphans = (
                await self.store.sweep_orphans()
                if await self.store.take_orphan_sweep(self.orphans_every_s)
                else 0
            )
            if orphans:
                logger.warning("blob sweep: removed %d blobs that no job owned (left by a crash)", orphans)
