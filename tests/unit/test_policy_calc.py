from __future__ import annotations

from policy import names
from policy.calc import Calculator, PolicyInputs, calculate, selector_set
from policy.model import INGRESS, Peer
from policy.render import render
from policy.selectors import Selector
from routed.model import ContainerPort, Endpoint, Namespace, Pod


def pol(name, spec, ns="prod"):
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


def world(n_cluster_pods: int, policies: list[dict], n_local: int = 3) -> PolicyInputs:
    namespaces = [Namespace("prod", {"env": "prod"}), Namespace("dev", {"env": "dev"})]
    pods = []
    endpoints = []
    for i in range(n_cluster_pods):
        ns = "prod" if i % 2 else "dev"
        pod = Pod(ns, f"p{i}", {"app": f"a{i % 5}"}, "n", (f"10.{i // 65000}.{(i // 250) % 256}.{i % 250 + 1}",),
                  (ContainerPort(8000 + i % 3, "TCP", "web"),))
        pods.append(pod)
        if i < n_local:
            endpoints.append(Endpoint(f"c{i}", "eth0", "", f"rtd{i:011x}", pod.ips, ns, pod.name))
    return PolicyInputs(namespaces, pods, policies, endpoints, ["192.168.0.1"])


POLICIES = [
    pol("a", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a1"}}},
                                                       {"namespaceSelector": {"matchLabels": {"env": "dev"}}}],
                                              "ports": [{"port": "web"}, {"port": 80}]}]}),
    pol("b", {"podSelector": {}, "policyTypes": ["Egress"],
              "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]}]}, ns="dev"),
]


def test_rule_count_independent_of_cluster_pods():
    small, big = calculate(world(10, POLICIES)), calculate(world(5000, POLICIES))
    assert render(small).rule_count() == render(big).rule_count()
    assert len(small.ipsets) == len(big.ipsets)
    assert sum(len(s.members) for s in big.ipsets.values()) > sum(len(s.members) for s in small.ipsets.values())


def test_rule_count_grows_with_local_endpoints():
    assert render(calculate(world(100, POLICIES, 20))).rule_count() > render(calculate(world(100, POLICIES, 3))).rule_count()


def test_ipsets_shared_between_identical_selectors():
    twin = pol("a2", POLICIES[0]["spec"])
    calc = calculate(world(50, [*POLICIES, twin]))
    assert len(calc.ipsets) == len(calculate(world(50, POLICIES)).ipsets)


def test_ip_block_zero_prefix_split_and_except_nomatch():
    calc = calculate(world(10, POLICIES))
    net = next(s for s in calc.ipsets.values() if s.kind == "hash:net")
    assert net.members == {"0.0.0.0/1", "128.0.0.0/1", "10.0.0.0/8 nomatch"}
    assert net.contains("8.8.8.8") and not net.contains("10.1.2.3")


def test_named_port_members_are_per_pod():
    calc = calculate(world(6, POLICIES))
    np_set = next(s for s in calc.ipsets.values() if s.kind == "hash:ip,port")
    assert "10.0.0.1,tcp:8000" in np_set.members and "10.0.0.2,tcp:8001" in np_set.members


def test_pods_without_policy_have_no_policy_chains_and_host_network_ignored():
    pods = [Pod("x", "a", {}, "n", ("10.1.0.1",)), Pod("x", "h", {}, "n", ("192.168.0.5",), host_network=True)]
    eps = [Endpoint("c", "eth0", "", "rtd00000000001", ("10.1.0.1",), "x", "a")]
    inputs = PolicyInputs([Namespace("x")], pods, [pol("deny", {"podSelector": {}}, ns="x")], eps, [])
    calc = Calculator(inputs)
    assert calc.selecting(pods[1], INGRESS) == []  # hostNetwork pods are never selected
    plan = calc.calculate().endpoints[0]
    assert plan.ingress == (names.policy_chain("x/deny", INGRESS),) and plan.egress is None
    # a selector peer never contains hostNetwork pod IPs
    every_pod = calc.define(selector_set("x", Peer(pod_selector=Selector())))
    assert calc.sets[every_pod].members == frozenset({"10.1.0.1"})


def test_unknown_pod_fails_closed_and_invalid_reported():
    eps = [Endpoint("c", "eth0", "", "rtd00000000001", ("10.1.0.1",), "x", "ghost")]
    bad = pol("bad", {"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}, ns="x")
    calc = calculate(PolicyInputs([Namespace("x")], [], [bad], eps, []))
    assert calc.endpoints[0].unknown_pod and calc.endpoints[0].ingress == () and calc.endpoints[0].egress == ()
    assert calc.problems[0].key == "x/bad" and calc.problems[0].fail_closed == ("Ingress",)
    assert calc.warnings


def test_ipv6_pods_are_members_and_endpoints_keep_every_address():
    pods = [Pod("x", "a", {"app": "s"}, "n", ("10.1.0.1", "fd00::1"), (ContainerPort(80, "TCP", "web"),)),
            Pod("x", "b", {"app": "c"}, "n", ("fd00::2",), (ContainerPort(80, "TCP", "web"),)),
            Pod("x", "ghost-ip", {"app": "c"}, "n", ())]
    eps = [Endpoint("c", "eth0", "", "rtd00000000001", ("10.1.0.1", "fd00::1"), "x", "a"),
           Endpoint("g", "eth0", "", "rtd00000000009", ("fd00::9",), "x", "ghost-ip")]
    policy = pol("p", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "c"}}}],
                                                       "ports": [{"port": "web"}]}]}, ns="x")
    calc = calculate(PolicyInputs([Namespace("x")], pods, [policy], eps, ["192.168.0.1", "fd99::1", "node-a"]))
    assert [ep.ips for ep in calc.endpoints] == [("10.1.0.1", "fd00::1"), ("fd00::9",)]
    sel = next(s for s in calc.ipsets.values() if s.kind == "hash:ip" and s.name != names.IPSET_HOST)
    assert sel.members == {"fd00::2", "fd00::9"}  # an IPv6-only pod, and one known by its endpoint's address
    port = next(s for s in calc.ipsets.values() if s.kind == "hash:ip,port")
    assert port.members == {"10.1.0.1,tcp:80", "fd00::1,tcp:80", "fd00::2,tcp:80"}
    assert port.contains("fd00::2", "TCP", 80) and not port.contains("fd00::2", "TCP", 81)
    assert calc.ipsets[names.IPSET_HOST].members == {"192.168.0.1", "fd99::1"}  # not-an-address skipped
