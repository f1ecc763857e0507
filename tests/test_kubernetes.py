"""deploy/kubernetes renders, with `kubectl kustomize`, to objects that Kubernetes, KEDA and the Prometheus
operator accept, and that keep segserve's promises: only the gateway is reachable, TorchServe stays on its
pod's loopback, the workers scale from zero on arq's queue and finish their jobs when stopped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from configparser import ConfigParser
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from gateway.jobs import keys
from gateway.ops.launcher import LOG_CONFIG
from gateway.settings import Settings
from tests.harness.kubernetes import (
    DEPLOY,
    OVERLAYS,
    Rendered,
    containers_of,
    env_of,
    labels,
    literal_env,
    pod_spec,
    render,
    selects,
)
from tests.harness.processes import ROOT
from tests.harness.redis_users import KEDA, SENTINEL_USERS

# The oldest Kubernetes with native sidecars on by default is 1.29; we validate against a current one.
KUBERNETES_VERSION = "1.31"
REDIS_PORTS = {6379, 26379}
TORCHSERVE_PORTS = {"inference": 8080, "management": 8081, "metrics": 8082}
# Settings that must differ from the repository's config.properties: where the archive is.
TORCHSERVE_CONFIG_CHANGES = {"model_store", "allowed_urls"}
# The trigger metadata that KEDA's redis scalers read (pkg/scalers/redis_scaler.go); a misspelt key would be
# ignored by KEDA and by its schema, which types metadata as a map of strings.
KEDA_REDIS_METADATA = {
    "address",
    "addresses",
    "host",
    "hosts",
    "port",
    "ports",
    "sentinelMaster",
    "listName",
    "listLength",
    "activationListLength",
    "databaseIndex",
    "enableTLS",
    "unsafeSsl",
    "username",
    "sentinelUsername",
}
# KEDA's and the Prometheus operator's schemas, installed from the npm registry by tests/kubernetes/package.json.
NPM_PACKAGES = ROOT / "tests" / "kubernetes"
NPM_CACHE = ROOT / ".segserve" / "npm"
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): ("@kubernetes-models/keda", "keda.sh/v1alpha1"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): ("@kubernetes-models/keda", "keda.sh/v1alpha1"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): (
        "@kubernetes-models/prometheus-operator",
        "monitoring.coreos.com/v1",
    ),
}
SETTINGS = {f"SEGSERVE_{f.name.upper()}" for f in fields(Settings)}


# ---------------------------------------------------------------------------------------------------------
# Rendering


def image_name(image: str) -> str:
    """``registry:port/name`` of ``registry:port/name:tag``."""
    name, _, tag = image.rpartition(":")
    return name if name and "/" not in tag else image


def all_containers(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every container and init container, wherever it is (as kustomize's image transformer looks)."""

    def walk(node: Any) -> Iterator[dict[str, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    yield from value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    yield from walk(objects)


# ---------------------------------------------------------------------------------------------------------
# Lookups


def torchserve_config(rendered: Rendered) -> dict[str, str]:
    text = rendered.one("ConfigMap", "segserve-torchserve")["data"]["config.properties"]
    return read_properties(text)


def read_properties(text: str) -> dict[str, str]:
    parser = ConfigParser(interpolation=None, delimiters=("=",), comment_prefixes=("#",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string("[p]\n" + text)
    return dict(parser["p"])


# ---------------------------------------------------------------------------------------------------------
# Patches


def test_patches_apply_to_the_right_containers() -> None:
    """The overlays patch init containers by index; their `test` operations pin which one they meant."""
    for name in OVERLAYS:
        patch = yaml.safe_load((DEPLOY / "overlays" / name / f"worker-{name}.yaml").read_text())
        indexed = {
            op["path"].split("/")[5] for op in patch if op["path"].startswith("/spec/template/spec/init")
        }
        tested = {op["path"].split("/")[5] for op in patch if op["op"] == "test"}
        assert indexed <= tested, f"{name}: an init container is patched by index without a test of its name"


def test_every_patch_targets_one_object(overlay: tuple[str, Rendered]) -> None:
    """kustomize applies a patch to whatever its target matches, and to nothing without a word: a renamed
    object would leave the overlay's patch unapplied."""
    name, rendered = overlay
    kustomization = yaml.safe_load((DEPLOY / "overlays" / name / "kustomization.yaml").read_text())
    for patch in kustomization["patches"]:
        matching = [obj for obj in rendered.objects if targeted(obj, patch["target"])]
        assert len(matching) == 1, f"{name}: {patch['path']} targets {len(matching)} objects, not one"


def targeted(obj: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    found = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    return all(found.get(key) == value for key, value in target.items())


# ---------------------------------------------------------------------------------------------------------
# Schemas


def test_core_objects_are_valid_kubernetes(rendered: Rendered) -> None:
    for obj in rendered.objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")


@pytest.fixture(scope="module")
def npm_schemas() -> Path:
    """KEDA's and the Prometheus operator's models, installed (pinned by the lock file) once, then reused."""
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.fail("node and npm are needed to check KEDA's objects against KEDA's schema")
    wanted = {f: (NPM_PACKAGES / f).read_text() for f in ("package.json", "package-lock.json")}
    NPM_CACHE.mkdir(parents=True, exist_ok=True)
    stamp = NPM_CACHE / "installed.json"
    if stamp.exists() and json.loads(stamp.read_text()) == wanted and (NPM_CACHE / "node_modules").is_dir():
        return NPM_CACHE
    for name, text in wanted.items():
        (NPM_CACHE / name).write_text(text)
    result = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error", "--ignore-scripts"],
        cwd=NPM_CACHE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"npm ci failed:\n{result.stdout}{result.stderr}"
    stamp.write_text(json.dumps(wanted))
    return NPM_CACHE


# Builds each object with its package's model class and runs the package's own validator on it. That
# validator accepts fields its schema does not declare (as the API server does, before it prunes them), so a
# misspelt field would pass, and be dropped quietly. But it reads each field its schema declares, every key
# of a map, and nothing else: it runs on a view of the object that notes what it reads, and a field it never
# read, in an object it did look into, is one the schema does not have.
VALIDATE_JS = """
import { readFileSync } from "node:fs";

function watched(value, reads) {
  if (value === null || typeof value !== "object") return value;
  return new Proxy(value, {
    get(target, key) {
      if (typeof key === "string") {
        if (!reads.has(target)) reads.set(target, new Set());
        reads.get(target).add(key);
      }
      return watched(target[key], reads);
    },
  });
}

function* undeclared(value, reads, path) {
  if (value === null || typeof value !== "object") return;
  const read = reads.get(value);
  for (const [key, item] of Object.entries(value)) {
    const at = Array.isArray(value) ? `${path}[${key}]` : path ? `${path}.${key}` : key;
    if (read && !Array.isArray(value) && !read.has(key)) {
      yield `${at}: not a field (the schema has ${[...read].sort().join(", ")})`;
    } else {
      yield* undeclared(item, reads, at);
    }
  }
}

const objects = JSON.parse(readFileSync(0, "utf8"));
const failures = [];
for (const { module, kind, object } of objects) {
  const models = await import(module);
  const model = new models[kind](object);
  const reads = new WeakMap();
  try {
    model.validate.call(watched(model, reads));
  } catch (error) {
    failures.push(`${kind}/${object.metadata.name}: ${error.message}`);
  }
  for (const problem of undeclared(model, reads, "")) {
    failures.push(`${kind}/${object.metadata.name}: ${problem}`);
  }
}
console.log(JSON.stringify(failures));
"""


def test_custom_objects_are_valid_for_keda_and_the_prometheus_operator(
    rendered: Rendered, npm_schemas: Path
) -> None:
    batch = []
    for obj in rendered.objects:
        if (key := (obj["apiVersion"], obj["kind"])) in CUSTOM_KINDS:
            package, group_version = CUSTOM_KINDS[key]
            batch.append({"module": f"{package}/{group_version}", "kind": obj["kind"], "object": obj})
    assert {o["kind"] for o in batch} == {"ScaledObject", "TriggerAuthentication", "ServiceMonitor"}
    result = subprocess.run(
        ["node", "--input-type=module", "-e", VALIDATE_JS],
        cwd=npm_schemas,
        input=json.dumps(batch),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    failures = json.loads(result.stdout)
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------------------
# Only the gateway is reachable; TorchServe stays on the worker pod's loopback


def test_only_the_gateway_is_exposed(rendered: Rendered) -> None:
    gateway_pods, worker_pods = rendered.pod_labels("gateway"), rendered.pod_labels("worker")
    exposed = []
    for service in rendered.of_kind("Service"):
        spec = service["spec"]
        assert spec.get("type", "ClusterIP") == "ClusterIP", (
            f"{service['metadata']['name']} is {spec['type']}"
        )
        assert not selects(spec["selector"], worker_pods), (
            f"{service['metadata']['name']} selects worker pods"
        )
        if {p["port"] for p in spec["ports"]} - REDIS_PORTS:
            exposed.append(service)
    assert [s["metadata"]["name"] for s in exposed] == ["segserve-gateway"]
    (gateway_service,) = exposed
    assert selects(gateway_service["spec"]["selector"], gateway_pods)
    assert gateway_service["spec"]["selector"] != {}
    port_names = {p["name"] for p in gateway_service["spec"]["ports"]}
    for ingress in rendered.of_kind("Ingress"):
        backends = [p["backend"]["service"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
        if default := ingress["spec"].get("defaultBackend"):
            backends.append(default["service"])
        assert backends
        for backend in backends:
            assert backend["name"] == "segserve-gateway"
            assert backend["port"].get("name") in port_names or backend["port"].get("number") in {
                p["port"] for p in gateway_service["spec"]["ports"]
            }
    for workload in rendered.workloads():
        spec = pod_spec(workload)
        assert not spec.get("hostNetwork"), workload["metadata"]["name"]
        for container in containers_of(workload).values():
            assert all("hostPort" not in p for p in container.get("ports", [])), container["name"]


def test_torchserve_listens_on_loopback_only_with_the_repositorys_safe_settings(rendered: Rendered) -> None:
    config = torchserve_config(rendered)
    repository = read_properties((ROOT / "config.properties").read_text())
    assert set(config) == set(repository)
    for key in set(config) - TORCHSERVE_CONFIG_CHANGES:
        assert config[key] == repository[key], key
    for kind, port in TORCHSERVE_PORTS.items():
        assert urlparse(config[f"{kind}_address"])[1] == f"127.0.0.1:{port}"
    for key, value in config.items():
        if key.endswith("_address"):
            assert value.removeprefix("http://").split(":")[0] == "127.0.0.1", key
    # Nothing moves them through TorchServe's environment overrides either.
    for container in all_containers(rendered.objects):
        for name, variable in env_of(container).items():
            if name.startswith("TS_") and "ADDRESS" in name:
                assert "127.0.0.1" in variable.get("value", ""), f"{container['name']}: {name}"
    archive = config["load_models"]
    assert re.fullmatch(
        config["allowed_urls"].replace("\\\\", "\\"), f"file://{config['model_store']}/{archive}"
    )


def test_the_worker_reaches_torchserve_over_the_pods_loopback(rendered: Rendered) -> None:
    containers = containers_of(rendered.worker)
    torchserve, worker = containers["torchserve"], containers["worker"]
    env = literal_env(worker)
    config = torchserve_config(rendered)
    assert env["SEGSERVE_TORCHSERVE_URL"] == config["inference_address"]
    assert env["SEGSERVE_TORCHSERVE_MANAGEMENT_URL"] == config["management_address"]
    # TorchServe writes key_file.json into its working directory, readable by its own user only: the worker
    # reads it there, from a volume that lives in memory, as the same user.
    key_file = Path(env["SEGSERVE_TORCHSERVE_KEY_FILE"])
    assert key_file.name == "key_file.json"
    assert torchserve["workingDir"] == str(key_file.parent)
    volumes = {v["name"]: v for v in pod_spec(rendered.worker)["volumes"]}
    mounts = {
        name: {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        for name, c in (("ts", torchserve), ("w", worker))
    }
    ts_mount, worker_mount = mounts["ts"][str(key_file.parent)], mounts["w"][str(key_file.parent)]
    assert ts_mount["name"] == worker_mount["name"]
    assert volumes[ts_mount["name"]]["emptyDir"]["medium"] == "Memory"
    assert worker_mount.get("readOnly") is True
    assert "runAsUser" in pod_spec(rendered.worker)["securityContext"]
    for container in (torchserve, worker):
        assert "runAsUser" not in container.get("securityContext", {}), container["name"]


# ---------------------------------------------------------------------------------------------------------
# Probes, resources, security


def test_gateway_probes(rendered: Rendered) -> None:
    (gateway,) = pod_spec(rendered.gateway)["containers"]
    port = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert port.get(gateway[probe]["httpGet"]["port"], gateway[probe]["httpGet"]["port"]) == 8000
    assert "--port 8000" in " ".join(gateway["command"])


def test_worker_pod_probes(rendered: Rendered) -> None:
    spec = pod_spec(rendered.worker)
    init = {c["name"]: c for c in spec["initContainers"]}
    # TorchServe is a native sidecar: it starts (model loaded) before the worker, and stops after it.
    assert [c["name"] for c in spec["initContainers"]] == ["model", "torchserve"]
    assert init["torchserve"]["restartPolicy"] == "Always"
    assert "restartPolicy" not in init["model"]
    assert "/models" in init["model"]["command"] and init["model"]["command"][:2] == [
        "segserve",
        "build-model",
    ]
    # Probes come from the kubelet to the pod's IP, where nothing listens: every probe here runs inside.
    for container in spec["initContainers"] + spec["containers"]:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in container:
                assert set(container[probe]) & {"httpGet", "tcpSocket", "grpc"} == set(), container["name"]
    startup = init["torchserve"]["startupProbe"]["exec"]["command"]
    script = probe_script(rendered, startup)
    assert "http://127.0.0.1:8080/ping" in script
    assert "--healthy" in startup
    (worker,) = spec["containers"]
    # segserve's --check, which logs in to the sentinels (tests/test_sentinel.py); arq's passes them no login.
    assert worker["livenessProbe"]["exec"]["command"] == ["segserve", "worker", "--check"]
    assert worker["command"] == ["segserve", "worker"]


def test_the_worker_pod_runs_segserves_own_commands(rendered: Rendered) -> None:
    """The archive the init container builds is the one TorchServe loads and the worker's jobs ask for, and
    the segserve commands are ones its CLI takes."""
    from gateway.cli import parser

    containers = containers_of(rendered.worker)
    build = parser().parse_args(containers["model"]["command"][1:])
    assert parser().parse_args(containers["worker"]["command"][1:]).command == "worker"
    model = build.name
    assert model == Settings.from_env(literal_env(containers["worker"])).default_model
    torchserve = containers["torchserve"]["command"]
    assert torchserve[torchserve.index("--models") + 1] == f"{model}={model}.mar"
    store = torchserve[torchserve.index("--model-store") + 1]
    assert store == build.model_store == torchserve_config(rendered)["model_store"]
    mounts = {
        name: {m["mountPath"]: m["name"] for m in containers[name]["volumeMounts"]} for name in containers
    }
    assert mounts["model"][store] == mounts["torchserve"][store]
    # TorchServe logs as `segserve up` has it log: the same file, word for word.
    log_config = Path(torchserve[torchserve.index("--log-config") + 1])
    assert torchserve_file(rendered, log_config) == LOG_CONFIG.read_text()


def probe_script(rendered: Rendered, command: list[str]) -> str:
    """The text of the script a probe runs, from the ConfigMap mounted where the command finds it."""
    return torchserve_file(rendered, Path(next(arg for arg in command if arg.endswith(".py"))))


def torchserve_file(rendered: Rendered, path: Path) -> str:
    """The text of a file the TorchServe container reads, from the ConfigMap mounted where it is."""
    torchserve = containers_of(rendered.worker)["torchserve"]
    (mount,) = [m for m in torchserve["volumeMounts"] if m["mountPath"] == str(path.parent)]
    (volume,) = [v for v in pod_spec(rendered.worker)["volumes"] if v["name"] == mount["name"]]
    configmap = rendered.one("ConfigMap", volume["configMap"]["name"])
    return str(configmap["data"][path.name])


def test_every_container_has_requests_and_limits(rendered: Rendered) -> None:
    for container in all_containers(rendered.objects):
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container.get("resources", {}).get(kind, {})), (
                f"{container['name']}: {kind}"
            )


def test_every_pod_runs_as_non_root(rendered: Rendered) -> None:
    for workload in rendered.workloads():
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True, workload["metadata"]["name"]
        assert spec["securityContext"]["runAsUser"] != 0
        for container in containers_of(workload).values():
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, container["name"]
            assert context["capabilities"]["drop"] == ["ALL"], container["name"]


def test_gpu_only_in_the_gpu_overlay(overlay: tuple[str, Rendered]) -> None:
    from gateway.cli import parser

    name, rendered = overlay
    torchserve = containers_of(rendered.worker)["torchserve"]
    # The init container counts the node's cores, not the pod's: the archive's threads must be named, and fit.
    build = parser().parse_args(containers_of(rendered.worker)["model"]["command"][1:])
    assert build.threads is not None and build.threads <= int(torchserve["resources"]["limits"]["cpu"])
    if name == "gpu":
        for kind in ("requests", "limits"):
            assert int(torchserve["resources"][kind]["nvidia.com/gpu"]) == 1
        assert pod_spec(rendered.worker)["tolerations"]
        assert "--batch-size" in containers_of(rendered.worker)["model"]["command"]
        # The init container that builds the archive sees no GPU, so it must name the CUDA engine itself.
        build = parser().parse_args(containers_of(rendered.worker)["model"]["command"][1:])
        assert build.engine == "torch"
        gpu_users = [c["name"] for c in all_containers(rendered.objects) if "nvidia.com/gpu" in json.dumps(c)]
        assert gpu_users == ["torchserve"]
    else:
        assert "nvidia.com/gpu" not in json.dumps(rendered.objects)
        # TorchServe's workers in the archive match the CPUs TorchServe gets.
        command = containers_of(rendered.worker)["model"]["command"]
        workers = command[command.index("--workers") + 1]
        assert torchserve["resources"]["limits"]["cpu"] == workers


# ---------------------------------------------------------------------------------------------------------
# The gateway


def test_gateway_deployment_autoscaling_and_disruption_budget(rendered: Rendered) -> None:
    gateway = rendered.gateway
    assert gateway["spec"]["replicas"] >= 2
    (hpa,) = rendered.of_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "segserve-gateway",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    budgets = [
        b
        for b in rendered.of_kind("PodDisruptionBudget")
        if selects(b["spec"]["selector"]["matchLabels"], rendered.pod_labels("gateway"))
    ]
    assert len(budgets) == 1


def test_the_gateway_needs_redis_and_the_blob_store(rendered: Rendered) -> None:
    (gateway,) = pod_spec(rendered.gateway)["containers"]
    env = env_of(gateway)
    segserve = {name for name in env if name.startswith("SEGSERVE_")}
    assert segserve == {
        "SEGSERVE_REDIS_URL",
        "SEGSERVE_REDIS_SENTINELS",
        "SEGSERVE_REDIS_SENTINEL_MASTER",
        "SEGSERVE_REDIS_MIN_REPLICAS",
        "SEGSERVE_API_KEYS",
        "SEGSERVE_WEBHOOK_SECRET",
        *BLOB_SETTINGS,
        "SEGSERVE_GATEWAY_IMAGE_BYTES",
    }
    assert env["SEGSERVE_REDIS_MIN_REPLICAS"]["value"] == "1"
    for name in ("SEGSERVE_API_KEYS", "SEGSERVE_WEBHOOK_SECRET"):
        assert "secretKeyRef" in env[name]["valueFrom"], name


BLOB_SETTINGS = {
    "SEGSERVE_BLOB_URL": "url",
    "SEGSERVE_BLOB_ENDPOINT": "endpoint",
    "SEGSERVE_BLOB_REGION": "region",
}
# What a gateway and a worker take beside their image budgets (measured: ~80 and ~100 MB; docs/storage.md).
BASE_MEMORY = {"gateway": 128 << 20, "worker": 160 << 20}


def quantity(text: str) -> int:
    """Bytes of a Kubernetes quantity ("512Mi") or a Redis one ("1gb")."""
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", text.strip()).groups()  # type: ignore[union-attr]
    scale = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30}
    return int(number) * scale[unit]


def test_gateways_and_workers_share_one_bucket_and_their_limits_fit_their_image_budgets(
    rendered: Rendered,
) -> None:
    """Each process keeps its image bytes within a budget (SEGSERVE_*_IMAGE_BYTES); its memory limit must hold
    that budget and its base, or a burst of large images gets it OOM-killed."""
    containers = {
        "gateway": pod_spec(rendered.gateway)["containers"][0],
        "worker": containers_of(rendered.worker)["worker"],
    }
    config = rendered.one("ConfigMap", "segserve-blobs")["data"]
    assert config["url"].startswith("s3://") and set(config) == set(BLOB_SETTINGS.values())
    for role, container in containers.items():
        env = env_of(container)
        for name, key in BLOB_SETTINGS.items():
            assert env[name]["valueFrom"]["configMapKeyRef"] == {"name": "segserve-blobs", "key": key}, (
                role,
                name,
            )
        for name, key in (
            ("AWS_ACCESS_KEY_ID", "access-key-id"),
            ("AWS_SECRET_ACCESS_KEY", "secret-access-key"),
        ):
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "segserve-blobs", (role, name)
            assert env[name]["valueFrom"]["secretKeyRef"]["key"] == key
        budget = int(env[f"SEGSERVE_{role.upper()}_IMAGE_BYTES"]["value"])
        limit = quantity(container["resources"]["limits"]["memory"])
        assert limit >= BASE_MEMORY[role] + budget, (
            f"{role}: a {limit >> 20} MiB limit under a {budget >> 20} MiB budget"
        )


def test_redis_is_sized_for_metadata_and_never_evicts(rendered: Rendered) -> None:
    script = rendered.one("ConfigMap", "segserve-redis-scripts")["data"]["redis.sh"]
    maxmemory = quantity(re.search(r"^\s*maxmemory (\S+)$", script, re.M).group(1))  # type: ignore[union-attr]
    assert re.search(r"^\s*maxmemory-policy noeviction$", script, re.M)
    redis = containers_of(rendered.one("StatefulSet", "segserve-redis"))["redis"]
    limit = quantity(redis["resources"]["limits"]["memory"])
    # Room beside maxmemory for the AOF rewrite's fork and the clients' buffers, but sized from metadata:
    # nowhere near what images would need.
    assert 1.25 * maxmemory <= limit <= 4 << 30, (maxmemory, limit)


def test_prometheus_scrapes_the_gateway(rendered: Rendered) -> None:
    service = rendered.one("Service", "segserve-gateway")
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    (gateway,) = pod_spec(rendered.gateway)["containers"]
    assert int(annotations["prometheus.io/port"]) in {p["containerPort"] for p in gateway["ports"]}
    (monitor,) = rendered.of_kind("ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], labels(service))
    assert monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # The dashboard selects the gateway's process metrics by job="segserve".
    assert labels(service)[monitor["spec"]["jobLabel"]] == "segserve"


# ---------------------------------------------------------------------------------------------------------
# Workers: scale from zero on arq's queue, finish their jobs when stopped


def test_keda_scales_the_workers_from_zero_on_the_backlog(rendered: Rendered) -> None:
    (scaled,) = rendered.of_kind("ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == rendered.worker["metadata"]["name"]
    assert spec.get("scaleTargetRef", {}).get("kind", "Deployment") == "Deployment"
    assert spec["minReplicaCount"] == 0
    assert spec["maxReplicaCount"] >= 1
    assert spec["cooldownPeriod"] > 0
    assert "replicas" not in rendered.worker["spec"], "KEDA owns the worker count; an apply must not reset it"
    (trigger,) = spec["triggers"]
    assert trigger["type"] in {"redis", "redis-sentinel"}
    metadata = trigger["metadata"]
    assert set(metadata) <= KEDA_REDIS_METADATA, set(metadata) - KEDA_REDIS_METADATA
    assert metadata["listName"] == keys.BACKLOG  # every key's waiting jobs, not only what arq holds
    assert int(metadata["activationListLength"]) >= 0
    assert int(metadata["listLength"]) >= 1
    # The same Redis database and sentinels as segserve's own.
    gateway_env = literal_env(pod_spec(rendered.gateway)["containers"][0])
    assert int(metadata.get("databaseIndex", 0)) == int(
        urlparse(gateway_env["SEGSERVE_REDIS_URL"]).path.strip("/")
    )
    if trigger["type"] == "redis-sentinel":
        assert metadata["sentinelMaster"] == gateway_env["SEGSERVE_REDIS_SENTINEL_MASTER"]
        # KEDA's operator resolves them from its own namespace: each name carries this one.
        ours = [s.rpartition(":") for s in gateway_env["SEGSERVE_REDIS_SENTINELS"].split(",")]
        assert [a.strip() for a in metadata["addresses"].split(",")] == [
            f"{host}.{rendered.namespace}.svc:{port}" for host, _, port in ours
        ]
    # KEDA logs in as its own user, which may only count the backlog (tests/test_redis_users.py), on the
    # sentinels too, with the password the Redis and the sentinels give that user.
    assert metadata["username"] == metadata.get("sentinelUsername", metadata["username"]) == KEDA.name
    assert KEDA.name in SENTINEL_USERS
    auth = rendered.one("TriggerAuthentication", trigger["authenticationRef"]["name"])
    refs = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"password", "sentinelPassword"}
    for container in ("redis", "sentinel"):
        workload = rendered.one("StatefulSet", f"segserve-{container}")
        keda_password = env_of(containers_of(workload)[container])["KEDA_PASSWORD"]
        for ref in refs.values():
            assert {"name": ref["name"], "key": ref["key"]} == keda_password["valueFrom"]["secretKeyRef"]


def test_worker_pods_finish_their_jobs_before_they_are_killed(rendered: Rendered) -> None:
    from gateway.worker import WorkerSettings

    worker = containers_of(rendered.worker)["worker"]
    here = Settings.from_env()
    there = Settings.from_env(literal_env(worker))
    # The job timeout as WorkerSettings derives it from the inference timeout, with the pod's setting.
    margin = WorkerSettings.job_timeout - int(here.inference_timeout)
    job_timeout = int(there.inference_timeout) + margin
    wait = max(job_timeout, int(getattr(WorkerSettings, "job_completion_wait", 0)))
    assert pod_spec(rendered.worker)["terminationGracePeriodSeconds"] >= wait


# ---------------------------------------------------------------------------------------------------------
# Redis with Sentinel


def test_redis_sentinel_group(rendered: Rendered) -> None:
    redis, sentinel = (
        rendered.one("StatefulSet", "segserve-redis"),
        rendered.one("StatefulSet", "segserve-sentinel"),
    )
    assert redis["spec"]["replicas"] == 2
    assert sentinel["spec"]["replicas"] == 3
    assert [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]] == ["data"]
    # Stable names: each StatefulSet's headless Service, resolvable before its pods are ready.
    for workload in (redis, sentinel):
        service = rendered.one("Service", workload["spec"]["serviceName"])
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True
        assert selects(service["spec"]["selector"], workload["spec"]["template"]["metadata"]["labels"])
    scripts = rendered.one("ConfigMap", "segserve-redis-scripts")["data"]
    assert "appendonly yes" in scripts["redis.sh"]
    assert "sentinel resolve-hostnames yes" in scripts["sentinel.sh"]
    # Nobody without the password re-points the master name; a primary alone takes no write.
    for line in (
        "protected-mode yes",
        "requirepass $REDIS_PASSWORD",
        "sentinel sentinel-pass $REDIS_PASSWORD",
    ):
        assert line in scripts["sentinel.sh"]
    assert "protected-mode no" not in scripts["sentinel.sh"]
    assert "min-replicas-to-write 1" in scripts["redis.sh"]
    assert "sentinel announce-hostnames yes" in scripts["sentinel.sh"]
    # A restarted former primary asks the sentinels first, and becomes a replica of the one they name.
    redis_sh = scripts["redis.sh"]
    assert (
        redis_sh.index("primary_from_sentinels")
        < redis_sh.index("primary_from_redis")
        < redis_sh.index("replicaof")
    )
    master = re.search(r"^MASTER_NAME=(\S+)$", scripts["common.sh"], re.M)
    assert master is not None
    # segserve's clients name every sentinel pod by its stable name, and the master they watch.
    for workload in (rendered.gateway, rendered.worker):
        env = literal_env(containers_of(workload)[workload["metadata"]["name"].removeprefix("segserve-")])
        assert env["SEGSERVE_REDIS_SENTINEL_MASTER"] == master.group(1)
        service = sentinel["spec"]["serviceName"]
        assert env["SEGSERVE_REDIS_SENTINELS"].split(",") == [
            f"segserve-sentinel-{i}.{service}:26379" for i in range(sentinel["spec"]["replicas"])
        ]
        # Each as its own Redis user (tests/test_redis_users.py), with the password the Redis and the
        # sentinels give that user.
        role = workload["metadata"]["name"].removeprefix("segserve-")
        url = urlparse(env["SEGSERVE_REDIS_URL"])
        assert url.username == f"segserve-{role}" and url.password == "$(REDIS_PASSWORD)"
        assert url.username in SENTINEL_USERS
        own = env_of(containers_of(workload)[role])["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        for member in ("redis", "sentinel"):
            variable = f"{role.upper()}_PASSWORD"
            theirs = env_of(containers_of(rendered.one("StatefulSet", f"segserve-{member}"))[member])
            assert theirs[variable]["valueFrom"]["secretKeyRef"] == own, (member, variable)
    pods = " ".join(f"segserve-sentinel-{i}" for i in range(sentinel["spec"]["replicas"]))
    assert f'SENTINEL_PODS="{pods}"' in scripts["common.sh"]


# ---------------------------------------------------------------------------------------------------------
# Consistency: settings, secrets, labels, images


def test_every_segserve_variable_is_a_real_setting(rendered: Rendered) -> None:
    for container in all_containers(rendered.objects):
        for name in env_of(container):
            if name.startswith("SEGSERVE_"):
                assert name in SETTINGS, (
                    f"{container['name']}: {name} is not a setting of gateway/settings.py"
                )
    # The comments too: they tell people which setting to change.
    for path in DEPLOY.rglob("*.yaml"):
        for name in re.findall(r"SEGSERVE_[A-Z0-9_]+", path.read_text()):
            assert name in SETTINGS, f"{path.relative_to(ROOT)}: {name} is not a setting"


def test_secrets_are_placeholders_and_every_reference_resolves(rendered: Rendered) -> None:
    secrets = {s["metadata"]["name"]: s for s in rendered.of_kind("Secret")}
    for secret in secrets.values():
        assert "data" not in secret, "commit placeholders as stringData only"
        for key, value in secret["stringData"].items():
            assert "REPLACE" in value, f"{secret['metadata']['name']}.{key} is not a placeholder"
    for container in all_containers(rendered.objects):
        for variable in container.get("env", []):
            if ref := variable.get("valueFrom", {}).get("secretKeyRef"):
                assert ref["key"] in secrets[ref["name"]]["stringData"], (container["name"], ref)
    for auth in rendered.of_kind("TriggerAuthentication"):
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in secrets[ref["name"]]["stringData"]


def test_labels_and_selectors_are_consistent(rendered: Rendered) -> None:
    keys = ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of")
    for obj in rendered.objects:
        found = labels(obj)
        assert all(found.get(k) for k in keys), f"{obj['kind']}/{obj['metadata']['name']}: {found}"
        assert found["app.kubernetes.io/part-of"] == "segserve"
        assert obj["metadata"].get("namespace", rendered.namespace) == rendered.namespace
    for workload in rendered.workloads():
        template = workload["spec"]["template"]["metadata"]["labels"]
        assert template == labels(workload), workload["metadata"]["name"]
        assert selects(workload["spec"]["selector"]["matchLabels"], template)
    pods = [w["spec"]["template"]["metadata"]["labels"] for w in rendered.workloads()]
    for service in rendered.of_kind("Service"):
        assert sum(selects(service["spec"]["selector"], p) for p in pods) == 1, service["metadata"]["name"]
    for budget in rendered.of_kind("PodDisruptionBudget"):
        assert sum(selects(budget["spec"]["selector"]["matchLabels"], p) for p in pods) == 1


def test_images_are_set_by_the_overlays(overlay: tuple[str, Rendered]) -> None:
    name, rendered = overlay
    kustomization = yaml.safe_load((DEPLOY / "overlays" / name / "kustomization.yaml").read_text())
    (rule,) = kustomization["images"]
    expected = f"{rule['newName']}:{rule['newTag']}"
    base = [
        c["image"] for c in all_containers(render(DEPLOY / "base")) if image_name(c["image"]) == "segserve"
    ]
    assert set(base) == {"segserve:latest"}
    ours = [c for c in all_containers(rendered.objects) if not c["image"].startswith("redis:")]
    assert len(ours) == 4 and {c["image"] for c in ours} == {expected}
