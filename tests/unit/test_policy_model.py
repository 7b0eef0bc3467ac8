from __future__ import annotations

import pytest

from policy.model import EGRESS, INGRESS, parse_policy


def pol(spec, name="p", ns="default"):
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


def test_inferred_policy_types():
    assert parse_policy(pol({"podSelector": {}})).types == {INGRESS}
    assert parse_policy(pol({"podSelector": {}, "egress": [{}]})).types == {INGRESS, EGRESS}
    # an empty egress list does not imply Egress (API server defaulting: len(egress) != 0)
    assert parse_policy(pol({"podSelector": {}, "egress": []})).types == {INGRESS}
    assert parse_policy(pol({"podSelector": {}, "policyTypes": ["Egress"]})).types == {EGRESS}


def test_empty_vs_missing_peers_and_ports():
    p = parse_policy(pol({"podSelector": {}, "ingress": [{}, {"from": [], "ports": []}, {"from": [{"podSelector": {}}]}]}))
    assert p.valid
    assert p.ingress[0].peers is None and p.ingress[0].ports is None
    assert p.ingress[1].peers is None and p.ingress[1].ports is None
    assert p.ingress[2].peers is not None and p.ingress[2].peers[0].namespace_selector is None


def test_ports():
    p = parse_policy(pol({"podSelector": {}, "ingress": [{"ports": [
        {"port": 80}, {"port": "http", "protocol": "UDP"}, {"port": 9000, "endPort": 9010, "protocol": "SCTP"},
        {"protocol": "UDP"}, {"port": "8080"}]}]}))
    assert p.valid, p.problems
    ports = p.ingress[0].ports
    assert ports[0].port == 80 and ports[0].protocol == "TCP"
    assert ports[1].name == "http" and ports[1].protocol == "UDP"
    assert (ports[2].port, ports[2].end_port, ports[2].protocol) == (9000, 9010, "SCTP")
    assert ports[3].port is None
    assert ports[4].port == 8080


@pytest.mark.parametrize("spec,fragment", [
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}, "invalid CIDR"),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]}, "not inside cidr"),
    ({"ingress": [{"ports": [{"protocol": "ICMP"}]}]}, "unknown protocol"),
    ({"ingress": [{"ports": [{"port": 70000}]}]}, "out of range"),
    ({"ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}, "below port"),
    ({"ingress": [{"ports": [{"port": "http", "endPort": 80}]}]}, "named port"),
    ({"ingress": [{"ports": [{"endPort": 80}]}]}, "needs a numeric port"),
    ({"ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "X"}]}}]}]},
     "unknown operator"),
    ({"ingress": [{"from": [{}]}]}, "must set podSelector"),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}, "cannot be combined"),
    ({"policyTypes": ["Sideways"]}, "policyTypes"),
])
def test_invalid_policies_are_reported_not_raised(spec, fragment):
    p = parse_policy(pol({"podSelector": {}, **spec}, name="bad", ns="prod"))
    assert not p.valid
    assert p.key == "prod/bad"
    assert any(fragment in reason for reason in p.problems), p.problems
    assert p.ingress == () and p.egress == ()  # fails closed: no allow rules


def test_invalid_pod_selector_fails_closed_for_whole_namespace():
    p = parse_policy(pol({"podSelector": {"matchLabels": {"bad key!": "x"}}, "policyTypes": ["Egress"]}))
    assert not p.valid and p.whole_namespace and p.types == {EGRESS}


def test_garbage_does_not_raise():
    for obj in (None, {}, {"spec": 3}, {"metadata": {"name": "x"}, "spec": {"ingress": "all"}}):
        assert not parse_policy(obj).valid


def test_invalid_pod_ips_are_dropped_not_fatal() -> None:
    from routed.model import Pod

    pod = Pod.from_k8s({"metadata": {"name": "p", "namespace": "n"},
                        "status": {"podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00:64::177ef"}, {"ip": "FD00::0001"}]}})
    assert pod.ips == ("10.0.0.1", "fd00::1")  # the invalid one left out, IPv6 in canonical form
