"""TorchServe handler for torchvision's DeepLabV3 semantic segmentation models.

One request = one image (the raw request body, or a form field named ``data``/``body``/``image``) plus
optional parameters, given as form fields or as ``X-Classes`` / ``X-Threshold`` headers:

- ``classes``: comma-separated class ids or VOC names; pixels of other classes become background (0);
- ``threshold``: in [0, 1]; pixels whose top class probability is below it become background (0).

One answer per request, JSON: the class-index mask at the image's own size as a palettised PNG (base64),
per-class pixel counts and timings; or, for an image that cannot be processed, ``{"error": {code, message}}``
with HTTP status 422 for that request only, so the rest of the batch still succeeds.

Engines. The archive's model-config ``handler:`` section names the engine and its precision: ``openvino``
(the default on CPU, about 3x faster than eager PyTorch there) and ``onnxruntime`` run the ONNX export that
``segserve build-model`` packed, ``torch`` runs the eager model from a state dict (the reference, and the
CUDA path). Every engine serves ``fp32``, the default. ``bf16`` is an opt-in for ``openvino`` on CPUs that
compute in it (AVX-512 BF16 or AMX): a forward pass about 1.8x as fast, and masks that differ where classes
are close (see ``check_precision``). ``describe_handle()`` reports both, and the worker logs them when it
loads.

Masks. The model sees the image with its short side at 520 pixels (its working size) and gives class
scores (logits) there: at its stride, 1/16 of that on mobilenet_v3_large, which its last layer upsamples
bilinearly to the working size. The mask is what torchvision's model and the usual post-processing give:
the working-size logits interpolated bilinearly (``align_corners=False``) to the image's own size, then the
arg-max there. Both upsamplings are done here (the ONNX graph stops before the model's), on labels: an
output pixel whose four source pixels share one top class has that class (a convex mix of scores keeps the
order), so only the pixels between differing source pixels have their scores interpolated, unless a
threshold asks for every pixel's probability. The image's size is done in bands of output rows: its 21
scores per pixel are never held at once (``Scores``, ``working_scores``, ``full_size_mask``).

Memory. Above the loaded, warm model, one image of the largest allowed size (25 MP, ``DEFAULT_MAX_PIXELS``)
raises the worker's peak resident memory by less than 256 MB (``MEMORY_BOUND_MB``; measured with OpenVINO:
95 MB for an RGB JPEG, 93 MB with a threshold, 191 MB for an RGBA PNG; with ONNX Runtime 107, 107 and
190 MB). What takes it: the decoded pixels (4 bytes each in PIL, twice while a mode is converted), kept
only until the model's input is made; the mask (1 byte each) and its PNG; and bands of at most
``BAND_BYTES`` per tensor.

Batches. TorchServe hands the handler several requests at once. On CPU they run as one forward pass per
group of equal input shape. Floats depend on the batch size (other kernels, other summation order), so a
batch's masks agree with those each image gives alone on at least 99.99% of pixels, and exactly wherever
the top two classes are not near-tied. With ``pad_batches: true`` in the handler's config (for a GPU, where
batching pays), images of different shapes share one pass, padded at the bottom and right to the largest
(``pad_batch``, ``crop_logits``). It is off by default, on every device: padding changes what the model
sees (its global pooling averages the padding in, and the border's neighbourhood moves), so an image's mask
would depend on its batchmates. On random weights, padded masks agreed with the same images alone on 23% to
100% of pixels (median 88%, 16 images of mixed sizes), far below 99.9%. Measure it on the real weights
before turning it on.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import io
import json
import logging
import os
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.models import segmentation

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
ENGINES = ("onnxruntime", "openvino", "torch")
# precision -> the engines that serve it
PRECISIONS: dict[str, tuple[str, ...]] = {"fp32": ENGINES, "bf16": ("openvino",)}
# The names of the exported graph's input (N x 3 x H x W, normalised) and output (N x 21 x h x w logits at
# the model's stride, before its last upsampling).
ONNX_INPUT, ONNX_OUTPUT = "image", "logits"
# The most bytes one float tensor of a band of output rows may take: small enough that a 25 MP image stays
# within the memory bound above, large enough that a band's fixed cost is a small part of its work.
BAND_BYTES = 8 << 20
# What one image may add to the peak resident memory at DEFAULT_MAX_PIXELS (tests/test_engines.py holds it).
MEMORY_BOUND_MB = 256


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
        ImageOps.exif_transpose(image, in_place=True)  # a copy otherwise, even when upright
        return to_rgb(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError("invalid_image", f"cannot decode image: {exc}") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; 16/32-bit integer and float greyscale are scaled, not clipped."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = Image.fromarray(greyscale_bytes(image))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a transparent palette image goes straight to RGB
    return image if image.mode == "RGB" else image.convert("RGB")


def greyscale_bytes(image: Image.Image) -> np.ndarray:
    """Integer greyscale scaled from its range (16 bits, or 8 when its values fit) to 8 bits; float
    greyscale clipped to [0, 255]. In float32 and in place: one temporary of 4 bytes a pixel."""
    array = np.array(image, dtype=np.float32)
    top = 255.0
    if image.mode != "F" and (image.mode.startswith("I;16") or array.max(initial=0) > 255):
        top = 65535.0
    np.clip(array, 0, top, out=array)
    array *= 255.0 / top
    np.rint(array, out=array)
    return array.astype(np.uint8)


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


@dataclass(frozen=True)
class Taps:
    """Bilinear taps along one axis, as ``F.interpolate(..., align_corners=False)`` places them: output
    index ``i`` reads input indices ``i0[i]`` and ``i1[i]`` (the next one, or the last again at the edge)
    with weights ``w0[i]`` and ``w1[i]``."""

    i0: torch.Tensor
    i1: torch.Tensor
    w0: torch.Tensor
    w1: torch.Tensor
    first: int = 0  # the output index of i0[0], for a part

    def part(self, start: int, stop: int) -> Taps:
        return Taps(
            self.i0[start:stop],
            self.i1[start:stop],
            self.w0[start:stop],
            self.w1[start:stop],
            self.first + start,
        )


def bilinear_taps(out_size: int, in_size: int, device: torch.device | str = "cpu") -> Taps:
    """Output pixel centres mapped back onto the input, in float32 as torch computes them."""
    scale = torch.tensor(in_size, dtype=torch.float32, device=device) / out_size
    source = ((torch.arange(out_size, dtype=torch.float32, device=device) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = source.to(torch.int64).clamp_max(in_size - 1)  # floor, since source >= 0
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    w1 = (source - i0).clamp(0, 1)
    return Taps(i0, i1, 1 - w1, w1)


# A label for "the corners of this cell differ": class ids are below it (at most 255 classes).
MIXED = 255


class Scores:
    """Class scores on a grid of pixels: every pixel's top class (``labels``, uint8, h x w), and the scores
    themselves (pixels x classes) read only where they are needed (``at``)."""

    labels: torch.Tensor
    classes: int

    def at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The scores (pixels x classes) of pixels (``rows[k]``, ``cols[k]``)."""
        raise NotImplementedError

    def block(self, start: int, stop: int) -> torch.Tensor:
        """The scores (rows x w x classes) of rows ``start`` to ``stop``."""
        raise NotImplementedError

    @functools.cached_property
    def cells(self) -> torch.Tensor:
        """Each pixel's label where it, its right, lower and lower-right neighbours agree (the edge's own
        pixels stand in for missing neighbours, as bilinear taps clamp there), else ``MIXED``."""
        padded = torch.nn.functional.pad(self.labels[None, None], (0, 1, 0, 1), mode="replicate")[0, 0]
        corner = padded[:-1, :-1]
        agree = (corner == padded[:-1, 1:]) & (corner == padded[1:, :-1]) & (corner == padded[1:, 1:])
        return torch.where(agree, corner, MIXED)


class StoredScores(Scores):
    """Scores held in memory: an engine's logits (classes x h x w)."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.classes, height, self.width = logits.shape
        # One pixel's classes side by side (channels-last is the fastest copy torch makes of this).
        pixels = logits[None].float().contiguous(memory_format=torch.channels_last)
        self.pixels = pixels.permute(0, 2, 3, 1).reshape(height * self.width, self.classes)
        self.labels = self.pixels.argmax(dim=1).to(torch.uint8).view(height, self.width)

    def at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return self.pixels.index_select(0, rows * self.width + cols)

    def block(self, start: int, stop: int) -> torch.Tensor:
        return self.pixels[start * self.width : stop * self.width].view(
            stop - start, self.width, self.classes
        )


class ResizedScores(Scores):
    """``source`` interpolated bilinearly along ``rows`` and ``cols``: a grid small enough to label whole
    (the model's working size). Its scores are computed wherever they are read, from the source
    interpolated along its rows once (``across``: source rows x output columns x classes)."""

    def __init__(self, source: Scores, rows: Taps, cols: Taps) -> None:
        self.rows, self.classes, self.width = rows, source.classes, len(cols.i0)
        self.across = along_rows(source.block(0, len(source.labels)), cols)
        self.labels = torch.from_numpy(labels_in_bands(source, rows, cols, scores_at=self.at))

    def at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        across = self.across.view(-1, self.classes)
        upper = across.index_select(0, self.rows.i0.index_select(0, rows) * self.width + cols)
        lower = across.index_select(0, self.rows.i1.index_select(0, rows) * self.width + cols)
        w_top, w_bottom = (
            self.rows.w0.index_select(0, rows)[:, None],
            self.rows.w1.index_select(0, rows)[:, None],
        )
        return upper * w_top + lower * w_bottom

    def block(self, start: int, stop: int) -> torch.Tensor:
        return across_rows(self.across, self.rows.part(start, stop))


def along_rows(block: torch.Tensor, cols: Taps) -> torch.Tensor:
    """A block of scores (rows x w x classes) interpolated along its rows to the columns of ``cols``."""
    left, right = block.index_select(1, cols.i0), block.index_select(1, cols.i1)
    return left * cols.w0[None, :, None] + right * cols.w1[None, :, None]


def across_rows(block: torch.Tensor, rows: Taps, first: int = 0) -> torch.Tensor:
    """A block of scores (rows x w x classes) whose first row is source row ``first``, interpolated across
    its rows to the rows of ``rows``."""
    upper, lower = block.index_select(0, rows.i0 - first), block.index_select(0, rows.i1 - first)
    return upper * rows.w0[:, None, None] + lower * rows.w1[:, None, None]


def interpolate_at(
    source: Scores, rows: Taps, cols: Taps, at_rows: torch.Tensor, at_cols: torch.Tensor
) -> torch.Tensor:
    """Class scores (pixels x classes) at the output pixels (``at_rows[k]``, ``at_cols[k]``), each computed
    from its own four source pixels alone, along the row and then across rows as torch does, so its floats
    are the same however the output is cut into bands."""
    top, bottom = rows.i0.index_select(0, at_rows), rows.i1.index_select(0, at_rows)
    left, right = cols.i0.index_select(0, at_cols), cols.i1.index_select(0, at_cols)
    w_left, w_right = cols.w0.index_select(0, at_cols)[:, None], cols.w1.index_select(0, at_cols)[:, None]
    w_top, w_bottom = rows.w0.index_select(0, at_rows)[:, None], rows.w1.index_select(0, at_rows)[:, None]
    upper = source.at(top, left) * w_left + source.at(top, right) * w_right
    lower = source.at(bottom, left) * w_left + source.at(bottom, right) * w_right
    return upper * w_top + lower * w_bottom


def resized_labels(
    source: Scores,
    rows: Taps,
    cols: Taps,
    threshold: float = 0.0,
    scores_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Class ids (uint8) of ``source`` interpolated to the output pixels of ``rows`` x ``cols``.

    An output pixel whose four source pixels share one top class has that class (a convex mix of scores
    keeps the order), so only the pixels between differing source pixels are interpolated (by
    ``interpolate_at``, or ``scores_at``, given output indices, when the output's scores have a quicker
    way), unless a threshold asks for every pixel's probability: then the band is interpolated whole."""
    if threshold > 0:
        first = int(rows.i0[0])
        scores = across_rows(along_rows(source.block(first, int(rows.i1[-1]) + 1), cols), rows, first)
        confidence, labels = torch.softmax(scores, dim=2).max(dim=2)
        return torch.where(confidence < threshold, 0, labels).to(torch.uint8)
    labels = source.cells.index_select(0, rows.i0).index_select(1, cols.i0)
    at_rows, at_cols = (labels == MIXED).nonzero().unbind(1)
    if len(at_rows):
        if scores_at is None:
            scores = interpolate_at(source, rows, cols, at_rows, at_cols)
        else:
            scores = scores_at(at_rows + rows.first, at_cols)
        labels[at_rows, at_cols] = scores.argmax(dim=1).to(torch.uint8)
    return labels


def working_scores(logits: torch.Tensor, batch_size: tuple[int, int], own_size: tuple[int, int]) -> Scores:
    """An image's class scores at its working size ``own_size`` (h, w), from its logits in a batch of
    ``batch_size`` (padded to the largest image when sizes were mixed: the image is the top-left region).

    Logits smaller than the batch are the model's before its last layer, the bilinear upsampling to the
    input's size (an exported graph stops before it): that upsampling is done here, on the labels and on
    the few pixels between differing ones, instead of on every score of every pixel."""
    (height, width), (own_height, own_width) = batch_size, own_size
    if tuple(logits.shape[1:]) == batch_size:
        return StoredScores(logits[:, :own_height, :own_width])
    rows = bilinear_taps(height, logits.shape[1], logits.device).part(0, own_height)
    cols = bilinear_taps(width, logits.shape[2], logits.device).part(0, own_width)
    return ResizedScores(StoredScores(logits), rows, cols)


def full_size_mask(
    scores: Scores | torch.Tensor,
    height: int,
    width: int,
    threshold: float = 0.0,
    band_rows: int | None = None,
) -> np.ndarray:
    """The class-id mask (uint8, ``height`` x ``width``) of one image's scores (or logits, classes x h x w):
    ``F.interpolate(logits, (height, width), mode="bilinear", align_corners=False)``, then softmax and
    threshold when asked, then arg-max."""
    if isinstance(scores, torch.Tensor):
        scores = StoredScores(scores)
    h, w = scores.labels.shape
    rows, cols = bilinear_taps(height, h, scores.labels.device), bilinear_taps(width, w, scores.labels.device)
    return labels_in_bands(scores, rows, cols, threshold, band_rows)


def labels_in_bands(
    scores: Scores,
    rows: Taps,
    cols: Taps,
    threshold: float = 0.0,
    band_rows: int | None = None,
    scores_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """``resized_labels`` in bands of ``band_rows`` output rows (by default as many as keep a band's float
    tensors within ``BAND_BYTES``)."""
    height, width = len(rows.i0), len(cols.i0)
    step = band_rows or max(1, BAND_BYTES // (width * scores.classes * 4))
    labels = np.empty((height, width), dtype=np.uint8)
    for start in range(0, height, step):
        stop = min(start + step, height)
        band = resized_labels(scores, rows.part(start, stop), cols, threshold, scores_at)
        labels[start:stop] = band.cpu().numpy()
    return labels


def batch_groups(shapes: Sequence[tuple[int, ...]], pad: bool) -> list[list[int]]:
    """Which inputs share a forward pass: all of them when padding, else those of equal shape."""
    if pad:
        return [list(range(len(shapes)))] if shapes else []
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(index)
    return list(groups.values())


def pad_batch(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack images (channels x h x w) of any sizes, padded at the bottom and right to the largest height
    and width. The padding is zero after normalisation: the training images' mean colour."""
    channels = tensors[0].shape[0]
    height = max(t.shape[1] for t in tensors)
    width = max(t.shape[2] for t in tensors)
    batch = tensors[0].new_zeros((len(tensors), channels, height, width))
    for index, tensor in enumerate(tensors):
        batch[index, :, : tensor.shape[1], : tensor.shape[2]] = tensor
    return batch


def class_counts(mask: np.ndarray, classes: int) -> np.ndarray:
    """Pixels per class id, counted in bands (bincount widens its input to 8 bytes a pixel)."""
    counts = np.zeros(classes, dtype=np.int64)
    step = max(1, BAND_BYTES // (8 * max(1, mask.shape[1])))
    for start in range(0, mask.shape[0], step):
        counts += np.bincount(mask[start : start + step].ravel(), minlength=classes)[:classes]
    return counts


class Engine(Protocol):
    """A forward pass: a normalised batch (N x 3 x h x w) in, logits (N x classes x h' x w') out: at the
    input's size, or at the model's stride before its last upsampling (see ``working_scores``)."""

    device: torch.device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...


class TorchEngine:
    """Eager PyTorch on the model's state dict: the reference, and the path on CUDA."""

    def __init__(self, variant: str, weights_file: str, device: torch.device) -> None:
        model = build_model(variant)
        model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
        model.aux_classifier = None  # type: ignore[assignment]  # the auxiliary head only helps training; skip its compute
        self.model = model.to(device).eval()
        self.device = device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits: torch.Tensor = self.model(batch.to(self.device))["out"]
        return logits


class Peers:
    """The model's other TorchServe workers on this machine, seen through advisory file locks: each worker
    holds an exclusive lock on its own file while it handles a batch. A lock goes with its process, so a
    worker that died counts as idle, and its file is removed by the next worker that looks."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.path = os.path.join(directory, f"{os.getpid()}-{id(self)}")
        self.fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o644)
        weakref.finalize(self, release_lock_file, self.fd, self.path)

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Mark this worker busy for the block."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def busy_others(self) -> int:
        busy = 0
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if path == self.path:
                continue
            try:
                with open(path) as other:
                    fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
                forget_if_gone(path, name)
            except BlockingIOError:
                busy += 1
            except OSError:
                pass  # a file that went meanwhile is no worker
        return busy


def release_lock_file(fd: int, path: str) -> None:
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(path)
        os.rmdir(os.path.dirname(path))  # the last worker out; others' files keep it otherwise


def forget_if_gone(path: str, name: str) -> None:
    """Remove the lock file of a worker whose process has ended (its name starts with its pid)."""
    try:
        os.kill(int(name.split("-")[0]), 0)
    except ProcessLookupError:
        os.unlink(path)
    except (ValueError, PermissionError):
        pass  # not a worker's file, or a process of another user's: alive


def ort_session(model_file: str, threads: int, spinning: bool, providers: list[Any]) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads wait for work by burning a core: right for a lone worker, wrong when several
    # workers share the cores and each one's spin steals the others' time.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(model_file, options, providers=providers)


class NarrowingEngine:
    """An engine on the CPU whose workers may share the cores. With ``peers`` (the handler marks its worker
    busy for each batch), a pass runs on ``threads`` while no other worker of the model is busy, so a lone
    request has every core, and on ``narrow`` threads (a session of its own) while one is, so that workers
    busy together do not share cores. Measured on 2 cores under 8 concurrent requests with ONNX Runtime:
    2 workers x 2 threads kept 90-95% of the throughput of 2 x 1; narrowing kept 100% (see default_threads
    in gateway/ops/archive.py)."""

    device = torch.device("cpu")
    session: Any
    narrow: Any = None
    peers: Peers | None = None

    def __init__(self, threads: int, narrow: int | None, peers: Peers | None) -> None:
        self.session = self._open(threads)
        if narrow is not None and narrow < threads and peers is not None and self.device.type == "cpu":
            self.narrow = self._open(narrow)
            self.peers = peers

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        busy_peers = self.peers is not None and self.peers.busy_others() > 0
        return self._run(self.narrow if busy_peers else self.session, batch)

    def _open(self, threads: int) -> Any:
        raise NotImplementedError

    def _run(self, session: Any, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class OnnxRuntimeEngine(NarrowingEngine):
    """ONNX Runtime on the exported graph (dynamic batch, height and width: no export per shape), on its
    CPU provider, or on CUDA where the build has it."""

    def __init__(
        self,
        model_file: str,
        threads: int,
        spinning: bool,
        gpu_id: int | None,
        narrow: int | None = None,
        peers: Peers | None = None,
    ) -> None:
        import onnxruntime as ort

        self.model_file, self.spinning = model_file, spinning
        self.providers: list[Any] = ["CPUExecutionProvider"]
        if gpu_id is not None and "CUDAExecutionProvider" in ort.get_available_providers():
            self.providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu_id}))
            self.device = torch.device(f"cuda:{gpu_id}")
        super().__init__(threads, narrow, peers)

    def _open(self, threads: int) -> Any:
        return ort_session(self.model_file, threads, self.spinning, self.providers)

    def _run(self, session: Any, batch: torch.Tensor) -> torch.Tensor:
        [logits] = session.run([ONNX_OUTPUT], {ONNX_INPUT: batch.cpu().numpy()})
        return torch.from_numpy(logits)


class OpenVinoEngine(NarrowingEngine):
    """OpenVINO's CPU plugin on the same exported graph, which it reads itself, at fp32 or, asked, bf16."""

    def __init__(
        self,
        model_file: str,
        threads: int,
        narrow: int | None = None,
        peers: Peers | None = None,
        precision: str = "fp32",
    ) -> None:
        import openvino

        self.core = openvino.Core()
        self.model = self.core.read_model(model_file)
        self.precision = precision
        super().__init__(threads, narrow, peers)

    def _open(self, threads: int) -> Any:
        config = {
            "INFERENCE_NUM_THREADS": threads,
            # Set either way: where the CPU has AMX, OpenVINO would pick bf16 itself.
            "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[self.precision],
            "PERFORMANCE_HINT": "LATENCY",  # one stream: each request on all of this worker's threads
            # Pinned, every worker's threads would take the same first cores; the kernel spreads them.
            "ENABLE_CPU_PINNING": False,
        }
        return self.core.compile_model(self.model, "CPU", config).create_infer_request()

    def _run(self, session: Any, batch: torch.Tensor) -> torch.Tensor:
        logits = session.infer({ONNX_INPUT: batch.numpy()})[ONNX_OUTPUT]
        return torch.from_numpy(logits.copy())  # the request reuses its output buffer on the next pass


def check_precision(engine: str, precision: str) -> None:
    """Refuse, with the reason, an engine and precision this machine cannot serve as asked.

    bf16 on OpenVINO, measured on this project's 2-core AMD EPYC (AVX-512 BF16, no AMX), mobilenet_v3_large
    on random weights, 640x480: the forward pass took 33 ms instead of 58. The masks differ from fp32's
    wherever two classes score within bf16's rounding (8 significant bits): random weights leave many such
    pixels (the README gives the measured agreement)."""
    if engine not in ENGINES or precision not in PRECISIONS:
        raise ValueError(f"cannot serve engine {engine!r} at precision {precision!r}")
    if engine not in PRECISIONS[precision]:
        served_by = ", ".join(PRECISIONS[precision])
        raise ValueError(f"precision {precision!r} is served by {served_by}, not by {engine!r}")
    if precision == "bf16" and not cpu_computes_in_bf16():
        raise ValueError(
            "precision 'bf16' needs a CPU that computes in bf16 (AVX-512 BF16 or AMX); this one does not"
        )


def cpu_computes_in_bf16() -> bool:
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def model_peers(manifest: dict[str, Any]) -> Peers:
    """The lock files of the workers of this model and version under this TorchServe (their parent)."""
    model = manifest.get("model", {})
    key = f"{model.get('modelName', 'model')}-{model.get('modelVersion', '0')}"
    return Peers(os.path.join(tempfile.gettempdir(), f"segserve-{os.getppid()}-{key}"))


@dataclass
class Item:
    """One request as it moves through the batch."""

    params: Params = field(default_factory=Params)
    size: tuple[int, int] | None = None  # the image's own (width, height): the mask's
    tensor: torch.Tensor | None = None  # normalised, at the model's working size
    working_size: tuple[int, int] = (0, 0)  # (h, w) of the model's input for this image
    logits: torch.Tensor | None = None  # classes x h x w: this image's slice of its batch's (working_scores)
    batch_size: tuple[int, int] = (0, 0)  # (h, w) of the batch's input: the largest image's when padded
    error: ImageError | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


def intra_op_threads(config: dict[str, Any]) -> int:
    """Threads per worker: the archive's choice, else the cores shared among its workers;
    ``OMP_NUM_THREADS`` wins over both, as operators expect of any OpenMP program."""
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    if config.get("intra_op_threads"):
        return max(1, int(config["intra_op_threads"]))
    return max(1, (os.cpu_count() or 1) // max(1, int(config.get("workers", 1))))


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
        check_precision(self.engine_name, self.precision)
        self.threads = intra_op_threads(config)
        # Without a setting, threads spin only when this worker has the cores to itself.
        workers = max(1, int(config.get("workers", 1)))
        self.spinning = bool(config.get("allow_spinning", workers <= 1))
        # Workers whose threads outnumber the cores take their share of them while others compute.
        cores = os.cpu_count() or 1
        self.narrow_threads = max(1, cores // workers) if workers * self.threads > cores else None
        self.max_pixels = int(
            os.environ.get("SEGSERVE_MAX_PIXELS", config.get("max_pixels", DEFAULT_MAX_PIXELS))
        )
        _, published = VARIANTS[self.variant]
        self.categories: list[str] = list(published.meta["categories"])
        self.transforms = published.transforms()
        self.palette = voc_palette()
        model_file = os.path.join(properties["model_dir"], context.manifest["model"]["serializedFile"])
        self.engine = self._load_engine(model_file, properties.get("gpu_id"), context.manifest)
        self.device = self.engine.device
        if self.device.type == "cpu":
            # torch's OpenMP threads spin after each op: beside other workers' threads (spinning off) they
            # take those workers' cores, so there torch, which then only post-processes, gets one thread.
            spins = self.engine_name == "torch" or self.spinning
            torch.set_num_threads(self.threads if spins else 1)
        # Padding changes masks (see the module's docstring): only where batching pays, on CUDA.
        self.pad_batches = bool(config.get("pad_batches", False))  # an opt-in: see the module's docstring
        if self.random_weights:
            logger.warning("RANDOM WEIGHTS (%s): masks from this model are meaningless", self.weights_label)
        logger.info(
            "deeplabv3 %s ready on %s: engine %s, precision %s, %d intra-op threads, weights: %s",
            self.variant, self.device, self.engine_name, self.precision, self.threads, self.weights_label,
        )  # fmt: skip

    def _load_engine(self, model_file: str, gpu_id: int | None, manifest: dict[str, Any]) -> Engine:
        peers = model_peers(manifest) if self.narrow_threads else None
        if self.engine_name == "onnxruntime":
            return OnnxRuntimeEngine(
                model_file, self.threads, self.spinning, gpu_id, self.narrow_threads, peers
            )
        if self.engine_name == "openvino":
            return OpenVinoEngine(model_file, self.threads, self.narrow_threads, peers, self.precision)
        cuda = torch.cuda.is_available() and gpu_id is not None
        return TorchEngine(self.variant, model_file, torch.device(f"cuda:{gpu_id}" if cuda else "cpu"))

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
            item = Item()
            start = time.perf_counter()
            try:
                item.params = parse_params(self._fields(idx, request), self.categories)
                payload = request.get("data") or request.get("body") or request.get("image") or b""
                image = open_rgb(bytes(payload), self.max_pixels)
                item.size = image.size
                item.tensor = self.transforms(image)  # the decoded pixels go: up to 100 MB at 25 MP
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
        ready = [item for item in items if item.tensor is not None]
        shapes = [tuple(item.tensor.shape) for item in ready if item.tensor is not None]
        for group in batch_groups(shapes, self.pad_batches):
            self._forward([ready[i] for i in group])
        return items

    def _forward(self, group: list[Item]) -> None:
        """One forward pass for ``group``; each item keeps its own region of the logits."""
        start = time.perf_counter()
        tensors = [item.tensor for item in group if item.tensor is not None]
        same = len({tuple(t.shape) for t in tensors}) == 1
        logits = self.engine(torch.stack(tensors) if same else pad_batch(tensors))
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)  # so that the timing holds the pass, not its launch
        batch_size = (max(int(t.shape[1]) for t in tensors), max(int(t.shape[2]) for t in tensors))
        for index, (item, tensor) in enumerate(zip(group, tensors, strict=True)):
            item.logits, item.batch_size = logits[index], batch_size
            item.working_size = (int(tensor.shape[1]), int(tensor.shape[2]))
            item.tensor = None
        elapsed = (time.perf_counter() - start) * 1000
        for item in group:
            item.timings_ms["inference"] = elapsed
            item.timings_ms["batch_size"] = len(group)

    def postprocess(self, items: list[Item]) -> list[dict[str, Any]]:
        answers = []
        for idx, item in enumerate(items):
            self.context.set_response_content_type(idx, "application/json")
            if item.error is not None or item.logits is None or item.size is None:
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
        assert item.logits is not None and item.size is not None
        width, height = item.size
        scores = working_scores(item.logits, item.batch_size, item.working_size)
        mask = full_size_mask(scores, height, width, item.params.threshold)
        item.logits = None  # the batch's logits go as soon as its last image has its mask
        if item.params.classes is not None:
            keep = np.zeros(256, dtype=np.uint8)
            keep[item.params.classes] = item.params.classes
            mask = keep[mask]
        counts = class_counts(mask, len(self.categories))
        picture = Image.fromarray(mask)
        picture.putpalette(self.palette)  # mode L -> P: pixel values stay the class ids
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
