"""A request's image to the pixels the model sees: as torchvision's transforms make them, upright, and the
CUDA path's own steps, run here on the CPU."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from gateway.handlers.deeplabv3 import images
from gateway.handlers.deeplabv3.engines import published_weights
from tests.harness.images import encode, scene

SHORT_SIDE = 520


def reference_pixels(body: bytes) -> np.ndarray:
    """torchvision's way: the whole image decoded, upright, resized by the weights' own transforms."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(body)).convert("RGB"))
    resize = published_weights("mobilenet_v3_large").transforms().resize_size
    from torchvision.transforms import functional

    resized = functional.resize(image, resize, antialias=True)
    return np.asarray(resized)


def test_the_working_size_is_torchvisions() -> None:
    for width, height in ((640, 480), (480, 640), (333, 251), (97, 61), (6124, 4082), (1, 7)):
        body = encode(Image.new("RGB", (width, height)), "PNG")
        assert images.working_size(width, height, SHORT_SIDE) == reference_pixels(body).shape[:2]


@pytest.mark.parametrize("size", [(640, 480), (2640, 1980)], ids=["smaller", "larger"])
def test_a_jpeg_decodes_whole_and_resizes_as_torchvision_does(size: tuple[int, int]) -> None:
    """Whole, also when much larger than the model's input: a JPEG decoded at a DCT scale gave the model
    other pixels, and masks that agreed with the reference's on only 95% of pixels (random weights)."""
    body = encode(scene(*size), "JPEG", quality=90)
    decoded = images.decode(body, 10**8)
    assert decoded.image.size == size
    picture = images.resize(decoded, SHORT_SIDE)
    assert picture.size == size
    assert np.array_equal(picture.pixels.numpy(), reference_pixels(body))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_turned_jpeg_is_decoded_upright(orientation: int) -> None:
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = orientation
    body = encode(scene(1600, 1200, seed=1), "JPEG", quality=90, exif=exif.tobytes())
    picture = images.resize(images.decode(body, 10**8), SHORT_SIDE)
    assert picture.size == ((1200, 1600) if orientation >= 5 else (1600, 1200))
    assert np.array_equal(picture.pixels.numpy(), reference_pixels(body))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_a_tensor_as_pil_turns_the_image(orientation: int) -> None:
    """nvJPEG does not apply EXIF orientations: ``orient`` does, on the decoded tensor."""
    image = Image.fromarray(np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8))
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    turned = images.orient(tensor, orientation).permute(1, 2, 0).numpy()
    expected = image if orientation == 1 else image.transpose(images.ORIENTATIONS[orientation])
    assert np.array_equal(turned, np.asarray(expected))


def test_only_jpegs_in_rgb_or_grey_go_to_the_device() -> None:
    def header(image: Image.Image, fmt: str) -> Image.Image:
        return images.open_image(encode(image, fmt), 10**8)

    assert images.device_decodable(header(scene(32, 24), "JPEG"))
    assert images.device_decodable(header(scene(32, 24).convert("L"), "JPEG"))
    assert not images.device_decodable(header(scene(32, 24).convert("CMYK"), "JPEG"))
    assert not images.device_decodable(header(scene(32, 24), "PNG"))


def test_the_device_path_run_on_the_cpu_matches_the_cpu_path() -> None:
    """``device_pictures`` batched on the CPU (torchvision decodes there too): upright, at the working
    size, within a level or two of PIL's resize. This is the CUDA path's logic; nvJPEG itself has not
    run here, nor on any GPU of this project yet."""
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6
    bodies = [
        encode(scene(640, 480), "JPEG", quality=90),
        encode(scene(1600, 1200, seed=2), "JPEG", quality=90, exif=exif.tobytes()),
        encode(scene(320, 200, seed=4).convert("L"), "JPEG", quality=90),
    ]
    headers = [images.open_image(body, 10**8) for body in bodies]
    pictures = images.device_pictures(headers, bodies, torch.device("cpu"), SHORT_SIDE)
    for body, picture in zip(bodies, pictures, strict=True):
        on_cpu = images.resize(images.decode(body, 10**8), SHORT_SIDE)
        assert picture.size == on_cpu.size and picture.pixels.shape == on_cpu.pixels.shape
        assert picture.pixels.dtype == torch.uint8
        difference = (picture.pixels.int() - on_cpu.pixels.int()).abs().float()
        assert difference.mean() < 2.5, difference.mean()


@pytest.mark.parametrize("digit", ["²", "٣", "１"])
def test_a_class_id_is_ascii_digits(digit: str) -> None:
    """``str.isdigit`` is true of superscripts, which ``int`` refuses, and of other scripts' digits, which
    it reads: a class id is ASCII digits only, and anything else an unknown class, never a crash."""
    categories = ["__background__", "cat", "dog", "bird"]
    assert images.parse_params({"classes": "3"}, categories).classes == [3]
    with pytest.raises(images.ImageError, match="unknown class"):
        images.parse_params({"classes": digit}, categories)
