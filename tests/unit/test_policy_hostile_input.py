"""A NetworkPolicy ipBlock that is not a plain CIDR is reported by name (escaped) and fails closed; the other
policies are still calculated (policy/model.py through routed/validation.py)."""

from __future__ import annotations

import pytest

from policy.calc import PolicyInputs, calculate
from policy.model import parse_policy
from routed.model import Endpoint, Namespace, Pod

INJECT = "\n-A INPUT -j ACCEPT"


def pol(name, cidr, excepts=()):
    return {"metadata": {"name": name, "namespace": "x"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                     "egress": [{"to": [{"ipBlock": {"cidr": cidr, "except": list(excepts)}}]}]}}


@pytest.mark.parametrize("cidr, excepts, reason", [
    ("10.0.0.0/8%x" + INJECT, (), "control character"),
    ("fe80::/64%eth0", (), "scope IDs"),
    (" 10.0.0.0/8", (), "whitespace"),
    ("10.0.0.0/8", ("10.1.0.0/16\n",), "except[0]"),
    ("\u0661\u0660.0.0.0/8", (), "non-ASCII"),
    (167772160, (), "must be a string"),  # ipaddress would take the int 10.0.0.0
])
def test_a_bad_ip_block_is_named_and_the_other_policies_apply(cidr, excepts, reason):
    bad = parse_policy(pol("bad", cidr, excepts))
    assert not bad.valid and reason in bad.problems[0], bad.problems
    assert all("\n" not in p and p.isascii() for p in bad.problems)

    pods = [Pod("x", "a", {}, "n", ("10.1.0.1",))]
    eps = [Endpoint("c", "eth0", "", "rtd00000000001", ("10.1.0.1",), "x", "a")]
    calc = calculate(PolicyInputs([Namespace("x")], pods, [pol("bad", cidr, excepts), pol("good", "192.0.2.0/24")],
                                  eps, []))
    assert [p.key for p in calc.problems] == ["x/bad"]
    assert any("192.0.2.0/24" in s.members for s in calc.ipsets.values())


def test_ip_block_is_canonical():
    p = parse_policy(pol("ok", "10.1.2.3/8", ("10.1.0.0/16",)))
    assert p.valid and p.egress[0].peers[0].ip_block.canonical() == "10.0.0.0/8!10.1.0.0/16"
    v6 = parse_policy(pol("v6", "2001:DB8::/32"))
    assert v6.egress[0].peers[0].ip_block.cidr == "2001:db8::/32"
