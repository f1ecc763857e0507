"""What the harness measured, as a table with the ratios the targets are stated in, and where each image's
CPU goes."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

THRESHOLD = 0.5  # what the old service's clients send
CEILING_CORES = (2, 16)  # this machine, and a 16-core GPU host
PHOTOS = ("flat", "textured")  # the two 640x480 pictures every target is held on


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


@dataclass(frozen=True)
class Labels:
    """The configurations' names, for the chosen engine (its label: "openvino" or "openvino bf16")."""

    engine: str

    @property
    def eager(self) -> str:
        return "a in-process torch"

    @property
    def in_process(self) -> str:
        return f"a' in-process {self.engine}"

    @property
    def alone(self) -> str:
        return f"e engine alone {self.engine}"

    @property
    def direct(self) -> str:
        return f"b torchserve {self.engine}"

    @property
    def wait(self) -> str:
        return f"c pipeline wait {self.engine}"

    @property
    def wait_torch(self) -> str:
        return "c pipeline wait torch"

    @property
    def poll(self) -> str:
        return f"c pipeline poll {self.engine}"

    @property
    def threshold(self) -> str:
        return f"c pipeline wait {self.engine} t{THRESHOLD:g}"

    @property
    def old_protocol(self) -> str:
        return f"o old protocol {self.engine} t{THRESHOLD:g}"


def ratio(a: Result | None, b: Result | None) -> float:
    return a.throughput / b.throughput if a and b and b.throughput else math.nan


def table(
    results: dict[str, Result],
    clients: int,
    submit: dict[str, Any],
    added: dict[str, list[float]],
    labels: Labels,
    agreement: float,
) -> str:
    lines = [
        f"{'image':<8} {'config':<34} {'clients':>7} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}  CPU ms/image by process",
    ]
    for r in results.values():
        cpu = ", ".join(
            f"{k} {v * 1000 / r.images:.1f}" for k, v in r.cpu_s.items() if r.images and v > 0.0005
        )
        lines.append(
            f"{r.image:<8} {r.config:<34} {r.clients:>7} {r.throughput:>9.2f} {r.percentile(0.5):>8.1f} {r.percentile(0.99):>8.1f} {r.errors:>6}  {cpu}"
        )

    def get(config: str, n: int, image: str = "flat") -> Result | None:
        return results.get(f"{image}/{config}/{n}")

    engine = labels.engine
    eager, fast = get(labels.eager, 1), get(labels.in_process, 1)
    c_torch = get(labels.wait_torch, clients)
    lines += [
        "",
        f"targets, {engine} against eager torch, in this run (flat and textured 640x480):",
        f"  a'/a = {ratio(fast, eager):.2f} (>= 2.5), masks agreeing on {agreement:.4%} of pixels (>= 99.9%)",
        f"  c {engine} / c torch = {ratio(get(labels.wait, clients), c_torch):.2f} at {clients} clients (>= 2.5)",
    ]
    for image in PHOTOS:
        c, b = get(labels.wait, clients, image), get(labels.direct, clients, image)
        alone = get(labels.alone, 1)  # the same shape for both pictures: the engine sees no pixels' content
        c1, b1 = get(labels.wait, 1, image), get(labels.direct, 1, image)
        gap = c1.percentile(0.5) - b1.percentile(0.5) if c1 and b1 else math.nan
        lines += [
            f"  {image}: c/b = {ratio(c, b):.3f} at {clients} clients (>= 0.97); "
            f"c/e (engine alone) = {ratio(c, alone):.3f} (>= 0.9)",
            f"  {image}: 1 client: c p50 - b p50 = {gap:+.1f} ms (<= 10)",
        ]
        for n in sorted({4, clients}):
            threshold, old = get(labels.threshold, n, image), get(labels.old_protocol, n, image)
            lines.append(
                f"  {image}: {n} clients: threshold {THRESHOLD:g} / none = "
                f"{ratio(threshold, get(labels.wait, n, image)):.3f} (>= 0.9); old protocol / c wait at "
                f"{clients} = {ratio(old, c):.3f} (>= 0.9)"
            )
    lines.append("")
    for image in (*PHOTOS, "128x128"):
        poll, b_image = get(labels.poll, clients, image), get(labels.direct, clients, image)
        if image not in added:
            continue
        lines.append(
            f"{image}: poll c/b = {ratio(poll, b_image):.3f} at {clients} clients; at 1 client the "
            f"pipeline adds {statistics.median(added[image]):+.1f} ms p50, "
            f"{Result('', '', 1, 0, 0, added[image]).percentile(0.99):+.1f} ms p99 over its TorchServe request "
            f"({len(added[image])} jobs)"
        )
    lines.append(
        f"submit path: {submit['jobs_per_s']:.0f} jobs/s accepted by one gateway ({submit['load_tool']}), "
        f"gateway RSS {submit['gateway_rss_mb']:.0f} MB"
    )
    return "\n".join(lines + cpu_breakdown(results, clients, labels))


def cpu_breakdown(results: dict[str, Result], clients: int, labels: Labels) -> list[str]:
    """Where each image's CPU goes, ms per image at N clients: the gateway's, the worker's and Redis's from
    the pipeline's run (c, Prefer: wait); TorchServe's from the TorchServe direct run (b), whose answers
    carry the handler's own stages (``cpu_ms``): its Java frontend, its Python backend split into those
    stages and the rest of that process (TorchServe's Python side: the request in, the answer out). Outside the forward pass is all of it but the forward
    pass; the ceiling is what N cores could feed if the model cost nothing."""
    roles = ("gateway", "worker", "redis", "frontend")
    stages = ("decode", "resize", "normalise", "forward", "mask", "png", "answer")
    lines = [
        "",
        f"CPU ms per image at {clients} clients ({labels.engine}; gateway, worker, Redis from c, TorchServe from b):",
        f"{'image':<8} "
        + " ".join(f"{name:>9}" for name in (*roles, "ts-python", *stages))
        + f" {'outside':>9}  images/s if the model cost nothing",
    ]
    for image in PHOTOS:
        b = results.get(f"{image}/{labels.direct}/{clients}")
        c = results.get(f"{image}/{labels.wait}/{clients}")
        if not (b and c and b.images and c.images):
            continue
        # The pipeline's own processes from c; TorchServe's from b, the run its handler's stages come from, so
        # that the rest of its Python backend is that run's backend less those stages.
        process = {role: c.cpu_s.get(f"{labels.engine} {role}", 0.0) * 1000 / c.images for role in roles[:3]}
        for role in ("frontend", "backend"):
            process[role] = b.cpu_s.get(f"{labels.engine} {role}", 0.0) * 1000 / b.images
        handler = {name: b.stages_ms.get(name, 0.0) / b.images for name in stages}
        rest_of_backend = process["backend"] - sum(handler.values())
        outside = sum(process.values()) - handler["forward"]
        ceilings = ", ".join(f"{n} cores {n * 1000 / outside:.0f}" for n in CEILING_CORES)
        figures = [*(process[r] for r in roles), rest_of_backend, *(handler[s] for s in stages), outside]
        lines.append(f"{image:<8} " + " ".join(f"{v:>9.1f}" for v in figures) + f"  {ceilings}")
    return lines
