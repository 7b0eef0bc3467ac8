from __future__ import annotations

from policy.calc import PolicyInputs
from policy.explain import explain, policies_for
from routed.model import ContainerPort, Endpoint, Namespace, Pod

WEB = Pod("prod", "web", {"app": "web"}, "n", ("10.0.0.1",), (ContainerPort(8080, "TCP", "http"),))
CLI = Pod("prod", "cli", {"app": "cli"}, "n", ("10.0.0.2",))
DEV = Pod("dev", "dev", {"app": "cli"}, "n", ("10.0.0.3",))


def inputs(policies):
    return PolicyInputs([Namespace("prod", {"env": "prod"}), Namespace("dev", {"env": "dev"})], [WEB, CLI, DEV],
                        policies, [Endpoint("c", "eth0", "", "rtd00000000001", WEB.ips, "prod", "web")],
                        ["192.168.0.1"])


def pol(name, spec, ns="prod"):
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


def test_default_allow():
    e = explain(inputs([]), CLI, WEB, 80, "TCP")
    assert e["allowed"] and "no policy selects" in e["ingress"]["reason"] and "no policy selects" in e["egress"]["reason"]


def test_rule_decides_and_default_deny():
    p = pol("allow", {"podSelector": {"matchLabels": {"app": "web"}},
                      "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "x"}}}]},
                                  {"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}],
                                   "ports": [{"port": "http"}]}]})
    e = explain(inputs([p]), CLI, WEB, 8080, "TCP")
    assert e["allowed"] and e["ingress"]["policy"] == "prod/allow" and e["ingress"]["ruleIndex"] == 1
    e = explain(inputs([p]), "prod/cli", "10.0.0.1", 80, "TCP")
    assert not e["allowed"] and "default deny" in e["ingress"]["reason"]
    assert not explain(inputs([p]), DEV, WEB, 8080, "TCP")["allowed"]  # podSelector alone: same namespace
    assert explain(inputs([p]), "192.168.0.1", WEB, 80, "TCP")["allowed"]  # node traffic (probes)
    assert policies_for(inputs([p]), WEB) == {"ingress": ["prod/allow"], "egress": []}
    assert policies_for(inputs([p]), "prod/cli") == {"ingress": [], "egress": []}


def test_egress_ip_block_except():
    p = pol("eg", {"podSelector": {}, "policyTypes": ["Egress"],
                   "egress": [{"to": [{"ipBlock": {"cidr": "8.0.0.0/8", "except": ["8.8.0.0/16"]}}]}]})
    assert explain(inputs([p]), CLI, "8.1.1.1", 443, "TCP")["allowed"]
    e = explain(inputs([p]), CLI, "8.8.8.8", 443, "TCP")
    assert not e["allowed"] and e["egress"]["pod"] == "prod/cli"


def test_invalid_policy_explained_as_fail_closed():
    bad = pol("bad", {"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]})
    e = explain(inputs([bad]), DEV, WEB, 80, "TCP")
    assert not e["allowed"] and "invalid" in e["ingress"]["reason"]
