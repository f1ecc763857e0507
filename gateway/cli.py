"""The ``segserve`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.client.commands import client_options, jobs, queue, submit, with_client
from gateway.settings import env_table

EPILOG = "environment variables (defaults):\n" + "\n".join(
    f"  {name}={default}" for name, default in env_table()
)


def build_model(args: argparse.Namespace) -> int:
    from gateway.ops.archive import BuildError, ServingConfig, build_archive

    serving = ServingConfig(
        batch_size=args.batch_size,
        max_batch_delay_ms=args.max_batch_delay,
        workers=args.workers,
        response_timeout_s=args.response_timeout,
        engine=args.engine,
        threads=args.threads,
        precision=args.precision,
    )
    try:
        build_archive(
            name=args.name,
            variant=args.variant,
            version=args.version,
            weights=args.weights,
            random_seed=args.seed if args.random_weights else None,
            store=Path(args.model_store) if args.model_store else None,
            serving=serving,
        )
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def setup(args: argparse.Namespace) -> int:
    from gateway.ops.setup import SetupError
    from gateway.ops.setup import setup as install

    try:
        install(with_browser=args.with_browser, with_s3=args.with_s3)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    extras = [
        name
        for name, wanted in (("chromium", args.with_browser), ("Ceph's RADOS Gateway", args.with_s3))
        if wanted
    ]
    print("redis-server and Java 17+ are installed" + "".join(f", and {extra}" for extra in extras))
    return 0


def up(args: argparse.Namespace) -> int:
    from gateway.ops.archive import BuildError
    from gateway.ops.launcher import up as run
    from gateway.ops.setup import SetupError

    try:
        return run(args.host, args.port, args.workers, args.model)
    except (SetupError, BuildError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def worker(args: argparse.Namespace) -> int:
    from gateway.worker import check, main

    if args.check:
        return check()
    main()
    return 0


def parser() -> argparse.ArgumentParser:
    from gateway.handlers.deeplabv3.catalog import ENGINES, PRECISIONS, VARIANTS
    from gateway.ops.archive import ServingConfig

    defaults = ServingConfig()
    root = argparse.ArgumentParser(
        prog="segserve",
        description="A job API for semantic segmentation: Starlette + arq + Redis in front of TorchServe.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "up",
        help="set up and run the whole stack until Ctrl-C",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="gateway address (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="gateway port (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="arq worker processes (default: %(default)s)")
    p.add_argument(
        "--model", default="deeplabv3", help="model archive to serve, built if missing (default: %(default)s)"
    )
    p.set_defaults(run=up)

    p = commands.add_parser("worker", help="one arq worker process, woken at once when a job is enqueued")
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 0 while this host's worker is alive (its heartbeat in Redis, every 2 s), else 1",
    )
    p.set_defaults(run=worker)

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
    p.add_argument("--webhook", metavar="URL", help="where the server POSTs each job's events, signed")
    p.add_argument(
        "--webhook-events",
        default="completed",
        help="which events: start, completed or start,completed (default: %(default)s)",
    )
    client_options(p)
    p.set_defaults(run=submit)

    p = commands.add_parser("status", help="a job, as JSON (exit 1 when it failed)")
    p.add_argument("job_id")
    p.add_argument("--wait", type=float, default=0, help="seconds to wait for the job to end (default: 0)")
    client_options(p)
    p.set_defaults(run=with_client("status"))

    p = commands.add_parser("retry", help="queue a failed or canceled job again, under its own id")
    p.add_argument("job_id")
    client_options(p)
    p.set_defaults(run=with_client("retry"))

    p = commands.add_parser(
        "jobs", help="this API key's jobs, newest first; --cancel cancels its queued ones"
    )
    p.add_argument(
        "--status",
        choices=["queued", "running", "succeeded", "failed", "canceled", "expired"],
        help="only jobs of this status",
    )
    p.add_argument("--limit", type=int, default=50, help="at most this many (default: %(default)s)")
    p.add_argument("--cancel", action="store_true", help="cancel every queued job of this key instead")
    client_options(p)
    p.set_defaults(run=jobs)

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
    p.add_argument("--with-s3", action="store_true", help="also Ceph's RADOS Gateway, the tests' S3 server")
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
    p.add_argument("--model-store", help="output directory (default: $SEGSERVE_MODEL_STORE or ./model_store)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="TorchServe batch size (default: 16 with a CUDA GPU, 1 on CPU, where batching measured slower)",
    )
    p.add_argument(
        "--max-batch-delay",
        type=int,
        default=defaults.max_batch_delay_ms,
        help="ms TorchServe waits to fill a batch (default: 10 with a CUDA GPU, 5 on CPU)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help="TorchServe workers for the model (default: two per GPU, else one per CPU core up to 8)",
    )
    p.add_argument(
        "--response-timeout",
        type=int,
        default=defaults.response_timeout_s,
        help="seconds (default: %(default)s)",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default=defaults.engine,
        help="what runs the model (default: openvino on CPU, where it measured fastest; torch with CUDA)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=defaults.precision,
        help="fp32 (default); bf16: openvino on CPUs with AVX-512 BF16 or AMX, its forward pass about "
        "1.8x as fast, masks that differ where classes are close (docs/models.md: Engines); fp16: torch "
        "on a CUDA GPU (not yet run on one)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=defaults.threads,
        help="intra-op threads per worker (default: as measured best for the workers on this CPU)",
    )
    p.set_defaults(run=build_model)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
