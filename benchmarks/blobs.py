"""The blob store's client against another, on the same S3 server in one run: obstore (what segserve uses)
and aiobotocore (the asyncio AWS SDK), each writing and reading many small objects concurrently, then a few
large ones, while the process's memory is watched.

It starts its own S3 server (Ceph's RADOS Gateway, as the tests do: `segserve setup --with-s3`, as root).

    .venv/bin/pip install aiobotocore   # the comparison only; segserve does not need it
    .venv/bin/python benchmarks/blobs.py --small 400 --large 10 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.jobs import Blobs
from gateway.settings import Settings
from tests.harness.s3 import ACCESS_KEY, REGION, SECRET_KEY, CephS3

SMALL, LARGE = 100_000, 20_000_000  # a photo-sized input, and the largest a submission may be
CONCURRENCY = 32


async def obstore_client(ceph: CephS3, bucket: str) -> tuple[Callable[..., Awaitable[Any]], ...]:
    env = ceph.env(bucket)
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    blobs = Blobs.from_settings(Settings.from_env(env))
    return blobs.put, blobs.get


@contextlib.asynccontextmanager
async def aiobotocore_client(
    ceph: CephS3, bucket: str
) -> AsyncIterator[tuple[Callable[..., Awaitable[Any]], ...]]:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    config = AioConfig(max_pool_connections=CONCURRENCY)
    async with get_session().create_client(
        "s3",
        endpoint_url=ceph.endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=config,
    ) as s3:

        async def put(name: str, data: bytes) -> None:
            await s3.put_object(Bucket=bucket, Key=name, Body=data)

        async def get(name: str) -> bytes:
            answer = await s3.get_object(Bucket=bucket, Key=name)
            async with answer["Body"] as body:
                return bytes(await body.read())

        yield put, get


async def measure(
    put: Callable[..., Awaitable[Any]], get: Callable[..., Awaitable[Any]], small: int, large: int
) -> dict[str, float]:
    limit = asyncio.Semaphore(CONCURRENCY)
    process = psutil.Process()
    small_data, large_data = os.urandom(SMALL), os.urandom(LARGE)

    async def bounded(step: Awaitable[Any]) -> None:
        async with limit:
            await step

    figures: dict[str, float] = {}
    rss = process.memory_info().rss
    started = time.perf_counter()
    await asyncio.gather(*(bounded(put(f"small/{n}", small_data)) for n in range(small)))
    figures["small puts/s"] = small / (time.perf_counter() - started)
    started = time.perf_counter()
    await asyncio.gather(*(bounded(get(f"small/{n}")) for n in range(small)))
    figures["small gets/s"] = small / (time.perf_counter() - started)
    started = time.perf_counter()
    for n in range(large):
        await put(f"large/{n}", large_data)
    figures["large put MB/s"] = large * LARGE / 1e6 / (time.perf_counter() - started)
    started = time.perf_counter()
    for n in range(large):
        await get(f"large/{n}")
    figures["large get MB/s"] = large * LARGE / 1e6 / (time.perf_counter() - started)
    figures["RSS growth MB"] = (process.memory_info().rss - rss) / 1e6
    return figures


async def main(small: int, large: int, rounds: int) -> None:
    ceph = CephS3(Path(tempfile.mkdtemp(prefix="segserve-blobs-bench-")))
    ceph.start()
    try:
        results: dict[str, list[dict[str, float]]] = {"obstore": [], "aiobotocore": []}
        for round_ in range(rounds):  # interleaved, so that drift in the machine falls on both
            bucket = ceph.bucket(f"bench-obstore-{round_}")
            put, get = await obstore_client(ceph, bucket)
            results["obstore"].append(await measure(put, get, small, large))
            try:
                async with aiobotocore_client(ceph, ceph.bucket(f"bench-aiobotocore-{round_}")) as (put, get):
                    results["aiobotocore"].append(await measure(put, get, small, large))
            except ImportError:
                results.pop("aiobotocore", None)
        for client, runs in results.items():
            for figure in runs[0]:
                values = ", ".join(f"{run[figure]:.1f}" for run in runs)
                print(f"{client:<12} {figure:<16} {values}")
    finally:
        ceph.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--small", type=int, default=400, help="objects of 100 kB, written then read, 32 at once"
    )
    parser.add_argument(
        "--large", type=int, default=10, help="objects of 20 MB, written then read, one at a time"
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.small, args.large, args.rounds))
