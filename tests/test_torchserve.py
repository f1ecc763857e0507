"""The handler inside a real TorchServe, started from config.properties with a random-weights archive."""

from __future__ import annotations

import functools
import io
import os
import socket
import tempfile
import threading
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from gateway.handlers.deeplabv3.catalog import MASK_CONTENT_TYPE
from gateway.handlers.deeplabv3.engines import published_weights
from gateway.ops.archive import load_model, prepare_weights
from gateway.torchserve import Prediction, TorchServe, read_prediction
from tests.harness.images import encode, scene
from tests.harness.processes import wait_until
from tests.harness.servers import SEED, Stack, TorchServeServer


def predict(ts: TorchServeServer, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{ts.inference_url}/predictions/deeplabv3",
        content=body,
        headers={"Content-Type": "application/octet-stream", **ts.headers("inference"), **headers},
        timeout=60,
    )


def prediction(response: httpx.Response) -> Prediction:
    """An answer to an image, read as the worker reads it: a binary body, as the handler set its type."""
    assert response.headers["content-type"] == MASK_CONTENT_TYPE, response.headers
    return read_prediction(response.content)


def mask_of(response: httpx.Response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(prediction(response).mask_png)))


@functools.cache
def seeded_model() -> torch.nn.Module:
    """The archive's random weights, made again from its seed (it carries an ONNX graph, not a state dict)."""
    with tempfile.TemporaryDirectory() as tmp:
        path, _, _ = prepare_weights("mobilenet_v3_large", None, SEED, Path(tmp))
        return load_model("mobilenet_v3_large", path)


def torchvision_mask(model_store: Path, image: Image.Image) -> np.ndarray:
    """The same weights, in this process, through torchvision's own transforms and eager model, the logits
    interpolated bilinearly to the image's size, then arg-max."""
    transforms = published_weights("mobilenet_v3_large").transforms()
    with torch.inference_mode():
        logits = seeded_model()(transforms(image)[None])["out"]
        full = F.interpolate(logits, size=image.size[::-1], mode="bilinear", align_corners=False)
        return full.argmax(1)[0].to(torch.uint8).numpy()


def test_jpeg_mask_equals_torchvision(torchserve: TorchServeServer, model_store: Path) -> None:
    body = encode(scene(640, 480), "JPEG", quality=90)
    response = predict(torchserve, body)
    assert response.status_code == 200, response.text
    mask = mask_of(response)
    assert mask.shape == (480, 640)
    expected = torchvision_mask(model_store, Image.open(io.BytesIO(body)).convert("RGB"))
    # Another engine (OpenVINO) than the reference's: the masks agree, not bit for bit.
    assert np.mean(mask == expected) >= 0.995
    assert len(prediction(response).classes) > 1


def test_concurrent_batch_mixing_good_and_broken(torchserve: TorchServeServer, model_store: Path) -> None:
    good = [encode(scene(320, 240, seed=i)) for i in range(4)]
    broken = [b"garbage", good[0][: len(good[0]) // 3]]
    bodies = [good[0], broken[0], good[1], good[2], broken[1], good[3]]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: predict(torchserve, b), bodies))
    for body, response in zip(bodies, responses, strict=True):
        if body in good:
            assert response.status_code == 200, response.text
            expected = torchvision_mask(model_store, Image.open(io.BytesIO(body)).convert("RGB"))
            assert np.mean(mask_of(response) == expected) >= 0.995
        else:
            assert response.status_code == 422
            assert response.json()["error"]["code"] == "invalid_image"
    batches = [prediction(r).timings_ms["batch_size"] for r in responses if r.status_code == 200]
    assert max(batches) > 1, "nothing was batched"


def test_formats_and_modes(torchserve: TorchServeServer) -> None:
    base = scene(200, 150)
    exif = Image.Exif()
    exif[0x0112] = 6
    cases = {
        "png": encode(base, "PNG"),
        "rgba": encode(base.convert("RGBA"), "PNG"),
        "grey": encode(base.convert("L"), "PNG"),
        "palette": encode(base.convert("P"), "PNG"),
        "webp": encode(base, "WEBP"),
        "exif-rotated": encode(base.transpose(Image.Transpose.ROTATE_270), "JPEG", exif=exif.tobytes()),
    }
    for name, body in cases.items():
        response = predict(torchserve, body)
        assert response.status_code == 200, (name, response.text)
        assert (prediction(response).width, prediction(response).height) == (200, 150), name


def test_parameters_through_headers_and_form(torchserve: TorchServeServer) -> None:
    body = encode(scene(160, 120))
    full = prediction(predict(torchserve, body))
    keep = full.classes[-1]
    by_header = prediction(predict(torchserve, body, **{"X-Classes": keep["name"]}))
    by_form = prediction(
        httpx.post(
            f"{torchserve.inference_url}/predictions/deeplabv3",
            files={"data": ("x.jpg", body)},
            data={"classes": str(keep["id"])},
            headers=torchserve.headers("inference"),
            timeout=60,
        )
    )
    for answer in (by_header, by_form):
        assert {c["id"] for c in answer.classes} <= {0, keep["id"]}
        assert next(c["pixels"] for c in answer.classes if c["id"] == keep["id"]) == keep["pixels"]


def test_management_api_lists_the_model(torchserve: TorchServeServer) -> None:
    [description] = torchserve.manage("GET", "/models/deeplabv3", params={"customized": "true"}).json()
    assert description["batchSize"] >= 1
    assert description["customizedMetadata"]["random_weights"] is True
    assert "meaningless" in description["customizedMetadata"]["weights"]
    assert description["customizedMetadata"]["engine"] == "openvino"  # the default on CPU
    assert description["customizedMetadata"]["precision"] == "fp32"
    listing = torchserve.manage("GET", "/models").json()
    assert [m["modelName"] for m in listing["models"]] == ["deeplabv3"]


async def test_the_workers_client_reads_masks_and_models_over_connections_kept_alive(
    torchserve: TorchServeServer,
) -> None:
    """The worker's own client: a mask and the model's description, and every connection it keeps to
    TorchServe probed by TCP keepalive, so a vanished host fails it in seconds, not hours."""
    client = TorchServe(torchserve.inference_url, torchserve.management_url, torchserve.key_file)
    try:
        image = encode(scene(96, 64), "JPEG")
        answer = await client.predict("deeplabv3", image, [0, 15], 0.0, "image/jpeg")
        assert (answer.width, answer.height) == (96, 64)
        assert Image.open(io.BytesIO(answer.mask_png)).size == (96, 64)
        [model] = await client.models()
        assert (model["name"], model["engine"]) == ("deeplabv3", "openvino")
        assert model["workers_ready"] >= 1
        assert await client.ping()
        ports = {int(url.rsplit(":", 1)[1]) for url in (torchserve.inference_url, torchserve.management_url)}
        kept = [
            c.fd
            for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port in ports and c.status == psutil.CONN_ESTABLISHED
        ]
        assert len(kept) >= 2, "one to each API, pooled"
        for fd in kept:
            with socket.socket(fileno=os.dup(fd)) as sock:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
    finally:
        await client.aclose()


def test_its_log_has_what_operators_read_and_no_line_per_inference(torchserve: TorchServeServer) -> None:
    """TorchServe runs with segserve's log config: its start-up and the handler's own lines on standard
    output, one access-log line a request, and none of the lines TorchServe's default writes per inference."""
    body = encode(scene(64, 48), "JPEG")
    for _ in range(5):
        assert predict(torchserve, body).status_code == 200
    out = (torchserve.directory / "torchserve.out").read_text()
    assert "Model deeplabv3 loaded" in out  # TorchServe's own start-up
    assert "ready on cpu: engine openvino" in out  # the handler's
    for per_inference in (
        "Backend response time",
        "Looping backend response",
        "Sending response for jobId",
        "Backend received inference",
        "[METRICS]",
        "[DEBUG]",
    ):
        assert per_inference not in out, per_inference
    logs = torchserve.directory / "logs"
    assert (logs / "access_log.log").read_text().count('"POST /predictions/deeplabv3 HTTP/1.1" 200') >= 5
    assert sorted(p.name for p in logs.iterdir()) == ["access_log.log"]  # no ts_log.log, model_log.log


def test_archive_carries_serving_config(model_store: Path) -> None:
    with zipfile.ZipFile(model_store / "deeplabv3.mar") as archive:
        config = yaml.safe_load(archive.read("model-config.yaml"))
    assert {"batchSize", "maxBatchDelay", "minWorkers", "maxWorkers", "responseTimeout"} <= set(config)
    assert config["handler"]["random_weights"] is True


def scale(ts: TorchServeServer, workers: int) -> bool:
    params = {"min_worker": str(workers), "max_worker": str(workers)}
    return ts.manage("PUT", "/models/deeplabv3", params=params, timeout=60).status_code < 300


def test_scaling_workers_while_jobs_flow_loses_none(isolated: Stack, torchserve: TorchServeServer) -> None:
    """A worker TorchServe stops mid-batch puts the batch back in its queue or, losing a race with its own
    thread, answers it 500 ("Worker died."): a plain client of TorchServe can lose those requests. segserve's
    worker retries them, so every job succeeds, once, while an operator scales up and down."""
    body = encode(scene(160, 120))
    finished: list[dict[str, Any]] = []
    stop = threading.Event()

    def flow() -> None:
        with httpx.Client(base_url=isolated.url, timeout=120) as client:
            while not stop.is_set():
                headers = {"Content-Type": "image/jpeg", "Prefer": "wait=30"}
                job = client.post("/v1/jobs", content=body, headers=headers).json()
                while job["status"] in ("queued", "running"):
                    job = client.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=30"}).json()
                finished.append(job)

    threads = [threading.Thread(target=flow) for _ in range(6)]  # enough to keep both workers busy
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            # TorchServe may answer a scale call 500 while it stops a worker; an operator tries again.
            wait_until(lambda: scale(torchserve, 2), 60, "TorchServe to accept scaling up")
            wait_until(lambda: torchserve.ready_workers() == 2, 120, "two TorchServe workers")
            wait_until(lambda: scale(torchserve, 1), 60, "TorchServe to accept scaling down")
            wait_until(lambda: torchserve.ready_workers() == 1, 120, "back to one worker")
        wait_until(lambda: len(finished) > 10, 60, "jobs to finish")
    finally:
        stop.set()
        for t in threads:
            t.join()
    outcomes = Counter(
        job["status"] if job["status"] == "succeeded" else job["error"]["code"] for job in finished
    )
    assert finished and set(outcomes) == {"succeeded"}, f"jobs lost while scaling: {outcomes}"
    assert len({job["id"] for job in finished}) == len(finished)
