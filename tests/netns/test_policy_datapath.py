"""Real packets through real iptables/ipsets in namespaces: NetworkPolicy semantics end to end."""

from __future__ import annotations

import os
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
from tests.helpers import run_and_expect
from tests.netns.policy_harness import RemoteController
from tests.netns.policy_topo import NODE_IP, OUTSIDE_IPS, PolicyTopo

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

PREFIX = "rtd-pol-dp"
WEB, DB, C1, C2 = "10.244.0.10", "10.244.0.11", "10.244.0.12", "10.244.0.20"
REMOTE = OUTSIDE_IPS[0]  # a pod on another node (dev/remote)
EXTERNAL = OUTSIDE_IPS[1]  # not a pod


def np(name: str, spec: dict, namespace: str = "prod") -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


class World:
    def __init__(self, topo: PolicyTopo, ctl: RemoteController) -> None:
        self.topo = topo
        self.ctl = ctl
        self.ns_labels: dict[str, dict[str, str]] = {"prod": {"env": "prod"}, "dev": {"env": "dev"}}
        self.policies: list[dict] = []
        self.remote = Pod("dev", "remote", {"app": "client"}, "other-node", (REMOTE,),
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
                            [p.endpoint() for p in self.topo.pods.values()], [NODE_IP])

    def sync(self, policies: list[dict] | None = None):
        if policies is not None:
            self.policies = policies
        report = self.ctl.call("sync", self.inputs())
        assert report.ok, report.error
        return report

    def check(self, expected: list[tuple[str, str, int, str, bool]]) -> None:
        # "outside" probes leave from REMOTE (a pod on another node, dev/remote)
        got = self.topo.matrix([(s, d, p, proto, REMOTE) if s == "outside" else (s, d, p, proto)
                                for s, d, p, proto, _ in expected])
        wrong = [(e[:4], e[4], g) for e, g in zip(expected, got, strict=True) if e[4] != g]
        assert not wrong, f"(flow, want, got): {wrong}"
        # explain must agree with the datapath, flow by flow
        inputs = self.inputs()
        by_name = {p.name: p.ip for p in self.topo.pods.values()}
        for (src, dst, port, proto, want) in expected:
            src_ip = by_name.get(src, REMOTE)
            assert explain(inputs, src_ip, dst, port, proto)["allowed"] == want, (src, dst, port, proto)


@pytest.fixture(scope="module")
def world():
    topo = PolicyTopo(PREFIX)
    ctl = None
    try:
        topo.up()
        topo.add_pod("prod", "web", WEB, {"app": "web"},
                     (ContainerPort(80, "TCP", "http"), ContainerPort(8080, "TCP", "web-alt"),
                      ContainerPort(53, "UDP", "dns")))
        topo.add_pod("prod", "db", DB, {"app": "db"}, (ContainerPort(9001, "TCP", "web-alt"),))
        topo.add_pod("prod", "c1", C1, {"app": "client"})
        topo.add_pod("dev", "c2", C2, {"app": "client"})
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
    w.sync([np("deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})])
    w.check([("c1", WEB, 80, "TCP", False)])
    save = ["iptables-save", "-c", "-t", "filter"]
    before = netns.ns_run(w.topo.node, save).stdout
    sets_before = netns.ns_run(w.topo.node, ["ipset", "save"]).stdout
    report = w.sync()
    assert not report.changed and report.iptables_ops == 0 and report.ipset_ops == 0
    after = netns.ns_run(w.topo.node, save).stdout
    strip = lambda t: [ln for ln in t.splitlines() if not ln.startswith("#")]  # noqa: E731
    assert strip(before) == strip(after)  # same rules, same counters
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
                     {"ipBlock": {"cidr": "0.0.0.0/0"}}]),
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
         ("c2", WEB, 53, "UDP"), ("web", DB, 9001, "TCP"), ("c1", REMOTE, 80, "TCP")]


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          phases=[Phase.explicit, Phase.generate])
@given(policies=_policies)
def test_property_explain_matches_datapath(world: World, policies: list[dict]):
    world.label_overrides = {}
    world.sync(policies)
    inputs = world.inputs()
    ips = {p.name: p.ip for p in world.topo.pods.values()}
    want = []
    for s, d, port, proto in FLOWS:
        e = explain(inputs, ips.get(s, REMOTE), d, port, proto)
        # a remote pod's policies are enforced by its own node, not by this one
        want.append((e["egress"]["allowed"] or s == "outside") and (e["ingress"]["allowed"] or d in (REMOTE, EXTERNAL)))
    got = world.topo.matrix([(s, d, p, proto, REMOTE) if s == "outside" else (s, d, p, proto)
                             for s, d, p, proto in FLOWS])
    assert got == want, [(f, w_, g) for f, w_, g in zip(FLOWS, want, got, strict=True) if w_ != g]
