"""The handler's own code path called in-process (configurations a and a'): the archive's weights and
settings, one image at a time, every core; in a process of its own per engine."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import sys
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

# done, latencies ms, errors, seconds, the handler's CPU ms by stage (summed)
Measured = tuple[int, list[float], int, float, dict[str, float]]


class Isolated:
    """An ``InProcess`` handler in a process of its own: torch's thread settings are per process, and two
    engines' handlers in one process would set them for each other."""

    def __init__(self, archive: Path, workdir: Path) -> None:
        context = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(1, mp_context=context, initializer=_load, initargs=(archive, workdir))
        self.model_dir = workdir

    def run(self, body: bytes, seconds: float) -> Measured:
        return self.pool.submit(_run, body, seconds).result()  # type: ignore[no-any-return]

    def mask(self, body: bytes) -> Any:
        return self.pool.submit(_mask, body).result()

    def close(self) -> None:
        self.pool.shutdown()


_handler: InProcess | None = None


def _load(archive: Path, workdir: Path) -> None:
    global _handler
    _handler = InProcess(archive, workdir)


def _run(body: bytes, seconds: float) -> Measured:
    assert _handler is not None
    return _handler.run(body, seconds)


def _mask(body: bytes) -> Any:
    assert _handler is not None
    return _handler.mask(body)


class InProcess:
    """The handler's own code path, called directly in this process on the archive's weights."""

    def __init__(self, archive: Path, workdir: Path) -> None:
        sys.path.insert(0, str(ROOT))
        import yaml

        from gateway.handlers.deeplabv3.handler import DeepLabV3Handler
        from tests.harness.handler import Context

        with zipfile.ZipFile(archive) as mar:
            mar.extractall(workdir)
        self.context = Context(workdir)
        self.context.manifest = json.loads((workdir / "MAR-INF" / "MANIFEST.json").read_text())
        config = yaml.safe_load((workdir / "model-config.yaml").read_text())
        config.setdefault("handler", {})["intra_op_threads"] = os.cpu_count() or 1  # the limit: every core
        self.context.model_yaml_config = config
        self.handler = DeepLabV3Handler()
        self.handler.initialize(self.context)

    def mask(self, body: bytes) -> Any:
        [answer] = self.handler.handle([{"body": body}], self.context)
        return np.asarray(Image.open(io.BytesIO(answer.partition(b"\n")[2])))

    def run(self, body: bytes, seconds: float) -> Measured:
        latencies = []
        stages: dict[str, float] = {}
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            t = time.perf_counter()
            [answer] = self.handler.handle([{"body": body}], self.context)
            assert isinstance(answer, bytes), answer
            latencies.append((time.perf_counter() - t) * 1000)
            for name, ms in json.loads(answer.partition(b"\n")[0])["cpu_ms"].items():
                stages[name] = stages.get(name, 0.0) + ms
        return len(latencies), latencies, 0, time.monotonic() - started, stages
