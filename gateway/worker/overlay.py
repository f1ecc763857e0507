"""The overlay a job may ask for: its mask's colours blended over its image, for people to look at.

Drawn once, by the worker, when the job succeeds (never per request), and stored beside the mask. It is drawn
in bands of rows, so a 25 MP image costs its decoded pixels and its mask, not several full-size copies more.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

BAND_ROWS = 512
ALPHA = 0.5


def memory_needed(width: int, height: int) -> int:
    """What drawing an overlay of this size holds at most: the decoded RGB image, the mask, and the PNG."""
    return 8 * width * height


def draw_overlay(image_data: bytes, mask_png: bytes) -> bytes:
    """The overlay as PNG: class colours blended over the upright image; background (class 0) left as is.
    Blocking and CPU-bound: run it in a thread."""
    with Image.open(io.BytesIO(mask_png)) as mask:
        mask.load()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the gateway bounded its pixels
        with Image.open(io.BytesIO(image_data)) as raw:
            raw.load()
            image = (ImageOps.exif_transpose(raw) or raw).convert("RGB")
    if image.size != mask.size:  # the mask is made at the upright image's size; this only guards
        image = image.resize(mask.size)
    width, height = mask.size
    for top in range(0, height, BAND_ROWS):
        box = (0, top, width, min(height, top + BAND_ROWS))
        part, labels = image.crop(box), mask.crop(box)
        # The palette indices are the class ids: paint where they are not background.
        painted = Image.frombytes("L", labels.size, labels.tobytes()).point(lambda v: 255 if v else 0)
        part.paste(Image.blend(part, labels.convert("RGB"), ALPHA), mask=painted)
        image.paste(part, box)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)  # for looking at: fast, a little larger
    return out.getvalue()
