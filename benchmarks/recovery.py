"""How fast segserve comes back by itself, and what a cold start costs.

    .venv/bin/python benchmarks/recovery.py [--rate 4]

It starts the stack with `segserve up` (its own ports and state directory) and keeps submitting small jobs at
``--rate`` per second. Then, one at a time, it SIGKILLs redis-server, TorchServe's java process and the arq
worker, and measures, from the kill:
  ready    until /readyz says "ready" again;
  served   until a job submitted after the kill has succeeded.
At the end every job the gateway accepted (202) must have succeeded: the lost ones are counted.

Then the cold start of a worker host, as when KEDA scales from zero: with the stack's own worker frozen
(SIGSTOP, so it takes nothing), a job waits in the queue; a new TorchServe and worker start beside it, as in
a Kubernetes worker pod, and the time from their start until that job has succeeded is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: reuse the benchmark's stack and the tests' helpers
from benchmarks.bench import BIN, Stack, picture  # noqa: E402
from gateway.ops.launcher import torchserve_command  # noqa: E402
from gateway.status import is_terminal  # noqa: E402
from tests.harness.processes import spawn  # noqa: E402
from tests.harness.servers import side_by_side_env  # noqa: E402

IMAGE = picture(128, 96)


class Load:
    """Jobs at a steady rate from a thread; remembers each one the gateway accepted."""

    def __init__(self, url: str, rate: float) -> None:
        self.url, self.rate = url, rate
        self.accepted: list[str] = []
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.wait(1 / self.rate):
                try:
                    response = submit(client)
                except httpx.HTTPError:
                    self.refused += 1
                    continue
                if response.status_code == 202:
                    self.accepted.append(response.json()["id"])
                else:
                    self.refused += 1


def submit(client: httpx.Client) -> httpx.Response:
    return client.post("/v1/jobs", content=IMAGE, headers={"Content-Type": "image/jpeg"})


def status(client: httpx.Client, job_id: str) -> str:
    return str(client.get(f"/v1/jobs/{job_id}").json()["status"])


def first(roles: dict[str, list[psutil.Process]], role: str, name: str = "") -> psutil.Process:
    return next(p for p in roles[role] if name in p.name())


def until(check: Any, timeout: float = 300) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if check():
                return time.monotonic() - start
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise TimeoutError("the stack did not come back")


def kill_and_time(stack: Stack, client: httpx.Client, role: str, name: str = "") -> dict[str, float]:
    victim = first(stack.processes(), role, name)
    victim.kill()
    killed = time.monotonic()
    ready = until(lambda: client.get("/readyz", timeout=2).json()["status"] == "ready")

    def served() -> bool:
        """A job submitted now succeeds; a refused submission raises, and the outer ``until`` tries again."""
        job_id = submit(client).json()["id"]
        until(lambda: status(client, job_id) == "succeeded", 120)  # raises if it never does
        return True

    until(served)
    return {"ready_s": round(ready, 2), "served_s": round(time.monotonic() - killed, 2)}


def cold_start(stack: Stack, client: httpx.Client, home: Path) -> float:
    """A new worker host (TorchServe + worker) starts with a job waiting; seconds until that job succeeded."""
    worker = first(stack.processes(), "worker")
    worker.suspend()
    try:
        until(lambda: client.get("/v1/queue").json()["workers"] == [], 60)  # its heartbeat has aged out
        job_id = submit(client).json()["id"]
        pod = home / "pod"
        pod.mkdir()
        env = {**side_by_side_env(pod), "SEGSERVE_REDIS_URL": stack.env["SEGSERVE_REDIS_URL"]}
        env |= {
            "TS_INFERENCE_ADDRESS": env["SEGSERVE_TORCHSERVE_URL"],
            "TS_MANAGEMENT_ADDRESS": env["SEGSERVE_TORCHSERVE_MANAGEMENT_URL"],
            "SEGSERVE_TORCHSERVE_KEY_FILE": str(pod / "key_file.json"),
        }
        store = Path(stack.env.get("SEGSERVE_MODEL_STORE", ROOT / "model_store"))
        command = torchserve_command(ROOT / "config.properties", store, "deeplabv3=deeplabv3.mar")
        torchserve = spawn(command, pod / "torchserve.log", cwd=pod, env=env)
        pod_worker = spawn([str(BIN / "segserve"), "worker"], pod / "worker.log", cwd=ROOT, env=env)
        try:
            return round(until(lambda: status(client, job_id) == "succeeded", 300), 2)
        finally:
            for process in (pod_worker, torchserve):
                os.killpg(process.pid, signal.SIGKILL)
    finally:
        worker.resume()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rate", type=float, default=4, help="jobs submitted per second (default: %(default)s)"
    )
    parser.add_argument("--out", default="recovery.json", help="where the figures go (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="segserve-recovery-") as tmp:
        home = Path(tmp)
        stack = Stack(home)
        stack.start()
        figures: dict[str, Any] = {}
        try:
            with httpx.Client(base_url=stack.url, timeout=10) as client, Load(stack.url, args.rate) as load:
                for role, name in (("redis", ""), ("torchserve", "java"), ("worker", "")):
                    time.sleep(5)  # steady load first
                    figures[f"kill -9 {name or role}"] = kill_and_time(stack, client, role, name)
                    print(f"kill -9 {name or role}: {figures[f'kill -9 {name or role}']}", flush=True)
            with httpx.Client(base_url=stack.url, timeout=10) as client:
                pending = set(load.accepted)

                def all_ended() -> bool:
                    pending.difference_update([j for j in list(pending) if is_terminal(status(client, j))])
                    return not pending

                until(all_ended, 600)
                lost = [j for j in load.accepted if status(client, j) != "succeeded"]
                figures["jobs"] = {
                    "accepted": len(load.accepted),
                    "refused": load.refused,
                    "not_succeeded": len(lost),
                }
                print(f"jobs: {figures['jobs']}", flush=True)
                figures["cold start s"] = cold_start(stack, client, home)
                print(f"cold start of a worker host: {figures['cold start s']} s", flush=True)
        finally:
            stack.stop()
    Path(args.out).write_text(json.dumps(figures, indent=2))
    return 0 if figures.get("jobs", {}).get("not_succeeded", 1) == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
