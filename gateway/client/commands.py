"""The ``segserve`` commands that talk to a running server: submit, status, jobs, models, queue."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=os.environ.get("SEGSERVE_URL", "http://127.0.0.1:8000"),
        help="the gateway (default: $SEGSERVE_URL or %(default)s)",
    )
    p.add_argument(
        "--api-key", default=os.environ.get("SEGSERVE_API_KEY"), help="API key (default: $SEGSERVE_API_KEY)"
    )


def submit(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.client.batch import find_images, submit_all
    from gateway.client.sdk import AsyncClient

    try:
        images = find_images(args.inputs)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    params = {"classes": args.classes.split(",") if args.classes else None, "threshold": args.threshold}
    if args.webhook:
        params |= {"webhook": args.webhook, "webhook_events": args.webhook_events.split(",")}

    async def run() -> dict[str, Any]:
        async with AsyncClient(args.url, args.api_key) as client:
            return await submit_all(
                client, images, Path(args.out), concurrency=args.concurrency, params=params
            )

    outcome = asyncio.run(run())
    print(
        f"{outcome['succeeded']} succeeded, {outcome['failed']} failed, {outcome['skipped']} skipped "
        f"(masks exist); summary in {outcome['summary']}"
    )
    return 1 if outcome["failed"] else 0


def with_client(call: str) -> Callable[[argparse.Namespace], int]:
    """A command that prints one API answer as JSON; exit 1 on an API error."""

    def command(args: argparse.Namespace) -> int:
        import json

        from gateway.client.sdk import Client, SegserveError

        try:
            with Client(args.url, args.api_key) as client:
                if call == "status":
                    answer = client.get(args.job_id, wait=args.wait)
                elif call == "retry":
                    answer = client.retry(args.job_id)
                else:
                    answer = getattr(client, call)()
        except SegserveError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(answer, indent=2))
        return 0 if call != "status" or answer["status"] != "failed" else 1

    return command


def jobs(args: argparse.Namespace) -> int:
    """This key's jobs as a table, newest first; or, with --cancel, cancel its queued ones."""
    from rich.console import Console
    from rich.table import Table

    from gateway.client.sdk import Client, SegserveError

    try:
        with Client(args.url, args.api_key) as client:
            if args.cancel:
                print(f"canceled {client.cancel_queued()} queued jobs")
                return 0
            found = client.jobs(args.status, args.limit)
    except SegserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    columns = ("id", "status", "priority", "created", "position", "error")
    rows = [
        (
            job["id"],
            job["status"],
            job["priority"],
            job["created_at"],
            str(job.get("position", "")),
            (job.get("error") or {}).get("code", ""),
        )
        for job in found
    ]
    if not sys.stdout.isatty():  # for scripts: one tab-separated line a job, nothing cut short
        print(f"# {len(found)} jobs, newest first")
        print("\t".join(columns))
        print("\n".join("\t".join(row) for row in rows))
        return 0
    table = Table(title=f"{len(found)} jobs at {args.url}, newest first")
    for name in columns:
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    return 0


def queue(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from gateway.client.sdk import Client, SegserveError
    from gateway.status import JobStatus

    def view(state: dict[str, Any]) -> Table:
        table = Table(title=f"segserve queue at {args.url}")
        for status in JobStatus:
            table.add_column(status.value, justify="right")
        table.add_row(*(str(state.get(status.value, 0)) for status in JobStatus))
        workers = Table(title=f"{len(state['workers'])} workers")
        for name in ("id", "started", "last seen", "concurrency"):
            workers.add_column(name)
        for w in state["workers"]:
            workers.add_row(w["id"], w["started_at"], w["last_seen"], str(w.get("concurrency", "")))
        outer = Table.grid()
        outer.add_row(table)
        outer.add_row(workers)
        return outer

    try:
        with Client(args.url, args.api_key, retries=0) as client:
            if args.once:
                Console().print(view(client.queue()))
                return 0
            with Live(view(client.queue()), refresh_per_second=2) as live:
                while True:
                    time.sleep(args.interval)
                    live.update(view(client.queue()))
    except SegserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
