"""The models the workers' TorchServes serve, as the gateway knows them: what ``/v1/models`` lists and what
each submission's model is checked against."""

from __future__ import annotations

import math
import time

from gateway.jobs import JobStore, ModelInfo


class ModelCatalog:
    """The workers' models (``Fleet.models``), cached for a few seconds, since every submission checks its
    model here."""

    def __init__(self, store: JobStore, ttl: float) -> None:
        self.store = store
        self.ttl = ttl
        self._models: list[ModelInfo] | None = None
        self._fetched = -math.inf

    async def list(self) -> list[ModelInfo] | None:
        """None while no worker has ever reported its models."""
        if time.monotonic() - self._fetched > self.ttl:
            self._models = await self.store.fleet.models()
            self._fetched = time.monotonic()
        return self._models

    async def known(self, name: str) -> bool | None:
        """Whether a worker serves ``name``; None when none has said yet (the job waits for one)."""
        models = await self.list()
        return None if models is None else any(model.name == name for model in models)
