"""What a key's limits say to its client: the RateLimit-Policy and RateLimit header fields (the IETF httpapi
draft, draft-ietf-httpapi-ratelimit-headers), on every submission's answer, refusals included.

Two policies, where the key has them: ``"rate"``, its submissions a second (a bucket of ``burst`` that
refills at ``rate``), and ``"queued"``, its jobs accepted and not ended.
"""

from __future__ import annotations

import math

from gateway.jobs.fairness import Admission, OwnerLimits


def ratelimit_headers(limits: OwnerLimits, admission: Admission) -> dict[str, str]:
    policies, states = [], []
    if limits.rate > 0:
        remaining = max(0, admission.tokens)
        policies.append(f'"rate";q={limits.burst};w={max(1, math.ceil(limits.burst / limits.rate))}')
        states.append(f'"rate";r={remaining};t={math.ceil(max(0, limits.burst - remaining) / limits.rate)}')
    if limits.max_queued > 0 and admission.queued >= 0:
        policies.append(f'"queued";q={limits.max_queued}')
        states.append(f'"queued";r={max(0, limits.max_queued - admission.queued)}')
    if not policies:
        return {}
    return {"RateLimit-Policy": ", ".join(policies), "RateLimit": ", ".join(states)}
