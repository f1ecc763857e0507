"""One request's image and parameters: its bytes to the pixels the model sees, and what it asks for.

One request = one image (the raw request body, or a form field named ``data``/``body``/``image``) plus
optional parameters, given as form fields or as ``X-Classes`` / ``X-Threshold`` headers:

- ``classes``: comma-separated class ids or VOC names; pixels of other classes become background (0);
- ``threshold``: in [0, 1]; pixels whose top class probability is below it become background (0).

The model sees the image upright, in RGB, resized as the weights' transforms resize it (PIL's bilinear,
antialiased) so that its short side is the working size, as uint8 pixels (``Picture``); the engine
normalises them. A large JPEG is decoded whole: decoding it at a DCT scale (PIL's ``draft``) would save
most of its decoding, but the model then sees other pixels, and on random weights a 1920x1080 photo's mask
agreed with the reference's on only 95.4% of pixels. On a CUDA device, JPEGs are decoded there in one batch
(nvJPEG) and resized there (``device_pictures``); every other image is decoded by the CPU.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

# PIL's transpose for each EXIF orientation (as ImageOps.exif_transpose applies them).
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An input that this image cannot be segmented for; ``code`` is the API's ``error.code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Params:
    classes: list[int] | None = None
    threshold: float = 0.0


@dataclass
class Picture:
    """An image as the model sees it."""

    size: tuple[int, int]  # the image's own upright (width, height): the mask's
    pixels: torch.Tensor  # uint8, working height x working width x RGB, on the decoding device


def request_fields(request: dict[str, Any], headers: dict[str, Any]) -> dict[str, str]:
    """Parameters from form fields, else from ``X-Classes`` / ``X-Threshold`` request headers."""
    lowered = {k.lower(): v for k, v in headers.items() if isinstance(v, str)}
    fields = {}
    for name in ("classes", "threshold"):
        value = request.get(name)
        if value is None:
            value = lowered.get(f"x-{name}")
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8", "replace")
        if value is not None:
            fields[name] = str(value)
    return fields


def request_image(request: dict[str, Any]) -> bytes:
    return bytes(request.get("data") or request.get("body") or request.get("image") or b"")


def parse_params(fields: dict[str, str], categories: list[str]) -> Params:
    params = Params()
    raw_classes = (fields.get("classes") or "").strip()
    if raw_classes:
        ids = []
        for item in raw_classes.split(","):
            name = item.strip()
            if name.isascii() and name.isdigit() and int(name) < len(categories):
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


def working_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(h, w) of the model's input: the short side at ``short_side``, as torchvision's resize computes it."""
    short, long = sorted((width, height))
    new_long = int(short_side * long / short)
    return (new_long, short_side) if width <= height else (short_side, new_long)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header read, refusing pixel bombs and empty images before any pixel is decoded."""
    if not data:
        raise ImageError("invalid_image", "empty image")
    try:
        with warnings.catch_warnings():
            # Our own limit below is lower than PIL's; its warning on the way there is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError("too_many_pixels", f"image is over the limit of {max_pixels} pixels") from exc
    except Exception as exc:  # any, as in decode: this image fails, not its batch
        raise ImageError("invalid_image", "cannot identify image file") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError("too_many_pixels", f"{width}x{height} is over the limit of {max_pixels} pixels")
    if width < 1 or height < 1:
        raise ImageError("invalid_image", f"image has no pixels ({width}x{height})")
    return image


def orientation(image: Image.Image) -> int:
    return int(image.getexif().get(EXIF_ORIENTATION, 1))


@dataclass
class Decoded:
    """An image decoded upright in RGB."""

    image: Image.Image
    size: tuple[int, int]  # its own upright (width, height)


def decode(data: bytes, max_pixels: int) -> Decoded:
    """``data`` decoded on the CPU, upright, in RGB."""
    image = open_image(data, max_pixels)
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # a copy otherwise, even when upright
        return Decoded(to_rgb(image), image.size)
    except Exception as exc:
        # Any exception: PIL's decoders and plugins raise more than OSError and ValueError on hostile bytes
        # (struct.error, IndexError, a plugin's own bug), and an exception out of the handler fails every
        # request of the batch, other tenants' too. MemoryError included: it is this image's size.
        raise ImageError("invalid_image", f"cannot decode image: {type(exc).__name__}: {exc}") from exc


def resize(decoded: Decoded, short_side: int) -> Picture:
    """The picture the model sees: resized as torchvision's transforms do (PIL's bilinear, antialiased)."""
    height, width = working_size(*decoded.size, short_side)
    image = decoded.image
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return Picture(decoded.size, torch.from_numpy(np.array(image)))  # writable: torch warns otherwise


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


# On a CUDA device ------------------------------------------------------------------------------------


def device_decodable(image: Image.Image) -> bool:
    """Whether nvJPEG can decode it: a baseline or progressive JPEG in YCbCr or greyscale (CMYK and the
    rest go to the CPU)."""
    return image.format == "JPEG" and image.mode in ("RGB", "L")


def orient(pixels: torch.Tensor, exif_orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a tensor (channels x h x w), as PIL's ``exif_transpose`` does: nvJPEG
    leaves it to the caller."""
    if exif_orientation in (5, 7):  # across a diagonal: transposed, the anti-diagonal also turned
        pixels = pixels.transpose(1, 2)
        return pixels.flip(1, 2) if exif_orientation == 7 else pixels
    turns = {3: 2, 6: -1, 8: 1}.get(exif_orientation)
    if turns is not None:
        return torch.rot90(pixels, turns, dims=(1, 2))
    flips = {2: (2,), 4: (1,)}.get(exif_orientation)
    return pixels.flip(flips) if flips else pixels


def device_pictures(
    images: list[Image.Image], payloads: list[bytes], device: torch.device, short_side: int
) -> list[Picture]:
    """JPEGs (their headers read, ``device_decodable``) decoded in one batch on ``device``, turned upright
    and resized there. The resize is torch's antialiased bilinear, not PIL's: a pixel may differ from the
    CPU's by a level or two."""
    import torchvision.io

    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in payloads]
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs for torchcodec, which has no batched JPEG decoder.
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB, device=device)
    pictures = []
    for image, pixels in zip(images, decoded, strict=True):
        upright = orient(pixels, orientation(image))
        height, width = working_size(upright.shape[2], upright.shape[1], short_side)
        resized = torch.nn.functional.interpolate(
            upright[None].float(), (height, width), mode="bilinear", align_corners=False, antialias=True
        )
        pixels_hwc = resized[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
        pictures.append(Picture((upright.shape[2], upright.shape[1]), pixels_hwc))
    return pictures
