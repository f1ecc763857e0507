"""The blob store: every job's input, mask and overlay, in a local directory or in an S3-compatible bucket.

Redis keeps job metadata only, a few kB a job whatever the image's size; the bytes live here, under the
names in ``gateway.jobs.keys``, for as long as their job (the job store deletes them with it, and the
worker's sweeper removes what a crash left behind).

One client serves both backends: obstore, the Python binding of the Rust ``object_store`` crate (the crate
behind Arrow's and DataFusion's storage). Its calls run on its own threads, so neither a directory nor a slow
bucket ever blocks the event loop; it streams both ways, uploads large bodies in parts, retries what S3 says
to retry, and signs URLs. A directory serves one host (``segserve up``, compose with a shared volume); several
hosts need a bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import shutil
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import obstore
from obstore.exceptions import BaseError as ObstoreError
from obstore.store import LocalStore, ObjectStore, S3Store

from gateway.settings import Settings

CHUNK = 256 * 1024  # what a read hands on at a time: small, so many concurrent reads hold little
PART = 5 * 1024 * 1024  # S3's smallest multipart part; an upload holds at most PARTS_IN_FLIGHT of them
PARTS_IN_FLIGHT = 2
FREE_SPACE_CACHE_S = 1.0


class BlobStoreError(Exception):
    """The blob store did not answer, or refused the call: worth trying again later."""


class BlobStoreFull(BlobStoreError):
    """The blob directory has less free space than it keeps in reserve."""


@dataclass(frozen=True)
class BlobInfo:
    name: str
    size: int
    modified: datetime


@dataclass(frozen=True)
class BlobStream:
    """A blob being read: its size, and its bytes in chunks."""

    size: int
    chunks: AsyncIterator[bytes]


def open_store(settings: Settings) -> tuple[ObjectStore, Path | None]:
    """The backend that ``SEGSERVE_BLOB_URL`` names, and its directory when it is one."""
    url = settings.blob_url
    scheme = urlparse(url).scheme
    if scheme in ("", "file"):
        directory = Path(urlparse(url).path if scheme else url).resolve()
        return LocalStore(directory, mkdir=True), directory
    if scheme != "s3":
        raise ValueError(f"SEGSERVE_BLOB_URL={url!r}: use a directory, file:///path or s3://bucket/prefix")
    config: dict[str, Any] = {}
    if settings.blob_endpoint:
        config["endpoint"] = settings.blob_endpoint
    if settings.blob_region:
        config["region"] = settings.blob_region
    timeout = f"{settings.blob_timeout:g}s"
    client = {"timeout": timeout, "connect_timeout": "5s", "allow_http": True}
    # Bounded retries: a call must fail inside the caller's own deadline, which then tries again later.
    retry = {"max_retries": 2, "retry_timeout": timedelta(seconds=settings.blob_timeout)}
    # Credentials, as every AWS tool reads them: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and
    # AWS_SESSION_TOKEN), a web identity token (EKS) or the instance's role.
    store = S3Store.from_url(url, config=config, client_options=client, retry_config=retry)  # type: ignore[arg-type]
    return store, None


class Blobs:
    """Named blobs, written and read whole or streamed; every failure of the store is a BlobStoreError."""

    def __init__(self, store: ObjectStore, directory: Path | None = None, min_free_bytes: int = 0) -> None:
        self.store = store
        self.directory = directory  # the directory backend's root, whose free space admission checks
        self.min_free_bytes = min_free_bytes
        self._free: tuple[float, int] | None = None  # (when measured, bytes free)

    @classmethod
    def from_settings(cls, settings: Settings) -> Blobs:
        store, directory = open_store(settings)
        return cls(store, directory, settings.blob_min_free_bytes)

    @property
    def signs(self) -> bool:
        """Whether this store can hand out presigned URLs (S3 can, a directory cannot)."""
        return isinstance(self.store, S3Store)

    async def put(self, name: str, data: bytes | AsyncIterable[bytes] | Iterable[bytes] | IO[bytes]) -> None:
        """Write the blob whole: readers see all of it or none. An error raised by ``data`` itself (a body over
        its limit) comes through as it is, and nothing is written."""
        # Bytes already in memory go in one request (faster); a stream goes in parts, so it is never held whole.
        in_parts = not isinstance(data, bytes)
        try:
            await obstore.put_async(
                self.store,
                name,
                data,
                use_multipart=in_parts,
                chunk_size=PART,
                max_concurrency=PARTS_IN_FLIGHT,
            )
        except (ObstoreError, OSError) as exc:
            # Concurrent uploads can pass the free-space check together and fill the disk: the write that
            # finds no space (ENOSPC, "os error 28") says the store is full, as the check would have.
            out_of_space = "os error 28" in str(exc) or getattr(exc, "errno", None) == errno.ENOSPC
            if self.directory is not None and (
                out_of_space or await self.free_bytes(fresh=True) < self.min_free_bytes
            ):
                raise BlobStoreFull(f"the blob directory {self.directory} is full") from exc
            raise BlobStoreError(f"cannot write {name}: {one_line(exc)}") from exc

    async def get(self, name: str) -> bytes | None:
        """The blob's bytes; None when there is no such blob."""
        try:
            result = await obstore.get_async(self.store, name)
            return bytes(await result.bytes_async())
        except FileNotFoundError:
            return None
        except (ObstoreError, OSError) as exc:
            raise BlobStoreError(f"cannot read {name}: {one_line(exc)}") from exc

    async def stream(self, name: str) -> BlobStream | None:
        """The blob, to be read in chunks; None when there is no such blob."""
        try:
            result = await obstore.get_async(self.store, name)
        except FileNotFoundError:
            return None
        except (ObstoreError, OSError) as exc:
            raise BlobStoreError(f"cannot read {name}: {one_line(exc)}") from exc

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in result.stream(min_chunk_size=CHUNK):
                yield bytes(chunk)

        return BlobStream(result.meta["size"], chunks())

    @contextlib.contextmanager
    def reader(self, name: str) -> Iterator[IO[bytes]]:
        """A file-like view of the blob that reads only what is asked (ranged reads on S3), for an image
        decoder that needs a header from anywhere in the file. Blocking: use it in a thread."""
        try:
            file = io.BufferedReader(BlobFile(obstore.open_reader(self.store, name)), buffer_size=CHUNK)
        except (ObstoreError, OSError) as exc:
            raise BlobStoreError(f"cannot read {name}: {one_line(exc)}") from exc
        with file:
            yield file

    async def delete(self, names: Iterable[str]) -> None:
        """Delete the blobs; those that do not exist are no error."""

        async def one(name: str) -> None:
            with contextlib.suppress(FileNotFoundError):
                await obstore.delete_async(self.store, name)

        try:
            await asyncio.gather(*(one(name) for name in names))
        except (ObstoreError, OSError) as exc:
            raise BlobStoreError(f"cannot delete: {one_line(exc)}") from exc

    async def list(self, prefix: str) -> AsyncIterator[BlobInfo]:
        """Every blob whose name starts with ``prefix``, in pages, never all in memory."""
        try:
            async for page in obstore.list(self.store, prefix, chunk_size=500):
                for meta in page:
                    yield BlobInfo(meta["path"], meta["size"], meta["last_modified"])
        except (ObstoreError, OSError) as exc:
            raise BlobStoreError(f"cannot list {prefix}: {one_line(exc)}") from exc

    async def sign(self, name: str, seconds: int) -> str:
        """A URL that GETs the blob without credentials for ``seconds``. Only where ``signs``."""
        assert isinstance(self.store, S3Store)
        try:
            return await obstore.sign_async(self.store, "GET", name, timedelta(seconds=seconds))
        except (ObstoreError, OSError) as exc:
            raise BlobStoreError(f"cannot sign {name}: {one_line(exc)}") from exc

    async def free_bytes(self, fresh: bool = False) -> int:
        """Free space where the directory backend writes (cached for a second); a bucket never fills."""
        if self.directory is None:
            return 1 << 62
        now = time.monotonic()
        if fresh or self._free is None or now - self._free[0] > FREE_SPACE_CACHE_S:
            usage = await asyncio.to_thread(shutil.disk_usage, self.directory)
            self._free = (now, usage.free)
        return self._free[1]

    async def check_room(self, incoming: int) -> None:
        """BlobStoreFull when writing ``incoming`` more bytes would eat into the reserve of free space."""
        if self.directory is not None and await self.free_bytes() - incoming < self.min_free_bytes:
            raise BlobStoreFull(
                f"the blob directory {self.directory} keeps {self.min_free_bytes} bytes free, "
                "and this image would not leave them"
            )

    async def health(self) -> str:
        """Whether the store answers and lets us list it (the bucket exists, the keys are right): "ok", else
        why not, for /readyz. It lists a prefix that holds nothing, so the answer is small."""
        try:
            await obstore.list_with_delimiter_async(self.store, "health-probe/")
        except (ObstoreError, OSError) as exc:
            return f"down: {one_line(exc, 120)}"
        return "ok"


class BlobFile(io.RawIOBase):
    """obstore's reader as a standard binary file: its reads answer obstore's own buffer type, which image
    decoders do not take."""

    def __init__(self, reader: Any) -> None:
        self._reader = reader

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = memoryview(self._reader.read(len(buffer)))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return int(self._reader.seek(offset, whence))

    def tell(self) -> int:
        return int(self._reader.tell())

    def close(self) -> None:
        self._reader.close()
        super().close()


def one_line(exc: BaseException, limit: int = 300) -> str:
    """obstore's messages carry a multi-line debug dump of the Rust error: its first line says it all."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
