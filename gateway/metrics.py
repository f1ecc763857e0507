"""Prometheus metrics across every worker and gateway: counters and histogram buckets live in Redis
(``segserve:stats``), workers add to them, and the gateway's ``/metrics`` reads them at scrape time."""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from gateway.jobs import QUEUE, RUNNING, STATS

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
HISTOGRAMS = {
    "queue_wait": "Seconds from submission until a worker started the job",
    "inference": "Seconds of model time per job, as the handler measured it",
    "total": "Seconds from submission until the job ended",
}
STATUSES = ("succeeded", "failed", "canceled")


def record_finished(pipe: Any, status: str, seconds: dict[str, float]) -> None:
    """Queue, on a Redis pipeline, the counter and histogram updates for one finished job."""
    pipe.hincrby(STATS, f"finished:{status}", 1)
    for name, value in seconds.items():
        index = bisect.bisect_left(BUCKETS, value)
        bucket = repr(BUCKETS[index]) if index < len(BUCKETS) else "+Inf"
        pipe.hincrby(STATS, f"{name}:bucket:{bucket}", 1)
        pipe.hincrbyfloat(STATS, f"{name}:sum", value)


class RedisCollector(Collector):
    def __init__(self, read: Any) -> None:
        self._read = read  # () -> (stats hash, queue length, running count), fetched before each scrape

    def collect(self) -> Iterator[Any]:
        stats, in_queue, running = self._read()
        submitted = CounterMetricFamily("segserve_jobs_submitted", "Jobs accepted by the gateways")
        submitted.add_metric([], float(stats.get("submitted", 0)))
        yield submitted
        finished = CounterMetricFamily(
            "segserve_jobs_finished", "Jobs that ended, by status", labels=["status"]
        )
        for status in STATUSES:
            finished.add_metric([status], float(stats.get(f"finished:{status}", 0)))
        yield finished
        yield GaugeMetricFamily(
            "segserve_queue_depth", "Jobs waiting for a worker", value=max(0, in_queue - running)
        )
        yield GaugeMetricFamily("segserve_jobs_running", "Jobs a worker is running", value=running)
        for name, doc in HISTOGRAMS.items():
            cumulative, buckets = 0.0, []
            for le in [*map(repr, BUCKETS), "+Inf"]:
                cumulative += float(stats.get(f"{name}:bucket:{le}", 0))
                buckets.append((le, cumulative))
            family = HistogramMetricFamily(f"segserve_job_{name}_seconds", doc)
            family.add_metric([], buckets, sum_value=float(stats.get(f"{name}:sum", 0)))
            yield family


async def render(redis: Any) -> bytes:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(STATS)
        pipe.zcard(QUEUE)
        pipe.zcount(RUNNING, time.time() * 1000, "+inf")
        raw, in_queue, running = await pipe.execute()
    stats = {k.decode(): v.decode() for k, v in raw.items()}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(lambda: (stats, in_queue, running)))
    registry.register(ProcessCollector(registry=None))
    return generate_latest(registry)
