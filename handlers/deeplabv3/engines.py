"""What runs the model: a batch of uint8 pixels in, logits out; and the locks by which a model's workers
share the CPU's cores.

``openvino`` (the default on CPU, about 3x faster than eager PyTorch there) and ``onnxruntime`` run the
ONNX export that ``segserve build-model`` packed; ``torch`` runs the eager model from a state dict (the
reference, and the CUDA path). Every engine serves ``fp32``, the default. ``bf16`` is an opt-in for
``openvino`` on CPUs that compute in it (AVX-512 BF16 or AMX): a forward pass about 1.8x as fast, and
masks that differ where classes are close. ``fp16`` is the opt-in for ``torch`` on CUDA (half precision on
the GPU; this project has not run it on one yet). ``check_precision`` refuses the rest, saying why.

Each engine normalises the pixels its own way (``prepare``): OpenVINO inside its compiled graph, from uint8
(its PrePostProcessor: no float copy of the image outside it), ONNX Runtime on the CPU, torch on its
device (on CUDA: the uint8 batch crosses the bus, a quarter of the float bytes, and is normalised there).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from . import catalog


@dataclass(frozen=True)
class Normalisation:
    """The weights' own input statistics (their ``transforms()``), on the 0-1 scale."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def mean_pixel(self) -> tuple[int, ...]:
        """The mean as uint8 pixels: what pads a batch, as it normalises to (nearly) zero."""
        return tuple(round(m * 255) for m in self.mean)

    def apply(self, batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 pixels (N x h x w x 3) to the model's input (N x 3 x h x w): one copy, scaled in place."""
        scale = torch.tensor([1 / (255 * s) for s in self.std], dtype=dtype, device=batch.device)
        shift = torch.tensor([m / s for m, s in zip(self.mean, self.std, strict=True)], dtype=dtype)
        tensor = batch.permute(0, 3, 1, 2).to(dtype, memory_format=torch.contiguous_format)
        return tensor.mul_(scale.view(1, -1, 1, 1)).sub_(shift.to(batch.device).view(1, -1, 1, 1))


def build_model(variant: str) -> torch.nn.Module:
    """The architecture of ``variant`` with untrained weights, shaped like the published checkpoints."""
    from torchvision.models import segmentation

    builder = getattr(segmentation, catalog.VARIANTS[variant].builder)
    # aux_loss=True so the published state dicts (which carry the auxiliary head) load strictly.
    model: torch.nn.Module = builder(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    return model


def published_weights(variant: str) -> Any:
    """torchvision's enum member of ``variant``'s published weights (its URL, categories, transforms)."""
    from torchvision.models import segmentation

    return getattr(getattr(segmentation, catalog.VARIANTS[variant].weights), catalog.PUBLISHED_WEIGHTS)


class Engine(Protocol):
    """A forward pass: ``prepare`` makes the engine's input of uint8 pixels (N x h x w x 3, one shape);
    the call gives logits (N x classes x h' x w', float32): at the input's size, or at the model's stride
    before its last upsampling (see masks.full_size_mask)."""

    device: torch.device

    def prepare(self, batch: torch.Tensor) -> Any: ...

    def __call__(self, prepared: Any) -> torch.Tensor: ...


class TorchEngine:
    """Eager PyTorch on the model's state dict: the reference, and the path on CUDA (fp16 there, asked)."""

    def __init__(
        self,
        variant: str,
        weights_file: str,
        device: torch.device,
        normalisation: Normalisation,
        precision: str = "fp32",
    ) -> None:
        model = build_model(variant)
        model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
        model.aux_classifier = None  # type: ignore[assignment]  # the auxiliary head only helps training; skip its compute
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.model = model.to(device, self.dtype).eval()
        self.device, self.normalisation = device, normalisation

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        # Normalised in float32 on the device, then narrowed: fp16 holds the result, not the arithmetic.
        return self.normalisation.apply(batch.to(self.device, non_blocking=True)).to(self.dtype)

    def __call__(self, prepared: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits: torch.Tensor = self.model(prepared)["out"]
        return logits.float()


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


def model_peers(manifest: dict[str, Any]) -> Peers:
    """The lock files of the workers of this model and version under this TorchServe (their parent)."""
    model = manifest.get("model", {})
    key = f"{model.get('modelName', 'model')}-{model.get('modelVersion', '0')}"
    return Peers(os.path.join(tempfile.gettempdir(), f"segserve-{os.getppid()}-{key}"))


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

    def __call__(self, prepared: Any) -> torch.Tensor:
        busy_peers = self.peers is not None and self.peers.busy_others() > 0
        return self._run(self.narrow if busy_peers else self.session, prepared)

    def _open(self, threads: int) -> Any:
        raise NotImplementedError

    def _run(self, session: Any, prepared: Any) -> torch.Tensor:
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
        normalisation: Normalisation,
        narrow: int | None = None,
        peers: Peers | None = None,
    ) -> None:
        import onnxruntime as ort

        self.model_file, self.spinning, self.normalisation = model_file, spinning, normalisation
        self.providers: list[Any] = ["CPUExecutionProvider"]
        if gpu_id is not None and "CUDAExecutionProvider" in ort.get_available_providers():
            self.providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu_id}))
            self.device = torch.device(f"cuda:{gpu_id}")
        super().__init__(threads, narrow, peers)

    def _open(self, threads: int) -> Any:
        return ort_session(self.model_file, threads, self.spinning, self.providers)

    def prepare(self, batch: torch.Tensor) -> np.ndarray:
        return self.normalisation.apply(batch.cpu()).numpy()

    def _run(self, session: Any, prepared: np.ndarray) -> torch.Tensor:
        [logits] = session.run([catalog.ONNX_OUTPUT], {catalog.ONNX_INPUT: prepared})
        return torch.from_numpy(logits)


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


class OpenVinoEngine(NarrowingEngine):
    """OpenVINO's CPU plugin on the same exported graph, which it reads itself, at fp32 or, asked, bf16.
    The graph takes uint8 pixels (N x h x w x 3): its PrePostProcessor converts, normalises and lays them
    out inside the compiled model, fused with its first layers."""

    def __init__(
        self,
        model_file: str,
        threads: int,
        normalisation: Normalisation,
        narrow: int | None = None,
        peers: Peers | None = None,
        precision: str = "fp32",
    ) -> None:
        import openvino
        from openvino.preprocess import PrePostProcessor

        self.core = openvino.Core()
        processing = PrePostProcessor(self.core.read_model(model_file))
        pixels = processing.input(catalog.ONNX_INPUT)
        pixels.tensor().set_element_type(openvino.Type.u8).set_layout(openvino.Layout("NHWC"))
        pixels.model().set_layout(openvino.Layout("NCHW"))
        pixels.preprocess().convert_element_type(openvino.Type.f32).mean(
            [255 * m for m in normalisation.mean]
        ).scale([255 * s for s in normalisation.std])
        self.model = processing.build()
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

    def prepare(self, batch: torch.Tensor) -> np.ndarray:
        return batch.numpy()

    def _run(self, session: Any, prepared: np.ndarray) -> torch.Tensor:
        logits = session.infer({catalog.ONNX_INPUT: prepared})[catalog.ONNX_OUTPUT]
        return torch.from_numpy(logits.copy())  # the request reuses its output buffer on the next pass


def check_precision(engine: str, precision: str, on_cuda: bool) -> None:
    """Refuse, with the reason, an engine and precision this machine cannot serve as asked.

    bf16 on OpenVINO, measured on this project's 2-core AMD EPYC (AVX-512 BF16, no AMX), mobilenet_v3_large
    on random weights, 640x480: the forward pass took 33 ms instead of 58. The masks differ from fp32's
    wherever two classes score within bf16's rounding (8 significant bits): random weights leave many such
    pixels (docs/performance.md gives the measured agreement). fp16 is for CUDA's half-precision units; on a
    CPU torch has no fast half-precision convolutions."""
    catalog.check_served(engine, precision)
    if precision == "bf16" and not cpu_computes_in_bf16():
        raise ValueError(
            "precision 'bf16' needs a CPU that computes in bf16 (AVX-512 BF16 or AMX); this one does not"
        )
    if precision == "fp16" and not on_cuda:
        raise ValueError("precision 'fp16' runs on a CUDA GPU; this worker has none (use fp32 on a CPU)")


def cpu_computes_in_bf16() -> bool:
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def intra_op_threads(config: dict[str, Any]) -> int:
    """Threads per worker: the archive's choice, else the cores shared among its workers;
    ``OMP_NUM_THREADS`` wins over both, as operators expect of any OpenMP program."""
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    if from_env.isascii() and from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    if config.get("intra_op_threads"):
        return max(1, int(config["intra_op_threads"]))
    return max(1, (os.cpu_count() or 1) // max(1, int(config.get("workers", 1))))


def batch_groups(shapes: Sequence[tuple[int, ...]], pad: bool) -> list[list[int]]:
    """Which inputs share a forward pass: all of them when padding, else those of equal shape."""
    if pad:
        return [list(range(len(shapes)))] if shapes else []
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(index)
    return list(groups.values())


def pad_batch(pictures: Sequence[torch.Tensor], fill: Sequence[int]) -> torch.Tensor:
    """Stack uint8 pictures (h x w x 3) of any sizes, padded at the bottom and right to the largest height
    and width with ``fill``: the training images' mean colour, which normalises to (nearly) zero."""
    height = max(p.shape[0] for p in pictures)
    width = max(p.shape[1] for p in pictures)
    batch = pictures[0].new_empty((len(pictures), height, width, 3))
    batch[:] = torch.tensor(list(fill), dtype=torch.uint8, device=batch.device)
    for index, picture in enumerate(pictures):
        batch[index, : picture.shape[0], : picture.shape[1]] = picture
    return batch
