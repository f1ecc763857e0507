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
  c t  the pipeline with `Prefer: wait` and a threshold (0.5, as the old service's clients send), at 4 and N
      clients, beside `Prefer: wait` without one;
  o   the old service's protocol: `POST /predict` with `threshold 0.5`, polling every 100 ms, at 4 and N;
  e   the engine alone (`benchmarks/engine_alone.py`: OpenVINO in throughput mode on the archive's graph,
      1x3x520x693, nothing around it), when the chosen engine is OpenVINO;
on two 640x480 JPEGs (a flat picture, whose masks have few borders, and a textured, photo-like one with
many; a 128x128 one too for the chosen engine), at 1 and N clients; then
  d   the submit path alone: jobs accepted per second by one gateway with no worker, and its memory.
It prints a table with the ratios the targets are stated in, the masks' agreement between a' and a, where
each image's CPU goes (by process; TorchServe's split into its Java frontend, the handler's stages as the
handler reports them, and the rest of its Python backend), the total outside the forward pass and the
images/s that N cores could feed if the model cost nothing; and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the helpers that start stacks are the test suite's
from benchmarks.inprocess import Isolated, Measured  # noqa: E402
from benchmarks.report import PHOTOS, THRESHOLD, Labels, Result, table  # noqa: E402
from tests.harness.images import encode, scene  # noqa: E402
from tests.harness.images import textured as textured_picture  # noqa: E402
from tests.harness.processes import free_port  # noqa: E402
from tests.harness.servers import side_by_side_env  # noqa: E402

BIN = Path(sys.executable).parent
POLL_INTERVAL = 0.05  # what a sensible polling client does: 20 looks a second
OLD_POLL_INTERVAL = 0.1  # what the old service's clients do


def picture(width: int, height: int) -> bytes:
    """The flat picture: large shapes on a plain background; its masks have few borders."""
    return encode(scene(width, height), "JPEG", quality=90)


def textured(width: int, height: int) -> bytes:
    """The textured, photo-like picture, whose masks have many borders."""
    return encode(textured_picture(width, height), "JPEG", quality=90)


class Stack:
    """`segserve up` on free ports, and the processes it runs, for CPU accounting."""

    def __init__(self, home: Path, model_store: Path | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.env = side_by_side_env(home)
        if model_store is not None:
            self.env["SEGSERVE_MODEL_STORE"] = str(model_store)
        # The old service's clients send a path under the image root (POST /predict).
        self.image_root = home / "images"
        self.image_root.mkdir(parents=True, exist_ok=True)
        self.env["SEGSERVE_IMAGE_ROOT"] = str(self.image_root)
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.home / "up.log").open("wb")
        self.process = subprocess.Popen(
            [str(BIN / "segserve"), "up", "--port", str(self.port)],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
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
            "gateway": [],
            "worker": [],
            "redis": [],
            "frontend": [],
            "backend": [],
        }
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


def load_client(clients: int, base_url: str | None = None) -> aiohttp.ClientSession:
    """The clients' HTTP session. It shares the cores with the stack it measures, so it is aiohttp's, which
    takes a fifth of httpx's CPU a request (0.12 ms against 0.62): an old-protocol client's ten polls a second
    would otherwise take CPU from the model that the old service's clients, on their own hosts, never do."""
    return aiohttp.ClientSession(
        base_url, connector=aiohttp.TCPConnector(limit=clients), timeout=aiohttp.ClientTimeout(total=120)
    )


async def torchserve_direct(stack: Stack, body: bytes, clients: int, seconds: float) -> Measured:
    """N clients against TorchServe; the handler's CPU by stage, summed from its answers' heads."""
    headers = {"Authorization": f"Bearer {stack.key('inference')}", "Content-Type": "image/jpeg"}
    url = f"{stack.env['SEGSERVE_TORCHSERVE_URL']}/predictions/deeplabv3"
    stages: dict[str, float] = {}
    async with load_client(clients) as client:

        async def one() -> bool:
            async with client.post(url, data=body, headers=headers) as response:
                if response.status != 200:
                    return False
                head = (await response.read()).partition(b"\n")[0]
            for name, ms in json.loads(head).get("cpu_ms", {}).items():
                stages[name] = stages.get(name, 0.0) + ms
            return True

        return (*await closed_loop(clients, seconds, one), stages)


async def pipeline(
    stack: Stack, body: bytes, clients: int, seconds: float, wait: bool, threshold: float = 0.0
) -> Measured:
    params = {"threshold": str(threshold)} if threshold else {}
    async with load_client(clients, stack.url) as client:

        async def one() -> bool:
            headers = {"Content-Type": "image/jpeg", **({"Prefer": "wait=60"} if wait else {})}
            async with client.post("/v1/jobs", data=body, headers=headers, params=params) as response:
                job = await response.json(content_type=None)
            while job.get("status") in ("queued", "running"):
                await asyncio.sleep(POLL_INTERVAL)
                async with client.get(f"/v1/jobs/{job['id']}") as response:
                    job = await response.json(content_type=None)
            return job.get("status") == "succeeded"

        return (*await closed_loop(clients, seconds, one), {})


async def old_protocol(stack: Stack, body: bytes, clients: int, seconds: float) -> Measured:
    """The old service's clients, as they are: ``POST /predict`` with a path and ``threshold 0.5``, then
    ``GET /predict/{id}`` every 100 ms until it is no longer 202."""
    name = f"{hash(body) & 0xFFFFFFFF:08x}.jpg"
    (stack.image_root / name).write_bytes(body)
    request = {"image_path": name, "threshold": THRESHOLD}
    async with load_client(clients, stack.url) as client:

        async def one() -> bool:
            async with client.post("/predict", json=request) as submitted:
                if submitted.status != 200:
                    return False
                job_id = (await submitted.json(content_type=None))["job_id"]
            while True:
                await asyncio.sleep(OLD_POLL_INTERVAL)
                async with client.get(f"/predict/{job_id}") as answer:
                    if answer.status == 202:
                        continue
                    result = await answer.json(content_type=None)
                    return answer.status == 200 and bool(result.get("success"))

        return (*await closed_loop(clients, seconds, one), {})


def engine_alone(model_file: Path, precision: str, seconds: float) -> Measured:
    """``benchmarks/engine_alone.py`` in a process of its own, as TorchServe's workers are."""
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "engine_alone.py"),
            str(model_file),
            "--precision",
            precision,
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    measured = json.loads(out.strip().splitlines()[-1])
    return measured["images"], [], 0, measured["seconds"], {}


async def pipeline_overhead(stack: Stack, body: bytes, jobs: int) -> list[float]:
    """Latency the pipeline adds at one client, job by job: the client's wait for a `Prefer: wait` answer
    minus the worker's TorchServe request, which is the request a direct client makes. Measured on the
    same job, it is free of the run-to-run and worker-to-worker spread of the inference itself."""
    added = []
    async with load_client(1, stack.url) as client:
        for _ in range(jobs):
            start = time.perf_counter()
            headers = {"Content-Type": "image/jpeg", "Prefer": "wait=60"}
            async with client.post("/v1/jobs", data=body, headers=headers) as response:
                job = await response.json(content_type=None)
            elapsed = (time.perf_counter() - start) * 1000
            assert job["status"] == "succeeded", job
            added.append(elapsed - job["timings_ms"]["backend"])
    return added


def submit_path(stack: Stack, seconds: float, workdir: Path) -> dict[str, Any]:
    """Jobs/s one gateway accepts with no worker to take them (its own Redis database), and its memory."""
    port = free_port()
    redis_url = stack.env["SEGSERVE_REDIS_URL"].rsplit("/", 1)[0] + "/1"
    env = {
        **stack.env,
        "SEGSERVE_REDIS_URL": redis_url,
        "SEGSERVE_MAX_QUEUED": "100000000",
        "SEGSERVE_TORCHSERVE_KEY_FILE": str(stack.home / "torchserve" / "key_file.json"),
    }
    gateway = subprocess.Popen(
        [
            str(BIN / "uvicorn"),
            "gateway.app:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
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
    return {
        "accepted": accepted,
        "seconds": elapsed,
        "jobs_per_s": accepted / elapsed,
        "gateway_cpu_s": cpu,
        "gateway_rss_mb": rss_mb,
        "load_tool": tool,
    }


def _wrk(url: str, image: Path, seconds: float, workdir: Path) -> tuple[int, float]:
    script = workdir / "submit.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "image/jpeg"\n'
        f'local f = io.open("{image}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
    )
    out = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{int(seconds)}s", "-s", str(script), f"{url}/v1/jobs"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
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


def build(engine: str, precision: str, store: Path) -> Path:
    """The archive for ``engine``, with the same seeded random weights as every other engine's."""
    subprocess.run(
        [
            str(BIN / "segserve"),
            "build-model",
            "--engine",
            engine,
            "--precision",
            precision,
            "--random-weights",
            "--model-store",
            str(store),
        ],
        cwd=ROOT,
        check=True,
    )
    return store / "deeplabv3.mar"


def agreement(first: Isolated, second: Isolated, body: bytes) -> float:
    return float((first.mask(body) == second.mask(body)).mean())


def configurations(
    labels: Labels,
    graph: tuple[str, str] | None,
    stacks: dict[str, Stack],
    local: dict[str, Isolated],
    args: argparse.Namespace,
) -> list[tuple[str, int, tuple[str, ...], Any]]:
    """(name, clients, images, run): run(body) -> (done, latencies ms, errors, seconds, stages). ``graph``:
    the chosen engine's name and precision when it is OpenVINO, whose graph the engine-alone run takes."""
    engine, n_max = labels.engine, args.concurrency
    seconds, fast, eager = args.seconds, stacks[engine], stacks["torch"]
    every, flat = (*PHOTOS, "128x128"), ("flat",)

    def wait(stack: Stack, n: int, threshold: float = 0.0) -> Any:
        return lambda body: asyncio.run(pipeline(stack, body, n, seconds, True, threshold))

    configs: list[tuple[str, int, tuple[str, ...], Any]] = [
        (labels.eager, 1, flat, lambda body: local["torch"].run(body, seconds)),
        (labels.in_process, 1, every, lambda body: local[engine].run(body, seconds)),
    ]
    if graph is not None:
        model = local[engine].model_dir / "model.onnx"
        configs.append((labels.alone, 1, flat, lambda body: engine_alone(model, graph[1], seconds)))
    for n in (1, n_max):
        configs += [
            (
                labels.direct,
                n,
                every,
                lambda body, n=n: asyncio.run(torchserve_direct(fast, body, n, seconds)),
            ),
            (labels.wait, n, every, wait(fast, n)),
            (labels.wait_torch, n, flat, wait(eager, n)),
        ]
    for n in sorted({4, n_max}):
        configs += [
            (labels.threshold, n, PHOTOS, wait(fast, n, THRESHOLD)),
            (
                labels.old_protocol,
                n,
                PHOTOS,
                lambda body, n=n: asyncio.run(old_protocol(fast, body, n, seconds)),
            ),
        ]
        if n != n_max:
            configs.append((labels.wait, n, PHOTOS, wait(fast, n)))
    configs.append(
        (labels.poll, n_max, every, lambda body: asyncio.run(pipeline(fast, body, n_max, seconds, False)))
    )
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
                measured = Result(
                    name,
                    image,
                    n,
                    done,
                    elapsed,
                    latencies,
                    errors,
                    {k: after[k] - before[k] for k in after},
                    stages,
                )
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
            labels = Labels(chosen)
            graph = (args.engine, args.precision) if args.engine == "openvino" else None
            configs = configurations(labels, graph, stacks, local, args)
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
    report = table(results, args.concurrency, submit, added, labels, agreed)
    print("\n" + report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        k: {
            **asdict(v),
            "throughput": v.throughput,
            "p50_ms": v.percentile(0.5),
            "p99_ms": v.percentile(0.99),
        }
        for k, v in results.items()
    }
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
