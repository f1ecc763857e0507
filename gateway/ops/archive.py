"""``segserve build-model``: a TorchServe archive (.mar) of DeepLabV3 with the project's handler.

The archive carries what its engine runs: for ``openvino`` (the default on CPU) and ``onnxruntime`` a graph
exported here, offline, with dynamic batch, height and width; for ``torch`` (the default on CUDA) the state
dict.
Weights come from one of three places, and the archive says which wherever it shows:
- torchvision's published ``COCO_WITH_VOC_LABELS_V1`` checkpoint, downloaded and hash-checked;
- a local ``.pth``, hash-checked when its file name is a published one (``<name>-<sha256 prefix>.pth``);
- seeded random weights, for tests and offline demos: the masks are meaningless and labelled so.
torch is imported only here, inside the functions, so the rest of the CLI stays light.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from gateway.handlers.deeplabv3 import catalog
from gateway.handlers.deeplabv3.catalog import ENGINES, GRAPH_ENGINES, VARIANTS

# TorchServe imports an archive's handler by its file name, from the model's directory
# (ts/model_loader.py), where the handler's package lies beside it: this one line is that file.
ENTRY_MODULE = "deeplabv3_handler"
ENTRY_SOURCE = "from deeplabv3.handler import handle  # TorchServe calls handle(data, context)\n"


def handler_package() -> Path:
    """The TorchServe handler's package, installed with segserve (gateway.handlers is the checkout's
    handlers/), so that an installed segserve builds archives without a checkout."""
    return Path(str(files("gateway.handlers").joinpath("deeplabv3")))


# torch.hub names published checkpoints <name>-<first 8+ hex digits of their SHA-256>.pth
PUBLISHED_NAME = re.compile(r"^(?P<stem>.+)-(?P<prefix>[0-9a-f]{8,})\.pth$")


def model_store() -> Path:
    """Where archives go and TorchServe finds them: ``model_store`` here, or SEGSERVE_MODEL_STORE."""
    return Path(os.environ.get("SEGSERVE_MODEL_STORE", "model_store")).resolve()


WORKERS_PER_GPU = 2


class BuildError(RuntimeError):
    """A model archive cannot be built as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ServingConfig:
    """TorchServe's per-model settings, written into the archive's model-config.yaml."""

    # None picks by the machine that builds the archive (normally the one that serves it): on CPU, as
    # measured, OpenVINO (faster than ONNX Runtime on the same graph: docs/performance.md) with batches
    # of one image (a forward pass of 4 images takes longer than 4 passes of one) and the workers and
    # threads of default_threads. On CUDA, eager torch with batches of 16 gathered for up to 10 ms (a
    # GPU's pass costs little more for 16 images than for one), and two workers per GPU, so that one
    # worker's CPU work (decoding, encoding masks) overlaps the other's forward pass; the CPU's cores are
    # shared among them for decoding. The CUDA choices have not been measured on a GPU yet.
    batch_size: int | None = None
    max_batch_delay_ms: int | None = None
    workers: int | None = None
    response_timeout_s: int = 60
    engine: str | None = None
    threads: int | None = None  # intra-op threads per worker
    precision: str = "fp32"  # bf16 is an opt-in: the handler's check_precision says where it is served

    def resolved(self) -> ServingConfig:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        cores = os.cpu_count() or 1
        engine = self.engine or ("torch" if gpus else "openvino")
        workers = self.workers or (WORKERS_PER_GPU * gpus) or min(cores, 8)
        return dataclasses.replace(
            self,
            batch_size=self.batch_size or (16 if gpus else 1),
            max_batch_delay_ms=self.max_batch_delay_ms or (10 if gpus else 5),
            workers=workers,
            engine=engine,
            threads=self.threads
            or (max(1, cores // workers) if gpus else default_threads(engine, cores, workers)),
        )

    @property
    def spinning(self) -> bool:
        """Whether idle threads may spin: only when the workers' threads do not outnumber the cores, else
        one worker's spinning takes the core another one is computing on."""
        return (self.workers or 1) * (self.threads or 1) <= (os.cpu_count() or 1)


def default_threads(engine: str, cores: int, workers: int) -> int:
    """Intra-op threads per worker on a CPU.

    OpenVINO and ONNX Runtime: every core in each worker, spinning off, and the handler narrows a pass to
    its share of the cores (cores // workers) while another worker of the model is busy. Measured with ONNX
    Runtime and the handler in-process on 2 cores (640x480 JPEG, 12 interleaved rounds, medians; throughput
    paired round by round with 2 x 1, as other work on the machine made single figures noisy), with the
    earlier graph that ended with the model's upsampling (the engine alone: 76 ms on 2 threads, 136 ms on
    one; without that layer, 56 and 123 ms):

        workers x threads                    lone request   8 concurrent   vs 2 x 1
        1 x 2, spinning                            130 ms      7.6 img/s
        2 x 1                                      179 ms     10.7 img/s       1
        2 x 2, spinning off                        111 ms     10.0 img/s    0.94 (0.90-0.95 in 4 runs)
        2 x 2, spinning off, narrowing (chosen)    115 ms     10.5 img/s    1.00 (1.00-1.01 in 2 runs)
        2 x 2 as above, torch on 2 threads          98-107 ms  5.7-6.3 img/s

    So a lone request runs at about the all-core speed and a full queue keeps the throughput of one
    single-threaded worker per core. The last row is why the handler gives torch, which only
    post-processes there, one thread: its OpenMP threads spin after each op and take the cores the other
    worker computes on.
    Eager torch: the cores shared among the workers, as its OpenMP threads spin.
    """
    if engine in GRAPH_ENGINES:
        return cores
    return max(1, cores // workers)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_published_hash(path: Path) -> bool:
    """True when ``path`` carries a published name and its content matches it; raises on a mismatch."""
    match = PUBLISHED_NAME.match(path.name)
    if not match:
        return False
    actual = sha256_of(path)
    if not actual.startswith(match["prefix"]):
        raise BuildError(
            f"{path} does not match its published SHA-256 (expected {match['prefix']}…, got {actual[:16]}…): "
            "the file is corrupt or not the published checkpoint"
        )
    return True


def calibrate_batch_norm(model: Any) -> Any:
    """Make random weights give masks that still depend on the image.

    Freshly initialised, batch norm's running statistics (mean 0, variance 1) are so far from the real
    activations that the output collapses to one constant class. Measuring them on seeded noise, as
    training would, gives a model whose argmax varies across an image, so tests can tell masks apart.
    """
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a plain average over the calibration batch
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 256, 256))
    return model.eval()


def prepare_weights(
    variant: str, weights: str | None, random_seed: int | None, workdir: Path, log: Any = print
) -> tuple[Path, str, bool]:
    """Write a state dict for ``variant`` into ``workdir``; return (path, label, is_random)."""
    import torch

    from gateway.handlers.deeplabv3.engines import build_model, published_weights

    if random_seed is not None:
        torch.manual_seed(random_seed)
        model = calibrate_batch_norm(build_model(variant))
        path = workdir / f"deeplabv3_{variant}-random-seed{random_seed}.pth"
        torch.save(model.state_dict(), path)
        return path, f"random (seed {random_seed}, meaningless masks)", True

    if weights:
        path = Path(weights).expanduser().resolve()
        if not path.is_file():
            raise BuildError(f"weights file not found: {path}")
        verified = check_published_hash(path)
        if not verified:
            log(f"warning: {path.name} is not a published checkpoint name; its hash cannot be checked")
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        build_model(variant).load_state_dict(state_dict)  # fails loudly on the wrong variant
        label = f"{path.name} ({'sha256 verified' if verified else 'unverified'})"
        return path, label, False

    published = published_weights(variant)
    log(f"downloading {published.url} …")
    socket.setdefaulttimeout(60)  # torch.hub's download has no timeout of its own
    try:
        state_dict = torch.hub.load_state_dict_from_url(published.url, progress=True, check_hash=True)
    except Exception as exc:  # offline, proxy refused, hash mismatch: all end the same way
        raise BuildError(
            f"cannot download the published weights ({exc.__class__.__name__}: {exc}). Offline? "
            "Pass --weights PATH to a local checkpoint, or --random-weights for a demo with meaningless masks."
        ) from exc
    finally:
        socket.setdefaulttimeout(None)
    path = workdir / Path(published.url).name
    torch.save(state_dict, path)
    return path, f"{Path(published.url).name} (published COCO_WITH_VOC_LABELS_V1, sha256 verified)", False


def load_model(variant: str, weights_path: Path) -> Any:
    """The eval-mode model of ``variant`` on a state dict, without the auxiliary head (training only)."""
    import torch

    from gateway.handlers.deeplabv3.engines import build_model

    model = build_model(variant)
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    model.aux_classifier = None
    return model.eval()


def export_onnx(variant: str, weights_path: Path, onnx_path: Path) -> Path:
    """Export the model's logits as an ONNX graph with dynamic batch, height and width axes, so one file
    serves every image size, then check that ONNX Runtime agrees with torch on another shape.

    The graph stops before the model's last layer, the bilinear upsampling of its logits (at its stride,
    1/8 or 1/16 of the input) to the input's size: the handler upsamples only the labels and the pixels
    between differing ones (``working_scores``), where the graph would compute every score of every pixel.
    """
    import torch

    model = load_model(variant, weights_path)

    class Logits(torch.nn.Module):
        """The model's ``out`` before its upsampling: a graph has tensors, not dicts, as outputs."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            logits: torch.Tensor = self.model.classifier(self.model.backbone(image)["out"])
            return logits

    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of one that needs onnxscript and
        # torch.export; this one needs only the onnx package and handles the model as it is.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Logits().eval(),
            (torch.zeros(1, 3, 520, 693),),
            str(onnx_path),
            input_names=[catalog.ONNX_INPUT],
            output_names=[catalog.ONNX_OUTPUT],
            dynamic_axes={catalog.ONNX_INPUT: axes, catalog.ONNX_OUTPUT: axes},
            opset_version=17,
            dynamo=False,
        )
    check_export(model, onnx_path)
    return onnx_path


def check_export(model: Any, onnx_path: Path) -> None:
    """Refuse an export whose masks differ from torch's on a batch of a shape it was not traced with."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from gateway.handlers.deeplabv3.masks import full_size_mask

    sample = torch.randn(2, 3, 200, 264, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(sample)["out"].argmax(1).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    [logits] = session.run(None, {catalog.ONNX_INPUT: sample.numpy()})
    size = (int(sample.shape[2]), int(sample.shape[3]))
    masks = [full_size_mask(torch.from_numpy(one), *size, batch_size=size) for one in logits]
    agreement = float((np.stack(masks) == expected).mean())
    if agreement < 0.999:
        raise BuildError(
            f"the ONNX export disagrees with torch (shape {logits.shape}, {agreement:.4%} of pixels agree)"
        )


def build_archive(
    *,
    name: str = "deeplabv3",
    variant: str = "mobilenet_v3_large",
    version: str = "1.0",
    weights: str | None = None,
    random_seed: int | None = None,
    store: Path | None = None,
    serving: ServingConfig = ServingConfig(),
    log: Any = print,
) -> Path:
    """Build ``store/<name>.mar`` and return its path."""
    if variant not in VARIANTS:
        raise BuildError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if serving.engine is not None and serving.engine not in ENGINES:
        raise BuildError(f"unknown engine {serving.engine!r}; choose one of {', '.join(ENGINES)}")
    if weights and random_seed is not None:
        raise BuildError("--weights and --random-weights exclude each other")
    store = store or model_store()
    serving = serving.resolved()
    try:
        check_precision(serving)
    except ValueError as exc:
        raise BuildError(str(exc)) from exc
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="segserve-build-") as tmp:
        workdir = Path(tmp)
        weights_path, label, is_random = prepare_weights(variant, weights, random_seed, workdir, log)
        served = weights_path
        if serving.engine in GRAPH_ENGINES:  # the state dict stays out: the graph carries the weights
            served = export_onnx(variant, weights_path, workdir / "model.onnx")
        config_path = workdir / "model-config.yaml"
        config_path.write_text(
            yaml.safe_dump(model_config(serving, variant, label, is_random), sort_keys=False)
        )
        entry, package = stage_handler(workdir)
        command = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            name,
            "--version",
            version,
            "--handler",
            f"{entry.with_suffix('')}:handle",  # the archiver adds .py back
            "--extra-files",
            str(package),  # its contents go to the model's directory: the package
            "--serialized-file",
            str(served),
            "--config-file",
            str(config_path),
            "--export-path",
            str(store),
            "--force",
        ]
        # The archiver stages files in $TMPDIR/<model name>: a directory of its own keeps two builds of one
        # name (two checkouts, two test runs) from deleting each other's files.
        staging = {**os.environ, "TMPDIR": str(workdir)}
        result = subprocess.run(command, capture_output=True, text=True, check=False, env=staging)
        if result.returncode != 0:
            raise BuildError(f"torch-model-archiver failed:\n{result.stderr or result.stdout}")
    archive = store / f"{name}.mar"
    if is_random:
        log("WARNING: random weights: this model's masks are meaningless (fine for tests and demos)")
    log(
        f"built {archive} ({variant}, version {version}, engine {serving.engine} {serving.precision}, "
        f"{serving.workers} workers x {serving.threads} threads, weights: {label})"
    )
    return archive


def check_precision(serving: ServingConfig) -> None:
    """The handler's own check, on this machine: the build is normally where the archive is served."""
    import torch

    from gateway.handlers.deeplabv3.engines import check_precision as handler_check

    assert serving.engine is not None
    handler_check(serving.engine, serving.precision, on_cuda=torch.cuda.is_available())


def stage_handler(workdir: Path) -> tuple[Path, Path]:
    """The archive's handler entry and a directory holding the handler's package, in ``workdir``."""
    entry = workdir / f"{ENTRY_MODULE}.py"
    entry.write_text(ENTRY_SOURCE)
    package = workdir / "handler"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(handler_package(), package / "deeplabv3", ignore=ignore)
    return entry, package


def model_config(serving: ServingConfig, variant: str, label: str, is_random: bool) -> dict[str, Any]:
    """The archive's model-config.yaml: TorchServe's settings, and the handler's under ``handler``."""
    return {
        "minWorkers": serving.workers,
        "maxWorkers": serving.workers,
        "batchSize": serving.batch_size,
        "maxBatchDelay": serving.max_batch_delay_ms,
        "responseTimeout": serving.response_timeout_s,
        "handler": {
            "variant": variant,
            "weights": label,
            "random_weights": is_random,
            "engine": serving.engine,
            "precision": serving.precision,
            "workers": serving.workers,
            "intra_op_threads": serving.threads,
            "allow_spinning": serving.spinning,
        },
    }
