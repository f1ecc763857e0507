"""deploy/kubernetes as objects: ``render`` runs ``kubectl kustomize`` on an overlay, ``Rendered`` looks its
objects up, and the helpers below read workloads, containers and selectors."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.processes import ROOT

DEPLOY = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")


def render(directory: Path) -> list[dict[str, Any]]:
    """What ``kubectl kustomize directory`` prints, as objects."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is needed to render the overlays (`kubectl kustomize`, kustomize v5)")
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj is not None]


class Rendered:
    """The objects of one rendered overlay."""

    def __init__(self, objects: list[dict[str, Any]]) -> None:
        self.objects = objects

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind} named {name}"
        return found[0]

    def workloads(self) -> list[dict[str, Any]]:
        return self.of_kind("Deployment") + self.of_kind("StatefulSet")

    def pod_labels(self, component: str) -> dict[str, str]:
        (workload,) = [
            w for w in self.workloads() if labels(w).get("app.kubernetes.io/component") == component
        ]
        return dict(workload["spec"]["template"]["metadata"]["labels"])

    @property
    def namespace(self) -> str:
        (namespace,) = self.of_kind("Namespace")
        return str(namespace["metadata"]["name"])

    @property
    def gateway(self) -> dict[str, Any]:
        return self.one("Deployment", "segserve-gateway")

    @property
    def worker(self) -> dict[str, Any]:
        return self.one("Deployment", "segserve-worker")


def labels(obj: dict[str, Any]) -> dict[str, str]:
    return dict(obj["metadata"].get("labels", {}))


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return dict(workload["spec"]["template"]["spec"])


def containers_of(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = pod_spec(workload)
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def literal_env(container: dict[str, Any]) -> dict[str, str]:
    return {name: e["value"] for name, e in env_of(container).items() if "value" in e}


def selects(selector: dict[str, str], pod_labels: dict[str, str]) -> bool:
    return all(pod_labels.get(k) == v for k, v in selector.items())
