"""The typed records of the job protocol: what crosses a module boundary is one of these, never a raw dict.

A job is stored as a Redis hash of strings; ``to_fields`` and ``from_fields`` are the one place that encodes
and decodes it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Literal, cast, get_args

# A job's states are one of the protocol's records, kept in a module the SDK imports without the server's.
from gateway.status import JobStatus as JobStatus


class Priority(str, Enum):
    """Orders one owner's own jobs: ``high`` before ``normal`` before ``low``, each first come, first served.
    It never changes an owner's share against the others'."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    def queue_score(self, created_ms: float) -> float:
        """The job's place in its owner's queue: its priority's band, then its arrival."""
        band = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}[self]
        return band * 1e13 + created_ms  # a band spans ~300 years of milliseconds; doubles stay exact


def now_ms() -> float:
    """Time as the job protocol keeps it: milliseconds since the epoch."""
    return time.time() * 1000


def iso(ms: float | None) -> str | None:
    """Milliseconds since the epoch as the API writes times: ISO 8601, UTC, milliseconds, ``Z``."""
    if ms is None:
        return None
    moment = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Why a job failed (its ``error.code``), as docs/api.md's "Job error codes" lists them.
FailureCode = Literal[
    "invalid_image",  # the handler's refusals of one image (handlers/)
    "too_many_pixels",
    "invalid_parameter",
    "too_large",  # TorchServe's 413
    "backend_error",  # any other refusal of the model server
    "model_not_found",
    "backend_unavailable",
    "expired",
    "queue_timeout",  # an expired job's: no worker started it before its deadline
    "input_missing",
    "worker_error",
    "internal_error",
]
FAILURE_CODES: frozenset[str] = frozenset(get_args(FailureCode))


def failure_code(code: str) -> FailureCode:
    """A code the model server gave, as one of ours: one we do not know is a ``backend_error``."""
    return cast(FailureCode, code) if code in FAILURE_CODES else "backend_error"


@dataclass(frozen=True)
class JobError:
    """Why a job failed: ``code`` for programs, ``message`` for people."""

    code: FailureCode
    message: str


@dataclass(frozen=True)
class JobParams:
    """What a job asks of the model, normalised."""

    classes: list[int] | None = None  # keep only these class ids; None: all
    threshold: float = 0.0  # pixels whose top class probability is below it become background
    overlay: bool = False  # also draw the mask over the image, for GET .../overlay.png

    def to_api(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> JobParams:
        return cls(data.get("classes"), float(data.get("threshold", 0.0)), bool(data.get("overlay", False)))


@dataclass(frozen=True)
class Result:
    """What a succeeded job found; the mask itself is in the blob store."""

    width: int
    height: int
    classes: list[dict[str, Any]]  # {"id", "name", "pixels", "fraction"} per class present


@dataclass(frozen=True)
class Outcome:
    """How a worker says a job ended."""

    status: JobStatus
    result: Result | None = None
    error: JobError | None = None
    mask_png: bytes | None = None
    overlay_png: bytes | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    input_gone: bool = False  # its input was not in the blob store: a retry could not run it either

    @classmethod
    def succeeded(
        cls, result: Result, mask_png: bytes, timings_ms: dict[str, float], overlay_png: bytes | None = None
    ) -> Outcome:
        return cls(JobStatus.SUCCEEDED, result, None, mask_png, overlay_png, timings_ms)

    @classmethod
    def failed(cls, code: FailureCode, message: str) -> Outcome:
        return cls(JobStatus.FAILED, error=JobError(code, message))

    @classmethod
    def input_missing(cls) -> Outcome:
        error = JobError("input_missing", "the job's input is no longer in the blob store")
        return cls(JobStatus.FAILED, error=error, input_gone=True)

    def to_fields(
        self, timings_ms: dict[str, float], mask: str | None, overlay: str | None
    ) -> dict[str, str]:
        """The job's fields this outcome sets, with the names of the blobs it wrote."""
        fields = {"timings_ms": json.dumps(timings_ms)}
        if self.input_gone:
            fields["input_gone"] = "1"
        if self.result is not None:
            fields["result"] = json.dumps(asdict(self.result))
        if self.error is not None:
            fields["error"] = json.dumps(asdict(self.error))
        if mask is not None:
            fields["mask"] = mask
        if overlay is not None:
            fields["overlay"] = overlay
        return fields


@dataclass(frozen=True)
class Submission:
    """A new job as a gateway accepted it. Its input is already in the blob store, under the job's id."""

    job_id: str
    model: str
    params: JobParams
    content_type: str
    input_bytes: int
    width: int
    height: int
    owner: str = ""  # the API key's owner id; "" when keys are off
    # Kept for the compatibility routes, which answer in the original service's shapes.
    image_path: str | None = None
    target_class_ids: list[int] | None = None
    webhook: str | None = None  # where the job's events are POSTed
    webhook_events: tuple[str, ...] = ("completed",)  # of "start", "completed"
    priority: Priority = Priority.NORMAL
    queue_timeout_ms: int | None = None  # the longest it may wait to start; None: as long as jobs are kept

    def to_fields(self, created_ms: float) -> dict[str, str]:
        fields = {
            "model": self.model,
            "params": json.dumps(self.params.to_api()),
            "owner": self.owner,
            "priority": self.priority.value,
            "content_type": self.content_type,
            "created_at": repr(created_ms),
            "input_bytes": str(self.input_bytes),
            "width": str(self.width),
            "height": str(self.height),
        }
        if self.image_path is not None:
            fields["image_path"] = self.image_path
        if self.target_class_ids is not None:
            fields["target_class_ids"] = json.dumps(self.target_class_ids)
        if self.webhook is not None:
            fields["webhook"] = self.webhook
            fields["webhook_events"] = json.dumps(list(self.webhook_events))
        if self.queue_timeout_ms is not None:
            fields["queue_timeout_ms"] = str(self.queue_timeout_ms)
        return fields


@dataclass(frozen=True)
class Job:
    """A job as the job store reads it: stored facts plus the state derived from arq's queue."""

    id: str
    status: JobStatus
    model: str
    params: JobParams
    owner: str
    content_type: str
    created_at: float  # milliseconds since the epoch, as every time here
    expires_at: float
    input_bytes: int = 0
    width: int = 0  # of the input, as its header says
    height: int = 0
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    position: int | None = None  # jobs that start before it, while queued
    eta_seconds: float | None = None  # until it starts, at the service rate measured lately, while queued
    priority: Priority = Priority.NORMAL
    queue_timeout_ms: int | None = None
    result: Result | None = None
    error: JobError | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    mask: str | None = None  # the mask's blob, once succeeded
    overlay: str | None = None  # the overlay's blob, once succeeded, if it was asked for
    image_path: str | None = None
    target_class_ids: list[int] | None = None
    webhook: str | None = None
    webhook_events: tuple[str, ...] = ()
    deliveries: dict[str, Any] = field(
        default_factory=dict
    )  # event type -> {id, state, attempts, last_status}

    @classmethod
    def from_fields(
        cls, job_id: str, fields: dict[str, str], running: bool, position: int, ttl_ms: float
    ) -> Job:
        """The job from its stored fields and what arq's keys say of it: running (its in-progress key exists)
        and its position (-1 when it is in no queue)."""
        created = float(fields["created_at"])
        finished = float(fields["finished_at"]) if "finished_at" in fields else None
        if "status" in fields:
            status = JobStatus(fields["status"])
        elif running:
            status = JobStatus.RUNNING
        elif position >= 0:
            status = JobStatus.QUEUED
        else:
            status = JobStatus.FAILED  # neither queued, running nor ended: see below
        error = JobError(**json.loads(fields["error"])) if "error" in fields else None
        if status is JobStatus.FAILED and error is None:
            # arq dropped the job without our outcome: it stayed queued past its TTL, or arq gave up on it
            # after its worker died too many times (the worker's log says which).
            error = JobError("expired", "the job ended without an outcome: it expired or its worker gave up")
        target = fields.get("target_class_ids")
        return cls(
            id=job_id,
            status=status,
            model=fields["model"],
            params=JobParams.from_api(json.loads(fields["params"])),
            owner=fields.get("owner", ""),
            content_type=fields["content_type"],
            created_at=created,
            expires_at=(finished or created) + ttl_ms,
            input_bytes=int(fields.get("input_bytes", 0)),
            width=int(fields.get("width", 0)),
            height=int(fields.get("height", 0)),
            attempts=int(fields.get("attempts", 0)),
            started_at=float(fields["started_at"]) if "started_at" in fields else None,
            finished_at=finished,
            position=position if status is JobStatus.QUEUED else None,
            result=Result(**json.loads(fields["result"])) if "result" in fields else None,
            error=error,
            timings_ms=json.loads(fields.get("timings_ms", "{}")),
            mask=fields.get("mask"),
            overlay=fields.get("overlay"),
            image_path=fields.get("image_path"),
            target_class_ids=json.loads(target) if target else None,
            webhook=fields.get("webhook"),
            webhook_events=tuple(json.loads(fields.get("webhook_events", "[]"))),
            deliveries=json.loads(fields.get("deliveries", "{}")),
            priority=Priority(fields.get("priority", "normal")),
            queue_timeout_ms=int(fields["queue_timeout_ms"]) if "queue_timeout_ms" in fields else None,
        )

    @property
    def event_id(self) -> str:
        """Names this state of the job (a Server-Sent Event's id): every change of state gets a new one."""
        position = f"-{self.position}" if self.status is JobStatus.QUEUED else ""
        return f"{self.attempts}-{self.status.value}{position}"

    def to_api(self) -> dict[str, Any]:
        """The API's job object: what a client may see (never the owner, nor where its blobs are)."""
        timings = dict(self.timings_ms)
        if self.started_at is not None and self.status is not JobStatus.QUEUED:
            timings.setdefault("queued", round(self.started_at - self.created_at, 1))
        job: dict[str, Any] = {
            "id": self.id,
            "status": self.status.value,
            "model": self.model,
            "params": self.params.to_api(),
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "expires_at": iso(self.expires_at),
            "attempts": self.attempts,
            "timings_ms": timings,
        }
        job["priority"] = self.priority.value
        if self.queue_timeout_ms is not None:
            job["queue_timeout"] = self.queue_timeout_ms / 1000
        if self.status is JobStatus.QUEUED and self.position is not None:
            job["position"] = self.position
            job["eta_seconds"] = self.eta_seconds
        if self.status is JobStatus.SUCCEEDED and self.result is not None:
            job["result"] = {
                "width": self.result.width,
                "height": self.result.height,
                "classes": self.result.classes,
                "mask_url": f"/v1/jobs/{self.id}/mask.png",
            }
            if self.overlay is not None:
                job["result"]["overlay_url"] = f"/v1/jobs/{self.id}/overlay.png"
        if self.status is JobStatus.FAILED:
            error = self.error or JobError("internal_error", "the job failed")
            job["error"] = {"code": error.code, "message": error.message}
        if self.status is JobStatus.EXPIRED:
            waited = (
                f"{self.queue_timeout_ms / 1000:g} s (queue_timeout)"
                if self.queue_timeout_ms
                else "as long as jobs are kept"
            )
            code: FailureCode = "queue_timeout"
            job["error"] = {"code": code, "message": f"no worker started the job within {waited}"}
        if self.webhook is not None:
            job["webhook"] = {
                "url": self.webhook,
                "events_filter": list(self.webhook_events),
                "deliveries": self.deliveries,
            }
        return job


@dataclass(frozen=True)
class ModelInfo:
    """One model version a worker's TorchServe serves, as ``/v1/models`` shows it."""

    name: str
    version: str
    default: bool = False  # the version a job that names only the model gets
    workers: int = 0  # TorchServe's workers for it, and how many of them are ready
    workers_ready: int = 0
    batch_size: int | None = None
    max_batch_delay_ms: int | None = None
    device: str = "cpu"
    variant: str | None = None
    engine: str = "torch"
    precision: str = "fp32"
    weights: str = "unknown"
    random_weights: bool = False

    def to_api(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> ModelInfo:
        """Fields this version does not know (from a newer worker) are left out."""
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker's heartbeat says about it and the TorchServe beside it, for ``/v1/queue``,
    ``/v1/models`` and ``/readyz``: gateways reach no TorchServe themselves, so this works across hosts."""

    id: str
    host: str
    pid: int
    started_at: str
    last_seen: str
    concurrency: int
    backend: str = "unknown"  # "ok", or why its TorchServe cannot compute
    models: list[ModelInfo] = field(default_factory=list)  # as its TorchServe lists them

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerInfo:
        data = json.loads(text)
        return cls(**{**data, "models": [ModelInfo.from_api(m) for m in data.get("models", [])]})


@dataclass(frozen=True)
class QueueStats:
    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int
    expired: int
    workers: list[dict[str, Any]]
