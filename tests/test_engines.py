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

from gateway.ops.archive import (
    GRAPH_ENGINES,
    PRECISIONS,
    BuildError,
    ServingConfig,
    build_archive,
    calibrate_batch_norm,
    export_onnx,
    model_config,
)
from tests.harness.handler import full_size_probabilities, handler_module, make_handler, mask_of, run
from tests.harness.images import encode, scene
from tests.harness.processes import BIN, ROOT
from tests.harness.servers import SEED

LARGEST = (6124, 4082)  # 24,998,168 pixels: the largest image DEFAULT_MAX_PIXELS allows, near 3:2


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One random model, saved as each engine loads it: weights.pth (torch) and model.onnx (onnxruntime)."""
    directory = tmp_path_factory.mktemp("exported")
    torch.manual_seed(SEED)
    model = calibrate_batch_norm(handler_module.build_model("mobilenet_v3_large"))
    torch.save(model.state_dict(), directory / "weights.pth")
    export_onnx("mobilenet_v3_large", directory / "weights.pth", directory / "model.onnx")
    return directory


@pytest.fixture(scope="module")
def engines(exported_model: Path) -> dict[str, Any]:
    return {name: make_handler(exported_model, name) for name in handler_module.ENGINES}


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
    engines: dict[str, Any], engine: str, size: tuple[int, int], mode: str
) -> None:
    """One exported graph serves every shape (dynamic axes). It stops at the model's stride, before the
    upsampling that the handler does, and the masks are eager torch's."""
    body = encode(scene(*size).convert(mode), "PNG")
    tensor = engines[engine].transforms(handler_module.open_rgb(body, 10**8))[None]
    exported, eager = engines[engine].engine(tensor), engines["torch"].engine(tensor)
    assert eager.shape == (1, 21, *tensor.shape[2:])
    assert exported.shape[:2] == (1, 21) and exported.shape[2] * 8 <= tensor.shape[2]
    [fast], _ = run(engines[engine], [{"body": body}])
    [reference], _ = run(engines["torch"], [{"body": body}])
    assert agreement(mask_of(fast), mask_of(reference)) >= 0.999
    assert len(np.unique(mask_of(reference))) > 1, "a random model should still give several classes here"


@pytest.mark.parametrize("engine", handler_module.ENGINES)
@pytest.mark.parametrize("size", [(640, 480), (1920, 1080)], ids=["640x480", "1920x1080"])
def test_full_size_masks_agree_with_the_bilinear_reference(
    engines: dict[str, Any], engine: str, size: tuple[int, int]
) -> None:
    """The reference: the eager model's logits interpolated bilinearly to the photo's size, then arg-max."""
    body = encode(scene(*size, seed=1), "JPEG", quality=90)
    [answer], context = run(engines[engine], [{"body": body}])
    assert context.status == {}
    assert (answer["width"], answer["height"]) == size
    eager = engines["torch"].engine.model
    expected = full_size_probabilities(eager, engines["torch"].transforms, Image.open(io.BytesIO(body)))
    assert agreement(mask_of(answer), expected.argmax(1)[0].numpy()) >= 0.995


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
    if not handler_module.cpu_computes_in_bf16():
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
    other = handler_module.Peers(engine.peers.directory)  # another worker of the model
    with engine.peers.busy():  # as the handler marks itself for each batch
        engine(torch.zeros(1, 3, 8, 8))
        with other.busy():
            engine(torch.zeros(1, 3, 8, 8))
    assert used == [engine.session, engine.narrow]


def test_peers_see_each_other_busy_and_forget_the_dead(tmp_path: Path) -> None:
    one, two = handler_module.Peers(str(tmp_path)), handler_module.Peers(str(tmp_path))
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
    whole = handler_module.full_size_mask(logits, *out, threshold, band_rows=out[0])
    for rows in (1, 2, 3):
        assert np.array_equal(handler_module.full_size_mask(logits, *out, threshold, band_rows=rows), whole)
    assert np.array_equal(handler_module.full_size_mask(logits, *out, threshold), whole)
    assert agreement(whole, reference_labels(logits, *out, threshold)) >= 0.999


def test_the_shortcut_for_agreeing_corners_changes_no_pixel() -> None:
    """Without a threshold only pixels between differing source labels are interpolated; asking for every
    pixel (a threshold no probability is below) gives the same mask."""
    generator = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.randn(1, 21, 6, 8, generator=generator), size=(30, 40), mode="bilinear")[0]
    sparse = handler_module.full_size_mask(smooth, 97, 123, band_rows=5)
    dense = handler_module.full_size_mask(smooth, 97, 123, threshold=1e-9, band_rows=5)
    assert np.array_equal(sparse, dense)
    assert np.array_equal(sparse, reference_labels(smooth, 97, 123))


def test_class_counts_in_bands() -> None:
    mask = np.random.default_rng(0).integers(0, 21, size=(301, 7), dtype=np.uint8)
    counts = handler_module.class_counts(mask, 21)
    assert counts.tolist() == np.bincount(mask.ravel(), minlength=21).tolist()


# Mixed sizes in one batch --------------------------------------------------------------------------------


def test_batch_groups_by_shape_or_all_when_padding() -> None:
    shapes = [(3, 520, 693), (3, 520, 693), (3, 693, 520), (3, 520, 693)]
    assert handler_module.batch_groups(shapes, pad=False) == [[0, 1, 3], [2]]
    assert handler_module.batch_groups(shapes, pad=True) == [[0, 1, 2, 3]]
    assert handler_module.batch_groups([], pad=True) == []


def test_padding_and_cropping_give_each_image_its_own_region() -> None:
    sizes = [(4, 6), (7, 3), (5, 5)]
    # Image i is 1 in channel i and 0 elsewhere: as logits, its label is i everywhere.
    tensors = [torch.zeros(3, h, w).index_fill_(0, torch.tensor([i]), 1) for i, (h, w) in enumerate(sizes)]
    batch = handler_module.pad_batch(tensors)
    assert batch.shape == (3, 3, 7, 6)
    for index, tensor in enumerate(tensors):
        region = batch[index, :, : tensor.shape[1], : tensor.shape[2]]
        assert torch.equal(region, tensor)
        assert batch[index].sum() == tensor.sum(), "the padding is zero"
    # A model that kept its input as its logits shows each image's scores are its own region, at its own
    # size, whether the logits are at the input's size or at a stride (upsampled like the model would).
    for logits in (batch, batch[:, :, ::2, ::2].contiguous()):
        for index, tensor in enumerate(tensors):
            own = handler_module.working_scores(logits[index], (7, 6), tuple(tensor.shape[1:]))
            assert own.labels.shape == tensor.shape[1:]
            assert (own.labels == index).all()


@pytest.mark.parametrize("size", [(520, 693), (37, 23), (9, 16)])
def test_scores_at_a_stride_are_the_models_upsampling(size: tuple[int, int]) -> None:
    """Logits at the model's stride, upsampled by working_scores then to the image's size, give the mask
    of upsampling them to the working size first, as the whole model does, then to the image's size."""
    generator = torch.Generator().manual_seed(sum(size))
    low = torch.randn(21, (size[0] + 15) // 16, (size[1] + 15) // 16, generator=generator)
    working = F.interpolate(low[None], size=size, mode="bilinear", align_corners=False)[0]
    scores = handler_module.working_scores(low, size, size)
    assert agreement(scores.labels.numpy(), working.argmax(0).to(torch.uint8).numpy()) >= 0.9999
    for out in ((480, 640), (size[0] * 2 + 1, size[1] // 2 + 1)):
        for threshold in (0.0, 0.12):
            mask = handler_module.full_size_mask(scores, *out, threshold, band_rows=7)
            assert agreement(mask, reference_labels(working, *out, threshold)) >= 0.999


@pytest.mark.parametrize("pad", [True, False], ids=["padded", "grouped"])
def test_a_mixed_size_batch_gives_each_image_its_own_mask(engines: dict[str, Any], pad: bool) -> None:
    service = engines["onnxruntime"]
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
    assert [a["timings_ms"]["batch_size"] for a in answers[1:]] == ([4] * 4 if pad else [1, 2, 1, 2])
    for size, answer in zip(sizes, answers[1:], strict=True):
        assert (answer["width"], answer["height"]) == size
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
    assert tuple(handler_module.PRECISIONS) == PRECISIONS


def test_the_archive_carries_the_graph_not_the_state_dict(model_store: Path) -> None:
    with zipfile.ZipFile(model_store / "deeplabv3.mar") as archive:
        names = archive.namelist()
        config = yaml.safe_load(archive.read("model-config.yaml"))
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    assert "model.onnx" in names and not any(name.endswith(".pth") for name in names)
    assert manifest["model"]["serializedFile"] == "model.onnx"
    assert (config["handler"]["engine"], config["handler"]["precision"]) == (
        "openvino",
        "fp32",
    )  # the default on CPU


def test_build_model_offers_the_engines() -> None:
    result = subprocess.run(
        [str(BIN / "segserve"), "build-model", "--help"], capture_output=True, text=True, check=True
    )
    assert "--engine {onnxruntime,openvino,torch}" in result.stdout
    assert "--precision {fp32,bf16}" in result.stdout


# Memory --------------------------------------------------------------------------------------------------

MEMORY_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from tests.harness.images import encode, scene
from tests.harness.handler import make_handler, run

def resident_mb(field):
    status = Path("/proc/self/status").read_text()
    return int(status.split(field + ":")[1].split()[0]) / 1024

service = make_handler(Path(sys.argv[2]), sys.argv[4])
run(service, [{"body": encode(scene(640, 480))}])  # warm: the engine's own buffers are the model's
body = Path(sys.argv[3]).read_bytes()
loaded = resident_mb("VmHWM")
Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from the resident memory now
before = resident_mb("VmHWM")
[answer], _ = run(service, [{"body": body}])
peak = resident_mb("VmHWM")
print(json.dumps({"grew_mb": peak - before, "before_mb": before, "loading_peak_mb": loaded,
                  "size": [answer["width"], answer["height"]]}))
"""


@pytest.mark.parametrize("engine", GRAPH_ENGINES)
def test_the_largest_image_stays_under_the_memory_bound(
    exported_model: Path, tmp_path: Path, engine: str
) -> None:
    """The peak resident memory one image of the largest allowed size adds, in a process of its own (Linux's
    peak, reset after the model is loaded and warm)."""
    largest = tmp_path / "largest.jpg"
    largest.write_bytes(encode(scene(*LARGEST), "JPEG", quality=90))
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(ROOT), str(exported_model), str(largest), engine],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["size"] == list(LARGEST)
    assert measured["grew_mb"] < handler_module.MEMORY_BOUND_MB, measured
