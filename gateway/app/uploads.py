"""How an image reaches the blob store: streamed as it arrives, bounded in size, checked from its header.

A raw body is never held whole: its chunks go on to the blob store as they come (an upload in parts on S3),
and only its first bytes stay in memory, for the header check. A form's file is parsed by Starlette, which
keeps a large one in a temporary file, and is streamed on from there. JSON bodies (base64 inside) and images
by URL are whole in memory; the caller holds the gateway's image memory budget for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import Message

from gateway.app import images
from gateway.app.errors import Problem
from gateway.jobs import JobStore, keys, new_job_id

HEAD_BYTES = 1 << 20  # an image's header is within its first MiB, but for rare TIFFs and JPEGs: see identify
CHUNK = 256 * 1024
STREAM_MEMORY = 16 << 20  # what one streamed upload holds at most: its head, a chunk, two S3 parts in flight


def body_too_large(limit: int, what: str = "the body") -> Problem:
    return Problem(413, "body_too_large", f"{what} is over the limit of {limit} bytes")


@dataclass(frozen=True)
class StoredImage:
    """An input in the blob store, under the id its job will have, and what its header says."""

    job_id: str
    size: int
    content_type: str
    width: int
    height: int


def declared_length(request: Request) -> int | None:
    declared = request.headers.get("content-length", "")
    return int(declared) if declared.isascii() and declared.isdigit() else None


def refuse_declared(request: Request, limit: int) -> None:
    """413 before reading a byte, when Content-Length already says the body is too large."""
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise body_too_large(limit)


def size_limited(request: Request, limit: int) -> Request:
    """The request, with a body that ends in 413 as soon as it passes ``limit`` bytes (for Starlette's form
    parser, which reads the body itself)."""
    refuse_declared(request, limit)
    received = 0

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise body_too_large(limit)
        return message

    return Request(request.scope, receive)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` bytes."""
    refuse_declared(request, limit)
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise body_too_large(limit)
        body += chunk
    return bytes(body)


async def file_chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK):
        yield chunk


async def store_stream(
    store: JobStore, chunks: AsyncIterator[bytes], limit: int, max_pixels: int, expected: int = 0
) -> StoredImage:
    """Stream an image to the blob store under a new job id, then check it; a Problem (and nothing stored)
    when it is too large, not an acceptable image, or the store has no room."""
    await store.blobs.check_room(expected)
    job_id = new_job_id()
    head = bytearray()
    size = 0

    async def counted() -> AsyncIterator[bytes]:
        nonlocal size
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise body_too_large(limit)
            if len(head) < HEAD_BYTES:
                head.extend(chunk[: HEAD_BYTES - len(head)])
            yield chunk

    await store.blobs.put(keys.input_blob(job_id), counted())
    return await identify(store, job_id, bytes(head), size, max_pixels)


async def store_bytes(store: JobStore, image: bytes, max_pixels: int) -> StoredImage:
    """Check an image held in memory, then put it in the blob store under a new job id."""
    content_type, width, height = images.check_image(image, max_pixels)
    await store.blobs.check_room(len(image))
    job_id = new_job_id()
    await store.blobs.put(keys.input_blob(job_id), image)
    return StoredImage(job_id, len(image), content_type, width, height)


async def identify(store: JobStore, job_id: str, head: bytes, size: int, max_pixels: int) -> StoredImage:
    """Check a stored input from its header. Nearly every header is in ``head``; where it is not (a TIFF whose
    directory comes last, a JPEG after a MiB of metadata), it is read from the blob, only as far as needed."""
    name = keys.input_blob(job_id)
    try:
        try:
            content_type, width, height = images.check_image(head, max_pixels)
        except Problem as exc:
            if exc.code != "not_an_image" or size <= len(head):
                raise
            content_type, width, height = await asyncio.to_thread(read_header, store, name, max_pixels)
    except BaseException:
        await store.discard_input(job_id)
        raise
    return StoredImage(job_id, size, content_type, width, height)


def read_header(store: JobStore, name: str, max_pixels: int) -> tuple[str, int, int]:
    with store.blobs.reader(name) as blob:
        return images.check_image(blob, max_pixels)
