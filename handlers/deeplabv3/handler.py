"""TorchServe handler for torchvision's DeepLabV3 semantic segmentation models.

TorchServe hands it batches of requests (``images`` says what one carries). One answer per request: for an
image it can segment, ``catalog.MASK_CONTENT_TYPE``: a line of JSON (width, height, per-class pixel
counts, timings) then the class-index mask at the image's own size as a palettised PNG; for an image that
cannot be processed, ``{"error": {code, message}}`` as JSON with HTTP status 422 for that request only, so
the rest of the batch still succeeds.

The archive's model-config ``handler:`` section names the engine and its precision (``engines``);
``describe_handle()`` reports both, and the worker logs them when it loads.

Timings. ``timings_ms`` holds wall-clock milliseconds (``preprocess``, ``inference``, ``postprocess``) and
the batch's size; ``cpu_ms`` the CPU milliseconds the worker process spent in each stage: ``decode``,
``resize``, ``normalise``, ``forward``, ``mask`` (upsampling, threshold, counts), ``png`` and ``answer``
(its JSON head), a batch's shared stages divided among its images. The process's clock counts the
engine's threads too, so a harness can say where each image's CPU goes.

Memory. Above the loaded, warm model, one image of the largest allowed size (25 MP,
``catalog.DEFAULT_MAX_PIXELS``) raises the worker's peak resident memory by less than
``catalog.MEMORY_BOUND_MB``. What takes it: the decoded pixels (4 bytes each in PIL, twice while a mode is
converted; a JPEG too is decoded whole, see ``images``), kept only until the model's input is made; the
mask (1 byte each) and its PNG; and the bands of ``masks``.

Batches. On CPU they run as one forward pass per group of equal input shape. Floats depend on the batch
size (other kernels, other summation order), so a batch's masks agree with those each image gives alone on
at least 99.99% of pixels, and exactly wherever the top two classes are not near-tied. With
``pad_batches: true`` in the handler's config (for a GPU, where batching pays), images of different shapes
share one pass, padded at the bottom and right to the largest with the mean colour. It is off by default, on
every device: padding changes what the model sees (its global pooling averages the padding in, and the
border's neighbourhood moves), so an image's mask would depend on its batchmates. On random weights, padded
masks agreed with the same images alone on 23% to 100% of pixels (median 88%, 16 images of mixed sizes),
far below 99.9%. Measure it on the real weights before turning it on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import catalog
from .engines import (
    Engine,
    Normalisation,
    OnnxRuntimeEngine,
    OpenVinoEngine,
    TorchEngine,
    batch_groups,
    check_precision,
    intra_op_threads,
    model_peers,
    pad_batch,
    published_weights,
)
from .images import (
    ImageError,
    Params,
    Picture,
    decode,
    device_decodable,
    device_pictures,
    open_image,
    parse_params,
    request_fields,
    request_image,
    resize,
)
from .masks import class_counts, full_size_mask, mask_png, voc_palette

logger = logging.getLogger(__name__)


@dataclass
class CpuMs:
    """CPU milliseconds of the worker process, by stage, for one image."""

    decode: float = 0.0
    resize: float = 0.0
    normalise: float = 0.0
    forward: float = 0.0
    mask: float = 0.0
    png: float = 0.0
    answer: float = 0.0


@dataclass
class Item:
    """One request as it moves through the batch."""

    params: Params = field(default_factory=Params)
    payload: bytes = b""
    picture: Picture | None = None  # until the model's input is made
    size: tuple[int, int] | None = None  # the image's own (width, height): the mask's
    working_size: tuple[int, int] = (0, 0)  # (h, w) of the model's input for this image
    logits: torch.Tensor | None = None  # classes x h x w: this image's slice of its batch's
    batch_size: tuple[int, int] = (0, 0)  # (h, w) of the batch's input: the largest image's when padded
    error: ImageError | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    cpu: CpuMs = field(default_factory=CpuMs)


def cpu_ms_since(start: float) -> float:
    return (time.process_time() - start) * 1000


class DeepLabV3Handler:
    """Batch in, batch out: ``preprocess`` decodes, ``inference`` runs the model, ``postprocess`` makes the
    full-size masks and encodes them.

    TorchServe's handler protocol (``initialize``, ``handle``, ``describe_handle``) without its
    ``BaseHandler``: importing that imports ``openvino.torch`` and torch's compiler wherever OpenVINO is
    installed, which added 6 s and 200 MB to each worker's start here, for nothing this handler uses."""

    context: Any = None

    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        config = (context.model_yaml_config or {}).get("handler", {})
        self.variant = config.get("variant", "mobilenet_v3_large")
        self.weights_label = config.get("weights", "unknown")
        self.random_weights = bool(config.get("random_weights", False))
        self.engine_name = str(config.get("engine", "torch"))  # archives older than engines ran eager torch
        self.precision = str(config.get("precision", "fp32"))
        gpu_id = properties.get("gpu_id")
        on_cuda = self.engine_name == "torch" and torch.cuda.is_available() and gpu_id is not None
        check_precision(self.engine_name, self.precision, on_cuda)
        self.threads = intra_op_threads(config)
        # Without a setting, threads spin only when this worker has the cores to itself.
        workers = max(1, int(config.get("workers", 1)))
        self.spinning = bool(config.get("allow_spinning", workers <= 1))
        # Workers whose threads outnumber the cores take their share of them while others compute.
        cores = os.cpu_count() or 1
        self.narrow_threads = max(1, cores // workers) if workers * self.threads > cores else None
        self.max_pixels = int(
            os.environ.get("SEGSERVE_MAX_PIXELS", config.get("max_pixels", catalog.DEFAULT_MAX_PIXELS))
        )
        published = published_weights(self.variant)
        self.categories: list[str] = list(published.meta["categories"])
        transforms = published.transforms()
        self.short_side = int(transforms.resize_size[0])
        self.normalisation = Normalisation(tuple(transforms.mean), tuple(transforms.std))
        self.palette = voc_palette()
        model_file = os.path.join(properties["model_dir"], context.manifest["model"]["serializedFile"])
        self.engine = self._load_engine(model_file, gpu_id, context.manifest)
        self.device = self.engine.device
        # On CUDA the CPU only decodes what nvJPEG cannot, in threads (PIL releases the GIL as it decodes).
        self.pool = ThreadPoolExecutor(self.threads) if self.device.type == "cuda" else None
        if self.device.type == "cpu":
            # torch's OpenMP threads spin after each op: beside other workers' threads (spinning off) they
            # take those workers' cores, so there torch, which then only post-processes, gets one thread.
            spins = self.engine_name == "torch" or self.spinning
            torch.set_num_threads(self.threads if spins else 1)
        self.pad_batches = bool(config.get("pad_batches", False))  # an opt-in: see the module's docstring
        if self.random_weights:
            logger.warning("RANDOM WEIGHTS (%s): masks from this model are meaningless", self.weights_label)
        logger.info(
            "deeplabv3 %s ready on %s: engine %s, precision %s, %d intra-op threads, weights: %s",
            self.variant,
            self.device,
            self.engine_name,
            self.precision,
            self.threads,
            self.weights_label,
        )

    def _load_engine(self, model_file: str, gpu_id: int | None, manifest: dict[str, Any]) -> Engine:
        peers = model_peers(manifest) if self.narrow_threads else None
        norm = self.normalisation
        if self.engine_name == "onnxruntime":
            return OnnxRuntimeEngine(
                model_file, self.threads, self.spinning, gpu_id, norm, self.narrow_threads, peers
            )
        if self.engine_name == "openvino":
            return OpenVinoEngine(model_file, self.threads, norm, self.narrow_threads, peers, self.precision)
        cuda = torch.cuda.is_available() and gpu_id is not None
        device = torch.device(f"cuda:{gpu_id}" if cuda else "cpu")
        return TorchEngine(self.variant, model_file, device, norm, self.precision)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        """TorchServe's batch, marked busy for the model's other workers from decoding to encoding; or, for
        the management API's ``?customized=true``, the description."""
        self.context = context
        start = time.perf_counter()
        if context.get_request_header(0, "describe") == "True":
            return [self.describe_handle()]
        peers = getattr(self.engine, "peers", None)
        with peers.busy() if peers is not None else contextlib.nullcontext():
            answers = self.postprocess(self.inference(self.preprocess(data)))
        context.metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
        return answers

    def describe_handle(self) -> str:
        """Shown by the management API's ``?customized=true`` and by the gateway's ``/v1/models``."""
        return json.dumps(
            {
                "variant": self.variant,
                "weights": self.weights_label,
                "random_weights": self.random_weights,
                "device": str(self.device),
                "engine": self.engine_name,
                "precision": self.precision,
                "intra_op_threads": self.threads,
                "classes": self.categories,
            }
        )

    def preprocess(self, data: list[dict[str, Any]]) -> list[Item]:
        items = []
        for idx, request in enumerate(data):
            item = Item(payload=request_image(request))
            try:
                item.params = parse_params(
                    request_fields(request, self.context.get_all_request_header(idx)), self.categories
                )
            except ImageError as exc:
                item.error = exc
            items.append(item)
        if self.device.type == "cuda":
            self._decode_on_device([item for item in items if item.error is None])
        else:
            for item in items:
                if item.error is None:
                    self._decode(item)
        return items

    def _decode(self, item: Item) -> None:
        """One image decoded and resized by the CPU, each stage timed."""
        start, clock = time.perf_counter(), time.process_time()
        try:
            decoded = decode(item.payload, self.max_pixels)
            item.cpu.decode, clock = cpu_ms_since(clock), time.process_time()
            item.picture = resize(decoded, self.short_side)  # the decoded pixels go: up to 100 MB at 25 MP
            item.size = item.picture.size
            item.cpu.resize = cpu_ms_since(clock)
        except ImageError as exc:
            item.error = exc
        item.payload = b""
        item.timings_ms["preprocess"] = (time.perf_counter() - start) * 1000

    def _decode_on_device(self, items: list[Item]) -> None:
        """JPEGs that nvJPEG decodes, in one batch on the GPU; the others in the CPU's threads. The stages
        overlap, so each image is charged an even share of the batch's time, as decoding."""
        start, clock = time.perf_counter(), time.process_time()
        on_device: list[tuple[Item, Image.Image]] = []
        on_cpu: list[tuple[Item, Image.Image]] = []
        for item in items:
            try:
                header = open_image(item.payload, self.max_pixels)
            except ImageError as exc:
                item.error = exc
                continue
            (on_device if device_decodable(header) else on_cpu).append((item, header))
        assert self.pool is not None
        list(self.pool.map(lambda pair: self._decode(pair[0]), on_cpu))
        if on_device:
            payloads = [item.payload for item, _ in on_device]
            try:
                pictures = device_pictures([h for _, h in on_device], payloads, self.device, self.short_side)
            except Exception:  # one bad JPEG fails nvJPEG's batch (any error): each on the CPU instead
                list(self.pool.map(lambda pair: self._decode(pair[0]), on_device))
            else:
                for (item, _), picture in zip(on_device, pictures, strict=True):
                    item.picture, item.size, item.payload = picture, picture.size, b""
        share = cpu_ms_since(clock) / max(1, len(items))
        for item in items:
            item.cpu.decode, item.cpu.resize = share, 0.0
            item.timings_ms["preprocess"] = (time.perf_counter() - start) * 1000

    def inference(self, items: list[Item], *args: Any, **kwargs: Any) -> list[Item]:
        ready = [item for item in items if item.picture is not None]
        shapes = [tuple(item.picture.pixels.shape) for item in ready if item.picture is not None]
        for group in batch_groups(shapes, self.pad_batches):
            self._forward([ready[i] for i in group])
        return items

    def _forward(self, group: list[Item]) -> None:
        """One forward pass for ``group``; each item keeps its own region of the logits."""
        start, clock = time.perf_counter(), time.process_time()
        pixels = [item.picture.pixels for item in group if item.picture is not None]
        same = len({tuple(p.shape) for p in pixels}) == 1
        prepared = self.engine.prepare(
            torch.stack(pixels) if same else pad_batch(pixels, self.normalisation.mean_pixel)
        )
        normalise, clock = cpu_ms_since(clock), time.process_time()
        logits = self.engine(prepared)
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)  # so that the timing holds the pass, not its launch
        forward = cpu_ms_since(clock)
        batch_size = (max(int(p.shape[0]) for p in pixels), max(int(p.shape[1]) for p in pixels))
        elapsed = (time.perf_counter() - start) * 1000
        for index, (item, picture) in enumerate(zip(group, pixels, strict=True)):
            item.logits, item.batch_size = logits[index], batch_size
            item.working_size = (int(picture.shape[0]), int(picture.shape[1]))
            item.picture = None
            item.cpu.normalise, item.cpu.forward = normalise / len(group), forward / len(group)
            item.timings_ms["inference"] = elapsed
            item.timings_ms["batch_size"] = len(group)

    def postprocess(self, items: list[Item]) -> list[Any]:
        answers: list[Any] = []
        for idx, item in enumerate(items):
            if item.error is not None or item.logits is None or item.size is None:
                error = item.error or ImageError("invalid_image", "image could not be processed")
                self.context.set_response_content_type(idx, "application/json")
                self.context.set_response_status(422, error.code, idx)
                answers.append({"error": {"code": error.code, "message": error.message}})
                continue
            self.context.set_response_content_type(idx, catalog.MASK_CONTENT_TYPE)
            answers.append(self._answer(item))
        return answers

    def _answer(self, item: Item) -> bytes:
        """The mask, its counts and its PNG, as one line of JSON and the PNG's bytes."""
        assert item.logits is not None and item.size is not None
        start, clock = time.perf_counter(), time.process_time()
        width, height = item.size
        mask = full_size_mask(
            item.logits,
            height,
            width,
            item.params.threshold,
            batch_size=item.batch_size,
            own_size=item.working_size,
        )
        item.logits = None  # the batch's logits go as soon as its last image has its mask
        if item.params.classes is not None:
            keep = np.zeros(256, dtype=np.uint8)
            keep[item.params.classes] = item.params.classes
            mask = keep[mask]
        counts = class_counts(mask, len(self.categories))
        item.cpu.mask, clock = cpu_ms_since(clock), time.process_time()
        png = mask_png(mask, self.palette)
        item.cpu.png, clock = cpu_ms_since(clock), time.process_time()
        total = width * height
        classes = [
            {"id": i, "name": self.categories[i], "pixels": int(n), "fraction": round(int(n) / total, 6)}
            for i, n in enumerate(counts)
            if n
        ]
        item.timings_ms["postprocess"] = (time.perf_counter() - start) * 1000
        item.cpu.answer = cpu_ms_since(clock)  # the head's JSON below is the last of it, a few microseconds
        head = {
            "width": width,
            "height": height,
            "classes": classes,
            "timings_ms": {k: round(v, 3) for k, v in item.timings_ms.items()},
            "cpu_ms": {k: round(v, 3) for k, v in asdict(item.cpu).items()},
        }
        return json.dumps(head, separators=(",", ":")).encode() + b"\n" + png


_service: DeepLabV3Handler | None = None


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    """TorchServe's entry point: the handler is built on the first call, not at import."""
    global _service
    if _service is None:
        _service = DeepLabV3Handler()
        _service.initialize(context)
    if data is None:
        return None
    return list(_service.handle(data, context))
