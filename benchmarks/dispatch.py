"""What one fair dispatch costs in Redis, with 1, 10 and 1,000 keys holding work and 50 or 1,000 jobs each.

Each cycle is a worker's end of a job (gateway.jobs.store.JobStore.complete), whose step hands the next job
to arq in weighted fair order. It prints the Redis commands one cycle runs (the scripts' own calls included)
and the microseconds one cycle takes, median over the cycles, against the smallest configuration in the same
run: the cost must follow the keys with work, never the jobs waiting.

    .venv/bin/python benchmarks/dispatch.py --cycles 300
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.jobs import JobParams, JobStore, Outcome, Result, Submission, keys, new_job_id
from tests.harness.jobs import directory_store
from tests.harness.processes import free_port
from tests.harness.servers import RedisServer

RESULT = Result(32, 24, [])
CONFIGS = ((1, 50), (10, 50), (1000, 10), (1, 1000), (10, 1000))  # (keys with work, jobs each)
SLOTS = 2  # the live workers' slots: arq's queue holds twice this, the rest wait in the keys' queues


async def fill(store: JobStore, owners: int, jobs_each: int) -> None:
    """Jobs as a gateway submits them, without their images (a dispatch never reads them)."""
    for index in range(owners * jobs_each):
        job_id = new_job_id()
        sub = Submission(
            job_id, "deeplabv3", JobParams(), "image/jpeg", 1000, 32, 24, owner=f"key-{index % owners}"
        )
        await store.submit(sub)


async def cycle(store: JobStore) -> None:
    job_id = (await store.redis.zrange(keys.QUEUE, 0, 0))[0].decode()
    started = await store.start(job_id, deadline_ms=4e12)
    assert started is not None
    await store.complete(started, Outcome.succeeded(RESULT, b"png", {}))


async def measure(redis: RedisServer, owners: int, jobs_each: int, cycles: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as blobs:
        store = directory_store(redis.url, Path(blobs), max_queued=10**7, result_ttl_s=3600, min_window=1)
        await store.redis.flushdb()
        await store.redis.hset(keys.STATS, keys.FLEET_SLOTS, str(SLOTS))  # type: ignore[misc]
        await fill(store, owners, jobs_each)
        await store.redis.config_resetstat()
        times = []
        for _ in range(cycles):
            began = time.perf_counter()
            await cycle(store)
            times.append(time.perf_counter() - began)
        stats = await store.redis.info("commandstats")
        await store.redis.aclose()
    calls = sum(stat["calls"] for name, stat in stats.items() if name != "cmdstat_info") / cycles
    return calls, statistics.median(times) * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=300, help="completions measured per configuration")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home, RedisServer(free_port(), Path(home)) as redis:
        print(f"{'keys':>6} {'jobs each':>10} {'commands/cycle':>15} {'µs/cycle':>10} {'÷ first':>8}")
        first = None
        for owners, jobs_each in CONFIGS:
            calls, micros = await measure(
                redis, owners, jobs_each, min(args.cycles, owners * jobs_each - 2 * SLOTS)
            )
            first = first or micros
            print(f"{owners:>6} {jobs_each:>10} {calls:>15.1f} {micros:>10.0f} {micros / first:>8.2f}")


if __name__ == "__main__":
    asyncio.run(main())
