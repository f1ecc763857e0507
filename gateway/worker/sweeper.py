"""Each worker also removes blobs whose job is gone: soon after a job expires or is deleted (the blob
expiries the job store keeps in Redis), and now and then whatever a crash left with no job at all (by listing
the blob store; one worker of the fleet at a time). An S3 lifecycle rule is the backstop (docs/storage.md)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import datetime, timezone

from gateway.jobs import JobStore, keys
from gateway.settings import Settings

logger = logging.getLogger(__name__)
EXPIRED_EVERY_S = 5.0
ORPHAN_GRACE_S = 600  # a blob older than this whose job does not exist is left from a crash
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
            orphans = await self.sweep_orphans() if await self.take_orphan_sweep(self.orphans_every_s) else 0
            if orphans:
                logger.warning("blob sweep: removed %d blobs that no job owned (left by a crash)", orphans)

    async def sweep_orphans(self, grace_s: float = ORPHAN_GRACE_S) -> int:
        """Delete blobs that no job owns, older than ``grace_s`` (what a crash between writing a blob and
        recording its job leaves behind); how many went. Lists the whole store: run it rarely."""
        cutoff = datetime.now(timezone.utc).timestamp() - grace_s
        orphans = 0
        for prefix in (keys.INPUTS, keys.MASKS, keys.OVERLAYS):
            batch: list[str] = []
            async for blob in self.store.blobs.list(prefix):
                if blob.modified.timestamp() < cutoff:
                    batch.append(blob.name)
                if len(batch) == 500:
                    orphans += await self._delete_unowned(batch)
                    batch = []
            orphans += await self._delete_unowned(batch)
        return orphans

    async def _delete_unowned(self, names: list[str]) -> int:
        owners = [keys.job_of_blob(name) or "" for name in names]
        async with self.store.redis.pipeline(transaction=False) as pipe:
            for owner in owners:
                pipe.exists(keys.job(owner))
            exists = await pipe.execute() if owners else []
        unowned = [
            name for name, owner, found in zip(names, owners, exists, strict=True) if owner and not found
        ]
        await self.store.blobs.delete(unowned)
        return len(unowned)

    async def take_orphan_sweep(self, every_s: float) -> bool:
        """Whether this process is the one to look for orphans now: one of the fleet per ``every_s``."""
        return bool(await self.store.redis.set(keys.ORPHAN_SWEEP_LOCK, "1", nx=True, px=int(every_s * 1000)))
