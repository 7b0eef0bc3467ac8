"""A LoadBalancer Service in the kube lab, end to end: a real kube-apiserver holds it, routed announces its IP
(externalTrafficPolicy Local: from the node with the endpoint), a real kube-proxy (iptables mode) on each node
DNATs it, and the external client behind the ToR reaches a pod — until a NetworkPolicy denies that client."""

from __future__ import annotations

import pytest

from routed.lab.bgp_setup import advertise_services
from routed.lab.lab import Lab
from routed.lab.routers import kernel_routes
from tests.helpers import apply_objects, run_and_expect

pytestmark = [pytest.mark.requires_root, pytest.mark.kube, pytest.mark.topo]
LB_RANGE = "198.51.100.0/24"
VIP = "198.51.100.20"

SERVICE = {
    "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-lb", "namespace": "demo"},
    "spec": {"type": "LoadBalancer", "selector": {"app": "vip"}, "externalTrafficPolicy": "Local",
             "allocateLoadBalancerNodePorts": False,
             "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    "status": {"loadBalancer": {"ingress": [{"ip": VIP}]}},
}
POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "vip-1", "namespace": "demo", "labels": {"app": "vip"}},
       "spec": {"nodeName": "node2", "containers": [{"name": "c", "ports": [{"containerPort": 8080}]}]}}


def deny_client(client: str) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "vip-not-from-client", "namespace": "demo"},
            "spec": {"podSelector": {"matchLabels": {"app": "vip"}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": [f"{client}/32"]}}]}]}}


@pytest.fixture(scope="module")
def lab():
    from tests.kube.kube_env import _build_or_skip

    _build_or_skip()
    lab = Lab("tkvip")
    try:
        lab.up(nodes=2, tor="frr", datastore="kube")
        advertise_services(lab, {"serviceLoadBalancerIPs": [{"cidr": LB_RANGE}]})
        yield lab
    finally:
        lab.down(quiet=True)


def test_external_client_reaches_the_load_balancer_ip_and_policy_applies(lab, tmp_path):
    state = lab.state()
    client = state.external["address"]
    node2 = state.node("node2")
    apply_objects(lab, tmp_path, "vip.yaml", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}},
          SERVICE, POD)
    run_and_expect(lambda: {r["prefix"]: sorted(r["nexthops"]) for r in kernel_routes(state.tors[0].netns)}.get(
        f"{VIP}/32"), [node2.address], timeout=30).check("the ToR routes the LB IP to node2 only")
    answer = run_and_expect(lambda: lab.probe_external(VIP, 80), lambda r: r["allowed"], timeout=30).check(
        "the external client reaches the LB IP (kube-proxy DNAT on node2)")
    assert answer["server"] == "demo/vip-1"
    assert answer["client_seen"] == client  # Local: no SNAT, the pod sees the client
    apply_objects(lab, tmp_path, "deny.yaml", deny_client(client))
    run_and_expect(lambda: lab.probe_external(VIP, 80)["allowed"], False, timeout=30).check(
        "a NetworkPolicy denying the external client blocks it")
