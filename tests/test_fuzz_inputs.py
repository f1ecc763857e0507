"""Property-based fuzzing (hypothesis) of everything a client sends, against the real gateway process: JSON,
form and multipart bodies, query strings, headers, host names in URLs (IDNA, IPv6 literals, ports) and image
bytes. The property: never a 5xx, and every 4xx is a problem answer with a code.

The fast tier runs FAST examples per strategy (a few seconds in all); the full tier runs FULL."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness.images import encode, scene
from tests.harness.servers import GatewayServer, RedisServer

FAST, FULL = 50, 200
BUDGETS = [FAST, pytest.param(FULL, marks=pytest.mark.slow)]
JPEG = encode(scene(32, 24))
PNG = encode(scene(32, 24), "PNG")
PARAMETERS = ["image", "image_url", "classes", "threshold", "model", "overlay", "webhook",
              "webhook_events_filter", "image_path", "target_class_ids"]  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
json_bodies = st.dictionaries(st.sampled_from(PARAMETERS) | st.text(max_size=8), json_values, max_size=6)
header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40
)
labels = st.text(
    st.sampled_from("aZ09-_.xn\u0645\u062b\u0627\u0644\u0661\u200d\u00df%"), min_size=0, max_size=20
)
hosts = (
    labels
    | st.ip_addresses(v=6).map(lambda ip: f"[{ip}]")
    | st.ip_addresses(v=4).map(str)
    | st.text(st.sampled_from("0123456789abcdef:.%"), max_size=30).map(lambda t: f"[{t}]")
)
ports = st.none() | st.integers(-5, 70000).map(str) | st.text(st.sampled_from("0123456789ab-+"), max_size=6)


def url(host: str, port: str | None) -> str:
    return f"http://{host}{'' if port is None else ':' + port}/hook"


def mutated(image: bytes) -> st.SearchStrategy[bytes]:
    """The image with some bytes changed, cut short, or with junk after it."""
    flips = st.lists(st.tuples(st.integers(0, len(image) - 1), st.integers(0, 255)), max_size=8)
    return st.one_of(
        flips.map(lambda fs: bytes(_apply(image, fs))),
        st.integers(0, len(image)).map(lambda n: image[:n]),
        st.binary(max_size=64).map(lambda junk: image + junk),
        st.binary(max_size=256),
    )


def _apply(image: bytes, flips: list[tuple[int, int]]) -> bytearray:
    changed = bytearray(image)
    for at, value in flips:
        changed[at] = value
    return changed


@pytest.fixture(scope="module")
def fuzzed(job_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    home = tmp_path_factory.mktemp("fuzz")
    (home / "images").mkdir()
    (home / "images" / "cat.jpg").write_bytes(JPEG)
    env = {"SEGSERVE_IMAGE_ROOT": str(home / "images"), "SEGSERVE_MAX_QUEUED": "100000"}
    with (
        GatewayServer(job_redis, home / "blobs", home, env) as gateway,
        httpx.Client(base_url=gateway.url, timeout=60) as client,
    ):
        yield client


def check(answer: httpx.Response) -> None:
    assert answer.status_code < 500, (answer.request.method, str(answer.request.url)[:200], answer.text[:300])
    if answer.status_code >= 400:
        assert answer.headers["content-type"] == "application/problem+json", answer.text[:300]
        assert answer.json()["code"], answer.text[:300]


def run(budget: int, strategy: st.SearchStrategy[Any], send: Any) -> None:
    @settings(max_examples=budget, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def property(example: Any) -> None:
        check(send(example))

    property()


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("path", ["/v1/jobs", "/predict"])
def test_json_bodies(fuzzed: httpx.Client, budget: int, path: str) -> None:
    image = base64.b64encode(JPEG).decode()
    bodies = json_bodies.map(lambda b: {"image": image, **b}) | json_bodies | json_values

    def send(body: Any) -> httpx.Response:
        content = json.dumps(body).encode()
        return fuzzed.post(path, content=content, headers={"Content-Type": "application/json"})

    run(budget, bodies, send)


@pytest.mark.parametrize("budget", BUDGETS)
def test_form_and_multipart_bodies(fuzzed: httpx.Client, budget: int) -> None:
    fields = st.dictionaries(
        st.sampled_from(PARAMETERS) | st.text(max_size=8), st.text(max_size=30), max_size=6
    )
    files = st.dictionaries(st.sampled_from(["image", "x"]), mutated(JPEG) | st.just(JPEG), max_size=2)

    def send(example: tuple[dict[str, str], dict[str, bytes]]) -> httpx.Response:
        data, uploads = example
        return fuzzed.post("/v1/jobs", data=data, files={k: ("a.jpg", v) for k, v in uploads.items()} or None)

    run(budget, st.tuples(fields, files), send)


@pytest.mark.parametrize("budget", BUDGETS)
def test_query_strings(fuzzed: httpx.Client, budget: int) -> None:
    queries = st.lists(
        st.tuples(st.sampled_from(PARAMETERS) | st.text(max_size=8), st.text(max_size=30)), max_size=6
    )
    raw = st.text(st.sampled_from("%&=+;ZZff00az?#[]"), max_size=40)

    def send(example: list[tuple[str, str]] | str) -> httpx.Response:
        target = f"/v1/jobs?{example}" if isinstance(example, str) else httpx.URL("/v1/jobs", params=example)
        return fuzzed.post(target, content=JPEG, headers={"Content-Type": "image/jpeg"})

    run(budget, queries | raw, send)


@pytest.mark.parametrize("budget", BUDGETS)
def test_headers(fuzzed: httpx.Client, budget: int) -> None:
    names = st.sampled_from(["Prefer", "Idempotency-Key", "async_mode", "Authorization", "Content-Type",
                             "Last-Event-ID", "X-Anything"])  # fmt: skip
    headers = st.dictionaries(names, header_text.map(str.strip), max_size=4)

    def send(example: dict[str, str]) -> httpx.Response:
        sent = {"Content-Type": "image/jpeg", **example}
        if "wait" in sent.get("Prefer", "") or sent.get("async_mode", "").lower() in ("false", "0", "no"):
            (
                sent.pop("Prefer", None),
                sent.pop("async_mode", None),
            )  # a real wait is served; no worker runs here
        encoded = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in sent.items()]
        return fuzzed.post("/v1/jobs", content=JPEG, headers=encoded)

    run(budget, headers, send)


@pytest.mark.parametrize("budget", BUDGETS)
def test_host_names_ports_and_ipv6_literals(fuzzed: httpx.Client, budget: int) -> None:
    image = base64.b64encode(JPEG).decode()

    def send(example: tuple[str, str | None, str]) -> httpx.Response:
        host, port, member = example
        body = (
            {"image": image, "webhook": url(host, port)}
            if member == "webhook"
            else {"image_url": url(host, port)}
        )
        return fuzzed.post("/v1/jobs", json=body)

    run(budget, st.tuples(hosts, ports, st.sampled_from(["webhook", "image_url"])), send)


@pytest.mark.parametrize("budget", BUDGETS)
def test_image_bytes(fuzzed: httpx.Client, budget: int) -> None:
    content_types = st.sampled_from(
        ["image/jpeg", "image/png", "image/webp", "image/tiff", "application/octet-stream"]
    )

    def send(example: tuple[bytes, str]) -> httpx.Response:
        body, content_type = example
        return fuzzed.post("/v1/jobs", content=body, headers={"Content-Type": content_type})

    run(budget, st.tuples(mutated(JPEG) | mutated(PNG), content_types), send)
