"""Every setting of the gateway and the worker, read from ``SEGSERVE_*`` environment variables.

docs/configuration.md lists each one with its default; tests/test_project.py holds the two in step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

MiB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    # Where job metadata lives (a few kB a job; images are in the blob store). Use a database of its own.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Redis Sentinel: comma-separated host:port of the sentinels. Set, they name the primary (of this master
    # name), and redis_url gives only the database and password.
    redis_sentinels: str = ""
    redis_sentinel_master: str = "mymaster"
    # Replicas that must hold a job before its 202 (Redis WAIT), so that an accepted job survives a
    # failover; 0: off. A submission waits up to redis_replica_timeout_ms for them, then fails with 503.
    redis_min_replicas: int = 0
    redis_replica_timeout_ms: int = 1000
    # Seconds one call to Redis may take before it fails (503 redis_unavailable at the gateway): a Redis that
    # hangs (SIGSTOP, a host gone without a reset) then costs a request this long, not until it is back.
    redis_timeout: float = 3.0
    # The worker's TorchServe: its inference and management APIs. Gateways never call it.
    torchserve_url: str = "http://127.0.0.1:8080"
    torchserve_management_url: str = "http://127.0.0.1:8081"
    # TorchServe writes its tokens to key_file.json in its working directory.
    torchserve_key_file: str = ".segserve/torchserve/key_file.json"
    # The model a job uses when it names none.
    default_model: str = "deeplabv3"
    # Seconds a finished job (its result and mask; a failed or canceled one's input too, for a retry) is kept;
    # also the longest a job may queue.
    result_ttl: int = 3600
    # Where inputs, masks and overlays live: a directory (one host) or s3://bucket/prefix (any S3 API).
    blob_url: str = ".segserve/blobs"
    # S3: the endpoint of a store other than AWS (Ceph RGW, MinIO, GCS's interop), and its region.
    # Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a web identity or the instance's role.
    blob_endpoint: str = ""
    blob_region: str = ""
    # Seconds one call to the blob store may take.
    blob_timeout: float = 30.0
    # S3: mask.png and overlay.png answer 307 to a URL signed for this many seconds; 0: streamed by the gateway.
    blob_presign_seconds: int = 0
    # A directory refuses new inputs (503 blob_store_full) when they would leave less free space than this.
    blob_min_free_bytes: int = 1024 * MiB
    # Seconds between two looks for blobs whose job is gone (what a crash can leave); one worker looks at a time.
    blob_sweep_seconds: float = 3600.0
    # Limits on submissions.
    max_body_bytes: int = 20 * MiB
    max_pixels: int = 25_000_000
    max_queued: int = 1000
    # Bytes of inputs of jobs accepted and not yet ended, at which submissions get 429 queue_bytes_full.
    max_queued_bytes: int = 4096 * MiB
    # The most image bytes a gateway holds at once (bodies being read, images by URL); the rest wait.
    gateway_image_bytes: int = 256 * MiB
    # The worker: the most jobs one worker process takes at once. It takes fewer while its TorchServe computes
    # fewer at once (2 × ready workers × batch size), so the rest keep a true position in the queue.
    worker_concurrency: int = 8
    # The most image bytes (inputs, masks, overlays) a worker process holds at once; the rest of its jobs wait.
    worker_image_bytes: int = 256 * MiB
    # Workers are woken when a job is enqueued; this bounds how late a deferred retry starts.
    worker_poll_delay: float = 0.1
    # Seconds one TorchServe request may take before it counts as a transient failure.
    inference_timeout: float = 60.0
    # Tries per job against an unavailable backend before the job fails with backend_unavailable.
    max_attempts: int = 10
    # First retry delay in seconds; it doubles per try, up to retry_max_delay (defaults: ~45 s in all).
    retry_delay: float = 0.5
    retry_max_delay: float = 8.0
    # API keys: comma-separated keys, and/or a file: TOML with each key's name, weight and limits
    # (docs/tenancy.md), or one key per line. Unset: no authentication. Set but naming no key: an error.
    api_keys: str = ""
    api_keys_file: str = ""
    # Without keys, only callers on this machine (loopback) are served; other hosts get 403 anonymous_remote
    # unless this says that anonymous access from anywhere is meant (a trusted network, a proxy in front).
    allow_anonymous_remote: bool = False
    # Seconds between two looks at the keys file: a changed file takes effect without a restart.
    keys_reload_seconds: float = 5.0
    # With two or more keys, the share of max_queued, and of the workers' slots, that a key naming no
    # max_queued or max_running may hold: no one key can fill the queue or every worker.
    key_queue_share: float = 0.5
    key_running_share: float = 0.5
    # The most live event streams (GET /v1/jobs/{id}/events) one key may hold open on one gateway.
    key_max_streams: int = 64
    # Root directory that the compatibility route POST /predict may read image_path under. Unset: off (403).
    image_root: str = ""
    # Seconds a gateway caches the models the workers report, for /v1/models and each submission's check.
    models_cache_seconds: float = 2.0
    # Webhooks: the server's signing key, a ``whsec_`` key; each API key signs with its own, derived from it
    # (GET /v1/webhooks/secret). Unset: submissions with a webhook are refused. `segserve up` makes one.
    webhook_secret: str = ""
    # A delivery is retried from this delay (seconds, doubling, with jitter) for up to webhook_retry_seconds.
    webhook_retry_delay: float = 5.0
    webhook_retry_seconds: int = 86400
    # Hosts (or host:port) that webhook and image URLs may name though they resolve to a non-public address.
    allowed_url_hosts: str = ""
    # Seconds a webhook receiver or an image URL has to connect, and then to answer.
    url_timeout: float = 10.0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            name = f"SEGSERVE_{f.name.upper()}"
            if name in env:
                values[f.name] = parse(name, env[name], type(f.default))
        return cls(**values)  # type: ignore[arg-type]

    @property
    def key_file(self) -> Path:
        return Path(self.torchserve_key_file)


# bool("false") is True: a boolean setting is read as one of these words instead.
BOOLEAN_WORDS = {
    "true": True,
    "1": True,
    "yes": True,
    "on": True,
    "false": False,
    "0": False,
    "no": False,
    "off": False,
}


def parse(name: str, raw: str, kind: type) -> object:
    """One variable's value as its setting's type; ValueError naming the variable when it is not one."""
    if kind is bool:
        word = raw.strip().lower()
        if word not in BOOLEAN_WORDS:
            raise ValueError(f"{name}={raw!r} is not a boolean: use true/false, 1/0, yes/no or on/off")
        return BOOLEAN_WORDS[word]
    try:
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from exc


def env_table() -> list[tuple[str, str]]:
    """(variable, default) for every setting, for docs/configuration.md and ``segserve up --help``."""
    return [(f"SEGSERVE_{f.name.upper()}", shown(f.default)) for f in fields(Settings)]


def shown(default: object) -> str:
    """A default as it is written in the environment: booleans as true/false."""
    return str(default).lower() if isinstance(default, bool) else str(default)
