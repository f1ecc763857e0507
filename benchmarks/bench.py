"""segserve's performance harness: the full pipeline against TorchServe direct and in-process inference,
for the chosen inference engine and for eager torch.

    .venv/bin/python benchmarks/bench.py [--seconds 15] [--rounds 2] [--concurrency 8] [--engine openvino]
                                         [--precision fp32] [--warmup 20]

It builds one archive per engine (`segserve build-model --engine E`, the same seeded random weights), starts
one stack per archive with `segserve up` (each its own ports and state directory; the one not measured sits
idle), then measures, with the configurations interleaved round by round so that machine drift falls on all
of them alike:
  a   in-process, eager torch: the handler's own code (decode, preprocess, forward, postprocess), one image
      at a time with every core;
  a'  the same with the chosen engine (at the chosen precision: `--precision bf16` names it "openvino bf16");
  b   TorchServe direct with the chosen engine: N concurrent HTTP clients against its archive;
  c   the pipeline (gateway -> Redis -> arq worker -> TorchServe) with `Prefer: wait`, and submit-then-poll,
      with the chosen engine, and with `Prefer: wait` on the eager torch archive;
  c t  the pipeline with `Prefer: wait` and a threshold (0.5, as the old service's clients send);
on two 640x480 JPEGs (a flat picture, whose masks have few borders, and a textured, photo-like one with
many; the textured one and a 128x128 one for the chosen engine only), at 1 and N clients; then
  d   the submit path alone: jobs accepted per second by one gateway with no worker, and its memory.
It prints a table with the ratios the targets are stated in, the masks' agreement between a' and a, where
each image's CPU goes (by process; TorchServe's split into its Java frontend, the handler's stages as the
handler reports them, and the rest of its Python backend), the total outside the forward pass and the
images/s that N cores could feed if the model cost nothing; and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the helpers that start stacks are the test suite's
from tests.harness.processes import free_port  # noqa: E402
from tests.harness.servers import side_by_side_env  # noqa: E402

BIN = Path(sys.executable).parent
POLL_INTERVAL = 0.05  # what a sensible polling client does: 20 looks a second
THRESHOLD = 0.5  # what the old service's clients send
CEILING_CORES = (2, 16)  # this machine, and a 16-core GPU host


def picture(width: int, height: int) -> bytes:
    """A flat picture: an ellipse and a rectangle on a plain background; its masks have few borders."""
    image = Image.new("RGB", (width, height), (40, 120, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.1, height * 0.2, width * 0.5, height * 0.9), fill=(240, 190, 20))
    draw.rectangle((width * 0.55, height * 0.1, width * 0.95, height * 0.6), fill=(20, 20, 20))
    return jpeg(image)


def textured(width: int, height: int) -> bytes:
    """A photo-like picture: colour gradients with noise; under random weights its masks have many
    borders, as real photos have more than the flat picture."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 37) * np.cos(y / 23)]
    pixels = np.stack(channels, axis=2) + rng.normal(0, 25, (height, width, 3))
    return jpeg(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


@dataclass
class Result:
    config: str
    image: str
    clients: int
    images: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)  # by process role, over the measurement
    stages_ms: dict[str, float] = field(default_factory=dict)  # the handler's own cpu_ms, summed

    def merge(self, other: Result) -> None:
        self.images += other.images
        self.seconds += other.seconds
        self.latencies_ms += other.latencies_ms
        self.errors += other.errors
        for name, value in other.cpu_s.items():
            self.cpu_s[name] = self.cpu_s.get(name, 0.0) + value
        for name, value in other.stages_ms.items():
            self.stages_ms[name] = self.stages_ms.get(name, 0.0) + value

    @property
    def throughput(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Stack:
    """`segserve up` on free ports, and the processes it runs, for CPU accounting."""

    def __init__(self, home: Path, model_store: Path | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.env = side_by_side_env(home)
        if model_store is not None:
            self.env["SEGSERVE_MODEL_STORE"] = str(model_store)
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.home / "up.log").open("wb")
        self.process = subprocess.Popen(
            [str(BIN / "segserve"), "up", "--port", str(self.port)],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"segserve up exited: see {self.home / 'up.log'}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).json().get("status") == "ready":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the stack did not become ready")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)

    def processes(self) -> dict[str, list[psutil.Process]]:
        """Processes by role: gateway, worker, redis, TorchServe's Java frontend and its Python backends."""
        assert self.process is not None
        roles: dict[str, list[psutil.Process]] = {
            "gateway": [], "worker": [], "redis": [], "frontend": [], "backend": []
        }  # fmt: skip
        for p in psutil.Process(self.process.pid).children(recursive=True):
            try:
                line = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if "gateway.app:app" in line:
                roles["gateway"].append(p)
            elif "segserve worker" in line:
                roles["worker"].append(p)
            elif "redis-server" in line:
                roles["redis"].append(p)
            elif "java" in p.name():
                roles["frontend"].append(p)
            elif "model_service_worker" in line:
                roles["backend"].append(p)
        return roles

    def key(self, kind: str) -> str:
        keys = json.loads((self.home / "torchserve" / "key_file.json").read_text())
        return str(keys[kind]["key"])


def cpu_seconds(roles: dict[str, list[psutil.Process]]) -> dict[str, float]:
    totals = {}
    for role, processes in roles.items():
        total = 0.0
        for p in processes:
            try:
                times = p.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        totals[role] = total
    return totals


Measured = tuple[int, list[float], int, float, dict[str, float]]  # done, latencies ms, errors, s, stages


async def closed_loop(clients: int, seconds: float, one: Any) -> tuple[int, list[float], int, float]:
    """`clients` loops calling `one()` back to back for `seconds`; (done, latencies ms, errors, elapsed)."""
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            start = time.perf_counter()
            ok = await one()
            if ok:
                latencies.append((time.perf_counter() - start) * 1000)
            else:
                errors += 1

    started = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(clients)))
    return len(latencies), latencies, errors, time.monotonic() - started


async def torchserve_direct(stack: Stack, body: bytes, clients: int, seconds: float) -> Measured:
    """N clients against TorchServe; the handler's CPU by stage, summed from its answers' heads."""
    headers = {"Authorization": f"Bearer {stack.key('inference')}", "Content-Type": "image/jpeg"}
    url = f"{stack.env['SEGSERVE_TORCHSERVE_URL']}/predictions/deeplabv3"
    stages: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as client:

        async def one() -> bool:
            response = await client.post(url, content=body, headers=headers)
            if response.status_code != 200:
                return False
            for name, ms in json.loads(response.content.partition(b"\n")[0]).get("cpu_ms", {}).items():
                stages[name] = stages.get(name, 0.0) + ms
            return True

        return (*await closed_loop(clients, seconds, one), stages)


async def pipeline(
    stack: Stack, body: bytes, clients: int, seconds: float, wait: bool, threshold: float = 0.0
) -> Measured:
    params = {"threshold": str(threshold)} if threshold else {}
    async with httpx.AsyncClient(
        base_url=stack.url, timeout=120, limits=httpx.Limits(max_connections=clients)
    ) as client:

        async def one() -> bool:
            headers = {"Content-Type": "image/jpeg", **({"Prefer": "wait=60"} if wait else {})}
            job = (await client.post("/v1/jobs", content=body, headers=headers, params=params)).json()
            while job.get("status") in ("queued", "running"):
                await asyncio.sleep(POLL_INTERVAL)
                job = (await client.get(f"/v1/jobs/{job['id']}")).json()
            return job.get("status") == "succeeded"

        return (*await closed_loop(clients, seconds, one), {})


async def pipeline_overhead(stack: Stack, body: bytes, jobs: int) -> list[float]:
    """Latency the pipeline adds at one client, job by job: the client's wait for a `Prefer: wait` answer
    minus the worker's TorchServe request, which is the request a direct client makes. Measured on the
    same job, it is free of the run-to-run and worker-to-worker spread of the inference itself."""
    added = []
    async with httpx.AsyncClient(base_url=stack.url, timeout=120) as client:
        for _ in range(jobs):
            start = time.perf_counter()
            response = await client.post(
                "/v1/jobs", content=body, headers={"Content-Type": "image/jpeg", "Prefer": "wait=60"}
            )
            elapsed = (time.perf_counter() - start) * 1000
            job = response.json()
            assert job["status"] == "succeeded", job
            added.append(elapsed - job["timings_ms"]["backend"])
    return added


class Isolated:
    """An ``InProcess`` handler in a process of its own: torch's thread settings are per process, and two
    engines' handlers in one process would set them for each other."""

    def __init__(self, archive: Path, workdir: Path) -> None:
        context = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(1, mp_context=context, initializer=_load, initargs=(archive, workdir))

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
        from gateway.handlers.deeplabv3.handler import DeepLabV3Handler

        with zipfile.ZipFile(archive) as mar:
            mar.extractall(workdir)
        manifest = json.loads((workdir / "MAR-INF" / "MANIFEST.json").read_text())
        import yaml

        config = yaml.safe_load((workdir / "model-config.yaml").read_text())
        config.setdefault("handler", {})["intra_op_threads"] = os.cpu_count() or 1  # the limit: every core
        handler = DeepLabV3Handler()
        self.context = _Context(workdir, manifest, config)
        handler.initialize(self.context)
        self.handler = handler

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


class _Context:
    def __init__(self, model_dir: Path, manifest: dict[str, Any], config: dict[str, Any]) -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.manifest = manifest
        self.model_yaml_config = config
        self.metrics = type("Metrics", (), {"add_time": lambda *a, **k: None})()

    def get_all_request_header(self, idx: int) -> dict[str, str]:
        return {}

    def get_request_header(self, idx: int, key: str) -> None:
        return None

    def set_response_status(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_response_content_type(self, *args: Any) -> None:
        pass


def submit_path(stack: Stack, seconds: float, workdir: Path) -> dict[str, Any]:
    """Jobs/s one gateway accepts with no worker to take them (its own Redis database), and its memory."""
    port = free_port()
    redis_url = stack.env["SEGSERVE_REDIS_URL"].rsplit("/", 1)[0] + "/1"
    env = {**stack.env, "SEGSERVE_REDIS_URL": redis_url, "SEGSERVE_MAX_QUEUED": "100000000",
           "SEGSERVE_TORCHSERVE_KEY_FILE": str(stack.home / "torchserve" / "key_file.json")}  # fmt: skip
    gateway = subprocess.Popen(
        [str(BIN / "uvicorn"), "gateway.app:app", "--port", str(port), "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, env=env, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        small = picture(32, 32)
        (workdir / "small.jpg").write_bytes(small)
        httpx.post(
            f"{url}/v1/jobs", content=small, headers={"Content-Type": "image/jpeg"}
        )  # warm the model cache
        process = psutil.Process(gateway.pid)
        cpu_before = sum(process.cpu_times()[:2])
        if shutil.which("wrk"):
            accepted, elapsed = _wrk(url, workdir / "small.jpg", seconds, workdir)
            tool = "wrk"
        else:
            accepted, elapsed = asyncio.run(_python_load(url, small, seconds))
            tool = "python"
        cpu = sum(process.cpu_times()[:2]) - cpu_before
        rss_mb = process.memory_info().rss / 2**20
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=30)
    return {"accepted": accepted, "seconds": elapsed, "jobs_per_s": accepted / elapsed, "gateway_cpu_s": cpu,
            "gateway_rss_mb": rss_mb, "load_tool": tool}  # fmt: skip


def _wrk(url: str, image: Path, seconds: float, workdir: Path) -> tuple[int, float]:
    script = workdir / "submit.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "image/jpeg"\n'
        f'local f = io.open("{image}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
    )
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{int(seconds)}s", "-s", str(script), f"{url}/v1/jobs"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    total = int(next(line.split()[0] for line in out.splitlines() if "requests in" in line))
    bad = next((int(line.split()[-1]) for line in out.splitlines() if "Non-2xx" in line), 0)
    return total - bad, float(seconds)


async def _python_load(url: str, body: bytes, seconds: float) -> tuple[int, float]:
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=32)) as client:

        async def one() -> bool:
            r = await client.post("/v1/jobs", content=body, headers={"Content-Type": "image/jpeg"})
            return r.status_code == 202

        done, _, _, elapsed = await closed_loop(32, seconds, one)
    return done, elapsed


def table(
    results: dict[str, Result],
    clients: int,
    submit: dict[str, Any],
    added: dict[str, list[float]],
    engine: str,
    agreement: float,
) -> str:
    lines = [
        f"{'image':<8} {'config':<30} {'clients':>7} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}  CPU ms/image by process",
    ]
    for r in results.values():
        cpu = ", ".join(
            f"{k} {v * 1000 / r.images:.1f}" for k, v in r.cpu_s.items() if r.images and v > 0.0005
        )
        lines.append(
            f"{r.image:<8} {r.config:<30} {r.clients:>7} {r.throughput:>9.2f} {r.percentile(0.5):>8.1f} {r.percentile(0.99):>8.1f} {r.errors:>6}  {cpu}"
        )

    def get(config: str, n: int, image: str = "flat") -> Result:
        return results[f"{image}/{config}/{n}"]

    eager, fast = get("a in-process torch", 1), get(f"a' in-process {engine}", 1)
    b, c = get(f"b torchserve {engine}", clients), get(f"c pipeline wait {engine}", clients)
    c_torch = get("c pipeline wait torch", clients)
    lone = get(f"c pipeline wait {engine}", 1).percentile(0.5) / fast.percentile(0.5)
    lines += [
        "",
        f"targets, flat 640x480, {engine} against eager torch, in this run:",
        f"  a'/a = {fast.throughput / eager.throughput:.2f} (>= 2.5), masks agreeing on {agreement:.4%} of pixels (>= 99.9%)",
        f"  c/b = {c.throughput / b.throughput:.3f} at {clients} clients (>= 0.97)",
        f"  c {engine} / c torch = {c.throughput / c_torch.throughput:.2f} at {clients} clients (>= 2.5)",
        f"  1 client: c p50 - b p50 = {get(f'c pipeline wait {engine}', 1).percentile(0.5) - get(f'b torchserve {engine}', 1).percentile(0.5):+.1f} ms (<= 10); c p50 / a' p50 = {lone:.3f}",
    ]
    for image in ("flat", "textured"):
        wait = get(f"c pipeline wait {engine}", clients, image)
        threshold = get(f"c pipeline wait {engine} t{THRESHOLD:g}", clients, image)
        lines.append(
            f"  {image}: threshold {THRESHOLD:g} / none = {threshold.throughput / wait.throughput:.3f} at {clients} clients (>= 0.9)"
        )
    lines.append("")
    for image in ("flat", "textured", "128x128"):
        poll = get(f"c pipeline poll {engine}", clients, image)
        b_image = get(f"b torchserve {engine}", clients, image)
        lines.append(
            f"{image}: poll c/b = {poll.throughput / b_image.throughput:.3f} at {clients} clients; at 1 client the "
            f"pipeline adds {statistics.median(added[image]):+.1f} ms p50, "
            f"{Result('', '', 1, 0, 0, added[image]).percentile(0.99):+.1f} ms p99 over its TorchServe request "
            f"({len(added[image])} jobs)"
        )
    lines.append(
        f"submit path: {submit['jobs_per_s']:.0f} jobs/s accepted by one gateway ({submit['load_tool']}), "
        f"gateway RSS {submit['gateway_rss_mb']:.0f} MB"
    )
    return "\n".join(lines + cpu_breakdown(results, clients, engine))


def cpu_breakdown(results: dict[str, Result], clients: int, engine: str) -> list[str]:
    """Where each image's CPU goes, ms per image at N clients: every process's from the pipeline's run
    (c, Prefer: wait), TorchServe's Python backend split by the handler's own stages (``cpu_ms``, from
    the TorchServe direct run b, whose answers carry them) and the rest of that process (TorchServe's
    Python side: the request in, the answer out). Outside the forward pass is all of it but the forward
    pass; the ceiling is what N cores could feed if the model cost nothing."""
    roles = ("gateway", "worker", "redis", "frontend")
    stages = ("decode", "resize", "normalise", "forward", "mask", "png", "answer")
    lines = [
        "",
        f"CPU ms per image at {clients} clients ({engine}; processes from c, the handler's stages from b):",
        f"{'image':<8} "
        + " ".join(f"{name:>9}" for name in (*roles, "ts-python", *stages))
        + f" {'outside':>9}  images/s if the model cost nothing",
    ]
    for image in ("flat", "textured"):
        b = results[f"{image}/b torchserve {engine}/{clients}"]
        c = results[f"{image}/c pipeline wait {engine}/{clients}"]
        if not (b.images and c.images):
            continue
        process = {
            role: c.cpu_s.get(f"{engine} {role}", 0.0) * 1000 / c.images for role in (*roles, "backend")
        }
        handler = {name: b.stages_ms.get(name, 0.0) / b.images for name in stages}
        rest_of_backend = process["backend"] - sum(handler.values())
        outside = sum(process.values()) - handler["forward"]
        ceilings = ", ".join(f"{n} cores {n * 1000 / outside:.0f}" for n in CEILING_CORES)
        figures = [*(process[r] for r in roles), rest_of_backend, *(handler[s] for s in stages), outside]
        lines.append(f"{image:<8} " + " ".join(f"{v:>9.1f}" for v in figures) + f"  {ceilings}")
    return lines


def build(engine: str, precision: str, store: Path) -> Path:
    """The archive for ``engine``, with the same seeded random weights as every other engine's."""
    subprocess.run(
        [str(BIN / "segserve"), "build-model", "--engine", engine, "--precision", precision,
         "--random-weights", "--model-store", str(store)],
        cwd=ROOT, check=True,
    )  # fmt: skip
    return store / "deeplabv3.mar"


def agreement(first: Isolated, second: Isolated, body: bytes) -> float:
    return float((first.mask(body) == second.mask(body)).mean())


def configurations(
    engine: str, stacks: dict[str, Stack], local: dict[str, Isolated], args: argparse.Namespace
) -> list[tuple[str, int, tuple[str, ...], Any]]:
    """(name, clients, images, run): run(body) -> (done, latencies ms, errors, seconds, stages)."""
    seconds, fast, eager = args.seconds, stacks[engine], stacks["torch"]
    every, flat, photos = ("flat", "textured", "128x128"), ("flat",), ("flat", "textured")
    configs: list[tuple[str, int, tuple[str, ...], Any]] = [
        ("a in-process torch", 1, flat, lambda body: local["torch"].run(body, seconds)),
        (f"a' in-process {engine}", 1, every, lambda body: local[engine].run(body, seconds)),
    ]
    for n in (1, args.concurrency):
        configs += [
            (f"b torchserve {engine}", n, every,
             lambda body, n=n: asyncio.run(torchserve_direct(fast, body, n, seconds))),
            (f"c pipeline wait {engine}", n, every,
             lambda body, n=n: asyncio.run(pipeline(fast, body, n, seconds, True))),
            ("c pipeline wait torch", n, flat,
             lambda body, n=n: asyncio.run(pipeline(eager, body, n, seconds, True))),
        ]  # fmt: skip
    configs += [
        (f"c pipeline poll {engine}", args.concurrency, every,
         lambda body: asyncio.run(pipeline(fast, body, args.concurrency, seconds, False))),
        (f"c pipeline wait {engine} t{THRESHOLD:g}", args.concurrency, photos,
         lambda body: asyncio.run(pipeline(fast, body, args.concurrency, seconds, True, THRESHOLD))),
    ]  # fmt: skip
    return configs


def measure(
    configs: list[tuple[str, int, tuple[str, ...], Any]],
    stacks: dict[str, Stack],
    images: dict[str, bytes],
    rounds: int,
) -> dict[str, Result]:
    results: dict[str, Result] = {}
    for round_no in range(rounds):
        order = configs[round_no % len(configs) :] + configs[: round_no % len(configs)]  # rotate
        for image, body in images.items():
            for name, n, sizes, run in order:
                if image not in sizes:
                    continue
                label = f"{image}/{name}/{n}"
                roles = {
                    f"{engine} {role}": processes
                    for engine, stack in stacks.items()
                    for role, processes in stack.processes().items()
                }
                before = cpu_seconds(roles)
                done, latencies, errors, elapsed, stages = run(body)
                after = cpu_seconds(roles)
                measured = Result(name, image, n, done, elapsed, latencies, errors,
                                  {k: after[k] - before[k] for k in after}, stages)  # fmt: skip
                results.setdefault(label, Result(name, image, n)).merge(measured)
                print(
                    f"round {round_no + 1}/{rounds} {label:<40} {measured.throughput:6.2f} images/s",
                    flush=True,
                )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=15, help="length of one measurement (default: %(default)s)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients, N (default: %(default)s)")
    parser.add_argument("--engine", default="openvino", help="the engine measured against eager torch")
    parser.add_argument("--precision", default="fp32", help="the chosen engine's (default: %(default)s)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=20,
        help="seconds of load per stack before measuring (default: %(default)s)",
    )
    parser.add_argument(
        "--jobs", type=int, default=40, help="jobs timed for the added latency (default: %(default)s)"
    )
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "latest.json"), help="JSON results"
    )
    args = parser.parse_args()

    if not shutil.which("wrk") and shutil.which("apt-get") and os.geteuid() == 0:
        print("installing wrk, the load generator for the submit path …", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, capture_output=True)
    images = {"flat": picture(640, 480), "textured": textured(640, 480), "128x128": picture(128, 128)}
    chosen = args.engine if args.precision == "fp32" else f"{args.engine} {args.precision}"
    engines = {chosen: (args.engine, args.precision), "torch": ("torch", "fp32")}  # by label
    with tempfile.TemporaryDirectory(prefix="segserve-bench-") as tmp:
        workdir = Path(tmp)
        stacks: dict[str, Stack] = {}
        local: dict[str, Isolated] = {}
        try:
            for engine, (name, precision) in engines.items():
                print(
                    f"building the {engine} archive and starting its stack with `segserve up` …", flush=True
                )
                archive = build(name, precision, workdir / name / "model_store")
                (workdir / name / "home").mkdir()
                stacks[engine] = Stack(workdir / name / "home", archive.parent)
                stacks[engine].start()
                local[engine] = Isolated(archive, workdir / name / "mar")
            agreed = agreement(local[chosen], local["torch"], images["flat"])
            configs = configurations(chosen, stacks, local, args)
            # TorchServe's JVM compiles its request path over the first few hundred requests: measured, its
            # own time around the handler fell from 6.4 ms (requests 5-60) to 4.3 ms (600-700). Measure the
            # steady state a running service is in.
            print(f"warming up: {args.warmup:g} s of {args.concurrency} clients per stack …", flush=True)
            for engine in engines:
                asyncio.run(pipeline(stacks[engine], images["flat"], args.concurrency, args.warmup, True))
                for body in images.values():
                    local[engine].run(body, 0.5)
                    asyncio.run(pipeline(stacks[engine], body, 1, 1, True))
            results = measure(configs, stacks, images, args.rounds)
            print("measuring the latency the pipeline adds …", flush=True)
            added = {
                image: asyncio.run(pipeline_overhead(stacks[chosen], body, args.jobs))
                for image, body in images.items()
            }
            print("measuring the submit path …", flush=True)
            submit = submit_path(stacks[chosen], args.seconds, workdir)
        finally:
            for handler in local.values():
                handler.close()
            for stack in stacks.values():
                stack.stop()
    report = table(results, args.concurrency, submit, added, chosen, agreed)
    print("\n" + report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {k: {**asdict(v), "throughput": v.throughput, "p50_ms": v.percentile(0.5), "p99_ms": v.percentile(0.99)}
               for k, v in results.items()}  # fmt: skip
    for v in summary.values():
        v.pop("latencies_ms")
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "results": summary,
                "agreement": agreed,
                "added_latency_ms": added,
                "submit_path": submit,
                "table": report,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
