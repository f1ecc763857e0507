"""Pictures made in the test, so that no image file is committed and every size is a parameter."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw


def scene(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    """A synthetic picture with large shapes, so masks have several regions."""
    image = Image.new("RGB", (width, height), (30 + seed * 40 % 200, 120, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.15, height * 0.2, width * 0.45, height * 0.85), fill=(250, 200, 10))
    draw.rectangle((width * 0.55, height * 0.1, width * 0.95, height * 0.6), fill=(20, 20, 20))
    draw.polygon([(0, height), (width, height * 0.6), (width, height)], fill=(200, 30, 30))
    return image


def textured(width: int = 640, height: int = 480) -> Image.Image:
    """A photo-like picture: colour gradients with noise; under random weights its masks have many
    borders, as real photos have more than ``scene``'s."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 37) * np.cos(y / 23)]
    pixels = np.stack(channels, axis=2) + rng.normal(0, 25, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()
