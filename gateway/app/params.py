"""Job parameters as clients send them (query string, form fields or JSON), checked and normalised."""

from __future__ import annotations

import base64
import math
import re
from typing import Any

from gateway.app.errors import Problem
from gateway.jobs.records import JobStatus, Priority

# torchvision's VOC category names, in class-id order (COCO_WITH_VOC_LABELS_V1's meta["categories"]).
VOC_CLASSES = (
    "__background__",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_WAIT_SECONDS = 60.0


def parse_classes(value: Any) -> list[int] | None:
    """A list of class names or ids (or a comma-separated string of them) as unique ids, in order."""
    if value is None or value == "" or value == []:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise Problem(422, "invalid_parameter", "classes must be a list of class names or ids")
    ids: list[int] = []
    for item in items:
        name = item.strip() if isinstance(item, str) else item
        if isinstance(name, bool):
            class_id = -1
        elif isinstance(name, int) or (
            isinstance(name, str) and name.isascii() and name.isdigit() and len(name) < 4
        ):
            class_id = int(name)
        elif isinstance(name, str) and name in VOC_CLASSES:
            class_id = VOC_CLASSES.index(name)
        else:
            class_id = -1
        if not 0 <= class_id < len(VOC_CLASSES):
            shown = str(item)[:40]
            raise Problem(
                422, "unknown_class", f"unknown class {shown!r}; see the class names in the API docs"
            )
        if class_id not in ids:
            ids.append(class_id)
    return ids


def parse_threshold(value: Any) -> float:
    if value is None or value == "":
        return 0.0
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = math.nan
    if isinstance(value, bool) or not 0.0 <= threshold <= 1.0:  # NaN fails this too
        raise Problem(
            422, "invalid_parameter", f"threshold must be a number in [0, 1], got {str(value)[:40]!r}"
        )
    return threshold


def parse_model(value: Any, default: str) -> str:
    if value is None or value == "":
        return default
    if not isinstance(value, str) or not MODEL_NAME.match(value):
        raise Problem(422, "invalid_parameter", "model must be a model name as listed by GET /v1/models")
    return value


def parse_wait(prefer: str | None, async_mode: str | None) -> float:
    """Seconds to hold the request: ``Prefer: wait=N`` (RFC 7240), or ``async_mode: false`` (60 s).

    A preference is a hint: a wait over 60 s is served as 60 s, an unreadable one as no wait.
    """
    if async_mode is not None and async_mode.strip().lower() in ("false", "0", "no"):
        return MAX_WAIT_SECONDS
    for preference in (prefer or "").split(","):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                return 0.0
            return min(seconds, MAX_WAIT_SECONDS) if seconds > 0 else 0.0
    return 0.0


WEBHOOK_EVENTS = ("start", "completed")


def parse_events_filter(value: Any) -> tuple[str, ...]:
    """``webhook_events_filter``: a list (or comma-separated string) of start and completed."""
    if value is None or value == "" or value == []:
        return ("completed",)
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(
        isinstance(i, str) and i.strip() in WEBHOOK_EVENTS for i in items
    ):
        raise Problem(422, "invalid_parameter", "webhook_events_filter must list start and/or completed")
    return tuple(dict.fromkeys(i.strip() for i in items))


def parse_overlay(value: Any) -> bool:
    """``overlay``: a JSON boolean, or true/false (1/0, yes/no) in a query string or form."""
    if value is None or value == "":
        return False
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word in ("true", "1", "yes"):
        return True
    if word in ("false", "0", "no"):
        return False
    raise Problem(422, "invalid_parameter", f"overlay must be true or false, got {str(value)[:40]!r}")


def parse_priority(value: Any) -> Priority:
    if value is None or value == "":
        return Priority.NORMAL
    try:
        return Priority(value)
    except ValueError:
        shown = str(value)[:40]
        raise Problem(
            422, "invalid_parameter", f"priority must be one of high, normal, low; got {shown!r}"
        ) from None


def parse_queue_timeout(value: Any, longest: float) -> int | None:
    """The longest a job may wait to start, in seconds, as milliseconds; None when not given."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not 0 < seconds <= longest:  # NaN fails this too
        raise Problem(
            422,
            "invalid_parameter",
            f"queue_timeout must be seconds above 0 and at most {longest:g}, got {str(value)[:40]!r}",
        )
    return math.ceil(seconds * 1000)


def parse_status_filter(value: str | None) -> JobStatus | None:
    if not value:
        return None
    try:
        return JobStatus(value)
    except ValueError:
        known = ", ".join(status.value for status in JobStatus)
        raise Problem(422, "invalid_parameter", f"status must be one of {known}") from None


def parse_limit(value: str | None, default: int = 50, most: int = 200) -> int:
    if value is None or value == "":
        return default
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= most:
        raise Problem(422, "invalid_parameter", f"limit must be a whole number from 1 to {most}")
    return int(value)


def format_cursor(created_ms: float) -> str:
    """A page's continuation: opaque to clients (base64 of the creation time it continues below)."""
    return base64.urlsafe_b64encode(repr(created_ms).encode()).decode().rstrip("=")


def parse_cursor(value: str | None) -> float | None:
    if not value:
        return None
    try:
        created = float(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode())
    except (ValueError, UnicodeDecodeError):
        raise Problem(422, "invalid_parameter", "cursor is not one this API gave out") from None
    if not math.isfinite(created):
        raise Problem(422, "invalid_parameter", "cursor is not one this API gave out")
    return created
