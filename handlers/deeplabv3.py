"""TorchServe handler for torchvision's DeepLabV3 semantic segmentation models.

One request = one image (the raw request body, or a form field named ``data``/``body``/``image``) plus
optional parameters, given as form fields or as ``X-Classes`` / ``X-Threshold`` headers:

- ``classes``: comma-separated class ids or VOC names; pixels of other classes become background (0);
- ``threshold``: in [0, 1]; pixels whose top class probability is below it become background (0).

One answer per request, JSON: the class-index mask at the image's own size as a palettised PNG (base64),
per-class pixel counts and timings; or, for an image that cannot be processed, ``{"error": {code, message}}``
with HTTP status 422 for that request only, so the rest of the batch still succeeds.

Requests batched together by TorchServe run as one forward pass per group of equal input shape. Floats
depend on the batch size (other kernels, other summation order), so a batch's masks agree with those each
image gives alone on at least 99.99% of pixels, and exactly wherever the top two classes are not near-tied.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.models import segmentation
from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)

# variant -> (torchvision builder, published weights enum member)
VARIANTS: dict[str, tuple[Any, Any]] = {
    "mobilenet_v3_large": (
        segmentation.deeplabv3_mobilenet_v3_large,
        segmentation.DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
    ),
    "resnet50": (
        segmentation.deeplabv3_resnet50,
        segmentation.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
    ),
    "resnet101": (
        segmentation.deeplabv3_resnet101,
        segmentation.DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1,
    ),
}
DEFAULT_MAX_PIXELS = 25_000_000


def build_model(variant: str) -> torch.nn.Module:
    """The architecture of ``variant`` with untrained weights, shaped like the published checkpoints."""
    builder, _ = VARIANTS[variant]
    # aux_loss=True so the published state dicts (which carry the auxiliary head) load strictly.
    model: torch.nn.Module = builder(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    return model


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB triples), so a mask PNG can be looked at as it is."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


class ImageError(ValueError):
    """An input that this image cannot be segmented for; ``code`` is the API's ``error.code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def open_rgb(data: bytes, max_pixels: int) -> Image.Image:
    """Decode ``data`` into an upright RGB image, refusing pixel bombs before decoding any pixels."""
    if not data:
        raise ImageError("invalid_image", "empty image")
    try:
        with warnings.catch_warnings():
            # Our own limit below is lower than PIL's; its warning on the way there is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError("too_many_pixels", f"image is over the limit of {max_pixels} pixels") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageError("invalid_image", "cannot identify image file") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError("too_many_pixels", f"{width}x{height} is over the limit of {max_pixels} pixels")
    if width < 1 or height < 1:
        raise ImageError("invalid_image", f"image has no pixels ({width}x{height})")
    try:
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return to_rgb(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError("invalid_image", f"cannot decode image: {exc}") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; 16/32-bit integer and float greyscale are scaled, not clipped."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        image = Image.fromarray((np.clip(array, 0, top) * (255.0 / top)).round().astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).round().astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a transparent palette image goes straight to RGB
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass
class Params:
    classes: list[int] | None = None
    threshold: float = 0.0


def parse_params(fields: dict[str, str], categories: list[str]) -> Params:
    params = Params()
    raw_classes = (fields.get("classes") or "").strip()
    if raw_classes:
        ids = []
        for item in raw_classes.split(","):
            name = item.strip()
            if name.isdigit() and int(name) < len(categories):
                ids.append(int(name))
            elif name in categories:
                ids.append(categories.index(name))
            else:
                raise ImageError("invalid_parameter", f"unknown class {name!r}")
        params.classes = ids
    raw_threshold = (fields.get("threshold") or "").strip()
    if raw_threshold:
        try:
            threshold = float(raw_threshold)
        except ValueError:
            threshold = float("nan")
        if not 0.0 <= threshold <= 1.0:  # also refuses NaN
            raise ImageError("invalid_parameter", f"threshold must be in [0, 1], got {raw_threshold!r}")
        params.threshold = threshold
    return params


@dataclass
class Item:
    """One request as it moves through the batch."""

    params: Params = field(default_factory=Params)
    image: Image.Image | None = None
    tensor: torch.Tensor | None = None
    mask: np.ndarray | None = None  # class ids at model resolution
    error: ImageError | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


class DeepLabV3Handler(BaseHandler):  # type: ignore[misc]  # TorchServe ships no type hints
    """Batch in, batch out: ``preprocess`` decodes, ``inference`` runs the model, ``postprocess`` encodes."""

    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")
        config = (context.model_yaml_config or {}).get("handler", {})
        self.variant = config.get("variant", "mobilenet_v3_large")
        self.weights_label = config.get("weights", "unknown")
        self.random_weights = bool(config.get("random_weights", False))
        # Threads per worker: the cores shared among the archive's TorchServe workers (OMP_NUM_THREADS wins).
        # More threads than cores makes OpenMP spin against each other and the rest of the stack.
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(config.get("workers", 1)))))
        self.max_pixels = int(
            os.environ.get("SEGSERVE_MAX_PIXELS", config.get("max_pixels", DEFAULT_MAX_PIXELS))
        )
        _, published = VARIANTS[self.variant]
        self.categories: list[str] = list(published.meta["categories"])
        self.transforms = published.transforms()
        self.palette = voc_palette()

        model = build_model(self.variant)
        serialized = context.manifest["model"]["serializedFile"]
        state_dict = torch.load(
            os.path.join(properties["model_dir"], serialized), map_location="cpu", weights_only=True
        )
        model.load_state_dict(state_dict)
        model.aux_classifier = None  # type: ignore[assignment]  # the auxiliary head only helps training; skip its compute
        self.model = model.to(self.device).eval()
        if self.random_weights:
            logger.warning("RANDOM WEIGHTS (%s): masks from this model are meaningless", self.weights_label)
        logger.info("deeplabv3 %s ready on %s, weights: %s", self.variant, self.device, self.weights_label)
        self.initialized = True

    def describe_handle(self) -> str:
        """Shown by the management API's ``?customized=true`` and by the gateway's ``/v1/models``."""
        return json.dumps(
            {
                "variant": self.variant,
                "weights": self.weights_label,
                "random_weights": self.random_weights,
                "device": str(self.device),
                "classes": self.categories,
            }
        )

    def preprocess(self, data: list[dict[str, Any]]) -> list[Item]:
        items = []
        for idx, request in enumerate(data):
            item = Item()
            start = time.perf_counter()
            try:
                item.params = parse_params(self._fields(idx, request), self.categories)
                payload = request.get("data") or request.get("body") or request.get("image") or b""
                image = open_rgb(bytes(payload), self.max_pixels)
                item.image = image
                item.tensor = self.transforms(image)
            except ImageError as exc:
                item.error = exc
            item.timings_ms["preprocess"] = (time.perf_counter() - start) * 1000
            items.append(item)
        return items

    def _fields(self, idx: int, request: dict[str, Any]) -> dict[str, str]:
        """Parameters from form fields, else from ``X-Classes`` / ``X-Threshold`` request headers."""
        headers = {
            k.lower(): v for k, v in self.context.get_all_request_header(idx).items() if isinstance(v, str)
        }
        fields = {}
        for name in ("classes", "threshold"):
            value = request.get(name)
            if value is None:
                value = headers.get(f"x-{name}")
            if isinstance(value, (bytes, bytearray)):
                value = value.decode("utf-8", "replace")
            if value is not None:
                fields[name] = str(value)
        return fields

    def inference(self, items: list[Item], *args: Any, **kwargs: Any) -> list[Item]:
        groups: dict[tuple[int, ...], list[Item]] = {}
        for item in items:
            if item.tensor is not None:
                groups.setdefault(tuple(item.tensor.shape), []).append(item)
        for group in groups.values():
            start = time.perf_counter()
            with torch.inference_mode():
                batch = torch.stack([item.tensor for item in group if item.tensor is not None]).to(
                    self.device
                )
                logits = self.model(batch)["out"]
                if any(item.params.threshold > 0 for item in group):
                    confidence, labels = torch.softmax(logits, dim=1).max(dim=1)
                else:
                    confidence, labels = None, logits.argmax(dim=1)
                for i, item in enumerate(group):
                    mask = labels[i]
                    if confidence is not None and item.params.threshold > 0:
                        mask = torch.where(confidence[i] < item.params.threshold, 0, mask)
                    item.mask = mask.to(torch.uint8).cpu().numpy()
            elapsed = (time.perf_counter() - start) * 1000
            for item in group:
                item.timings_ms["inference"] = elapsed
                item.timings_ms["batch_size"] = len(group)
        return items

    def postprocess(self, items: list[Item]) -> list[dict[str, Any]]:
        answers = []
        for idx, item in enumerate(items):
            self.context.set_response_content_type(idx, "application/json")
            if item.error is not None or item.mask is None or item.image is None:
                error = item.error or ImageError("invalid_image", "image could not be processed")
                self.context.set_response_status(422, error.code, idx)
                answers.append({"error": {"code": error.code, "message": error.message}})
                continue
            start = time.perf_counter()
            answer = self._encode(item)
            item.timings_ms["postprocess"] = (time.perf_counter() - start) * 1000
            answer["timings_ms"] = {k: round(v, 3) for k, v in item.timings_ms.items()}
            answers.append(answer)
        return answers

    def _encode(self, item: Item) -> dict[str, Any]:
        assert item.mask is not None and item.image is not None
        mask = item.mask
        if item.params.classes is not None:
            mask = np.where(np.isin(mask, item.params.classes), mask, 0).astype(np.uint8)
        width, height = item.image.size
        picture = Image.fromarray(mask)
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.Resampling.NEAREST)
        picture.putpalette(self.palette)  # mode L -> P: pixel values stay the class ids
        counts = np.bincount(np.asarray(picture).ravel(), minlength=len(self.categories))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", compress_level=3)
        total = width * height
        return {
            "width": width,
            "height": height,
            "classes": [
                {"id": i, "name": self.categories[i], "pixels": int(n), "fraction": round(int(n) / total, 6)}
                for i, n in enumerate(counts)
                if n
            ],
            "mask_png": base64.b64encode(buffer.getvalue()).decode("ascii"),
        }


_service: DeepLabV3Handler | None = None


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    """TorchServe's entry point (``deeplabv3.py:handle``): the handler is built on the first call, not at import."""
    global _service
    if _service is None:
        _service = DeepLabV3Handler()
        _service.initialize(context)
    if data is None:
        return None
    return list(_service.handle(data, context))
