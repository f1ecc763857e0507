"""The ``segserve`` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from gateway.settings import env_table

EPILOG = "environment variables (defaults):\n" + "\n".join(
    f"  {name}={default}" for name, default in env_table()
)


def build_model(args: argparse.Namespace) -> int:
    from gateway.archive import BuildError, ServingConfig, build_archive

    serving = ServingConfig(
        batch_size=args.batch_size,
        max_batch_delay_ms=args.max_batch_delay,
        workers=args.workers,
        response_timeout_s=args.response_timeout,
    )
    try:
        build_archive(
            name=args.name,
            variant=args.variant,
            version=args.version,
            weights=args.weights,
            random_seed=args.seed if args.random_weights else None,
            store=Path(args.model_store),
            serving=serving,
        )
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def setup(args: argparse.Namespace) -> int:
    from gateway.launcher import SetupError
    from gateway.launcher import setup as install

    try:
        install(with_browser=args.with_browser)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("redis-server and Java 17+ are installed" + (", and chromium" if args.with_browser else ""))
    return 0


def up(args: argparse.Namespace) -> int:
    from gateway.archive import BuildError
    from gateway.launcher import SetupError
    from gateway.launcher import up as run

    try:
        return run(args.host, args.port, args.workers, args.model)
    except (SetupError, BuildError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("SEGSERVE_URL", "http://127.0.0.1:8000"),
                   help="the gateway (default: $SEGSERVE_URL or %(default)s)")  # fmt: skip
    p.add_argument(
        "--api-key", default=os.environ.get("SEGSERVE_API_KEY"), help="API key (default: $SEGSERVE_API_KEY)"
    )


def submit(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.batch import find_images, submit_all
    from gateway.client import AsyncClient

    try:
        images = find_images(args.inputs)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    params = {"classes": args.classes.split(",") if args.classes else None, "threshold": args.threshold}

    async def run() -> dict[str, Any]:
        async with AsyncClient(args.url, args.api_key) as client:
            return await submit_all(
                client, images, Path(args.out), concurrency=args.concurrency, params=params
            )

    outcome = asyncio.run(run())
    print(f"{outcome['succeeded']} succeeded, {outcome['failed']} failed, {outcome['skipped']} skipped "
          f"(masks exist); summary in {outcome['summary']}")  # fmt: skip
    return 1 if outcome["failed"] else 0


def with_client(call: str) -> object:
    """A command that prints one API answer as JSON; exit 1 on an API error."""

    def command(args: argparse.Namespace) -> int:
        import json

        from gateway.client import Client, SegserveError

        try:
            with Client(args.url, args.api_key) as client:
                answer = (
                    client.get(args.job_id, wait=args.wait) if call == "status" else getattr(client, call)()
                )
        except SegserveError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(answer, indent=2))
        return 0 if call != "status" or answer["status"] != "failed" else 1

    return command


def queue(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from gateway.client import Client, SegserveError

    def view(state: dict[str, Any]) -> Table:
        table = Table(title=f"segserve queue at {args.url}")
        for name in ("queued", "running", "succeeded", "failed", "canceled"):
            table.add_column(name, justify="right")
        table.add_row(
            *(str(state.get(k, 0)) for k in ("queued", "running", "succeeded", "failed", "canceled"))
        )
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


def parser() -> argparse.ArgumentParser:
    from gateway.archive import DEFAULT_STORE, VARIANTS, ServingConfig

    defaults = ServingConfig()
    root = argparse.ArgumentParser(
        prog="segserve",
        description="A job API for semantic segmentation: Starlette + arq + Redis in front of TorchServe.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("up", help="set up and run the whole stack until Ctrl-C", epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="gateway address (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="gateway port (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="arq worker processes (default: %(default)s)")
    p.add_argument(
        "--model", default="deeplabv3", help="model archive to serve, built if missing (default: %(default)s)"
    )
    p.set_defaults(run=up)

    p = commands.add_parser("submit", help="segment images and folders of images, writing mask PNGs")
    p.add_argument(
        "inputs", nargs="+", metavar="IMAGES_OR_DIRS", help="image files, or folders searched recursively"
    )
    p.add_argument("--classes", help="comma-separated class names or ids to keep (default: all)")
    p.add_argument(
        "--threshold", type=float, default=None, help="minimum class probability, 0 to 1 (default: 0)"
    )
    p.add_argument("--out", default="masks", help="where masks and summary.json go (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=8, help="images in flight (default: %(default)s)")
    client_options(p)
    p.set_defaults(run=submit)

    p = commands.add_parser("status", help="a job, as JSON (exit 1 when it failed)")
    p.add_argument("job_id")
    p.add_argument("--wait", type=float, default=0, help="seconds to wait for the job to end (default: 0)")
    client_options(p)
    p.set_defaults(run=with_client("status"))

    p = commands.add_parser("models", help="the models TorchServe serves, as JSON")
    client_options(p)
    p.set_defaults(run=with_client("models"))

    p = commands.add_parser(
        "queue", help="a live view of queue depth, running jobs and workers (Ctrl-C ends it)"
    )
    p.add_argument("--once", action="store_true", help="print once and exit")
    p.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes (default: %(default)s)"
    )
    client_options(p)
    p.set_defaults(run=queue)

    p = commands.add_parser("setup", help="install redis-server and Java 17+ when missing (Debian/Ubuntu)")
    p.add_argument("--with-browser", action="store_true", help="also chromium, for the web page's test")
    p.set_defaults(run=setup)

    p = commands.add_parser("build-model", help="build model_store/<name>.mar for TorchServe")
    p.add_argument("--name", default="deeplabv3", help="model name in TorchServe (default: %(default)s)")
    p.add_argument(
        "--variant", default="mobilenet_v3_large", choices=VARIANTS, help="backbone (default: %(default)s)"
    )
    p.add_argument("--version", default="1.0", help="model version (default: %(default)s)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", metavar="PATH", help="a local .pth checkpoint instead of downloading")
    weights.add_argument(
        "--random-weights",
        action="store_true",
        help="seeded random weights: meaningless masks, for tests and demos",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for --random-weights (default: %(default)s)")
    p.add_argument(
        "--model-store", default=str(DEFAULT_STORE), help="output directory (default: %(default)s)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="TorchServe batch size (default: 8 with a CUDA GPU, 1 on CPU, where batching measured slower)",
    )
    p.add_argument(
        "--max-batch-delay",
        type=int,
        default=defaults.max_batch_delay_ms,
        help="ms TorchServe waits to fill a batch (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help="TorchServe workers for the model (default: one per GPU, else one per CPU core up to 8)",
    )
    p.add_argument(
        "--response-timeout",
        type=int,
        default=defaults.response_timeout_s,
        help="seconds (default: %(default)s)",
    )
    p.set_defaults(run=build_model)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
