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


# -- IPv6 flows ---------------------------------------------------------------------------------------------
WEB6 = Pod("prod", "web", {"app": "web"}, "n", ("10.0.0.1", "fd00::1"), (ContainerPort(8080, "TCP", "http"),))
CLI6 = Pod("prod", "cli", {"app": "cli"}, "n", ("10.0.0.2", "fd00::2"))
V6ONLY = Pod("prod", "v6", {"app": "cli"}, "n", ("fd00::6",))


def inputs6(policies):
    return PolicyInputs([Namespace("prod", {"env": "prod"})], [WEB6, CLI6, V6ONLY], policies,
                        [Endpoint("c", "eth0", "", "rtd00000000001", WEB6.ips, "prod", "web")], ["192.168.0.1", "fd99::1"])


def test_ipv6_flows_resolve_pods_to_their_ipv6_address():
    p = pol("allow", {"podSelector": {"matchLabels": {"app": "web"}},
                      "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}], "ports": [{"port": "http"}]}]})
    e = explain(inputs6([p]), CLI6, "fd00::1", 8080, "TCP")
    assert e["allowed"] and e["src"] == "fd00::2" and e["ingress"]["policy"] == "prod/allow" and "IPv6 flow" in e["notes"]
    assert explain(inputs6([p]), CLI6, WEB6, 8080, "TCP")["src"] == "10.0.0.2"  # both pods dual-stack: IPv4
    e = explain(inputs6([p]), CLI6, WEB6, 8080, "TCP", family=6)
    assert e["allowed"] and (e["src"], e["dst"]) == ("fd00::2", "fd00::1")
    assert explain(inputs6([p]), V6ONLY, WEB6, 8080, "TCP")["dst"] == "fd00::1"  # only IPv6 in common
    assert not explain(inputs6([p]), CLI6, "fd00::1", 80, "TCP")["allowed"]
    assert explain(inputs6([p]), "fd99::1", WEB6, 80, "TCP")["allowed"]  # the node's own IPv6 address
    assert explain(inputs6([p]), "FD00:0::2", "fd00::1", 8080, "TCP")["allowed"]  # any spelling of an address
    missing = explain(inputs6([p]), V6ONLY, "10.0.0.1", 8080, "TCP")
    assert not missing["allowed"] and "has no IPv4 address" in missing["egress"]["reason"]
    mixed = explain(inputs6([p]), "10.0.0.2", "fd00::1", 8080, "TCP")
    assert not mixed["allowed"] and "is not an IPv4 address" in mixed["egress"]["reason"]


def test_ipv6_ip_block_and_v4_block_never_matches_v6():
    p = pol("eg", {"podSelector": {}, "policyTypes": ["Egress"],
                   "egress": [{"to": [{"ipBlock": {"cidr": "::/0", "except": ["2001:db8:1::/48"]}}]},
                              {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 53, "protocol": "UDP"}]}]})
    assert explain(inputs6([p]), CLI6, "2001:db8::1", 443, "TCP")["allowed"]
    assert not explain(inputs6([p]), CLI6, "2001:db8:1::1", 443, "TCP")["allowed"]
    assert not explain(inputs6([p]), CLI6, "8.8.8.8", 443, "TCP")["allowed"]  # ::/0 is not an IPv4 block
    assert explain(inputs6([p]), CLI6, "10.1.1.1", 53, "UDP")["allowed"]
    assert explain(inputs6([p]), CLI6, "fd00::5", 53, "UDP")["allowed"]  # by rule 0 (::/0), not the v4 block
    assert explain(inputs6([p]), CLI6, "fd00::5", 53, "UDP")["egress"]["ruleIndex"] == 0
