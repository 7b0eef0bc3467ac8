"""Real packets through real iptables/ip6tables/ipsets in namespaces: NetworkPolicy semantics end to end, IPv4
and IPv6 (dual-stack pods; the same policies police both families)."""

from __future__ import annotations

import os
import re
import shlex
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from policy.calc import PolicyInputs
from policy.explain import explain
from routed import netns
from routed.model import ContainerPort, Pod
from tests.helpers import holds_for, run_and_expect
from tests.netns.policy_harness import RemoteController
from tests.netns.policy_topo import GATEWAY6, NODE_IP, NODE_IP6, OUTSIDE_IPS, OUTSIDE_IPS6, PolicyTopo

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

PREFIX = "rtd-pol-dp"
WEB, DB, C1, C2 = "10.244.0.10", "10.244.0.11", "10.244.0.12", "10.244.0.20"
WEB6, DB6, C16, C26 = "fd00:244::10", "fd00:244::11", "fd00:244::12", "fd00:244::20"
REMOTE = OUTSIDE_IPS[0]  # a pod on another node (dev/remote)
EXTERNAL = OUTSIDE_IPS[1]  # not a pod
REMOTE6, EXTERNAL6 = OUTSIDE_IPS6


def np(name: str, spec: dict, namespace: str = "prod") -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


class World:
    def __init__(self, topo: PolicyTopo, ctl: RemoteController) -> None:
        self.topo = topo
        self.ctl = ctl
        self.ns_labels: dict[str, dict[str, str]] = {"prod": {"env": "prod"}, "dev": {"env": "dev"}}
        self.policies: list[dict] = []
        self.remote = Pod("dev", "remote", {"app": "client"}, "other-node", (REMOTE, REMOTE6),
                          (ContainerPort(9002, "TCP", "web-alt"),))
        self.label_overrides: dict[str, dict[str, str]] = {}

    def inputs(self) -> PolicyInputs:
        pods = []
        for p in self.topo.pods.values():
            pod = p.pod()
            if p.name in self.label_overrides:
                pod = Pod(pod.namespace, pod.name, self.label_overrides[p.name], pod.node_name, pod.ips, pod.ports)
            pods.append(pod)
        pods.append(self.remote)
        return PolicyInputs(self.topo.namespaces(self.ns_labels), pods, list(self.policies),
                            [p.endpoint() for p in self.topo.pods.values()], [NODE_IP, NODE_IP6])

    def sync(self, policies: list[dict] | None = None):
        if policies is not None:
            self.policies = policies
        report = self.ctl.call("sync", self.inputs())
        assert report.ok, report.error
        return report

    def source(self, src: str, dst: str) -> str:
        """The address a probe from `src` to `dst` leaves from ("outside": REMOTE(6), the remote pod dev/remote)."""
        v6 = ":" in dst
        if src == "outside":
            return REMOTE6 if v6 else REMOTE
        pod = self.topo.pods[src]
        return (pod.ip6 or "") if v6 else pod.ip

    def check(self, expected: list[tuple[str, str, int, str, bool]]) -> None:
        got = self.topo.matrix([(s, d, p, proto, self.source(s, d)) if s == "outside" else (s, d, p, proto)
                                for s, d, p, proto, _ in expected])
        wrong = [(e[:4], e[4], g) for e, g in zip(expected, got, strict=True) if e[4] != g]
        assert not wrong, f"(flow, want, got): {wrong}"
        # explain must agree with the datapath, flow by flow
        inputs = self.inputs()
        for (src, dst, port, proto, want) in expected:
            got_explain = explain(inputs, self.source(src, dst), dst, port, proto)["allowed"]
            assert got_explain == want, (src, dst, port, proto)


@pytest.fixture(scope="module")
def world():
    topo = PolicyTopo(PREFIX)
    ctl = None
    try:
        topo.up()
        topo.add_pod("prod", "web", WEB, {"app": "web"},
                     (ContainerPort(80, "TCP", "http"), ContainerPort(8080, "TCP", "web-alt"),
                      ContainerPort(53, "UDP", "dns")), ip6=WEB6)
        topo.add_pod("prod", "db", DB, {"app": "db"}, (ContainerPort(9001, "TCP", "web-alt"),), ip6=DB6)
        topo.add_pod("prod", "c1", C1, {"app": "client"}, ip6=C16)
        topo.add_pod("dev", "c2", C2, {"app": "client"}, ip6=C26)
        ctl = RemoteController(topo.node, iptables_writer="restore", iptables_backend="auto")
        yield World(topo, ctl)
    finally:
        if ctl is not None:
            ctl.close()
        topo.down()


@pytest.fixture
def w(world: World) -> World:
    world.label_overrides = {}
    world.ns_labels = {"prod": {"env": "prod"}, "dev": {"env": "dev"}}
    world.sync([])
    return world


def test_no_policy_everything_allowed(w: World):
    w.check([("c1", WEB, 80, "TCP", True), ("c2", DB, 9001, "TCP", True), ("outside", WEB, 80, "TCP", True),
             ("web", EXTERNAL, 80, "TCP", True), ("c1", WEB, 53, "UDP", True)])


def test_ingress_default_deny_and_pod_selector(w: World):
    w.sync([np("deny", {"podSelector": {"matchLabels": {"app": "web"}}}),
            np("allow-client", {"podSelector": {"matchLabels": {"app": "web"}},
                                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                             "ports": [{"port": 80}]}]})])
    w.check([("c1", WEB, 80, "TCP", True),   # same-namespace client, allowed port
             ("c1", WEB, 8080, "TCP", False),  # other port
             ("c2", WEB, 80, "TCP", False),   # client in another namespace: podSelector alone is same-ns
             ("db", WEB, 80, "TCP", False),
             ("c1", DB, 9001, "TCP", True),   # db is not selected
             ("outside", WEB, 80, "TCP", False),
             ("web", C1, 80, "TCP", True)])   # egress not restricted


def test_namespace_selector_and_vs_or(w: World):
    and_peer = {"namespaceSelector": {"matchLabels": {"env": "dev"}}, "podSelector": {"matchLabels": {"app": "client"}}}
    w.sync([np("and", {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [and_peer]}]})])
    w.check([("c2", WEB, 80, "TCP", True), ("c1", WEB, 80, "TCP", False), ("outside", WEB, 80, "TCP", True),
             ("db", WEB, 80, "TCP", False)])  # outside 10.99.0.1 is dev/remote (app=client)
    or_peers = [{"namespaceSelector": {"matchLabels": {"env": "dev"}}},
                {"podSelector": {"matchLabels": {"app": "db"}}}]
    w.sync([np("or", {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": or_peers}]})])
    w.check([("c2", WEB, 80, "TCP", True), ("db", WEB, 80, "TCP", True), ("c1", WEB, 80, "TCP", False)])


def test_egress_ipblock_except_and_udp(w: World):
    w.sync([np("egress", {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                          "egress": [{"to": [{"ipBlock": {"cidr": "10.99.0.0/16", "except": ["10.99.1.0/24"]}}]},
                                     {"ports": [{"port": 53, "protocol": "UDP"}]}]})])
    w.check([("c1", REMOTE, 80, "TCP", True), ("c1", EXTERNAL, 80, "TCP", False),
             ("c1", WEB, 80, "TCP", False), ("c1", WEB, 53, "UDP", True), ("c1", WEB, 5353, "UDP", False),
             ("c1", EXTERNAL, 53, "UDP", True), ("web", EXTERNAL, 80, "TCP", True)])


def test_named_ports_and_endport(w: World):
    # ingress named port resolves per destination pod: web-alt is 8080 on web, 9001 on db
    w.sync([np("named-in", {"podSelector": {}, "ingress": [{"ports": [{"port": "web-alt"}]}]}),
            np("range", {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                         "egress": [{"ports": [{"port": 9000, "endPort": 9002}]}]})])
    w.check([("c2", WEB, 8080, "TCP", True), ("c2", WEB, 9001, "TCP", False), ("c2", DB, 9001, "TCP", True),
             ("c2", DB, 8080, "TCP", False), ("c1", REMOTE, 9000, "TCP", True), ("c1", REMOTE, 9002, "TCP", True),
             ("c1", REMOTE, 9003, "TCP", False), ("c1", REMOTE, 80, "TCP", False)])
    # egress named port resolves per selected destination pod (remote: 9002; web: 8080)
    w.sync([np("named-out", {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                             "egress": [{"ports": [{"port": "web-alt"}]}]})])
    w.check([("c1", WEB, 8080, "TCP", True), ("c1", WEB, 80, "TCP", False), ("c1", REMOTE, 9002, "TCP", True),
             ("c1", REMOTE, 9001, "TCP", False), ("c1", DB, 9001, "TCP", True), ("c1", EXTERNAL, 9002, "TCP", False)])


def test_live_reaction_to_changes(w: World):
    pol = np("allow-client", {"podSelector": {"matchLabels": {"app": "web"}},
                              "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]})
    w.sync([pol])
    run_and_expect(lambda: w.topo.reach("c1", WEB, 80, "TCP"), True, 5.0,
                   interval=0.05).check("c1 -> web:80 allowed")
    run_and_expect(lambda: w.topo.reach("db", WEB, 80, "TCP"), False, 5.0,
                   interval=0.05).check("db -> web:80 denied")
    w.label_overrides = {"db": {"app": "client"}}  # pod label change: ipset membership only
    report = w.sync()
    assert report.iptables_ops == 0 and report.ipset_ops > 0
    run_and_expect(lambda: w.topo.reach("db", WEB, 80, "TCP"), True, 5.0,
                   interval=0.05).check("db -> web:80 allowed")
    w.label_overrides = {}
    w.sync()
    run_and_expect(lambda: w.topo.reach("db", WEB, 80, "TCP"), False, 5.0,
                   interval=0.05).check("db -> web:80 denied")
    # policy update: allow from another namespace by namespace label
    pol2 = np("allow-client", {"podSelector": {"matchLabels": {"app": "web"}},
                               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "x"}}}]}]})
    w.sync([pol2])
    run_and_expect(lambda: w.topo.reach("c1", WEB, 80, "TCP"), False, 5.0,
                   interval=0.05).check("c1 -> web:80 denied")
    run_and_expect(lambda: w.topo.reach("c2", WEB, 80, "TCP"), False, 5.0,
                   interval=0.05).check("c2 -> web:80 denied")
    w.ns_labels["dev"] = {"env": "dev", "team": "x"}  # namespace label change
    w.sync()
    run_and_expect(lambda: w.topo.reach("c2", WEB, 80, "TCP"), True, 5.0,
                   interval=0.05).check("c2 -> web:80 allowed")
    w.sync([])  # policy delete
    run_and_expect(lambda: w.topo.reach("c1", WEB, 80, "TCP"), True, 5.0,
                   interval=0.05).check("c1 -> web:80 allowed")


def test_invalid_policy_fails_closed_and_others_work(w: World):
    bad = np("bad", {"podSelector": {"matchLabels": {"app": "db"}},
                     "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}}]}]})
    good = np("good", {"podSelector": {"matchLabels": {"app": "web"}},
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]})
    report = w.sync([bad, good])
    assert [p["policy"] for p in report.invalid] == ["prod/bad"]
    assert report.invalid[0]["failClosed"] == ["Ingress"]
    assert "except" in report.invalid[0]["reasons"][0]
    w.check([("c1", DB, 9001, "TCP", False), ("c1", WEB, 80, "TCP", True), ("db", WEB, 80, "TCP", False),
             ("db", C1, 80, "TCP", True)])
    assert w.ctl.call("report")["invalidPolicies"][0]["policy"] == "prod/bad"


def test_anti_spoofing(w: World):
    c1 = w.topo.pods["c1"]
    forged = "10.244.0.99"
    netns.ns_run(c1.ns, ["ip", "addr", "add", f"{forged}/32", "dev", "eth0"])
    # the reply would come back if the forged packet got through
    netns.ns_run(w.topo.node, ["ip", "route", "replace", f"{forged}/32", "dev", c1.host_if])
    try:
        before = w.ctl.call("drop_counters")["prod/c1"]
        assert w.topo.probe(c1.ns, [(WEB, 80, "TCP", forged)]) == [False]
        assert w.topo.probe(c1.ns, [(WEB, 80, "TCP", C1)]) == [True]
        assert w.ctl.call("drop_counters")["prod/c1"] > before
        # positive control: the same forged address works once it is the endpoint's own
        ep_inputs = w.inputs()
        eps = [e if e.pod_name != "c1" else type(e)(e.container_id, e.ifname, e.netns, e.host_ifname,
                                                     (C1, forged), e.pod_namespace, e.pod_name)
               for e in ep_inputs.endpoints]
        w.ctl.call("sync", PolicyInputs(ep_inputs.namespaces, ep_inputs.pods, ep_inputs.policies, eps,
                                        ep_inputs.node_ips))
        assert w.topo.probe(c1.ns, [(WEB, 80, "TCP", forged)]) == [True]
    finally:
        netns.ns_run(c1.ns, ["ip", "addr", "del", f"{forged}/32", "dev", "eth0"], check=False)
        netns.ns_run(w.topo.node, ["ip", "route", "del", f"{forged}/32"], check=False)
        w.sync()


def test_unknown_rtd_interface_fails_closed(w: World):
    name = "x" + uuid.uuid4().hex[:6]
    pod = w.topo.add_pod("prod", name, "10.244.0.50", {"app": "client"})
    try:  # wired, but the agent does not know it yet: it carries nothing
        assert w.topo.probe(pod.ns, [(WEB, 80, "TCP")]) == [False]
        assert w.topo.reach("c1", "10.244.0.50", 80) is False
        w.sync()
        run_and_expect(lambda: w.topo.reach(name, WEB, 80, "TCP"), True, 5.0,
                       interval=0.05).check(f"{name} -> web:80 allowed")
    finally:
        del w.topo.pods[name]
        netns.delete(pod.ns)
        w.sync()


def test_second_sync_writes_nothing(w: World):
    first = w.sync([np("deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})])
    assert first.families == (4, 6)
    w.check([("c1", WEB, 80, "TCP", False), ("c1", WEB6, 80, "TCP", False)])
    before = {f: _our_rules(w.topo.node, first.backend, f) for f in (4, 6)}
    sets_before = netns.ns_run(w.topo.node, ["ipset", "save"]).stdout
    assert "family inet6" in sets_before and "rtd6-host-ips" in sets_before
    report = w.sync()
    assert not report.changed and report.iptables_ops == 0 and report.ipset_ops == 0
    assert report.family_ops == {4: 0, 6: 0}
    assert _our_rules(w.topo.node, first.backend, 4) == before[4]  # same rules, same counters
    _counters_kept(before[6], _our_rules(w.topo.node, first.backend, 6))
    assert sets_before == netns.ns_run(w.topo.node, ["ipset", "save"]).stdout


def test_deny_logging_nflog(world: World):
    ctl = RemoteController(world.topo.node, iptables_writer="restore", deny_log=True)
    try:
        world.sync([np("deny", {"podSelector": {"matchLabels": {"app": "web"}}})])
        report = ctl.call("sync", world.inputs())
        assert report.ok
        out = netns.ns_run(world.topo.node, ["iptables-save", "-t", "filter"]).stdout
        assert "NFLOG" in out and "DENY-I" in out
        assert world.topo.reach("c1", WEB, 80) is False
        assert ctl.call("drop_counters")["prod/web"] >= 1
    finally:
        ctl.close()
        world.sync([])


# -- IPv6 ------------------------------------------------------------------------------------------------
def _our_rules(ns: str, backend: str, family: int) -> list[str]:
    tool = "iptables" if family == 4 else "ip6tables"
    out = netns.ns_run(ns, [f"{tool}-{backend}-save", "-c", "-t", "filter"]).stdout
    return [ln for ln in out.splitlines() if not ln.startswith("#")]


def _counters_kept(before: list[str], after: list[str]) -> None:
    """The same rules, none rewritten: every counter kept (it may only have grown: neighbour discovery goes on in
    the background, and a rewritten rule would start again from 0)."""
    def split(lines: list[str]) -> list[tuple[int, str]]:
        out = []
        for ln in lines:
            m = re.match(r"^\[(\d+):\d+\] (.*)$", ln)
            out.append((int(m.group(1)), m.group(2)) if m else (0, ln))
        return out

    b, a = split(before), split(after)
    assert [t for _, t in b] == [t for _, t in a]
    assert all(pa >= pb for (pb, _), (pa, _) in zip(b, a, strict=True))
    assert any(pb > 0 for pb, text in b if text.startswith("-A rtd-")), "no counted packets to compare"


def test_ipv6_ingress_default_deny_and_pod_selector(w: World):
    w.sync([np("deny", {"podSelector": {"matchLabels": {"app": "web"}}}),
            np("allow-client", {"podSelector": {"matchLabels": {"app": "web"}},
                                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                             "ports": [{"port": 80}, {"port": 53, "protocol": "UDP"}]}]})])
    w.check([("c1", WEB6, 80, "TCP", True), ("c1", WEB6, 8080, "TCP", False), ("c2", WEB6, 80, "TCP", False),
             ("db", WEB6, 80, "TCP", False), ("c1", DB6, 9001, "TCP", True), ("outside", WEB6, 80, "TCP", False),
             ("web", C16, 80, "TCP", True), ("c1", WEB6, 53, "UDP", True), ("c1", WEB6, 5353, "UDP", False),
             ("c1", WEB, 80, "TCP", True), ("c2", WEB, 80, "TCP", False)])  # the same policy polices both families


def test_ipv6_ip_block_except_and_families_kept_apart(w: World):
    w.sync([np("egress6", {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                           "egress": [{"to": [{"ipBlock": {"cidr": "fd98::/32", "except": ["fd98:0:1::/48"]}}]}]})])
    w.check([("c1", REMOTE6, 80, "TCP", True), ("c1", EXTERNAL6, 80, "TCP", False), ("c1", WEB6, 80, "TCP", False),
             ("c1", REMOTE6, 53, "UDP", True),
             ("c1", REMOTE, 80, "TCP", False),  # an IPv6 block's IPv4 set is empty: no IPv4 flow matches it
             ("web", EXTERNAL6, 80, "TCP", True)])
    w.sync([np("egress4", {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                           "egress": [{"to": [{"ipBlock": {"cidr": "10.99.0.0/16"}}, {"ipBlock": {"cidr": "::/0",
                                                                                               "except": ["fd98::/32"]}}]}]})])
    w.check([("c1", REMOTE, 80, "TCP", True), ("c1", EXTERNAL, 80, "TCP", True),
             ("c1", REMOTE6, 80, "TCP", False),  # the IPv4 block does not open IPv6; ::/0 excepts fd98::/32
             ("c1", WEB6, 80, "TCP", True),  # ::/0 (split into two /1 halves in the set)
             ("c1", WEB, 80, "TCP", False)])


def test_ipv6_anti_spoofing(w: World):
    c1 = w.topo.pods["c1"]
    forged = "fd00:244::99"
    netns.ns_run(c1.ns, ["ip", "-6", "addr", "add", f"{forged}/128", "dev", "eth0", "nodad"])
    # the reply would come back if the forged packet got through
    netns.ns_run(w.topo.node, ["ip", "-6", "route", "replace", f"{forged}/128", "dev", c1.host_if])
    try:
        before = w.ctl.call("drop_counters")["prod/c1"]
        assert w.topo.probe(c1.ns, [(WEB6, 80, "TCP", forged), (WEB6, 53, "UDP", forged)]) == [False, False]
        assert w.topo.probe(c1.ns, [(WEB6, 80, "TCP", C16)]) == [True]
        assert w.ctl.call("drop_counters")["prod/c1"] > before  # the IPv6 table's drops are counted too
        assert w.topo.probe(c1.ns, [(WEB6, 80, "TCP", C26)]) == [False]  # another pod's address
        # an endpoint without an IPv6 address: all of its IPv6 is spoofed (the pod cannot speak IPv6 unpoliced),
        # its IPv4 is not
        inputs = w.inputs()
        eps = [e if e.pod_name != "c1" else type(e)(e.container_id, e.ifname, e.netns, e.host_ifname, (C1,),
                                                     e.pod_namespace, e.pod_name) for e in inputs.endpoints]
        w.ctl.call("sync", PolicyInputs(inputs.namespaces, inputs.pods, inputs.policies, eps, inputs.node_ips))
        assert w.topo.probe(c1.ns, [(WEB6, 80, "TCP"), (REMOTE6, 80, "TCP"), (WEB, 80, "TCP")]) == [False, False, True]
        # positive control: the forged address works once it is the endpoint's own
        eps = [e if e.pod_name != "c1" else type(e)(e.container_id, e.ifname, e.netns, e.host_ifname,
                                                     (C1, C16, forged), e.pod_namespace, e.pod_name)
               for e in inputs.endpoints]
        w.ctl.call("sync", PolicyInputs(inputs.namespaces, inputs.pods, inputs.policies, eps, inputs.node_ips))
        assert w.topo.probe(c1.ns, [(WEB6, 80, "TCP", forged)]) == [True]
    finally:
        netns.ns_run(c1.ns, ["ip", "-6", "addr", "del", f"{forged}/128", "dev", "eth0"], check=False)
        netns.ns_run(w.topo.node, ["ip", "-6", "route", "del", f"{forged}/128"], check=False)
        w.sync()


def _flush_neighbours(w: World, *pods: str) -> None:
    for name in pods:
        pod = w.topo.pods[name]
        netns.ns_run(pod.ns, ["ip", "-6", "neigh", "flush", "dev", "eth0"])
        netns.ns_run(w.topo.node, ["ip", "-6", "neigh", "flush", "dev", pod.host_if])
        assert w.topo.neighbour(pod.ns, GATEWAY6, "eth0") in ("", "FAILED")


def test_ipv6_neighbour_discovery_under_deny_all(w: World):
    # deny all in both directions, except c1 -> web:80 (TCP): no rule allows ICMPv6 anywhere
    report = w.sync([np("deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
                     np("c1-out", {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                                   "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                               "ports": [{"port": 80}]}]}),
                     np("web-in", {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
                                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                                "ports": [{"port": 80}]}]})])
    _flush_neighbours(w, "c1", "web")
    # both pods resolve fe80::1, the node resolves both pods' /128s: neighbour discovery through the policy
    run_and_expect(lambda: w.topo.reach("c1", WEB6, 80), True, 5.0, interval=0.05).check("c1 -> web6:80 allowed")
    for name in ("c1", "web"):
        state = w.topo.neighbour(w.topo.pods[name].ns, GATEWAY6, "eth0")
        assert state in ("REACHABLE", "DELAY", "PROBE", "STALE"), (name, state)
    assert w.topo.reach("c1", WEB6, 8080) is False and w.topo.reach("c1", DB6, 9001) is False  # still deny-all
    _flush_neighbours(w, "db")
    w.topo.reach("db", WEB6, 80)  # denied, but its gateway is resolved on the way
    run_and_expect(lambda: w.topo.neighbour(w.topo.pods["db"].ns, GATEWAY6, "eth0"), "REACHABLE", 5.0,
                   interval=0.05).check("db resolves fe80::1 under deny-all")
    # negative control: without the neighbour discovery rules the same flow dies (resolution is dropped by the
    # deny-all egress policy: NS/NA are not TCP to web:80) -- and a read-back restores them
    backend = report.backend
    rules = [ln.split("] ", 1)[-1] for ln in _our_rules(w.topo.node, backend, 6)]  # without the counters
    victims = [ln for ln in rules if ln.startswith("-A rtd-INPUT ") and re.search(r"--icmpv6-type 13[56] ", ln)]
    assert len(victims) == 2
    for line in victims:
        netns.ns_run(w.topo.node, [f"ip6tables-{backend}", "-t", "filter", *shlex.split(line.replace("-A ", "-D ", 1))])
    _flush_neighbours(w, "c1", "web")
    holds_for(lambda: w.topo.reach("c1", WEB6, 80), False, 1.5).check("c1 -> web6:80 dies without ND rules")
    w.ctl.call("force_readback")
    repaired = w.ctl.call("apply")
    assert repaired.full and repaired.family_ops.get(6, 0) > 0 and repaired.family_ops.get(4, 0) == 0
    run_and_expect(lambda: w.topo.reach("c1", WEB6, 80), True, 5.0, interval=0.05).check("repaired")


@pytest.mark.parametrize("writer,backend", [("restore", "nft"), ("restore", "legacy"), ("iptc", "legacy")])
def test_ipv6_every_writer_and_backend(world: World, writer: str, backend: str):
    """IPv6 policing with each writer and backend (the module's controller is cleared out meanwhile: only one
    backend's tables hold our rules at a time)."""
    world.ctl.call("remove_all")
    ctl = RemoteController(world.topo.node, iptables_writer=writer, iptables_backend=backend)
    try:
        world.policies = [np("allow-client", {"podSelector": {"matchLabels": {"app": "web"}},
                                              "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                                           "ports": [{"port": 80}]}]}),
                          np("egress6", {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                                         "egress": [{"to": [{"ipBlock": {"cidr": "fd98::/32",
                                                                         "except": ["fd98:0:1::/48"]}}]},
                                                    {"to": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]})]
        report = ctl.call("sync", world.inputs())
        assert report.ok and report.backend == backend and report.families == (4, 6), report.error
        assert any("ip6tables" in ln or "rtd6-" in ln for ln in _our_rules(world.topo.node, backend, 6))
        got = world.topo.matrix([("c1", WEB6, 80, "TCP"), ("c2", WEB6, 80, "TCP"), ("db", WEB6, 80, "TCP"),
                                 ("c1", REMOTE6, 80, "TCP"), ("c1", EXTERNAL6, 80, "TCP"), ("c1", DB6, 9001, "TCP"),
                                 ("c1", WEB6, 8080, "TCP"), ("c1", WEB, 80, "TCP"), ("db", WEB, 80, "TCP")])
        assert got == [True, False, False, True, False, False, False, True, False], got  # c2: other namespace
        c1 = world.topo.pods["c1"]
        assert world.topo.probe(c1.ns, [(WEB6, 80, "TCP", C26)]) == [False]  # spoofed source
        before6 = _our_rules(world.topo.node, backend, 6)
        again = ctl.call("sync", world.inputs())
        assert again.ok and again.iptables_ops == 0 and again.ipset_ops == 0
        _counters_kept(before6, _our_rules(world.topo.node, backend, 6))
        ctl.call("remove_all")
        assert not any("rtd" in ln for ln in _our_rules(world.topo.node, backend, 6))
    finally:
        ctl.close()
        world.policies = []
        world.sync([])


# -- property: random policies, explain == datapath ------------------------------------------------------
_apps = st.sampled_from(["web", "db", "client"])
_selector = st.one_of(st.just({}), _apps.map(lambda a: {"matchLabels": {"app": a}}),
                      _apps.map(lambda a: {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": [a]}]}))
_ns_selector = st.sampled_from([{}, {"matchLabels": {"env": "dev"}}, {"matchLabels": {"env": "prod"}}])
_peer = st.one_of(
    _selector.map(lambda s: {"podSelector": s}),
    _ns_selector.map(lambda s: {"namespaceSelector": s}),
    st.tuples(_ns_selector, _selector).map(lambda t: {"namespaceSelector": t[0], "podSelector": t[1]}),
    st.sampled_from([{"ipBlock": {"cidr": "10.99.0.0/16", "except": ["10.99.1.0/24"]}},
                     {"ipBlock": {"cidr": "10.244.0.0/24", "except": ["10.244.0.12/32"]}},
                     {"ipBlock": {"cidr": "0.0.0.0/0"}},
                     {"ipBlock": {"cidr": "fd98::/32", "except": ["fd98:0:1::/48"]}},
                     {"ipBlock": {"cidr": "fd00:244::/64", "except": ["fd00:244::12/128"]}},
                     {"ipBlock": {"cidr": "::/0"}}]),
)
_port = st.sampled_from([{"port": 80}, {"port": "web-alt"}, {"port": 9000, "endPort": 9002},
                         {"port": 53, "protocol": "UDP"}, {"protocol": "UDP"}, {"port": 8080}])
_rule = st.fixed_dictionaries({}, optional={"peers": st.lists(_peer, max_size=2), "ports": st.lists(_port, max_size=2)})


def _policy(i: int, ns: str, sel: dict, types: list[str], ingress: list[dict], egress: list[dict]) -> dict:
    spec: dict = {"podSelector": sel, "policyTypes": types}
    if "Ingress" in types:
        spec["ingress"] = [{**({"from": r["peers"]} if "peers" in r else {}), **({"ports": r["ports"]} if "ports" in r else {})}
                           for r in ingress]
    if "Egress" in types:
        spec["egress"] = [{**({"to": r["peers"]} if "peers" in r else {}), **({"ports": r["ports"]} if "ports" in r else {})}
                          for r in egress]
    return np(f"rnd{i}", spec, ns)


_policies = st.lists(
    st.tuples(st.sampled_from(["prod", "dev"]), _selector,
              st.sampled_from([["Ingress"], ["Egress"], ["Ingress", "Egress"]]),
              st.lists(_rule, max_size=2), st.lists(_rule, max_size=2)),
    min_size=1, max_size=3,
).map(lambda items: [_policy(i, *item) for i, item in enumerate(items)])

FLOWS = [("c1", WEB, 80, "TCP"), ("c2", WEB, 8080, "TCP"), ("c2", DB, 9001, "TCP"), ("web", C1, 9000, "TCP"),
         ("db", REMOTE, 9002, "TCP"), ("c1", EXTERNAL, 53, "UDP"), ("outside", C2, 80, "TCP"),
         ("c2", WEB, 53, "UDP"), ("web", DB, 9001, "TCP"), ("c1", REMOTE, 80, "TCP"),
         ("c1", WEB6, 80, "TCP"), ("c2", WEB6, 8080, "TCP"), ("web", C16, 9000, "TCP"), ("db", REMOTE6, 9002, "TCP"),
         ("c1", EXTERNAL6, 53, "UDP"), ("outside", C26, 80, "TCP"), ("c2", WEB6, 53, "UDP"), ("c1", REMOTE6, 80, "TCP")]


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          phases=[Phase.explicit, Phase.generate])
@given(policies=_policies)
def test_property_explain_matches_datapath(world: World, policies: list[dict]):
    world.label_overrides = {}
    world.sync(policies)
    inputs = world.inputs()
    want = []
    for s, d, port, proto in FLOWS:
        e = explain(inputs, world.source(s, d), d, port, proto)
        # a remote pod's policies are enforced by its own node, not by this one
        want.append((e["egress"]["allowed"] or s == "outside")
                    and (e["ingress"]["allowed"] or d in (REMOTE, EXTERNAL, REMOTE6, EXTERNAL6)))
    got = world.topo.matrix([(s, d, p, proto, world.source(s, d)) if s == "outside" else (s, d, p, proto)
                             for s, d, p, proto in FLOWS])
    assert got == want, [(f, w_, g) for f, w_, g in zip(FLOWS, want, got, strict=True) if w_ != g]
