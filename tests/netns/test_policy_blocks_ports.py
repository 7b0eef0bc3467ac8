"""Real packets against rules with several ipBlocks (excepts, a block inside another's except), selector peers and
several ports (multiport, a bitmap:port set beyond 15 slots, UDP), IPv4 and IPv6: each flow is allowed or
denied exactly as NetworkPolicy says (and as `explain` says), with one kernel rule per protocol and a handful
of sets, written incrementally (list:sets after their members, destroyed before them) and read back unchanged."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from policy.calc import PolicyInputs
from policy.explain import explain
from routed import netns
from tests.netns.policy_harness import RemoteController
from tests.netns.policy_topo import NODE_IP, NODE_IP6, OUTSIDE_LINK_IP, PolicyTopo

pytestmark = [pytest.mark.netns, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

PREFIX = "rtd-pol-bp"
WEB, DB, C1, C2 = "10.244.0.10", "10.244.0.11", "10.244.0.12", "10.244.0.20"
WEB6, DB6, C16, C26 = "fd00:244::10", "fd00:244::11", "fd00:244::12", "fd00:244::20"
# sources outside the node (on the outside namespace's loopback; the node routes everything there)
IN_BLOCK, EXCEPTED, BACK_IN, EXCEPTED2, OTHER_BLOCK = "10.99.0.1", "10.99.1.1", "10.99.1.200", "10.99.2.5", "10.98.0.1"
IN_BLOCK6, EXCEPTED6, BACK_IN6, IN_BLOCK6B, EXCEPTED6B, OTHER_BLOCK6 = (
    "fd98::1", "fd98:0:1::1", "fd98:0:1::7", "fd98:0:2::1", "fd97::1", "fd97:1::1")
EXTRA = (BACK_IN, EXCEPTED2, OTHER_BLOCK, BACK_IN6, IN_BLOCK6B, EXCEPTED6B, OTHER_BLOCK6)
MANY_PORTS = [{"port": 9000, "endPort": 9003}] + [{"port": 20000 + 7 * i} for i in range(20)]  # 22 slots

INGRESS = {"metadata": {"name": "blocks-in", "namespace": "prod"}, "spec": {
    "podSelector": {"matchLabels": {"app": "web"}},
    "ingress": [
        {"from": [{"ipBlock": {"cidr": "10.99.0.0/16", "except": ["10.99.1.0/24", "10.99.2.0/24"]}},
                  {"ipBlock": {"cidr": "10.99.1.200/32"}},
                  {"ipBlock": {"cidr": "fd98::/32", "except": ["fd98:0:1::/48"]}},
                  {"ipBlock": {"cidr": "fd98:0:1::7/128"}},
                  {"podSelector": {"matchLabels": {"app": "client"}}}],
         "ports": [{"port": 80}, {"port": 8080}, {"port": 53, "protocol": "UDP"}]},
        {"from": [{"ipBlock": {"cidr": "10.98.0.0/16"}}, {"ipBlock": {"cidr": "fd97::/16", "except": ["fd97::/64"]}}],
         "ports": MANY_PORTS}]}}
EGRESS = {"metadata": {"name": "blocks-out", "namespace": "dev"}, "spec": {
    "podSelector": {}, "policyTypes": ["Egress"],
    "egress": [{"to": [{"ipBlock": {"cidr": "10.99.0.0/16", "except": ["10.99.1.0/24"]}},
                       {"ipBlock": {"cidr": "fd98::/32", "except": ["fd98:0:1::/48"]}}],
                "ports": [{"port": 80}, *MANY_PORTS]}]}}

# (source: pod name or an outside address, destination, port, protocol, allowed)
FLOWS = [
    (IN_BLOCK, WEB, 80, "TCP", True), (IN_BLOCK, WEB, 8080, "TCP", True), (IN_BLOCK, WEB, 53, "UDP", True),
    (IN_BLOCK, WEB, 9000, "TCP", False), (IN_BLOCK, WEB, 5353, "UDP", False),
    (EXCEPTED, WEB, 80, "TCP", False), (EXCEPTED2, WEB, 80, "TCP", False),
    (BACK_IN, WEB, 80, "TCP", True), (BACK_IN, WEB, 9001, "TCP", False),  # an except, but a block of its own
    (OTHER_BLOCK, WEB, 9002, "TCP", True), (OTHER_BLOCK, WEB, 9003, "TCP", True), (OTHER_BLOCK, WEB, 80, "TCP", False),
    (OTHER_BLOCK, WEB, 8080, "TCP", False), (OUTSIDE_LINK_IP, WEB, 80, "TCP", False),
    ("c1", WEB, 80, "TCP", True), ("c1", WEB, 9000, "TCP", False), ("c2", WEB, 80, "TCP", False),
    ("db", WEB, 8080, "TCP", False), (IN_BLOCK, DB, 9001, "TCP", True),  # db is not selected
    (IN_BLOCK6, WEB6, 80, "TCP", True), (IN_BLOCK6, WEB6, 53, "UDP", True), (IN_BLOCK6, WEB6, 9000, "TCP", False),
    (EXCEPTED6, WEB6, 80, "TCP", False), (BACK_IN6, WEB6, 8080, "TCP", True), (IN_BLOCK6B, WEB6, 80, "TCP", True),
    (EXCEPTED6B, WEB6, 9001, "TCP", False), (OTHER_BLOCK6, WEB6, 9001, "TCP", True),
    (OTHER_BLOCK6, WEB6, 80, "TCP", False), ("c1", WEB6, 8080, "TCP", True), ("c2", WEB6, 80, "TCP", False),
    # egress of dev/c2 to the outside
    ("c2", IN_BLOCK, 80, "TCP", True), ("c2", IN_BLOCK, 9001, "TCP", True), ("c2", IN_BLOCK, 8080, "TCP", False),
    ("c2", EXCEPTED, 80, "TCP", False), ("c2", IN_BLOCK6, 9003, "TCP", True), ("c2", EXCEPTED6, 80, "TCP", False),
    ("c2", IN_BLOCK6, 8080, "TCP", False), ("c1", EXCEPTED, 80, "TCP", True),  # c1 has no egress policy
]


class World:
    def __init__(self, topo: PolicyTopo, ctl: RemoteController) -> None:
        self.topo, self.ctl = topo, ctl

    def inputs(self, policies: list[dict]) -> PolicyInputs:
        pods = [p.pod() for p in self.topo.pods.values()]
        return PolicyInputs(self.topo.namespaces({}), pods, policies, [p.endpoint() for p in self.topo.pods.values()],
                            [NODE_IP, NODE_IP6])

    def check(self, flows: list[tuple[str, str, int, str, bool]], policies: list[dict]) -> None:
        checks = []
        for src, dst, port, proto, _ in flows:
            if src in self.topo.pods:
                checks.append((src, dst, port, proto))
            else:
                checks.append(("outside", dst, port, proto, src))
        got = self.topo.matrix(checks)
        wrong = [(f[:4], f[4], g) for f, g in zip(flows, got, strict=True) if f[4] != g]
        assert not wrong, f"(flow, want, got): {wrong}"
        inputs = self.inputs(policies)
        for src, dst, port, proto, want in flows:
            source = src if src not in self.topo.pods else self.topo.pods[src].pod()
            assert explain(inputs, source, dst, port, proto)["allowed"] == want, (src, dst, port, proto)


@pytest.fixture(scope="module")
def world():
    topo = PolicyTopo(PREFIX)
    ctl = None
    try:
        topo.up()
        for addr in EXTRA:
            netns.ns_run(topo.outside, ["ip", "addr", "add", f"{addr}/{128 if ':' in addr else 32}", "dev", "lo"]
                         + (["nodad"] if ":" in addr else []))
        topo.add_pod("prod", "web", WEB, {"app": "web"}, ip6=WEB6)
        topo.add_pod("prod", "db", DB, {"app": "db"}, ip6=DB6)
        topo.add_pod("prod", "c1", C1, {"app": "client"}, ip6=C16)
        topo.add_pod("dev", "c2", C2, {"app": "client"}, ip6=C26)
        ctl = RemoteController(topo.node, iptables_writer="restore", iptables_backend="auto")
        yield World(topo, ctl)
    finally:
        if ctl is not None:
            ctl.close()
        topo.down()


def _kernel_sets(ns: str) -> dict[str, str]:
    """name -> type of our kernel sets."""
    out = netns.ns_run(ns, ["ipset", "save"]).stdout.splitlines()
    return {line.split()[1]: line.split()[2] for line in out if line.startswith("create rtd")}


def test_blocks_and_ports_per_spec_on_both_families(world: World):
    report = world.ctl.call("sync", world.inputs([]))
    assert report.ok, report.error
    # incremental: the policies arrive as events (sets, list:sets after their members, then the rules)
    for policy in (INGRESS, EGRESS):
        world.ctl.call("engine.set_policy", policy)
    report = world.ctl.call("apply")
    assert report.ok and not report.full, report.error
    world.check(FLOWS, [INGRESS, EGRESS])
    kinds = _kernel_sets(world.topo.node)
    assert {"list:set", "bitmap:port", "hash:net"} <= set(kinds.values())
    assert all(name.startswith("rtd6-") for name in kinds if name.startswith("rtd6")) and any(
        name.startswith("rtd6-l-") for name in kinds)
    # one kernel rule per protocol of each rule: 2 + 1 (ingress) + 1 (egress), in each family
    for tool in ("iptables", "ip6tables"):
        lines = netns.ns_run(world.topo.node, [f"{tool}-save", "-t", "filter"]).stdout.splitlines()
        policy_rules = [ln for ln in lines if ln.startswith(("-A rtd-pi-", "-A rtd-pe-"))]
        assert len(policy_rules) == 4, policy_rules
    # read back in full: nothing differs (bitmap:port saved port by port, list:set members)
    world.ctl.call("force_readback")
    again = world.ctl.call("apply")
    assert again.ok and again.full and again.iptables_ops == 0 and again.ipset_ops == 0, again
    # removed as events: the rules, then each list:set before the sets it holds
    world.ctl.call("engine.delete_policy", "prod/blocks-in")
    world.ctl.call("engine.delete_policy", "dev/blocks-out")
    gone = world.ctl.call("apply")
    assert gone.ok, gone.error
    assert set(_kernel_sets(world.topo.node).values()) == {"hash:ip"}  # the host sets are left
    world.check([(EXCEPTED, WEB, 80, "TCP", True), ("c2", EXCEPTED, 80, "TCP", True)], [])


def _saved(ns: str, family: int) -> list[str]:
    tool = "iptables" if family == 4 else "ip6tables"
    out = netns.ns_run(ns, [f"{tool}-legacy-save", "-t", "filter"]).stdout.splitlines()
    return [ln for ln in out if ln.startswith("-A ")]


def test_both_writers_write_the_same_multiport_and_set_rules(world: World):
    inputs = world.inputs([INGRESS, EGRESS])
    spaces = [f"{PREFIX}-wa", f"{PREFIX}-wb"]
    controllers = []
    try:
        for ns in spaces:
            netns.create(ns)
        controllers = [RemoteController(spaces[0], iptables_writer="restore", iptables_backend="legacy"),
                       RemoteController(spaces[1], iptables_writer="iptc")]
        for ctl in controllers:
            report = ctl.call("sync", inputs)
            assert report.ok, report.error
        for family in (4, 6):
            restore, iptc = (_saved(ns, family) for ns in spaces)
            assert restore == iptc and any("-m multiport --dports 80,8080" in ln for ln in restore)
        assert controllers[1].call("sync", inputs).iptables_ops == 0
    finally:
        for ctl in controllers:
            ctl.close()
        for ns in spaces:
            netns.delete(ns)
