"""Node-to-node mesh: nodes on one L2 segment (a bridge in the "switch" namespace), no ToR router; every node
learns every other node's CIDR with that node as next hop. Dual stack: one mesh session per family."""

import os

import pytest

from routed import netns
from tests.helpers import run_and_expect
from tests.topo.bgp_topo import BgpTopo

pytestmark = [pytest.mark.topo, pytest.mark.netns]


class MeshTopo(BgpTopo):
    @staticmethod
    def node_addr(i, t=1):
        return f"10.1.0.{i + 1}"

    @staticmethod
    def node_addr6(i, t=1):
        return f"fd00::{i + 1}"

    def build(self):
        netns.delete_all(self.prefix)
        sw = self.tor_ns(1)
        netns.create(sw)
        netns.ns_run(sw, ["ip", "link", "add", "br0", "type", "bridge"])
        netns.ns_run(sw, ["ip", "link", "set", "br0", "up"])
        for i in range(1, self.n + 1):
            ns = self.node_ns(i)
            netns.create(ns)
            netns.ns_run(ns, ["ip", "addr", "add", f"10.244.{i}.1/32", "dev", "lo"])
            netns.veth(sw, f"n{i}", ns, "t1")
            netns.ns_run(sw, ["ip", "link", "set", f"n{i}", "master", "br0"])
            netns.ns_run(ns, ["ip", "addr", "add", f"{self.node_addr(i)}/24", "dev", "t1"])
            if self.v6:
                netns.ns_run(ns, ["ip", "addr", "add", f"{self.node_addr6(i)}/64", "dev", "t1", "nodad"])
                netns.ns_run(ns, ["ip", "addr", "add", f"fd10:{i}::1/128", "dev", "lo"])

    def objects(self):
        objs = [o for o in super().objects() if o["kind"] != "BGPPeer"]
        for o in objs:
            if o["kind"] == "BGPConfiguration":
                o["spec"]["nodeToNodeMesh"] = True
        return objs


def test_mesh(request):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    topo = MeshTopo("rtd-bgp-mesh", nodes=3)
    request.addfinalizer(topo.cleanup)
    topo.build()
    for i in (1, 2, 3):
        topo.start_node(i)
    try:
        def full() -> bool:
            return all(len(topo.node_routes(i)) == 2 for i in (1, 2, 3))

        run_and_expect(full, bool, 30, ignore=(Exception,)).check("full mesh routes")
    except AssertionError:
        print(topo.logs())
        raise
    assert topo.node_routes(1)["10.244.2.0/24"] == [topo.node_addr(2)]
    st = topo.status(2)["status"]
    assert sorted(p["name"] for p in st["peers"]) == ["mesh:node1", "mesh:node3"]
    run_and_expect(lambda: all(p["state"] == "established" for p in topo.status(2)["status"]["peers"]),
                   bool, 15, ignore=(Exception,)).check("node2's sessions established")
    assert topo.ping(1, 3).returncode == 0


def test_mesh_dual_stack(request):
    """Dual-stack nodes: one session per family and node pair (the lower address connects, the higher listens,
    on its first address of each family); each family's CIDRs via the other node's address of that family."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    topo = MeshTopo("rtd-bgp-mesh6", nodes=3, v6=True)
    request.addfinalizer(topo.cleanup)
    topo.build()
    for i in (1, 2, 3):
        topo.start_node(i)
    try:
        run_and_expect(lambda: all(len(topo.node_routes(i)) == 4 for i in (1, 2, 3)), bool, 30,
                       ignore=(Exception,)).check("full mesh routes, both families")
    except AssertionError:
        print(topo.logs())
        raise
    for i in (1, 2, 3):
        routes = topo.node_routes(i)
        for j in {1, 2, 3} - {i}:
            assert routes[f"10.244.{j}.0/24"] == [topo.node_addr(j)], routes
            assert routes[f"fd10:{j}::/64"] == [topo.node_addr6(j)], routes
    st = topo.status(2)["status"]
    assert sorted((p["name"], p["address"]) for p in st["peers"]) == [
        ("mesh:node1", "10.1.0.2"), ("mesh:node1", "fd00::2"), ("mesh:node3", "10.1.0.4"), ("mesh:node3", "fd00::4")]
    run_and_expect(lambda: all(p["state"] == "established" for p in topo.status(2)["status"]["peers"]),
                   bool, 15, ignore=(Exception,)).check("node2's sessions established")
    adv = {(r["peer"], r["prefix"]): r["nextHop"] for r in topo.status(2)["advertised"]}
    assert adv[("fd00::2", "fd10:2::/64")] == "fd00::3" and adv[("10.1.0.2", "10.244.2.0/24")] == "10.1.0.3"
    assert ("10.1.0.2", "fd10:2::/64") not in adv  # each session carries its own family only
    assert topo.ping6(1, 3).returncode == 0 and topo.ping(1, 3).returncode == 0
