"""The forward pass alone: OpenVINO in throughput mode on an archive's own graph, the shape the handler
gives a 640x480 image (1 x 3 x 520 x 693), nothing around it. What no pipeline can beat on this CPU.

    .venv/bin/python benchmarks/engine_alone.py MODEL.onnx [--precision fp32] [--seconds 10]

Prints one line of JSON: images, seconds, images_per_s, streams.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

SHAPE = (1, 3, 520, 693)


def engine_alone(model_file: str, precision: str, seconds: float) -> dict[str, float]:
    """As many requests in flight as OpenVINO's throughput hint asks for, back to back for ``seconds``."""
    import openvino

    core = openvino.Core()
    config = {
        "PERFORMANCE_HINT": "THROUGHPUT",
        "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
    }
    compiled = core.compile_model(core.read_model(model_file), "CPU", config)
    streams = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    queue = openvino.AsyncInferQueue(compiled, streams)
    pixels = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    for _ in range(streams):  # warm: each stream's first pass allocates its buffers
        queue.start_async({0: pixels})
    queue.wait_all()
    done = 0

    def count(*_: object) -> None:
        nonlocal done
        done += 1

    queue.set_callback(count)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        queue.start_async({0: pixels})  # blocks while every request is busy
    queue.wait_all()
    elapsed = time.perf_counter() - started
    return {"images": done, "seconds": elapsed, "images_per_s": done / elapsed, "streams": streams}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="the archive's model.onnx")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    print(json.dumps(engine_alone(args.model, args.precision, args.seconds)))


if __name__ == "__main__":
    main()
