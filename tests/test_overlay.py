"""The overlay a worker draws for a job that asks for it, in-process."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from gateway.worker.overlay import BAND_ROWS, draw_overlay
from tests.harness.images import encode, scene


def test_the_overlay_blends_class_colours_over_the_image_and_leaves_background() -> None:
    width, height = 97, 2 * BAND_ROWS + 31  # over several bands, the last one short
    labels = np.zeros((height, width), np.uint8)
    labels[10:400, 5:60] = 8
    labels[700:, 50:] = 15
    colours = [(12 * i % 256, (255 - 12 * i) % 256, (40 + 9 * i) % 256) for i in range(256)]
    mask = Image.fromarray(labels, "P")
    mask.putpalette([c for colour in colours for c in colour])
    image = scene(width, height)
    drawn = Image.open(io.BytesIO(draw_overlay(encode(image, "PNG"), encode(mask, "PNG"))))
    assert drawn.format == "PNG" and drawn.size == (width, height)
    original, painted = np.asarray(image, np.int16), np.asarray(drawn.convert("RGB"), np.int16)
    palette = np.array(colours, np.int16)
    assert (painted[labels == 0] == original[labels == 0]).all()
    expected = (original + palette[labels]) / 2
    assert np.abs(painted[labels != 0] - expected[labels != 0]).max() <= 1


def test_the_overlay_is_drawn_on_the_upright_image() -> None:
    """A JPEG whose EXIF says "rotate 90°" has its mask at the upright size; the overlay is upright too."""
    sideways = scene(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to view
    data = encode(sideways, "JPEG", exif=exif.tobytes())
    mask = Image.new("P", (30, 40))
    assert Image.open(io.BytesIO(draw_overlay(data, encode(mask, "PNG")))).size == (30, 40)
