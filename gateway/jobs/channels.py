"""Following a Redis pub/sub channel for a process's life: gateways follow the changed channel (to wake the
requests that wait), workers the enqueued one (to take new work at once)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from redis.asyncio import Redis

logger = logging.getLogger(__name__)
RECONNECT_SECONDS = 0.5


async def follow(
    redis: Redis, channel: str, on_message: Callable[[bytes], None], on_gap: Callable[[], None]
) -> None:
    """Call ``on_message`` with each message on ``channel`` until cancelled, reconnecting when Redis goes away.
    ``on_gap`` is called whenever messages may have been missed: at each (re)subscription, and when the
    connection is lost."""
    while True:
        try:
            async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(channel)
                on_gap()
                while True:  # a quiet channel is no error, whatever the connection's read timeout
                    message = await pubsub.get_message(timeout=60)
                    if message is not None:
                        on_message(message["data"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis restarting or failing over
            logger.warning("%s: notifications interrupted (%s); reconnecting", channel, exc)
            on_gap()
            await asyncio.sleep(RECONNECT_SECONDS)
