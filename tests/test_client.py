"""The Python client, the `segserve` CLI and the web page, against the running stack."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from gateway.client import AsyncClient, Client, SegserveError
from tests.harness.images import encode, scene
from tests.harness.processes import BIN, ROOT
from tests.harness.servers import Stack


def test_sync_client_round_trip(stack: Stack, tmp_path: Path) -> None:
    image = tmp_path / "scene.png"
    image.write_bytes(encode(scene(96, 72), "PNG"))
    with Client(stack.url) as client:
        job = client.segment(image, classes=["cat", 0], threshold=0.0, overlay=True)
        assert job["status"] == "succeeded" and job["params"]["classes"] == [8, 0]
        assert client.mask(job["id"]).startswith(b"\x89PNG")
        assert client.overlay(job["id"]).startswith(b"\x89PNG")
        assert client.get(job["id"])["id"] == job["id"]
        assert client.models()["models"][0]["name"] == "deeplabv3"
        assert client.queue()["workers"]
        queued = client.submit(image.read_bytes())
        assert client.wait(queued["id"])["status"] == "succeeded"
        client.delete(queued["id"])
        with pytest.raises(SegserveError) as error:
            client.get(queued["id"])
        assert error.value.status == 404 and error.value.code == "job_not_found"


async def test_async_client_follows_a_job_behind_others_live(stack: Stack) -> None:
    async with AsyncClient(stack.url) as client:
        # More jobs ahead than the workers take at once: this one waits in the queue, however fast they are.
        taken_at_once = sum(worker["concurrency"] for worker in (await client.queue())["workers"])
        ahead = [await client.submit(encode(scene(200, 150, seed=i))) for i in range(taken_at_once + 4)]
        mine = await client.submit(encode(scene(64, 48)))
        states = [(job["status"], job.get("position")) async for job in client.events(mine["id"])]
        assert states[-1] == ("succeeded", None) and ("running", None) in states, states
        queued = [position for status, position in states if status == "queued"]
        assert queued and queued == sorted(queued, reverse=True) and len(set(queued)) == len(queued), states
        assert states.index(("running", None)) == len(queued)  # queued, then running, then the end
        assert (await client.wait(mine["id"], poll=True))["status"] == "succeeded"  # polling still works
        for job in ahead:
            assert (await client.wait(job["id"]))["status"] == "succeeded"


async def test_async_client_honours_retry_after(stack: Stack) -> None:
    full = Stack(stack.redis, stack.torchserve, stack.env, log_dir=stack.log_dir)
    full.start_gateway(SEGSERVE_MAX_QUEUED="0")
    try:
        async with AsyncClient(full.url, retries=1) as client:
            started = time.monotonic()
            with pytest.raises(SegserveError) as error:
                await client.submit(encode(scene(32, 32)))
            assert error.value.status == 429 and error.value.code == "queue_full"
            assert time.monotonic() - started >= 5  # waited the Retry-After once before giving up
    finally:
        full.stop()


def run_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "segserve"), *args, "--url", stack.url], capture_output=True, text=True, timeout=300
    )


def test_cli_submit_folder_is_resumable(stack: Stack, tmp_path: Path) -> None:
    images = tmp_path / "in"
    (images / "sub").mkdir(parents=True)
    for i in range(3):
        (images / ("sub" if i else "") / f"img{i}.jpg").write_bytes(encode(scene(80, 60, seed=i)))
    (images / "broken.png").write_bytes(b"not a png")
    (images / "notes.txt").write_text("not an image, not picked up")
    out = tmp_path / "masks"

    first = run_cli(
        stack, "submit", str(images), "--out", str(out), "--concurrency", "3", "--classes", "cat,person"
    )
    assert first.returncode == 1, first.stdout + first.stderr  # one image failed
    assert "3 succeeded, 1 failed, 0 skipped" in first.stdout
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "img0.png",
        "sub/img1.png",
        "sub/img2.png",
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["broken.png"]["status"] == "failed"
        and summary["broken.png"]["error"]["code"] == "not_an_image"
    )
    assert summary["sub/img1.jpg"]["status"] == "succeeded"

    again = run_cli(stack, "submit", str(images), "--out", str(out))
    assert "0 succeeded, 1 failed, 3 skipped" in again.stdout
    assert len(json.loads((out / "summary.json").read_text())) == 4

    missing = run_cli(stack, "submit", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_cli_status_models_queue(stack: Stack) -> None:
    with Client(stack.url) as client:
        job = client.segment(encode(scene(40, 30)))
    status = run_cli(stack, "status", job["id"])
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "succeeded"
    unknown = run_cli(stack, "status", "j_" + "0" * 32)
    assert unknown.returncode == 1 and "job_not_found" in unknown.stderr
    models = run_cli(stack, "models")
    assert json.loads(models.stdout)["default_model"] == "deeplabv3"
    queue = run_cli(stack, "queue", "--once")
    assert queue.returncode == 0 and "workers" in queue.stdout and "queued" in queue.stdout
    helped = subprocess.run([str(BIN / "segserve"), "--help"], capture_output=True, text=True)
    for command in ("up", "submit", "status", "models", "queue", "build-model"):
        assert command in helped.stdout


def test_web_page_in_a_real_browser(stack: Stack, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail(
            "chromium is not installed: run `segserve setup --with-browser` (the README's test command does)"
        )
    from playwright.sync_api import sync_playwright

    image = tmp_path / "street.jpg"
    image.write_bytes(encode(scene(320, 240)))
    artifacts = ROOT / "tests" / "artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page()
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(stack.url + "/")
            page.wait_for_selector("#warning:not([hidden])", timeout=10_000)
            assert "random weights" in page.inner_text("#warning")
            page.fill("#classes", "")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#overlay", timeout=60_000)
            assert "done in" in page.inner_text("#status")
            # The page followed the job's live events, and never polled it.
            assert [url for url in requested if url.endswith("/events")], requested
            assert not [url for url in requested if re.search(r"/v1/jobs/j_[0-9a-f]{32}$", url)], requested
            legend = page.inner_text(".legend")
            assert "%" in legend
            natural_width = page.eval_on_selector("#overlay", "img => img.naturalWidth")
            assert natural_width == 320
            assert page.get_attribute("a[download]", "download", timeout=5000).endswith("-mask.png")
            page.screenshot(path=str(artifacts / "web-page.png"), full_page=True)
            page.goto(stack.url + "/docs")
            page.wait_for_selector(".opblock", timeout=30_000)
            assert "/v1/jobs" in page.inner_text("body")
        finally:
            browser.close()
