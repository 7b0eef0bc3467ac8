"""The kube lab dual-stack: a real kube-apiserver with IPv4 and IPv6 Service ranges, Nodes with a pod CIDR per
family, pods whose status carries both addresses, IPv6 pod traffic across the fabric and NetworkPolicy from
the API enforced on IPv6 as on IPv4."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator

import pytest

from routed import netns
from routed.lab.lab import Lab
from tests.helpers import run_and_expect
from tests.kube.test_kube_lab import WEB_FROM_CLIENTS, store

pytestmark = [pytest.mark.requires_root, pytest.mark.kube, pytest.mark.topo]
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "lab", "two-nodes.yaml")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    from tests.kube.kube_env import _build_or_skip

    _build_or_skip()
    lab = Lab("tkube6")
    try:
        lab.up(nodes=2, files=[EXAMPLE], tor="frr", datastore="kube", ip_family="dual")
    except Exception:
        lab.down(quiet=True)
        raise
    yield lab
    lab.down(quiet=True)
    assert netns.list_ours("rtd-tkube6-") == []


def versions(ips: list[str]) -> list[int]:
    return [ipaddress.ip_address(ip).version for ip in ips]


def tcp80(lab: Lab, family: int) -> dict[tuple[str, str], bool]:
    return {(r["from"], r["to"]): r["allowed"]
            for r in lab.matrix(ports=[80], protocols=["tcp"], timeout=0.8, family=family)}


def test_api_objects_are_dual_stack(lab: Lab) -> None:
    kube = store(lab)
    node = kube.read({"kind": "Node", "metadata": {"name": "node1"}})
    assert node is not None and versions([c.split("/")[0] for c in node["spec"]["podCIDRs"]]) == [4, 6]
    pod = kube.read({"kind": "Pod", "metadata": {"name": "web-1", "namespace": "demo"}})
    assert pod is not None and versions([p["ip"] for p in pod["status"]["podIPs"]]) == [4, 6]
    # the apiserver hands a RequireDualStack Service a ClusterIP of each family
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-ds", "namespace": "demo"},
           "spec": {"ipFamilyPolicy": "RequireDualStack", "selector": {"app": "web"},
                    "ports": [{"port": 80, "protocol": "TCP"}]}}
    kube.write(svc)
    try:
        created = kube.read(svc)
        assert created is not None and versions(created["spec"]["clusterIPs"]) == [4, 6], created
    finally:
        kube.delete(svc)


def test_ipv6_pod_traffic_and_policy_from_the_api(lab: Lab) -> None:
    rows = lab.matrix(timeout=0.8, family=6)
    assert len(rows) == 64 and all(r["allowed"] and r["client_seen"] == r["from_ip"] for r in rows)
    kube = store(lab)
    kube.write(WEB_FROM_CLIENTS)
    try:
        for family in (6, 4):
            seen = run_and_expect(lambda f=family: tcp80(lab, f), lambda m: not m[("demo/web-1", "demo/web-2")],
                                  timeout=20).check(f"web-1 -> web-2 denied on IPv{family}")
            assert seen[("demo/client-1", "demo/web-2")], seen
        rules = netns.ns_run(lab.state().node("node2").netns, ["ip6tables-save", "-t", "filter"]).stdout
        assert "rtd-pi-" in rules and "--dport 80" in rules
    finally:
        kube.delete(WEB_FROM_CLIENTS)
    run_and_expect(lambda: tcp80(lab, 6), lambda m: all(m.values()), timeout=20).check("all allowed again")
