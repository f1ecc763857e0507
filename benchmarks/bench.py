"""segserve's performance harness: the full pipeline against TorchServe direct and in-process inference.

    .venv/bin/python benchmarks/bench.py [--seconds 15] [--rounds 2] [--concurrency 8]

It starts the stack with `segserve up` (its own ports and state directory), then measures, with the
configurations interleaved round by round so that machine drift falls on all of them alike:
  a  in-process: the handler's own code (decode, preprocess, forward, postprocess), one image at a time;
  b  TorchServe direct: N concurrent HTTP clients against the same archive;
  c  the pipeline (gateway -> Redis -> arq worker -> TorchServe) with `Prefer: wait`, and submit-then-poll;
on a 640x480 JPEG and a 128x128 one, at 1 and N clients; then
  d  the submit path alone: jobs accepted per second by one gateway with no worker, and its memory.
It prints a table with the ratios the targets are stated in and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the helpers that start stacks are the test suite's
from tests.conftest import free_port, side_by_side_env  # noqa: E402

BIN = Path(sys.executable).parent
POLL_INTERVAL = 0.05  # what a sensible polling client does: 20 looks a second


def picture(width: int, height: int) -> bytes:
    image = Image.new("RGB", (width, height), (40, 120, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.1, height * 0.2, width * 0.5, height * 0.9), fill=(240, 190, 20))
    draw.rectangle((width * 0.55, height * 0.1, width * 0.95, height * 0.6), fill=(20, 20, 20))
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
    cpu_s: dict[str, float] = field(default_factory=dict)

    def merge(self, other: Result) -> None:
        self.images += other.images
        self.seconds += other.seconds
        self.latencies_ms += other.latencies_ms
        self.errors += other.errors
        for name, value in other.cpu_s.items():
            self.cpu_s[name] = self.cpu_s.get(name, 0.0) + value

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

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.env = side_by_side_env(home)
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
        """Processes by role: gateway, worker, redis, torchserve (frontend and Python backends)."""
        assert self.process is not None
        roles: dict[str, list[psutil.Process]] = {"gateway": [], "worker": [], "redis": [], "torchserve": []}
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
            elif "java" in p.name() or "model_service_worker" in line:
                roles["torchserve"].append(p)
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


async def torchserve_direct(
    stack: Stack, body: bytes, clients: int, seconds: float
) -> tuple[int, list[float], int, float]:
    headers = {"Authorization": f"Bearer {stack.key('inference')}", "Content-Type": "image/jpeg"}
    url = f"{stack.env['SEGSERVE_TORCHSERVE_URL']}/predictions/deeplabv3"
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as client:

        async def one() -> bool:
            response = await client.post(url, content=body, headers=headers)
            return response.status_code == 200

        return await closed_loop(clients, seconds, one)


async def pipeline(
    stack: Stack, body: bytes, clients: int, seconds: float, wait: bool
) -> tuple[int, list[float], int, float]:
    async with httpx.AsyncClient(
        base_url=stack.url, timeout=120, limits=httpx.Limits(max_connections=clients)
    ) as client:

        async def one() -> bool:
            headers = {"Content-Type": "image/jpeg", **({"Prefer": "wait=60"} if wait else {})}
            job = (await client.post("/v1/jobs", content=body, headers=headers)).json()
            while job.get("status") in ("queued", "running"):
                await asyncio.sleep(POLL_INTERVAL)
                job = (await client.get(f"/v1/jobs/{job['id']}")).json()
            return job.get("status") == "succeeded"

        return await closed_loop(clients, seconds, one)


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


class InProcess:
    """The handler's own code path, called directly in this process on the archive's weights."""

    def __init__(self, archive: Path, workdir: Path) -> None:
        sys.path.insert(0, str(ROOT))
        from gateway.ops.archive import load_handler_module

        with zipfile.ZipFile(archive) as mar:
            mar.extractall(workdir)
        manifest = json.loads((workdir / "MAR-INF" / "MANIFEST.json").read_text())
        import yaml

        config = yaml.safe_load((workdir / "model-config.yaml").read_text())
        handler = load_handler_module().DeepLabV3Handler()
        self.context = _Context(workdir, manifest, config)
        handler.initialize(self.context)
        import torch

        torch.set_num_threads(os.cpu_count() or 1)  # the limit: one process with every core
        self.handler = handler

    def run(self, body: bytes, seconds: float) -> tuple[int, list[float], int, float]:
        latencies = []
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            t = time.perf_counter()
            [answer] = self.handler.handle([{"body": body}], self.context)
            assert "mask_png" in answer
            latencies.append((time.perf_counter() - t) * 1000)
        return len(latencies), latencies, 0, time.monotonic() - started


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
    results: dict[str, Result], clients: int, submit: dict[str, Any], added: dict[str, list[float]]
) -> str:
    lines = [
        f"{'image':<8} {'config':<22} {'clients':>7} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}  CPU s/image by process",
    ]
    for r in results.values():
        cpu = ", ".join(f"{k} {v / r.images:.3f}" for k, v in r.cpu_s.items() if r.images and v > 0.0005)
        lines.append(
            f"{r.image:<8} {r.config:<22} {r.clients:>7} {r.throughput:>9.2f} {r.percentile(0.5):>8.1f} {r.percentile(0.99):>8.1f} {r.errors:>6}  {cpu}"
        )
    lines.append("")
    for image in ("640x480", "128x128"):

        def get(config: str, n: int, image: str = image) -> Result:
            return results[f"{image}/{config}/{n}"]

        a, b, c = get("a in-process", 1), get("b torchserve", clients), get("c pipeline wait", clients)
        poll = get("c pipeline poll", clients)
        p50_gap = get("c pipeline wait", 1).percentile(0.5) - get("b torchserve", 1).percentile(0.5)
        lines.append(
            f"{image}: c/b = {c.throughput / b.throughput:.3f} (poll {poll.throughput / b.throughput:.3f}), "
            f"c/a = {c.throughput / a.throughput:.3f} at {clients} clients; at 1 client the pipeline adds "
            f"{statistics.median(added[image]):+.1f} ms p50, {Result('', '', 1, 0, 0, added[image]).percentile(0.99):+.1f} ms p99 "
            f"over its TorchServe request ({len(added[image])} jobs; p50 gap of the runs above {p50_gap:+.1f} ms)"
        )
    lines.append(
        f"submit path: {submit['jobs_per_s']:.0f} jobs/s accepted by one gateway ({submit['load_tool']}), "
        f"gateway RSS {submit['gateway_rss_mb']:.0f} MB"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=15, help="length of one measurement (default: %(default)s)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients, N (default: %(default)s)")
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
    images = {"640x480": picture(640, 480), "128x128": picture(128, 128)}
    with tempfile.TemporaryDirectory(prefix="segserve-bench-") as tmp:
        workdir = Path(tmp)
        stack = Stack(workdir / "home")
        (workdir / "home").mkdir()
        print("starting the stack with `segserve up` …", flush=True)
        stack.start()
        try:
            in_process = InProcess(ROOT / "model_store" / "deeplabv3.mar", workdir / "mar")
            configs: list[tuple[str, int, Any]] = [
                ("a in-process", 1, lambda body, n: in_process.run(body, args.seconds)),
            ]
            for n in (1, args.concurrency):
                configs += [
                    (
                        "b torchserve",
                        n,
                        lambda body, n=n: asyncio.run(torchserve_direct(stack, body, n, args.seconds)),
                    ),
                    (
                        "c pipeline wait",
                        n,
                        lambda body, n=n: asyncio.run(pipeline(stack, body, n, args.seconds, True)),
                    ),
                    (
                        "c pipeline poll",
                        n,
                        lambda body, n=n: asyncio.run(pipeline(stack, body, n, args.seconds, False)),
                    ),
                ]
            print("warming up …", flush=True)
            for body in images.values():
                in_process.run(body, 0.5)
                asyncio.run(torchserve_direct(stack, body, 1, 1))
                asyncio.run(pipeline(stack, body, 1, 1, True))
            results: dict[str, Result] = {}
            for round_no in range(args.rounds):
                order = configs[round_no % len(configs) :] + configs[: round_no % len(configs)]  # rotate
                for image, body in images.items():
                    for name, n, run in order:
                        label = f"{image}/{name}/{n}"
                        roles = stack.processes()
                        before = cpu_seconds(roles)
                        done, latencies, errors, elapsed = run(body, n)
                        after = cpu_seconds(roles)
                        measured = Result(name, image, n, done, elapsed, latencies, errors,
                                          {k: after[k] - before[k] for k in after})  # fmt: skip
                        results.setdefault(label, Result(name, image, n)).merge(measured)
                        print(
                            f"round {round_no + 1}/{args.rounds} {label:<32} {measured.throughput:6.2f} images/s",
                            flush=True,
                        )
            print("measuring the latency the pipeline adds …", flush=True)
            added = {
                image: asyncio.run(pipeline_overhead(stack, body, args.jobs))
                for image, body in images.items()
            }
            print("measuring the submit path …", flush=True)
            submit = submit_path(stack, args.seconds, workdir)
        finally:
            stack.stop()
    report = table(results, args.concurrency, submit, added)
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
