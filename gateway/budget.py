"""A process's memory ceiling for image work: a weighted semaphore of bytes.

Work that holds image bytes (a body being read, an input sent to the model server, an overlay being drawn)
first reserves what it may hold, and waits while the budget is taken, so a process's memory stays under
its base size plus the budget whatever arrives. Waiters are served in arrival order, so a large image is
never starved by a stream of small ones; one larger than the whole budget waits for all of it and runs alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class BudgetTimeout(Exception):
    """The reservation was not granted in time: the process is busy with other images."""


class MemoryBudget:
    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int, timeout: float | None = None) -> AsyncIterator[None]:
        """Hold ``nbytes`` of the budget for the block; BudgetTimeout when not granted within ``timeout``."""
        granted = await self._acquire(nbytes, timeout)
        try:
            yield
        finally:
            self._release(granted)

    async def _acquire(self, nbytes: int, timeout: float | None) -> int:
        nbytes = min(max(nbytes, 0), self.total)
        if not self._waiters and self.used + nbytes <= self.total:
            self.used += nbytes
            return nbytes
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = (nbytes, granted)
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(granted, timeout)
        except BaseException as exc:
            if granted.done() and not granted.cancelled():
                self._release(nbytes)  # granted in the very moment we gave up: hand it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                self._grant()  # those behind us may fit now
            if isinstance(exc, asyncio.TimeoutError):
                raise BudgetTimeout(f"{nbytes} bytes of image memory not free within {timeout:g} s") from None
            raise
        return nbytes

    def _release(self, nbytes: int) -> None:
        self.used -= nbytes
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            nbytes, granted = self._waiters[0]
            if granted.done():  # cancelled meanwhile
                self._waiters.popleft()
                continue
            if self.used + nbytes > self.total:
                return
            self._waiters.popleft()
            self.used += nbytes
            granted.set_result(None)
