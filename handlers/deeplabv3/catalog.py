"""What the handler serves, named once and without torch: variants, engines, precisions, and the names
the exported graph and the answers carry. The archive builder (``gateway/ops/archive.py``) and the CLI
import this module; the handler's own modules too, so nothing here is written twice."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """A DeepLabV3 backbone, by the names torchvision gives its builder and its published weights."""

    builder: str  # a function of torchvision.models.segmentation
    weights: str  # its weights enum; the member served is PUBLISHED_WEIGHTS


VARIANTS: dict[str, Variant] = {
    "mobilenet_v3_large": Variant("deeplabv3_mobilenet_v3_large", "DeepLabV3_MobileNet_V3_Large_Weights"),
    "resnet50": Variant("deeplabv3_resnet50", "DeepLabV3_ResNet50_Weights"),
    "resnet101": Variant("deeplabv3_resnet101", "DeepLabV3_ResNet101_Weights"),
}
PUBLISHED_WEIGHTS = "COCO_WITH_VOC_LABELS_V1"  # the 21 PASCAL VOC classes
CLASSES = 21

ENGINES = ("onnxruntime", "openvino", "torch")
GRAPH_ENGINES = ("onnxruntime", "openvino")  # the engines that run the exported ONNX graph
# precision -> the engines that serve it. bf16 and fp16 are opt-ins: bf16 where the CPU computes in it,
# fp16 on CUDA (engines.check_precision says why a machine cannot).
PRECISIONS: dict[str, tuple[str, ...]] = {"fp32": ENGINES, "bf16": ("openvino",), "fp16": ("torch",)}

# The names of the exported graph's input (N x 3 x H x W, normalised) and output (N x 21 x h x w logits at
# the model's stride, before its last upsampling).
ONNX_INPUT, ONNX_OUTPUT = "image", "logits"

# The short side of the image the model sees (torchvision's transforms for these weights resize to it).
WORKING_SHORT_SIDE = 520
DEFAULT_MAX_PIXELS = 25_000_000
# What one image may add to the peak resident memory at DEFAULT_MAX_PIXELS (tests/test_engines.py holds it).
MEMORY_BOUND_MB = 256

# A successful answer: one line of JSON (width, height, classes, timings), a newline, then the mask as PNG
# bytes. Binary, so that neither the handler nor the client spends a pass on base64 and a JSON string of
# it; errors stay JSON (``{"error": {code, message}}``).
MASK_CONTENT_TYPE = "application/vnd.segserve.mask"


def check_served(engine: str, precision: str) -> None:
    """Refuse an engine or precision that is not in the catalog, or a pair that no engine serves."""
    if engine not in ENGINES or precision not in PRECISIONS:
        raise ValueError(f"cannot serve engine {engine!r} at precision {precision!r}")
    if engine not in PRECISIONS[precision]:
        served_by = ", ".join(PRECISIONS[precision])
        raise ValueError(f"precision {precision!r} is served by {served_by}, not by {engine!r}")
