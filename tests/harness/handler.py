"""The TorchServe handler in the test's own process, as TorchServe's handler tests run theirs: a small
context object, a model in a temp dir, and the reference each mask is held to."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from gateway.handlers.deeplabv3.catalog import GRAPH_ENGINES
from gateway.handlers.deeplabv3.engines import published_weights
from gateway.handlers.deeplabv3.handler import DeepLabV3Handler

# The weights' own preprocessing, the reference every engine is compared with.
REFERENCE_TRANSFORMS = published_weights("mobilenet_v3_large").transforms()


class Context:
    """What the handler uses of TorchServe's context."""

    def __init__(self, model_dir: Path, headers: list[dict[str, str]] | None = None) -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None, "batch_size": 8}
        self.manifest = {"model": {"serializedFile": "weights.pth"}}
        self.model_yaml_config = {
            "handler": {"variant": "mobilenet_v3_large", "weights": "test", "random_weights": True}
        }
        self.headers = headers or []
        self.status: dict[int, tuple[int, str]] = {}
        self.content_types: dict[int, str] = {}
        self.metrics = Metrics()

    def get_all_request_header(self, idx: int) -> dict[str, str]:
        return self.headers[idx] if idx < len(self.headers) else {}

    def get_request_header(self, idx: int, key: str) -> str | None:
        return self.get_all_request_header(idx).get(key)

    def set_response_status(self, code: int, phrase: str = "", idx: int = 0) -> None:
        self.status[idx] = (code, phrase)

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value


class Metrics:
    def add_time(self, *args: Any, **kwargs: Any) -> None:
        pass


def make_handler(directory: Path, engine: str, **settings: Any) -> DeepLabV3Handler:
    """The handler, initialized on the model saved in ``directory`` for ``engine``, at fp32 unless
    ``settings`` say otherwise."""
    context = Context(directory)
    context.manifest = {
        "model": {"serializedFile": "model.onnx" if engine in GRAPH_ENGINES else "weights.pth"}
    }
    context.model_yaml_config["handler"].update({"engine": engine, "precision": "fp32", **settings})
    service = DeepLabV3Handler()
    service.initialize(context)
    return service


def run(
    handler: Any, requests: list[dict[str, Any]], headers: list[dict[str, str]] | None = None
) -> tuple[list[Any], Context]:
    context = Context(Path("."), headers)
    return handler.handle(requests, context), context


def head_of(answer: bytes) -> dict[str, Any]:
    """The JSON line that starts an answer to an image."""
    head: dict[str, Any] = json.loads(answer.partition(b"\n")[0])
    return head


def mask_of(answer: bytes) -> np.ndarray:
    """The mask of an answer to an image: the PNG after its JSON line, a palette image."""
    image = Image.open(io.BytesIO(answer.partition(b"\n")[2]))
    assert image.mode == "P"
    return np.asarray(image)


def full_size_probabilities(model: Any, transforms: Any, image: Image.Image) -> torch.Tensor:
    """torchvision's own path: the published transforms, the model, then its logits interpolated bilinearly
    to the image's size, as the model does inside, and softmax (1 x classes x H x W)."""
    with torch.inference_mode():
        logits = model(transforms(image)[None])["out"]
        full = F.interpolate(logits, size=image.size[::-1], mode="bilinear", align_corners=False)
        return torch.softmax(full, dim=1)
