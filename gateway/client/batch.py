"""``segserve submit``: push many images through the API with a progress bar, writing mask PNGs and a
JSON summary. Resumable: an image whose mask already exists is skipped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from gateway.client.sdk import CONTENT_TYPES, AsyncClient, SegserveError

SUMMARY = "summary.json"


def find_images(inputs: Sequence[str]) -> list[tuple[Path, Path]]:
    """(image, its path relative to the input it was found under), in a stable order."""
    found: list[tuple[Path, Path]] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found += [
                (p, p.relative_to(path)) for p in sorted(path.rglob("*")) if p.suffix.lower() in CONTENT_TYPES
            ]
        elif path.is_file():
            found.append((path, Path(path.name)))
        else:
            raise FileNotFoundError(f"no such file or directory: {given}")
    return found


def mask_path(out: Path, relative: Path) -> Path:
    return out / relative.with_suffix(".png")


def plan(images: list[tuple[Path, Path]], out: Path) -> tuple[dict[str, Any], list[tuple[Path, Path]]]:
    """The summary so far, and the images whose masks do not exist yet."""
    out.mkdir(parents=True, exist_ok=True)
    summary_file = out / SUMMARY
    summary: dict[str, Any] = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    return summary, [(image, rel) for image, rel in images if not mask_path(out, rel).exists()]


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


async def submit_all(
    client: AsyncClient,
    images: Iterable[tuple[Path, Path]],
    out: Path,
    *,
    concurrency: int = 8,
    params: dict[str, Any] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Segment every image not done yet; return the summary, which is also written to ``out/summary.json``."""
    everything = list(images)
    summary, todo = await asyncio.to_thread(plan, everything, out)
    summary_file = out / SUMMARY
    counts = {"succeeded": 0, "failed": 0}
    semaphore = asyncio.Semaphore(concurrency)
    progress = Progress(
        TextColumn("[bold]segmenting"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )

    async def one(image: Path, rel: Path, task: Any) -> None:
        async with semaphore:
            try:
                job = await client.segment(image, **(params or {}))
                if job["status"] == "succeeded":
                    await asyncio.to_thread(write, mask_path(out, rel), await client.mask(job["id"]))
                entry = {
                    "job_id": job["id"],
                    "status": job["status"],
                    "classes": job.get("result", {}).get("classes"),
                    "error": job.get("error"),
                }
            except (SegserveError, OSError) as exc:
                entry = {
                    "job_id": None,
                    "status": "failed",
                    "classes": None,
                    "error": {"code": getattr(exc, "code", "io_error"), "message": str(exc)},
                }
            summary[str(rel)] = entry
            counts["succeeded" if entry["status"] == "succeeded" else "failed"] += 1
            progress.update(task, advance=1, state=f"{counts['succeeded']} ok, {counts['failed']} failed")

    with progress:
        task = progress.add_task("images", total=len(todo), state="")
        await asyncio.gather(*(one(image, rel, task) for image, rel in todo))
    await asyncio.to_thread(write, summary_file, json.dumps(summary, indent=2, sort_keys=True).encode())
    return {
        "submitted": len(todo),
        "skipped": len(everything) - len(todo),
        **counts,
        "summary": str(summary_file),
    }
