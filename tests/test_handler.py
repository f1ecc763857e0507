"""The TorchServe handler on its own: a small context object and a random model in a temp dir."""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import gateway.handlers.deeplabv3.handler as handler_entry
from gateway.app.params import VOC_CLASSES
from gateway.handlers.deeplabv3 import catalog, images
from gateway.handlers.deeplabv3.engines import build_model
from gateway.handlers.deeplabv3.handler import CpuMs, DeepLabV3Handler
from gateway.ops.archive import calibrate_batch_norm
from gateway.torchserve import read_prediction
from tests.harness.handler import (
    REFERENCE_TRANSFORMS,
    Context,
    full_size_probabilities,
    head_of,
    mask_of,
    run,
)
from tests.harness.images import encode, scene


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(3)
    model = calibrate_batch_norm(build_model("mobilenet_v3_large"))
    torch.save(model.state_dict(), directory / "weights.pth")
    return directory


@pytest.fixture(scope="module")
def handler(model_dir: Path) -> Any:
    service = DeepLabV3Handler()
    service.initialize(Context(model_dir))
    return service


def reference_mask(handler: Any, image: Image.Image) -> np.ndarray:
    """The arg-max of the full-size reference, on the eager model of a ``torch`` engine handler."""
    probabilities = full_size_probabilities(handler.engine.model, REFERENCE_TRANSFORMS, image)
    return probabilities.argmax(1)[0].to(torch.uint8).numpy()


def test_mask_matches_torchvision_at_original_size(handler: Any) -> None:
    image = scene(333, 251)
    [answer], context = run(handler, [{"body": encode(image, "PNG")}])
    assert context.status == {} and context.content_types == {0: catalog.MASK_CONTENT_TYPE}
    mask, head = mask_of(answer), head_of(answer)
    assert mask.shape == (251, 333)
    assert head["width"] == 333 and head["height"] == 251
    expected = reference_mask(handler, image)
    # The same model and the same interpolations: only float rounding at a near-tie could flip a pixel.
    assert np.mean(mask == expected) >= 0.9999
    assert len(np.unique(mask)) > 1, "a random model should still give several classes on this scene"
    counts = {c["id"]: c["pixels"] for c in head["classes"]}
    assert counts == {int(k): int(v) for k, v in zip(*np.unique(mask, return_counts=True), strict=True)}
    assert sum(c["fraction"] for c in head["classes"]) == pytest.approx(1.0, abs=1e-4)
    assert all(c["name"] == VOC_CLASSES[c["id"]] for c in head["classes"])


def test_the_gateway_reads_the_answer_as_the_handler_writes_it(handler: Any) -> None:
    [answer], _ = run(handler, [{"body": encode(scene(160, 120))}])
    prediction = read_prediction(answer)
    assert (prediction.width, prediction.height) == (160, 120)
    assert prediction.classes == head_of(answer)["classes"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(prediction.mask_png))), mask_of(answer))
    assert prediction.timings_ms["batch_size"] == 1


def test_each_stage_reports_the_cpu_it_took(handler: Any) -> None:
    """Every stage is timed on the process's CPU clock, and together they are no more than the CPU the
    whole batch took (they cover most of it: the handler's own bookkeeping is the rest)."""
    bodies = [encode(scene(640, 480, seed=i), "JPEG") for i in range(2)]
    clock = time.process_time()
    answers, _ = run(handler, [{"body": body} for body in bodies], [{"X-Threshold": "0.3"}] * 2)
    spent_ms = (time.process_time() - clock) * 1000
    stages = [head_of(answer)["cpu_ms"] for answer in answers]
    assert all(set(s) == set(CpuMs.__dataclass_fields__) for s in stages)
    for name in ("decode", "resize", "normalise", "forward", "mask", "png"):
        assert all(s[name] > 0 for s in stages), name
    charged = sum(sum(s.values()) for s in stages)
    assert 0.5 * spent_ms < charged <= spent_ms + 1, (charged, spent_ms)


def test_a_batch_agrees_with_each_image_alone(handler: Any) -> None:
    """Batched floats differ from single ones in the last bits (other kernels, other summation order), so a
    pixel whose top two classes are nearly tied may flip. What holds: the masks agree on at least 99.99% of
    pixels, and exactly wherever the top-two margin is clear."""
    images = [scene(320, 240, seed=i) for i in range(3)] + [scene(200, 300, seed=5)]
    alone = [mask_of(run(handler, [{"body": encode(im)}])[0][0]) for im in images]
    together, context = run(handler, [{"body": encode(im)} for im in images])
    assert context.status == {}
    assert [head_of(a)["timings_ms"]["batch_size"] for a in together] == [
        3,
        3,
        3,
        1,
    ]  # equal shapes share a pass
    for single, batched in zip(alone, together, strict=True):
        assert np.mean(single == mask_of(batched)) >= 0.9999

    tensors = torch.stack([REFERENCE_TRANSFORMS(im) for im in images[:3]])
    with torch.inference_mode():
        batch_logits = handler.engine.model(tensors)["out"]
        single_logits = torch.cat([handler.engine.model(t[None])["out"] for t in tensors])
    top_two = single_logits.topk(2, dim=1).values
    clear = (top_two[:, 0] - top_two[:, 1]) > 1e-3
    assert clear.float().mean() > 0.9, "the margin test must cover most pixels to mean anything"
    batch_labels, single_labels = batch_logits.argmax(1), single_logits.argmax(1)
    assert torch.equal(batch_labels[clear], single_labels[clear])
    assert (batch_labels == single_labels).float().mean() >= 0.9999


def test_bad_images_fail_alone(handler: Any) -> None:
    good = encode(scene(64, 48))
    truncated = good[: len(good) // 2]
    requests = [{"body": good}, {"body": b"not an image"}, {"body": truncated}, {"body": b""}, {"body": good}]
    answers, context = run(handler, requests)
    assert isinstance(answers[0], bytes) and isinstance(answers[4], bytes)
    for idx in (1, 2, 3):
        assert context.status[idx][0] == 422
        assert answers[idx]["error"]["code"] == "invalid_image"
    assert set(context.status) == {1, 2, 3}


class FaultyDecoder(ImageFile.ImageFile):
    """A real PIL plugin whose decoder raises what PIL's own never raise (a plugin's bug), as hostile bytes
    can make a decoder do."""

    format = "FAULTY"
    failure: type[Exception] = RuntimeError

    def _open(self) -> None:
        self._size, self._mode = (8, 8), "RGB"

    def load(self) -> Any:
        raise self.failure("the decoder fell over")


@pytest.mark.parametrize("failure", [ZeroDivisionError, KeyError, RuntimeError, MemoryError])
def test_any_decoder_error_fails_only_its_image(
    handler: Any, monkeypatch: pytest.MonkeyPatch, failure: type[Exception]
) -> None:
    Image.init()  # PIL's own plugins first, so that the registry restored after the test holds them
    monkeypatch.setattr(FaultyDecoder, "failure", failure)
    monkeypatch.setitem(Image.OPEN, "FAULTY", (FaultyDecoder, lambda prefix: prefix.startswith(b"FAULTY")))
    monkeypatch.setattr(Image, "ID", [*Image.ID, "FAULTY"])
    good = encode(scene(64, 48))
    answers, context = run(handler, [{"body": good}, {"body": b"FAULTY" + bytes(64)}, {"body": good}])
    assert set(context.status) == {1} and context.status[1][0] == 422
    assert answers[1]["error"]["code"] == "invalid_image"
    assert failure.__name__ in answers[1]["error"]["message"]
    assert mask_of(answers[0]).shape == mask_of(answers[2]).shape == (48, 64)


def test_device_decoding_batches_jpegs_and_falls_back_to_the_pool(
    handler: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA the handler decodes a batch's JPEGs in one call on the device and the rest in a thread
    pool; a JPEG that fails that call sends the call's JPEGs to the pool, where only it fails. The same
    code runs here with the CPU as the device (no GPU has run it yet)."""
    calls: list[int] = []
    on_device = handler_entry.device_pictures

    def counted(headers: Any, payloads: list[bytes], device: Any, short_side: int) -> Any:
        calls.append(len(payloads))
        return on_device(headers, payloads, device, short_side)

    monkeypatch.setattr(handler_entry, "device_pictures", counted)
    with ThreadPoolExecutor(2) as pool:
        monkeypatch.setattr(handler, "pool", pool)
        jpeg, png = encode(scene(64, 48), "JPEG"), encode(scene(64, 48), "PNG")
        items = [handler_entry.Item(payload=body) for body in (jpeg, png, jpeg)]
        handler._decode_on_device(items)
        assert calls == [2], "the two JPEGs in one call, the PNG in the pool"
        assert all(item.error is None and item.picture is not None for item in items)
        assert all(item.picture.size == (64, 48) for item in items)
        broken = [handler_entry.Item(payload=body) for body in (jpeg, jpeg[: len(jpeg) // 2], png)]
        handler._decode_on_device(broken)
    assert calls == [2, 2]
    assert broken[0].picture is not None and broken[2].picture is not None
    assert broken[1].picture is None and broken[1].error is not None
    assert broken[1].error.code == "invalid_image"


def test_pixel_bomb_is_refused_before_decoding(handler: Any) -> None:
    bomb = encode(Image.new("L", (30000, 30000)), "PNG", optimize=True)
    assert len(bomb) < 2_000_000
    answers, context = run(handler, [{"body": bomb}])
    assert context.status[0][0] == 422
    assert answers[0]["error"]["code"] == "too_many_pixels"


@pytest.mark.parametrize(
    "make",
    [
        lambda: scene(90, 60).convert("RGBA"),
        lambda: scene(90, 60).convert("LA"),
        lambda: scene(90, 60).convert("L"),
        lambda: scene(90, 60).convert("P"),
        lambda: scene(90, 60).convert("CMYK"),
        lambda: Image.fromarray(np.asarray(scene(90, 60).convert("L"), dtype=np.uint16) * 257),
    ],
    ids=["RGBA", "LA", "L", "P", "CMYK", "I;16"],
)
def test_any_mode_is_converted(handler: Any, make: Any) -> None:
    image = make()
    fmt = "TIFF" if image.mode in ("CMYK", "I;16", "LA") else "PNG"
    [answer], context = run(handler, [{"body": encode(image, fmt)}])
    assert context.status == {}, answer
    assert mask_of(answer).shape == (60, 90)


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    grey = np.full((4, 4), 40000, dtype=np.uint16)
    rgb = images.to_rgb(Image.fromarray(grey))
    assert rgb.mode == "RGB"
    assert np.asarray(rgb)[0, 0, 0] == round(40000 / 257)


def test_exif_orientation_is_honoured(handler: Any) -> None:
    upright = scene(120, 80)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 80 wide, 120 high as stored
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90° clockwise to view: what a phone writes for this
    [answer], _ = run(handler, [{"body": encode(stored, "JPEG", exif=exif.tobytes())}])
    assert (head_of(answer)["width"], head_of(answer)["height"]) == (120, 80)
    assert mask_of(answer).shape == (80, 120)


def test_classes_and_threshold(handler: Any) -> None:
    body = encode(scene(160, 120))
    [full], _ = run(handler, [{"body": body}])
    present = [c["id"] for c in head_of(full)["classes"]]
    keep = present[-1]
    [only], _ = run(handler, [{"body": body}], [{"X-Classes": str(keep)}])
    mask, full_mask = mask_of(only), mask_of(full)
    assert set(np.unique(mask)) <= {0, keep}
    assert np.array_equal(mask == keep, full_mask == keep)
    [named], _ = run(handler, [{"body": body, "classes": VOC_CLASSES[keep].encode()}])
    assert np.array_equal(mask_of(named), mask)
    [zero], _ = run(handler, [{"body": body}], [{"X-Threshold": "0.0"}])
    assert np.array_equal(mask_of(zero), full_mask)


def test_threshold_blanks_unsure_pixels(handler: Any) -> None:
    image = scene(160, 120)
    confidence, labels = full_size_probabilities(handler.engine.model, REFERENCE_TRANSFORMS, image).max(1)
    threshold = float(np.quantile(confidence.numpy(), 0.3))
    assert 0 < threshold < 1
    expected = torch.where(confidence[0] < threshold, 0, labels[0]).to(torch.uint8).numpy()
    [answer], _ = run(handler, [{"body": encode(image, "PNG")}], [{"x-threshold": repr(threshold)}])
    assert np.mean(mask_of(answer) == expected) >= 0.9999
    assert (expected == 0).sum() > (reference_mask(handler, image) == 0).sum()


@pytest.mark.parametrize("headers", [{"X-Threshold": "nan"}, {"X-Threshold": "2"}, {"X-Classes": "unicorn"}])
def test_bad_parameters_are_errors(handler: Any, headers: dict[str, str]) -> None:
    answers, context = run(handler, [{"body": encode(scene(32, 32))}], [headers])
    assert context.status[0][0] == 422
    assert answers[0]["error"]["code"] == "invalid_parameter"


def test_describe_labels_random_weights(handler: Any) -> None:

    described = json.loads(handler.describe_handle())
    assert described["random_weights"] is True
    assert described["device"] == "cpu"
    # A model-config without an engine (archives built before engines) runs eager torch, in fp32.
    assert (described["engine"], described["precision"]) == ("torch", "fp32")
    assert described["classes"] == list(VOC_CLASSES)


def test_importing_the_handler_builds_nothing() -> None:
    assert handler_entry._service is None


def test_the_archived_package_imports_as_torchserve_imports_it(tmp_path: Path) -> None:
    """TorchServe imports the handler by its file name with the model's directory on the path
    (ts/model_loader.py); the package beside it must import by its relative imports alone, not from
    segserve's installed copy."""
    import subprocess
    import sys

    from gateway.ops.archive import ENTRY_MODULE, stage_handler

    entry, package = stage_handler(tmp_path)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    entry.rename(model_dir / entry.name)
    (package / "deeplabv3").rename(model_dir / "deeplabv3")
    probe = (
        "import sys, importlib; sys.path.insert(0, sys.argv[1]); "
        f"entry = importlib.import_module({ENTRY_MODULE!r}); "
        "print(entry.handle.__module__, 'gateway' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(model_dir)],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert result.stdout.split() == ["deeplabv3.handler", "False"], result.stderr
