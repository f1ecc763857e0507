"""The arq worker: takes jobs from Redis and sends many at once to TorchServe, which batches them.

Run ``segserve worker`` (woken at once by each enqueue), or arq's own CLI, ``arq
gateway.worker.WorkerSettings`` (which looks at the queue every ``SEGSERVE_WORKER_POLL_DELAY``);
``segserve worker --check`` (or arq's ``--check``, where the sentinels take no login) tells whether this
host's is alive.
"""

from gateway.worker.runner import SegserveWorker, WorkerSettings, check, main

__all__ = ["SegserveWorker", "WorkerSettings", "check", "main"]
