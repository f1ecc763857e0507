"""Prometheus metrics across every worker and gateway: the job store keeps the counters and histogram
buckets in Redis (workers add to them as jobs end), and ``/metrics`` reads them at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from gateway.jobs import BUCKETS, HISTOGRAMS, Counters, JobStatus, JobStore, keys

ENDED = [status for status in JobStatus if status.is_terminal()]


class StoreCollector(Collector):
    def __init__(self, counters: Counters) -> None:
        self.stats, self.in_queue, self.running = counters.stats, counters.in_queue, counters.running

    def collect(self) -> Iterator[Any]:
        stats = self.stats
        submitted = CounterMetricFamily("segserve_jobs_submitted", "Jobs accepted by the gateways")
        submitted.add_metric([], stats.get("submitted", 0))
        yield submitted
        finished = CounterMetricFamily(
            "segserve_jobs_finished", "Jobs that ended, by status", labels=["status"]
        )
        for status in ENDED:
            finished.add_metric([status.value], stats.get(f"finished:{status.value}", 0))
        yield finished
        deliveries = CounterMetricFamily(
            "segserve_webhook_deliveries",
            "Webhook delivery attempts by outcome: delivered, failed (given up), retried",
            labels=["outcome"],
        )
        for outcome in ("delivered", "failed", "retried"):
            deliveries.add_metric([outcome], stats.get(f"webhooks:{outcome}", 0))
        yield deliveries
        queued = max(0, self.in_queue - self.running)
        yield GaugeMetricFamily("segserve_queue_depth", "Jobs waiting for a worker", value=queued)
        yield GaugeMetricFamily("segserve_jobs_running", "Jobs a worker is running", value=self.running)
        yield GaugeMetricFamily(
            "segserve_pending_input_bytes",
            "Bytes of the inputs of jobs accepted and not yet ended, as SEGSERVE_MAX_QUEUED_BYTES counts them",
            value=stats.get(keys.PENDING_BYTES, 0),
        )
        for name, doc in HISTOGRAMS.items():
            cumulative, buckets = 0.0, []
            for le in [*map(repr, BUCKETS), "+Inf"]:
                cumulative += stats.get(f"{name}:bucket:{le}", 0)
                buckets.append((le, cumulative))
            family = HistogramMetricFamily(f"segserve_job_{name}_seconds", doc)
            family.add_metric([], buckets, sum_value=stats.get(f"{name}:sum", 0))
            yield family


async def render(store: JobStore) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(await store.fleet.counters()))
    registry.register(ProcessCollector(registry=None))
    return generate_latest(registry)
