"""Service VIP advertisement in the lab: a LoadBalancer IP reaches the ToR's kernel via the nodes that should
announce it (externalTrafficPolicy Local: nodes with a ready endpoint; Cluster: every node)."""

from __future__ import annotations

import pytest

from routed import api
from routed.lab.bgp_setup import advertise_services
from routed.lab.lab import Lab
from routed.lab.routers import kernel_routes
from tests.helpers import apply_objects, run_and_expect

pytestmark = [pytest.mark.requires_root, pytest.mark.topo]
LB_RANGE = "198.51.100.0/24"
VIP = "198.51.100.10"


@pytest.fixture(scope="module")
def lab():
    lab = Lab("tsvc")
    try:
        lab.up(nodes=2, tor="frr")
        advertise_services(lab, {"serviceLoadBalancerIPs": [{"cidr": LB_RANGE}],
                                 "serviceCommunities": {"loadBalancerIP": ["65000:300"]}})
        yield lab
    finally:
        lab.down(quiet=True)


def service(policy: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-lb", "namespace": "demo"},
            "spec": {"type": "LoadBalancer", "selector": {"app": "vip"}, "externalTrafficPolicy": policy,
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": VIP}]}}}


def pod(name: str, node: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "demo", "labels": {"app": "vip"}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"containerPort": 80}]}]}}


def tor_hops(lab: Lab, prefix: str) -> list[str]:
    routes = {r["prefix"]: r["nexthops"] for r in kernel_routes(lab.state().tors[0].netns)}
    return sorted(routes.get(prefix, []))


def expect_hops(lab: Lab, expected: list[str], what: str) -> None:
    outcome = run_and_expect(lambda: tor_hops(lab, f"{VIP}/32"), expected, timeout=30)
    if not outcome.ok:  # say what each node thinks it announces, and from which slices
        state = lab.state()
        details = {n.name: {"advertised": [r["prefix"] for r in api.call(lab.paths.node_socket(n.name),
                                                                          "bgp.advertised")],
                            "serviceRoutes": api.call(lab.paths.node_socket(n.name), "bgp.status")["serviceRoutes"]}
                   for n in state.nodes}
        pytest.fail(f"{what}: {outcome.diff}; nodes: {details}; slices: {state.endpoint_slices}")


def test_load_balancer_ip_follows_the_ready_endpoints(lab, tmp_path):
    state = lab.state()
    addr = {n.name: n.address for n in state.nodes}
    both = sorted(addr.values())
    run_and_expect(lambda: tor_hops(lab, LB_RANGE), both, timeout=30).check("every node announces the LB range")
    apply_objects(lab, tmp_path, "svc.yaml", service("Local"))
    pod2 = apply_objects(lab, tmp_path, "pod2.yaml", pod("vip-2", "node2"))
    expect_hops(lab, [addr["node2"]], "Local: the /32 only via the node with the endpoint")
    advertised = api.call(lab.paths.node_socket("node2"), "bgp.advertised")
    vip_route = next(r for r in advertised if r["prefix"] == f"{VIP}/32")
    assert vip_route["source"] == "Service demo/web-lb" and "65000:300" in vip_route["communities"]
    assert api.call(lab.paths.node_socket("node2"), "bgp.status")["serviceRoutes"] == 2  # the range and the /32
    pod1 = apply_objects(lab, tmp_path, "pod1.yaml", pod("vip-1", "node1"))
    expect_hops(lab, both, "endpoints on both: ECMP")
    lab.delete(pod1)
    lab.delete(pod2)
    expect_hops(lab, [], "no endpoint left: withdrawn")
    apply_objects(lab, tmp_path, "svc-cluster.yaml", service("Cluster"))
    expect_hops(lab, both, "Cluster: via every node")
    assert tor_hops(lab, LB_RANGE) == both
