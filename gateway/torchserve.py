"""The one module that talks to TorchServe, so another model server could replace it.

The handler answers an image with a line of JSON then the mask's PNG (``MASK_CONTENT_TYPE``); archives built
before that answered JSON with the PNG in base64, which ``predict`` still reads.

TorchServe enforces token authorization: its keys are in ``key_file.json`` in its working directory
and expire (60 minutes by default). On a refused token the client re-reads the file and, when the key
there is the one just refused, asks TorchServe for a fresh one with the file's API key.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from gateway.handlers.deeplabv3.catalog import MASK_CONTENT_TYPE

logger = logging.getLogger(__name__)

# What a restarting, overloaded or unreachable TorchServe answers; worth trying again later.
TRANSIENT_STATUSES = {500, 502, 503, 504, 507}

# TCP keepalive, probed after 10 s of silence every 5 s: a TorchServe whose host vanished (no reset) fails
# an idle pooled connection in ~25 s, not after the kernel's default of two hours.
KEEPALIVE = [
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
]


def one_line(text: str, limit: int = 200) -> str:
    """TorchServe's error bodies are indented JSON: one line of them reads better in a log or a job."""
    return " ".join(text.split())[:limit]


def token_refused(response: httpx.Response) -> bool:
    # TorchServe answers a missing, wrong or expired token with 400 and this exception's name.
    return response.status_code in (400, 401) and b"InvalidKeyException" in response.content


class BackendUnavailable(Exception):
    """TorchServe cannot answer now (down, restarting, overloaded, timed out)."""


class ModelNotFound(Exception):
    pass


class InputRejected(Exception):
    """The handler refused this image or these parameters; ``code`` is the API's ``error.code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Prediction:
    width: int
    height: int
    classes: list[dict[str, Any]]
    mask_png: bytes
    timings_ms: dict[str, float]


def read_prediction(body: bytes) -> Prediction:
    """The handler's answer to an image (``MASK_CONTENT_TYPE``): a line of JSON, then the mask's PNG.
    ValueError or KeyError when it is not one."""
    head, _, mask_png = body.partition(b"\n")
    return prediction(json.loads(head), mask_png)


def prediction(fields: dict[str, Any], mask_png: bytes) -> Prediction:
    return Prediction(
        width=fields["width"],
        height=fields["height"],
        classes=fields["classes"],
        mask_png=mask_png,
        timings_ms=fields.get("timings_ms", {}),
    )


class Tokens:
    """TorchServe's keys from its key file, refreshed when one is refused."""

    def __init__(self, key_file: Path) -> None:
        self.key_file = key_file
        self._keys: dict[str, str] = {}
        self._lock = asyncio.Lock()

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.key_file.read_text())
        except (OSError, ValueError):
            return {}  # token authorization off, or TorchServe not started yet
        return {kind: entry.get("key", "") for kind, entry in data.items() if isinstance(entry, dict)}

    def header(self, kind: str) -> dict[str, str]:
        if not self._keys:
            self._keys = self._read()
        key = self._keys.get(kind)
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def refresh(
        self, kind: str, refused: dict[str, str], client: httpx.AsyncClient, management: str
    ) -> None:
        async with self._lock:
            if self.header(kind) != refused:
                return  # another request refreshed it meanwhile
            self._keys = self._read()
            if self.header(kind) != refused or not self._keys.get("API"):
                return
            # Same key as refused: it expired. Ask for a new one; TorchServe rewrites the file.
            api = {"Authorization": f"Bearer {self._keys['API']}"}
            try:
                await client.get(f"{management}/token", params={"type": kind}, headers=api, timeout=5)
            except httpx.HTTPError as exc:
                logger.warning("cannot refresh TorchServe's %s token: %s", kind, exc)
            self._keys = self._read()


class TorchServe:
    def __init__(
        self,
        inference_url: str,
        management_url: str,
        key_file: Path,
        timeout: float = 60.0,
        max_connections: int = 64,
    ) -> None:
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        self.tokens = Tokens(key_file)
        # TorchServe queues requests with no timeout of its own while its worker restarts: ours bounds them.
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        # No proxies from the environment: the bearer tokens must go to TorchServe and nowhere else.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=5.0),
            transport=httpx.AsyncHTTPTransport(limits=limits, socket_options=KEEPALIVE),
            trust_env=False,
        )
        self._describe_cache: dict[tuple[str, str], dict[str, Any]] = {}

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _request(self, kind: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
        base_headers = kwargs.pop("headers", {})
        for attempt in range(2):
            auth = self.tokens.header(kind)
            try:
                response = await self.client.request(method, url, headers={**base_headers, **auth}, **kwargs)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                raise BackendUnavailable(f"{type(exc).__name__}: {str(exc) or 'no answer in time'}") from exc
            if not token_refused(response):
                return response
            if attempt == 0:
                await self.tokens.refresh(kind, auth, self.client, self.management_url)
        # Still refused: TorchServe is (re)starting and has not written its new keys yet, or they are not ours.
        raise BackendUnavailable("TorchServe refused our token")

    async def predict(
        self, model: str, image: bytes, classes: list[int] | None, threshold: float, content_type: str
    ) -> Prediction:
        headers = {"Content-Type": content_type or "application/octet-stream", "X-Threshold": repr(threshold)}
        if classes is not None:
            headers["X-Classes"] = ",".join(map(str, classes))
        response = await self._request(
            "inference", "POST", f"{self.inference_url}/predictions/{model}", content=image, headers=headers
        )
        if response.status_code in TRANSIENT_STATUSES:
            raise BackendUnavailable(f"TorchServe answered {response.status_code}: {one_line(response.text)}")
        if response.status_code == 404:
            raise ModelNotFound(model)
        content_type = response.headers.get("content-type", "").split(";")[0].strip()
        if response.status_code == 200 and content_type == MASK_CONTENT_TYPE:
            try:
                return read_prediction(response.content)
            except (ValueError, KeyError) as exc:
                raise BackendUnavailable("unreadable answer from TorchServe (its JSON head)") from exc
        try:
            body = response.json()
        except ValueError as exc:
            raise BackendUnavailable(f"unreadable answer from TorchServe ({response.status_code})") from exc
        if response.status_code != 200 or "error" in body:
            error = body.get("error") if isinstance(body.get("error"), dict) else {}
            code = error.get("code") or ("too_large" if response.status_code == 413 else "backend_error")
            raise InputRejected(code, error.get("message") or body.get("message") or one_line(response.text))
        return prediction(body, base64.b64decode(body["mask_png"]))  # an archive older than the binary answer

    async def models(self) -> list[dict[str, Any]]:
        """Every registered model version, as ``/v1/models`` shows it (the worker reports it)."""
        names: list[str] = []
        token = ""
        while True:
            params = {"limit": "100", **({"next_page_token": token} if token else {})}
            listing = await self._management_json("GET", "/models", params=params)
            names += [m["modelName"] for m in listing.get("models", [])]
            token = listing.get("nextPageToken", "")
            if not token:
                break
        described = await asyncio.gather(*(self._management_json("GET", f"/models/{n}/all") for n in names))
        default_versions = await asyncio.gather(
            *(self._management_json("GET", f"/models/{n}") for n in names)
        )
        models = []
        for versions, default in zip(described, default_versions, strict=True):
            default_version = default[0]["modelVersion"] if default else None
            for v in versions:
                custom = await self._customized(v["modelName"], v["modelVersion"])
                workers = v.get("workers", [])
                models.append(
                    {
                        "name": v["modelName"],
                        "version": v["modelVersion"],
                        "default": v["modelVersion"] == default_version,
                        "workers": len(workers),
                        "workers_ready": sum(1 for w in workers if w.get("status") == "READY"),
                        "batch_size": v.get("batchSize"),
                        "max_batch_delay_ms": v.get("maxBatchDelay"),
                        "device": custom.get("device")
                        or ("gpu" if any(w.get("gpu") for w in workers) else "cpu"),
                        "variant": custom.get("variant"),
                        "engine": custom.get("engine", "torch"),
                        "precision": custom.get("precision", "fp32"),
                        "weights": custom.get("weights", "unknown"),
                        "random_weights": custom.get("random_weights", False),
                    }
                )
        return models

    async def _customized(self, name: str, version: str) -> dict[str, Any]:
        """The handler's own description (variant, weights, device); it never changes for a version."""
        key = (name, version)
        if key not in self._describe_cache:
            try:
                data = await self._management_json(
                    "GET", f"/models/{name}/{version}", params={"customized": "true"}
                )
                custom = data[0].get("customizedMetadata", {}) if data else {}
                if isinstance(custom, str):
                    custom = json.loads(custom)
            except (BackendUnavailable, ValueError):
                return {}
            self._describe_cache[key] = custom
        return self._describe_cache[key]

    async def _management_json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._request("management", method, f"{self.management_url}{path}", **kwargs)
        if response.status_code == 404:
            raise ModelNotFound(path)
        if response.status_code != 200:
            raise BackendUnavailable(f"TorchServe management answered {response.status_code}")
        return response.json()

    async def ping(self) -> bool:
        try:
            response = await self._request("inference", "GET", f"{self.inference_url}/ping", timeout=2)
        except BackendUnavailable:
            return False
        return response.status_code == 200
