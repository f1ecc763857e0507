"""The typed records of the job protocol: what crosses a module boundary is one of these, never a raw dict."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


def iso(ms: float | None) -> str | None:
    """Milliseconds since the epoch as the API writes times: ISO 8601, UTC, milliseconds, ``Z``."""
    if ms is None:
        return None
    moment = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class JobError:
    """Why a job failed: ``code`` for programs, ``message`` for people."""

    code: str
    message: str


@dataclass(frozen=True)
class Result:
    """What a succeeded job found; the mask itself is stored beside the job."""

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
    timings_ms: dict[str, float] = field(default_factory=dict)

    @classmethod
    def succeeded(cls, result: Result, mask_png: bytes, timings_ms: dict[str, float]) -> Outcome:
        return cls(JobStatus.SUCCEEDED, result=result, mask_png=mask_png, timings_ms=timings_ms)

    @classmethod
    def failed(cls, code: str, message: str) -> Outcome:
        return cls(JobStatus.FAILED, error=JobError(code, message))


@dataclass(frozen=True)
class Submission:
    """A new job as a gateway accepted it."""

    model: str
    params: dict[str, Any]  # {"classes": [ids] | None, "threshold": float}
    image: bytes
    content_type: str
    owner: str = ""  # the API key's owner id; "" when keys are off
    # Kept for the compatibility routes, which answer in the original service's shapes.
    image_path: str | None = None
    target_class_ids: list[int] | None = None
    webhook: str | None = None  # where the job's events are POSTed
    webhook_events: tuple[str, ...] = ("completed",)  # of "start", "completed"


@dataclass(frozen=True)
class Job:
    """A job as the job store reads it: stored facts plus the state derived from arq's queue."""

    id: str
    status: JobStatus
    model: str
    params: dict[str, Any]
    owner: str
    content_type: str
    created_at: float  # milliseconds since the epoch, as every time here
    expires_at: float
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    position: int | None = None  # jobs ahead, while queued
    result: Result | None = None
    error: JobError | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    image_path: str | None = None
    target_class_ids: list[int] | None = None
    webhook: str | None = None
    webhook_events: tuple[str, ...] = ()
    deliveries: dict[str, Any] = field(
        default_factory=dict
    )  # event type -> {id, state, attempts, last_status}

    @property
    def event_id(self) -> str:
        """Names this state of the job (a Server-Sent Event's id): every change of state gets a new one."""
        position = f"-{self.position}" if self.status is JobStatus.QUEUED else ""
        return f"{self.attempts}-{self.status.value}{position}"

    def to_api(self) -> dict[str, Any]:
        """The API's job object: what a client may see (never the owner)."""
        timings = dict(self.timings_ms)
        if self.started_at is not None and self.status is not JobStatus.QUEUED:
            timings.setdefault("queued", round(self.started_at - self.created_at, 1))
        job: dict[str, Any] = {
            "id": self.id,
            "status": self.status.value,
            "model": self.model,
            "params": self.params,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "expires_at": iso(self.expires_at),
            "attempts": self.attempts,
            "timings_ms": timings,
        }
        if self.status is JobStatus.QUEUED and self.position is not None:
            job["position"] = self.position
        if self.status is JobStatus.SUCCEEDED and self.result is not None:
            job["result"] = {
                "width": self.result.width,
                "height": self.result.height,
                "classes": self.result.classes,
                "mask_url": f"/v1/jobs/{self.id}/mask.png",
            }
        if self.status is JobStatus.FAILED:
            error = self.error or JobError("internal_error", "the job failed")
            job["error"] = {"code": error.code, "message": error.message}
        if self.webhook is not None:
            job["webhook"] = {"url": self.webhook, "events_filter": list(self.webhook_events),
                              "deliveries": self.deliveries}  # fmt: skip
        return job


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
    models: list[dict[str, Any]] = field(default_factory=list)  # as its TorchServe lists them

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass(frozen=True)
class QueueStats:
    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int
    workers: list[dict[str, Any]]
