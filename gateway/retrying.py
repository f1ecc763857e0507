"""How long to wait before trying again: one backoff for every retry loop, and one ``Retry-After`` reader.

The worker's tries, the webhook deliveries, the SDK's requests and the launcher's restarts all wait the same
way: a first delay that doubles per attempt up to a cap, with jitter where many senders may come back at once.
"""

from __future__ import annotations

import email.utils
import random
from datetime import datetime, timezone


def backoff(attempt: int, first: float, cap: float, *, jitter: bool = False) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 for the first): ``first``, doubling per
    attempt, at most ``cap``. With ``jitter``, a random share of that between half and all of it, so that
    clients that failed together do not come back together."""
    delay = min(first * 2 ** min(max(attempt - 1, 0), 60), cap)
    return float(delay * random.uniform(0.5, 1.0) if jitter else delay)


def retry_after(value: str | None, cap: float, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (RFC 9110 §10.2.3: delta-seconds or an HTTP date), at most
    ``cap``; None when absent or malformed."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), cap)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)  # HTTP dates are in GMT
    seconds = (moment - (now or datetime.now(timezone.utc))).total_seconds()
    return min(max(0.0, seconds), cap)
