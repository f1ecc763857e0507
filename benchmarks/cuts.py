"""The CPU the handler spends around the model, stage by stage, and what each cut measured saves: one
process, one thread, the handler's own functions, on the harness's flat and textured 640x480 pictures
under seeded random weights (the logits a real model gives for them).

    .venv/bin/python benchmarks/cuts.py [--repeats 15] [--out benchmarks/results/cuts.json]

Each figure is the median CPU ms of ``--repeats`` calls; compare them within one run (the machine is
shared and its speed drifts). The cuts:
- the threshold: the mask at threshold 0.5 from the stride-level logits (``masks.full_size_mask``), against
  every pixel's probabilities at the image's size (the same maps as dense matrix products, ``dense=True``);
- PNG: zlib level 1 (the handler's) against PIL's default 6;
- the answer: the binary head + PNG against the PNG in base64 inside JSON, written and read;
- JPEG decode at reduced scale (PIL's ``draft``) for a 1920x1080 photo, against the whole decode, and how
  far the model's input then moves (the mask agreement is in ``handlers/deeplabv3/images.py``);
- the resize by torch on uint8 pixels (antialiased bilinear, channels last) against PIL's (the handler's);
- decoding a batch of 16 JPEGs in a thread pool (the CUDA handler's fallback) against one by one.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the pictures are the bench's
from benchmarks.bench import picture, textured  # noqa: E402
from gateway.handlers.deeplabv3 import images, masks  # noqa: E402
from gateway.handlers.deeplabv3.engines import build_model  # noqa: E402
from gateway.ops.archive import calibrate_batch_norm  # noqa: E402

THRESHOLD = 0.5


def cpu_ms(call: Callable[[], Any], repeats: int) -> float:
    call()  # warm
    times = []
    for _ in range(repeats):
        start = time.process_time()
        call()
        times.append((time.process_time() - start) * 1000)
    return statistics.median(times)


def wall_ms(call: Callable[[], Any], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def stride_logits(model: Any, body: bytes) -> tuple[torch.Tensor, tuple[int, int]]:
    """The exported graph's output for an image: logits at the model's stride, and the input's (h, w)."""
    pixels = images.resize(images.decode(body, 25_000_000), 520).pixels
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    batch = ((pixels.float() / 255 - mean) / std).permute(2, 0, 1)[None]
    with torch.inference_mode():
        logits = model.classifier(model.backbone(batch)["out"])[0]
    return logits, (int(batch.shape[2]), int(batch.shape[3]))


def answers(mask: np.ndarray, palette: list[int]) -> dict[str, Callable[[], None]]:
    """Writing and reading the answer: binary head + PNG, against base64 PNG inside JSON."""
    png = masks.mask_png(mask, palette)
    head = {"width": 640, "height": 480, "classes": [{"id": 1, "pixels": 2}] * 8}

    def binary() -> None:
        body = json.dumps(head, separators=(",", ":")).encode() + b"\n" + png
        json.loads(body.partition(b"\n")[0])

    def base64_json() -> None:
        body = json.dumps({**head, "mask_png": base64.b64encode(png).decode()}).encode()
        base64.b64decode(json.loads(body)["mask_png"])

    return {"binary": binary, "base64_json": base64_json}


def image_figures(model: Any, body: bytes, palette: list[int], repeats: int) -> dict[str, float]:
    logits, size = stride_logits(model, body)
    mask = masks.full_size_mask(logits, 480, 640, batch_size=size)

    def mask_at(threshold: float, dense: bool = False) -> Callable[[], Any]:
        return lambda: masks.full_size_mask(logits, 480, 640, threshold, batch_size=size, dense=dense)

    decoded = images.decode(body, 25_000_000)
    figures = {
        "decode": cpu_ms(lambda: images.decode(body, 25_000_000), repeats),
        "resize, PIL": cpu_ms(lambda: images.resize(decoded, 520), repeats),
        "resize, torch uint8": cpu_ms(lambda: torch_resize(decoded), repeats),
        "mask": cpu_ms(mask_at(0.0), repeats),
        f"mask t{THRESHOLD:g}": cpu_ms(mask_at(THRESHOLD), repeats),
        f"mask t{THRESHOLD:g} every pixel": cpu_ms(mask_at(THRESHOLD, dense=True), repeats),
        "png level 1": cpu_ms(lambda: masks.mask_png(mask, palette), repeats),
        "png level 6": cpu_ms(lambda: png_at_level(mask, palette, 6), repeats),
        "png bytes level 1": float(len(masks.mask_png(mask, palette))),
        "png bytes level 6": float(len(png_at_level(mask, palette, 6))),
    }
    for label, call in answers(mask, palette).items():
        figures[f"answer {label}"] = cpu_ms(call, repeats)
    return figures


def measure(repeats: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.manual_seed(3)
    model = calibrate_batch_norm(build_model("mobilenet_v3_large")).eval()
    palette = masks.voc_palette()
    results: dict[str, Any] = {}
    for name, body in (("flat", picture(640, 480)), ("textured", textured(640, 480))):
        results[name] = image_figures(model, body, palette, repeats)
    photo = textured(1920, 1080)
    results["1920x1080"] = {
        "decode + resize": cpu_ms(lambda: images.resize(images.decode(photo, 25_000_000), 520), repeats),
        "draft decode + resize": cpu_ms(lambda: draft_decode(photo), repeats),
        "input pixels moved by draft (mean abs)": float(
            (
                images.resize(images.decode(photo, 25_000_000), 520).pixels.float()
                - draft_decode(photo).pixels.float()
            )
            .abs()
            .mean()
        ),
    }
    batch = [textured(640, 480)] * 16
    with ThreadPoolExecutor(2) as pool:
        results["16 JPEGs, wall ms"] = {
            "one by one": wall_ms(
                lambda: [images.decode(b, 25_000_000) for b in batch], max(3, repeats // 3)
            ),
            "2 threads": wall_ms(
                lambda: list(pool.map(lambda b: images.decode(b, 25_000_000), batch)), max(3, repeats // 3)
            ),
        }
    return results


def png_at_level(mask: np.ndarray, palette: list[int], level: int) -> bytes:
    image = Image.fromarray(mask)
    image.putpalette(palette)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=level)
    return out.getvalue()


def torch_resize(decoded: images.Decoded) -> torch.Tensor:
    """The working-size pixels by torch's antialiased bilinear on uint8, channels last: within one level of
    PIL's."""
    height, width = images.working_size(*decoded.size, 520)
    pixels = torch.from_numpy(np.array(decoded.image)).permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(
        pixels, (height, width), mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0].permute(1, 2, 0).contiguous()


def draft_decode(body: bytes) -> images.Picture:
    """PIL's reduced-scale JPEG decode (libjpeg's DCT scaling) to the smallest scale at least the working
    size, then the same resize."""
    image = Image.open(io.BytesIO(body))
    height, width = images.working_size(*image.size, 520)
    image.draft("RGB", (width, height))
    image.load()
    return images.resize(images.Decoded(image.convert("RGB"), image.size), 520)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cuts.json"))
    args = parser.parse_args()
    results = measure(args.repeats)
    for group, figures in results.items():
        print(group)
        for name, value in figures.items():
            print(f"  {name:<42} {value:10.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
