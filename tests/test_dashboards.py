"""The Grafana dashboard and Prometheus configuration refer to metrics that really exist."""

from __future__ import annotations

import json
import re

import httpx
import yaml

from tests.harness.images import encode, scene
from tests.harness.processes import ROOT
from tests.harness.servers import Stack

PROMQL_FUNCTIONS = {
    "sum",
    "max",
    "rate",
    "by",
    "histogram_quantile",
    "clamp_min",
    "le",
    "status",
    "model_name",
    "job",
    "instance",
    "outcome",
}


def test_dashboard_queries_name_real_metrics(stack: Stack) -> None:
    httpx.post(
        f"{stack.url}/v1/jobs",
        content=encode(scene(32, 32)),
        headers={"Content-Type": "image/jpeg", "Prefer": "wait=30"},
        timeout=60,
    )
    exposed = httpx.get(f"{stack.url}/metrics").text
    exposed += httpx.get(f"http://127.0.0.1:{stack.torchserve.metrics}/metrics").text
    names = set(re.findall(r"(?m)^([a-zA-Z_:][a-zA-Z0-9_:]*)", exposed))
    dashboard = json.loads((ROOT / "dashboards" / "segserve.json").read_text())
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for word in re.findall(
                r"[a-zA-Z_][a-zA-Z0-9_]*",
                re.sub(r'"[^"]*"|\[[^\]]*\]|\d+(\.\d+)?(e-?\d+)?', "", target["expr"]),
            ):
                if word in PROMQL_FUNCTIONS:
                    continue
                assert word in names, f"panel {panel['title']!r} uses {word}, which nothing exposes"


def test_prometheus_scrapes_gateway_and_torchserve() -> None:
    config = yaml.safe_load((ROOT / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets == {"segserve": ["gateway:8000"], "torchserve": ["torchserve:8082"]}
