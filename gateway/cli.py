"""The ``segserve`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
        install()
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("redis-server and Java 17+ are installed")
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

    p = commands.add_parser("setup", help="install redis-server and Java 17+ when missing (Debian/Ubuntu)")
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
        help="TorchServe batch size (default: %(default)s)",
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
        help="TorchServe workers for the model (default: %(default)s)",
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
