"""Engines, full-size masks, mixed-size batches and memory: the handler in this process, on a random model
exported once per session, compared with torchvision's eager model."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import openvino
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from gateway.handlers.deeplabv3 import catalog, engines, images, masks
from gateway.handlers.deeplabv3.catalog import ENGINES, GRAPH_ENGINES
from gateway.ops.archive import (
    BuildError,
    ServingConfig,
    build_archive,
    calibrate_batch_norm,
    export_onnx,
    model_config,
)
from tests.harness.handler import (
    REFERENCE_TRANSFORMS,
    full_size_probabilities,
    head_of,
    make_handler,
    mask_of,
    run,
)
from tests.harness.images import encode, scene, textured
from tests.harness.processes import BIN, ROOT
from tests.harness.servers import SEED

LARGEST = (6124, 4082)  # 24,998,168 pixels: the largest image DEFAULT_MAX_PIXELS allows, near 3:2


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One random model, saved as each engine loads it: weights.pth (torch) and model.onnx (onnxruntime)."""
    directory = tmp_path_factory.mktemp("exported")
    torch.manual_seed(SEED)
    model = calibrate_batch_norm(engines.build_model("mobilenet_v3_large"))
    torch.save(model.state_dict(), directory / "weights.pth")
    export_onnx("mobilenet_v3_large", directory / "weights.pth", directory / "model.onnx")
    return directory


@pytest.fixture(scope="module")
def handlers(exported_model: Path) -> dict[str, Any]:
    return {name: make_handler(exported_model, name) for name in ENGINES}


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.mean(a == b))


@pytest.mark.parametrize("engine", GRAPH_ENGINES)
@pytest.mark.parametrize(
    ("size", "mode"),
    [((640, 480), "RGB"), ((333, 251), "L"), ((200, 300), "RGBA"), ((97, 61), "P")],
    ids=["640x480-RGB", "333x251-L", "200x300-RGBA", "97x61-P"],
)
def test_exported_graph_masks_agree_with_eager_torch(
    handlers: dict[str, Any], engine: str, size: tuple[int, int], mode: str
) -> None:
    """One exported graph serves every shape (dynamic axes). It stops at the model's stride, before the
    upsampling that the handler does, and the masks are eager torch's."""
    body = encode(scene(*size).convert(mode), "PNG")
    pixels = images.resize(images.decode(body, 10**8), 520).pixels[None]
    fast_engine, eager_engine = handlers[engine].engine, handlers["torch"].engine
    exported, eager = fast_engine(fast_engine.prepare(pixels)), eager_engine(eager_engine.prepare(pixels))
    assert eager.shape == (1, 21, *pixels.shape[1:3])
    assert exported.shape[:2] == (1, 21) and exported.shape[2] * 8 <= pixels.shape[1]
    [fast], _ = run(handlers[engine], [{"body": body}])
    [reference], _ = run(handlers["torch"], [{"body": body}])
    assert agreement(mask_of(fast), mask_of(reference)) >= 0.999
    assert len(np.unique(mask_of(reference))) > 1, "a random model should still give several classes here"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("size", [(640, 480), (1920, 1080)], ids=["640x480", "1920x1080"])
def test_full_size_masks_agree_with_the_bilinear_reference(
    handlers: dict[str, Any], engine: str, size: tuple[int, int]
) -> None:
    """The reference: the weights' transforms on the whole decoded photo, the eager model, its logits
    interpolated bilinearly to the photo's size, then arg-max."""
    body = encode(scene(*size, seed=1), "JPEG", quality=90)
    [answer], context = run(handlers[engine], [{"body": body}])
    assert context.status == {}
    assert (head_of(answer)["width"], head_of(answer)["height"]) == size
    eager = handlers["torch"].engine.model
    expected = full_size_probabilities(eager, REFERENCE_TRANSFORMS, Image.open(io.BytesIO(body)))
    assert agreement(mask_of(answer), expected.argmax(1)[0].numpy()) >= 0.995


@pytest.mark.parametrize("photo_like", [False, True], ids=["flat", "textured"])
@pytest.mark.parametrize("blanked", [0.1, 0.5, 0.9])
def test_a_threshold_agrees_with_the_full_size_softmax(
    handlers: dict[str, Any], blanked: float, photo_like: bool
) -> None:
    """The reference: every pixel's probabilities at the photo's size (the weights' transforms, the eager
    model, its logits interpolated bilinearly, softmax), blanked below the threshold: here the one that
    blanks a tenth, half or nine tenths of the pixels. The handler decides most pixels from the logits at
    the model's stride; on both pictures it agrees on >= 99.9%."""
    image = textured(640, 480) if photo_like else scene(640, 480, seed=2)
    body = encode(image, "JPEG", quality=90)
    eager = handlers["torch"].engine.model
    reference = Image.open(io.BytesIO(body))
    confidence, labels = full_size_probabilities(eager, REFERENCE_TRANSFORMS, reference).max(1)
    threshold = float(np.quantile(confidence.numpy(), blanked))
    expected = torch.where(confidence[0] < threshold, 0, labels[0]).numpy()
    [answer], _ = run(handlers["openvino"], [{"body": body}], [{"X-Threshold": repr(threshold)}])
    assert agreement(mask_of(answer), expected) >= 0.999


def test_describe_and_session_follow_the_archive(exported_model: Path) -> None:
    service = make_handler(exported_model, "onnxruntime", intra_op_threads=1, allow_spinning=False, workers=2)
    described = json.loads(service.describe_handle())
    assert (described["engine"], described["precision"], described["device"]) == (
        "onnxruntime",
        "fp32",
        "cpu",
    )
    assert described["intra_op_threads"] == 1
    options = service.engine.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(ValueError, match="precision"):
        make_handler(exported_model, "onnxruntime", precision="int8")


def test_bf16_is_served_only_where_asked_and_says_so(exported_model: Path) -> None:
    """An opt-in on OpenVINO, labelled as such; its masks differ from fp32's only where classes are close.
    On these random weights (many near-ties) 93-99% of pixels agreed with eager torch (docs/performance.md): bf16 must
    change the mask, and keep at least 90% of it."""
    for engine in ("onnxruntime", "torch"):
        with pytest.raises(ValueError, match="'bf16' is served by openvino"):
            make_handler(exported_model, engine, precision="bf16")
    if not engines.cpu_computes_in_bf16():
        with pytest.raises(ValueError, match="needs a CPU that computes in bf16"):
            make_handler(exported_model, "openvino", precision="bf16")
        return
    service = make_handler(exported_model, "openvino", precision="bf16")
    described = json.loads(service.describe_handle())
    assert (described["engine"], described["precision"]) == ("openvino", "bf16")
    compiled = service.engine.session.get_compiled_model()
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.bf16
    fp32 = make_handler(exported_model, "openvino")
    assert (
        fp32.engine.session.get_compiled_model().get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32
    )
    body = encode(scene(640, 480, seed=1), "JPEG", quality=90)
    [answer], _ = run(service, [{"body": body}])
    [reference], _ = run(fp32, [{"body": body}])
    assert 0.9 <= agreement(mask_of(answer), mask_of(reference)) < 1.0


def test_fp16_is_served_only_by_torch_on_cuda_and_says_so(exported_model: Path) -> None:
    """fp16 is an opt-in for eager torch on a CUDA GPU. This machine has none: the refusal is what runs
    here; the half-precision pass itself has not run on a GPU."""
    for engine in GRAPH_ENGINES:
        with pytest.raises(ValueError, match="'fp16' is served by torch"):
            make_handler(exported_model, engine, precision="fp16")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CPU's refusal cannot be seen here")
    with pytest.raises(ValueError, match="runs on a CUDA GPU; this worker has none"):
        make_handler(exported_model, "torch", precision="fp16")
    with pytest.raises(BuildError, match="runs on a CUDA GPU"):
        build_archive(
            random_seed=0, serving=ServingConfig(engine="torch", precision="fp16"), store=Path("/nonexistent")
        )


def test_the_torch_engine_narrows_to_fp16_only_after_normalising(exported_model: Path) -> None:
    """The dtypes of the fp16 path, on the CPU (torch runs half-precision convolutions slowly there, but
    runs them): the pixels are normalised in float32 and only then narrowed, and the logits come back as
    float32 for the masks. A small input: at the model's own 520 rows, CPU convolutions in half precision
    took this test 48 s."""
    reference = make_handler(exported_model, "torch").engine
    half = engines.TorchEngine(
        "mobilenet_v3_large",
        str(exported_model / "weights.pth"),
        torch.device("cpu"),
        reference.normalisation,
        precision="fp16",
    )
    pixels = images.resize(images.decode(encode(scene(192, 128)), 10**8), 128).pixels[None]
    prepared = half.prepare(pixels)
    assert prepared.dtype == torch.float16
    assert torch.allclose(prepared.float(), reference.prepare(pixels), atol=2e-3)
    assert next(half.model.parameters()).dtype == torch.float16
    logits = half(prepared)
    assert logits.dtype == torch.float32
    assert agreement(logits.argmax(1).numpy(), reference(reference.prepare(pixels)).argmax(1).numpy()) > 0.9


def session_threads(engine: str, session: Any) -> int:
    if engine == "openvino":
        return int(session.get_compiled_model().get_property("INFERENCE_NUM_THREADS"))
    return int(session.get_session_options().intra_op_num_threads)


@pytest.mark.parametrize("engine_name", GRAPH_ENGINES)
def test_workers_sharing_the_cores_narrow_while_another_computes(
    exported_model: Path, engine_name: str
) -> None:
    """2 workers x 2 threads on 2 cores: a lone pass has both cores, a pass beside a busy worker one."""
    cores = os.cpu_count() or 1
    service = make_handler(exported_model, engine_name, workers=cores, intra_op_threads=cores)
    engine = service.engine
    if cores == 1:
        assert engine.peers is None, "one core: nothing to share"
        return
    assert service.narrow_threads == 1 and engine.narrow is not None
    assert session_threads(engine_name, engine.session) == cores
    assert session_threads(engine_name, engine.narrow) == 1
    used: list[Any] = []
    engine._run = lambda session, batch: used.append(session) or torch.zeros(1)
    other = engines.Peers(engine.peers.directory)  # another worker of the model
    with engine.peers.busy():  # as the handler marks itself for each batch
        engine(torch.zeros(1, 3, 8, 8))
        with other.busy():
            engine(torch.zeros(1, 3, 8, 8))
    assert used == [engine.session, engine.narrow]


def test_peers_see_each_other_busy_and_forget_the_dead(tmp_path: Path) -> None:
    one, two = engines.Peers(str(tmp_path)), engines.Peers(str(tmp_path))
    assert one.busy_others() == two.busy_others() == 0
    with one.busy():
        assert two.busy_others() == 1 and one.busy_others() == 0
    assert two.busy_others() == 0
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f"{dead.stdout.strip()}-1"
    stale.write_text("")
    assert one.busy_others() == 0 and not stale.exists()


# Full-size masks, in bands -------------------------------------------------------------------------------


def reference_labels(logits: torch.Tensor, height: int, width: int, threshold: float = 0.0) -> np.ndarray:
    full = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)
    confidence, labels = torch.softmax(full, dim=1).max(dim=1)
    if threshold > 0:
        labels = torch.where(confidence < threshold, 0, labels)
    return labels[0].to(torch.uint8).numpy()


@pytest.mark.parametrize(
    ("source", "out"),
    [((13, 17), (50, 37)), ((40, 30), (17, 11)), ((7, 9), (7, 9)), ((1, 5), (3, 8))],
    ids=["up", "down", "same", "one-row"],
)
@pytest.mark.parametrize("threshold", [0.0, 0.12])
def test_banded_masks_equal_the_unbanded_one(
    source: tuple[int, int], out: tuple[int, int], threshold: float
) -> None:
    """Any band height gives the same mask as one band, and that mask is torch's bilinear one."""
    logits = torch.randn(21, *source, generator=torch.Generator().manual_seed(sum(out)))
    whole = masks.full_size_mask(logits, *out, threshold, band_rows=out[0])
    for rows in (1, 2, 3):
        assert np.array_equal(masks.full_size_mask(logits, *out, threshold, band_rows=rows), whole)
    assert np.array_equal(masks.full_size_mask(logits, *out, threshold), whole)
    assert agreement(whole, reference_labels(logits, *out, threshold)) >= 0.999


def test_the_shortcut_for_agreeing_corners_changes_no_pixel() -> None:
    """Without a threshold only pixels between differing source labels are interpolated; asking for every
    pixel (a threshold no probability is below) gives the same mask."""
    generator = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.randn(1, 21, 6, 8, generator=generator), size=(30, 40), mode="bilinear")[0]
    sparse = masks.full_size_mask(smooth, 97, 123, band_rows=5)
    dense = masks.full_size_mask(smooth, 97, 123, threshold=1e-9, band_rows=5)
    assert np.array_equal(sparse, dense)
    assert np.array_equal(sparse, reference_labels(smooth, 97, 123))


def test_class_counts_in_bands() -> None:
    mask = np.random.default_rng(0).integers(0, 21, size=(301, 7), dtype=np.uint8)
    counts = masks.class_counts(mask, 21)
    assert counts.tolist() == np.bincount(mask.ravel(), minlength=21).tolist()


# Mixed sizes in one batch --------------------------------------------------------------------------------


def test_batch_groups_by_shape_or_all_when_padding() -> None:
    shapes = [(3, 520, 693), (3, 520, 693), (3, 693, 520), (3, 520, 693)]
    assert engines.batch_groups(shapes, pad=False) == [[0, 1, 3], [2]]
    assert engines.batch_groups(shapes, pad=True) == [[0, 1, 2, 3]]
    assert engines.batch_groups([], pad=True) == []


def test_padding_and_cropping_give_each_image_its_own_region() -> None:
    sizes = [(4, 6), (7, 3), (5, 5)]
    pictures = [torch.full((h, w, 3), 10 * (i + 1), dtype=torch.uint8) for i, (h, w) in enumerate(sizes)]
    batch = engines.pad_batch(pictures, (124, 116, 104))
    assert batch.shape == (3, 7, 6, 3)
    for index, picture in enumerate(pictures):
        assert torch.equal(batch[index, : picture.shape[0], : picture.shape[1]], picture)
        padding = batch[index].clone()
        padding[: picture.shape[0], : picture.shape[1]] = torch.tensor([124, 116, 104], dtype=torch.uint8)
        assert (padding == torch.tensor([124, 116, 104], dtype=torch.uint8)).all(), "the mean colour pads"
    # Logits of a padded batch: image i is 1 in channel i over its own region, the padding 0. Each image's
    # mask is its own region at its own size, whether the logits are at the input's size or at a stride
    # (upsampled as the model would).
    logits = torch.zeros(3, 3, 7, 6)
    for index, (h, w) in enumerate(sizes):
        logits[index, index, :h, :w] = 1
    for batch_logits in (logits, logits[:, :, ::2, ::2].contiguous()):
        for index, (h, w) in enumerate(sizes):
            mask = masks.full_size_mask(batch_logits[index], 2 * h, 3 * w, batch_size=(7, 6), own_size=(h, w))
            assert mask.shape == (2 * h, 3 * w)
            assert (mask == index).mean() > 0.8 and set(np.unique(mask)) <= {0, index}
    for index, (h, w) in enumerate(sizes):  # at the input's size the crop is exact
        mask = masks.full_size_mask(logits[index], 2 * h, 3 * w, batch_size=(7, 6), own_size=(h, w))
        assert (mask == index).all()


@pytest.mark.parametrize("size", [(520, 693), (37, 23), (9, 16)])
def test_scores_at_a_stride_are_the_models_upsampling(size: tuple[int, int]) -> None:
    """Logits at the model's stride give the mask of upsampling them to the working size first, as the
    whole model does, then to the image's size."""
    generator = torch.Generator().manual_seed(sum(size))
    low = torch.randn(21, (size[0] + 15) // 16, (size[1] + 15) // 16, generator=generator)
    working = F.interpolate(low[None], size=size, mode="bilinear", align_corners=False)[0]
    at_working = masks.full_size_mask(low, *size, batch_size=size)
    assert agreement(at_working, working.argmax(0).to(torch.uint8).numpy()) >= 0.9999
    for out in ((480, 640), (size[0] * 2 + 1, size[1] // 2 + 1)):
        for threshold in (0.0, 0.12):
            mask = masks.full_size_mask(low, *out, threshold, batch_size=size, band_rows=7)
            assert agreement(mask, reference_labels(working, *out, threshold)) >= 0.999


@pytest.mark.parametrize("threshold", [0.0, 0.3])
@pytest.mark.parametrize("out", [(480, 640), (1080, 1920), (251, 333)], ids=["same", "taller", "smaller"])
def test_the_device_path_agrees_with_the_cpu_path(out: tuple[int, int], threshold: float) -> None:
    """On a GPU the maps run as dense matrix products of every pixel's scores. Run here on the CPU, that
    path gives the CPU path's mask (no GPU has run it yet)."""
    low = torch.randn(21, 33, 44, generator=torch.Generator().manual_seed(out[0]))
    cpu = masks.full_size_mask(low, *out, threshold, batch_size=(520, 693))
    dense = masks.full_size_mask(low, *out, threshold, batch_size=(520, 693), dense=True, band_rows=100)
    assert agreement(cpu, dense) >= 0.9999


def test_a_threshold_computes_few_pixels_where_the_scores_are_smooth(monkeypatch: pytest.MonkeyPatch) -> None:
    """What makes a threshold cheap: where the logits vary slowly, runs of pixels are kept or blanked
    from the bounds, and only a thin band near the threshold is computed pixel by pixel."""
    computed: list[int] = []
    pixel_labels = masks.pixel_labels

    def counting(scores: torch.Tensor, log_threshold: float | None) -> torch.Tensor:
        computed.append(scores[0].numel())
        return pixel_labels(scores, log_threshold)

    monkeypatch.setattr(masks, "pixel_labels", counting)
    y, x = torch.meshgrid(torch.linspace(-3, 3, 33), torch.linspace(-3, 3, 44), indexing="ij")
    low = torch.full((21, 33, 44), -10.0)
    low[1], low[2] = 2 * x + y, torch.full_like(x, 1.0)  # class 1 leads on the right, 2 on the left
    mask = masks.full_size_mask(low, 480, 640, 0.5, batch_size=(520, 693))
    full = F.interpolate(low[None], (520, 693), mode="bilinear", align_corners=False)
    assert agreement(mask, reference_labels(full[0], 480, 640, 0.5)) >= 0.999
    assert len(np.unique(mask)) == 3, "kept on both sides, blanked between"
    assert 0 < sum(computed) < 0.1 * 480 * 640


@pytest.mark.parametrize("dense", [False, True], ids=["bounds", "every pixel"])
def test_classes_far_below_the_top_weigh_what_softmax_gives_them(dense: bool) -> None:
    """Scores spread from a few units to hundreds (random weights give both): the classes whose exp is
    too small for float32 (masks.LOWEST_GAP) count as softmax counts them, and the many a few units below
    the top count in full, so the pixels near a threshold of 0.9 are kept or blanked as the reference does."""
    generator = torch.Generator().manual_seed(9)
    spread = torch.logspace(0, 2.5, 44)  # from 1 to 316, across the columns
    low = torch.randn(21, 33, 44, generator=generator) * spread
    mask = masks.full_size_mask(low, 480, 640, 0.9, batch_size=(520, 693), dense=dense)
    full = F.interpolate(low[None].double(), (520, 693), mode="bilinear", align_corners=False)
    reference = reference_labels(full[0], 480, 640, 0.9)
    assert agreement(mask, reference) >= 0.999
    blanked = reference == 0
    assert 0.05 < blanked.mean() < 0.95, "the threshold both keeps and blanks"


@pytest.mark.parametrize("pad", [True, False], ids=["padded", "grouped"])
def test_a_mixed_size_batch_gives_each_image_its_own_mask(handlers: dict[str, Any], pad: bool) -> None:
    service = handlers["onnxruntime"]
    # At the model's size (short side 520): 924x520, 693x520, 520x520, 693x520. The first is the widest
    # and as high as any, so padding leaves it as it is.
    sizes = [(320, 180), (320, 240), (160, 160), (320, 240)]
    bodies = [encode(scene(*size, seed=i)) for i, size in enumerate(sizes)]
    alone = [mask_of(run(service, [{"body": body}])[0][0]) for body in bodies]
    service.pad_batches = pad
    try:
        answers, context = run(service, [{"body": b"broken"}, *({"body": body} for body in bodies)])
    finally:
        service.pad_batches = False
    assert context.status[0][0] == 422 and set(context.status) == {0}
    assert [head_of(a)["timings_ms"]["batch_size"] for a in answers[1:]] == ([4] * 4 if pad else [1, 2, 1, 2])
    for size, answer in zip(sizes, answers[1:], strict=True):
        assert (head_of(answer)["width"], head_of(answer)["height"]) == size
        assert mask_of(answer).shape == size[::-1]
    # Grouped by shape, only float rounding differs from each image alone. Padded, the model sees the
    # padding too (its global pooling, the border's neighbours): only the unpadded image keeps its mask.
    same = range(4) if not pad else range(1)
    assert all(agreement(mask_of(answers[1 + i]), alone[i]) >= 0.9999 for i in same)


# Archives ------------------------------------------------------------------------------------------------


def test_a_cpu_build_picks_openvino_and_records_it() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine builds for CUDA")
    serving = ServingConfig().resolved()
    assert serving.engine == "openvino"
    config = model_config(serving, "mobilenet_v3_large", "test", True)["handler"]
    assert (config["engine"], config["precision"]) == ("openvino", "fp32")
    assert config["intra_op_threads"] == serving.threads and config["workers"] == serving.workers
    with pytest.raises(BuildError, match="unknown engine"):
        build_archive(random_seed=0, serving=ServingConfig(engine="tensorrt"), store=Path("/nonexistent"))
    # A precision the engine does not serve is refused before any export.
    with pytest.raises(BuildError, match="'bf16' is served by openvino, not by 'torch'"):
        build_archive(
            random_seed=0, serving=ServingConfig(engine="torch", precision="bf16"), store=Path("/nonexistent")
        )
    bf16 = dataclasses.replace(serving, precision="bf16")
    assert model_config(bf16, "mobilenet_v3_large", "test", True)["handler"]["precision"] == "bf16"
    assert (serving.batch_size, serving.max_batch_delay_ms) == (1, 5)


def test_a_cuda_build_batches_and_shares_each_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a build on a machine with GPUs writes (two GPUs, 16 cores, as torch would report them): eager
    torch, batches of 16 gathered for 10 ms, two workers per GPU sharing the cores for decoding. Not run on
    a GPU: only the choice is tested."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    serving = ServingConfig().resolved()
    assert (serving.engine, serving.batch_size, serving.max_batch_delay_ms) == ("torch", 16, 10)
    assert (serving.workers, serving.threads) == (4, 4)
    assert ServingConfig(batch_size=4, max_batch_delay_ms=2).resolved().batch_size == 4


def test_the_archive_carries_the_graph_not_the_state_dict(model_store: Path) -> None:
    with zipfile.ZipFile(model_store / "deeplabv3.mar") as archive:
        names = archive.namelist()
        config = yaml.safe_load(archive.read("model-config.yaml"))
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    assert "model.onnx" in names and not any(name.endswith(".pth") for name in names)
    assert manifest["model"]["serializedFile"] == "model.onnx"
    # The handler ships as its package, beside the one-line module TorchServe imports by its file name.
    assert manifest["model"]["handler"] == "deeplabv3_handler:handle"
    assert "deeplabv3_handler.py" in names
    package = {"catalog", "engines", "handler", "images", "masks", "__init__"}
    assert {f"deeplabv3/{module}.py" for module in package} <= set(names)
    assert not any("__pycache__" in name for name in names)
    assert (config["handler"]["engine"], config["handler"]["precision"]) == (
        "openvino",
        "fp32",
    )  # the default on CPU


def test_build_model_offers_the_engines() -> None:
    result = subprocess.run(
        [str(BIN / "segserve"), "build-model", "--help"], capture_output=True, text=True, check=True
    )
    assert "--engine {onnxruntime,openvino,torch}" in result.stdout
    assert "--precision {fp32,bf16,fp16}" in result.stdout


# Memory --------------------------------------------------------------------------------------------------

MEMORY_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from tests.harness.images import encode, scene
from tests.harness.handler import head_of, make_handler, run

def resident_mb(field):
    status = Path("/proc/self/status").read_text()
    return int(status.split(field + ":")[1].split()[0]) / 1024

service = make_handler(Path(sys.argv[2]), sys.argv[4])
run(service, [{"body": encode(scene(640, 480))}])  # warm: the engine's own buffers are the model's
body = Path(sys.argv[3]).read_bytes()
loaded = resident_mb("VmHWM")
Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from the resident memory now
before = resident_mb("VmHWM")
[answer], _ = run(service, [{"body": body}], [{"X-Threshold": sys.argv[5]}])
peak = resident_mb("VmHWM")
print(json.dumps({"grew_mb": peak - before, "before_mb": before, "loading_peak_mb": loaded,
                  "size": [head_of(answer)["width"], head_of(answer)["height"]]}))
"""


@pytest.mark.parametrize("threshold", ["0", "0.5"])
@pytest.mark.parametrize("engine", GRAPH_ENGINES)
def test_the_largest_image_stays_under_the_memory_bound(
    exported_model: Path, tmp_path: Path, engine: str, threshold: str
) -> None:
    """The peak resident memory one image of the largest allowed size adds, in a process of its own (Linux's
    peak, reset after the model is loaded and warm), with and without a threshold: its probabilities are
    made from the logits in bands too."""
    largest = tmp_path / "largest.jpg"
    largest.write_bytes(encode(scene(*LARGEST), "JPEG", quality=90))
    probe = [sys.executable, "-c", MEMORY_PROBE, str(ROOT), str(exported_model), str(largest), engine]
    result = subprocess.run([*probe, threshold], capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["size"] == list(LARGEST)
    assert measured["grew_mb"] < catalog.MEMORY_BOUND_MB, measured
