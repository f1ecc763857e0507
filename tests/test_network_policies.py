"""deploy/kubernetes's NetworkPolicies, rendered by `kubectl kustomize`, let through exactly the paths that
segserve needs: every segserve pod is shut both ways but for those, and the egress to the internet refuses
at least every address the URL guard refuses.

NetworkPolicy is judged here as the API defines it (policies add up; a pod is isolated in a direction once a
policy of that type selects it; a rule's empty peer or port list matches all), for the one cluster that
cannot exist here: enforcement is the network plugin's."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.urls import is_public
from tests.harness.kubernetes import Rendered, selects

NAMESPACE = "segserve"


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, namespace: str, **labels: str) -> Pod:
        return cls(namespace, tuple(labels.items()))


Endpoint = Pod | str  # a pod, or an address outside the cluster


def peer_matches(peer: dict[str, Any], endpoint: Endpoint, policy_namespace: str) -> bool:
    if isinstance(endpoint, str):  # ipBlock is for addresses outside the cluster, as the API says
        if "ipBlock" not in peer:
            return False
        address = ipaddress.ip_address(endpoint)
        block = peer["ipBlock"]
        inside = [ipaddress.ip_network(block["cidr"])] + [
            ipaddress.ip_network(e) for e in block.get("except", [])
        ]
        return (
            address.version == inside[0].version
            and address in inside[0]
            and not any(address.version == n.version and address in n for n in inside[1:])
        )
    if "ipBlock" in peer:
        return False
    labels = dict(endpoint.labels)
    if "namespaceSelector" in peer:
        namespace_labels = {"kubernetes.io/metadata.name": endpoint.namespace}
        if not selects(peer["namespaceSelector"].get("matchLabels", {}), namespace_labels):
            return False
    elif endpoint.namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector", {}).get("matchLabels", {}), labels)


def port_matches(ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    return not ports or any(
        p.get("port", port) == port and p.get("protocol", "TCP") == protocol for p in ports
    )


def admitted(rendered: Rendered, pod: Pod, direction: str, peer: Endpoint, port: int, protocol: str) -> bool:
    """Whether the policies selecting ``pod`` let ``peer:port`` out of it (Egress) or in to it (Ingress)."""
    key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    policies = [
        p
        for p in rendered.of_kind("NetworkPolicy")
        if p["metadata"].get("namespace", NAMESPACE) == pod.namespace
        and direction in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"].get("matchLabels", {}), dict(pod.labels))
    ]
    if not policies:
        return True  # not isolated in this direction
    return any(
        (not rule.get(peers_key) or any(peer_matches(x, peer, pod.namespace) for x in rule[peers_key]))
        and port_matches(rule.get("ports"), port, protocol)
        for policy in policies
        for rule in policy["spec"].get(key, [])
    )


def connects(
    rendered: Rendered, source: Endpoint, target: Endpoint, port: int, protocol: str = "TCP"
) -> bool:
    out = not isinstance(source, Pod) or admitted(rendered, source, "Egress", target, port, protocol)
    into = not isinstance(target, Pod) or admitted(rendered, target, "Ingress", source, port, protocol)
    return out and into


def segserve_pods(rendered: Rendered) -> dict[str, Pod]:
    return {
        component: Pod(NAMESPACE, tuple(sorted(rendered.pod_labels(component).items())))
        for component in ("gateway", "worker", "redis")
    }


def test_every_segserve_pod_is_shut_both_ways(rendered: Rendered) -> None:
    """With no other policy, a segserve pod would take in and send out nothing: each path below is opened
    by name, and a new component starts shut."""
    for workload in rendered.workloads():
        labels = dict(workload["spec"]["template"]["metadata"]["labels"])
        assert labels.get("app.kubernetes.io/part-of") == "segserve", workload["metadata"]["name"]
    (deny,) = [
        p for p in rendered.of_kind("NetworkPolicy") if p["metadata"]["name"] == "segserve-default-deny"
    ]
    assert deny["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/part-of": "segserve"}}
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]


PUBLIC, METADATA, POD_NETWORK = "93.184.215.14", "169.254.169.254", "10.1.2.3"


def test_only_the_designed_paths_are_open(rendered: Rendered) -> None:
    pods = segserve_pods(rendered)
    outside = {
        "keda": Pod.of("keda", **{"app.kubernetes.io/name": "keda-operator"}),
        "ingress": Pod.of("ingress-nginx", **{"app.kubernetes.io/name": "ingress-nginx"}),
        "stranger": Pod.of("default", app="anything"),
        "dns": Pod.of("kube-system", **{"k8s-app": "kube-dns"}),
    }
    endpoints: dict[str, Endpoint] = {
        **pods,
        **outside,
        "public": PUBLIC,
        "metadata": METADATA,
        "pod network": POD_NETWORK,
    }
    ports = [
        (6379, "TCP"),
        (26379, "TCP"),
        (8000, "TCP"),
        (8080, "TCP"),
        (53, "UDP"),
        (53, "TCP"),
        (443, "TCP"),
    ]
    redis_ports = {(6379, "TCP"), (26379, "TCP")}
    dns_ports = {(53, "UDP"), (53, "TCP")}
    expected = (
        {(s, "redis", p) for s in ("gateway", "worker", "redis", "keda") for p in redis_ports}
        | {(s, "gateway", (8000, "TCP")) for s in endpoints if s not in pods}
        | {(s, "dns", p) for s in pods for p in dns_ports}
        | {(s, "public", p) for s in ("gateway", "worker") for p in ports}
    )
    opened = {
        (s, t, p)
        for s, source in endpoints.items()
        for t, target in endpoints.items()
        for p in ports
        if (s in pods or t in pods) and connects(rendered, source, target, *p)
    }  # paths between two endpoints outside segserve are none of its policies' business
    assert opened == expected, (sorted(opened - expected), sorted(expected - opened))


def isatap(address: ipaddress.IPv6Address) -> bool:
    """An ISATAP interface id (…:0:5efe:a.b.c.d): its IPv4 address matters only on an ISATAP tunnel, which a
    pod has none of; the URL guard refuses it all the same, and no prefix can name it."""
    return ((int(address) >> 32) & 0xFDFF_FFFF) == 0x0000_5EFE


@pytest.mark.parametrize("component", ["gateway", "worker"])
@settings(max_examples=300, deadline=None, database=None)
@given(address=st.ip_addresses())
def test_the_egress_refuses_whatever_the_url_guard_refuses(
    rendered: Rendered, component: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> None:
    """Hypothesis draws addresses from the special-purpose ranges as well as at large."""
    pod = segserve_pods(rendered)[component]
    if isinstance(address, ipaddress.IPv6Address) and isatap(address):
        return
    if connects(rendered, pod, str(address), 443):
        assert is_public(str(address)), f"{component} may reach {address}, which the URL guard refuses"


@pytest.mark.parametrize(
    "address",
    ["169.254.169.254", "10.0.0.1", "100.64.0.1", "127.0.0.1", "172.16.0.1", "192.168.1.1", "0.0.0.0",
     "::1", "::7f00:1", "::ffff:127.0.0.1", "::ffff:0:7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::a00:1",
     "2002:7f00:1::", "2001:0:4136:e378:8000:63bf:f5ff:fffe", "fd00::1", "fe80::1", "ff02::1"],
)  # fmt: skip
def test_the_probes_of_the_url_guard_are_refused_here_too(rendered: Rendered, address: str) -> None:
    assert not is_public(address)
    for component in ("gateway", "worker", "redis"):
        assert not connects(rendered, segserve_pods(rendered)[component], address, 443), (component, address)


@pytest.mark.parametrize("address", [PUBLIC, "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_are_open_to_the_gateway_and_the_workers_only(
    rendered: Rendered, address: str
) -> None:
    assert is_public(address)
    pods = segserve_pods(rendered)
    assert connects(rendered, pods["gateway"], address, 443) and connects(
        rendered, pods["worker"], address, 8443
    )
    assert not connects(rendered, pods["redis"], address, 443)
