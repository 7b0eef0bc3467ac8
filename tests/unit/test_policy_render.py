from __future__ import annotations

import hashlib

from policy import names
from policy.calc import PolicyInputs, calculate
from policy.dataplane.iptables import diff, parse_save, restore_script
from policy.render import RenderOptions, Ruleset, hash_rules, render
from routed.model import ContainerPort, Endpoint, Namespace, Pod
from tests.unit.test_policy_calc import POLICIES, pol, world


def test_name_lengths():
    calc = calculate(world(100, POLICIES, 10))
    ruleset = render(calc)
    assert all(c.startswith("rtd") and len(c) <= names.MAX_CHAIN for c in ruleset.chains)
    assert all(s.startswith("rtd") and len(s) <= names.MAX_IPSET for s in calc.ipsets)


def test_hashes_deterministic_and_chained():
    a = render(calculate(world(100, POLICIES, 10)))
    b = render(calculate(world(100, POLICIES, 10)))
    assert a.chains == b.chains and a.hooks == b.hooks
    r1 = hash_rules("rtd-x", ["-j ACCEPT", "-j DROP"])
    r2 = hash_rules("rtd-x", ["-j RETURN", "-j DROP"])
    assert r1[1].hash != r2[1].hash  # depends on the previous rule
    assert hash_rules("rtd-y", ["-j ACCEPT"])[0].hash != r1[0].hash  # and on the chain


def test_fail_closed_dispatch_and_anti_spoofing():
    ruleset = render(calculate(world(10, POLICIES, 2)))
    assert ruleset.chains[names.CHAIN_FROM_DISPATCH][-1].body == "-i rtd+ -j DROP"
    assert ruleset.chains[names.CHAIN_TO_DISPATCH][-1].body == "-o rtd+ -j DROP"
    fw = [c for c in ruleset.chains if c.startswith("rtd-fw-")][0]
    assert any(r.body.startswith("! -s ") and r.body.endswith("-j DROP") for r in ruleset.chains[fw])


def test_deny_log_rules():
    ruleset = render(calculate(world(10, POLICIES, 2)), RenderOptions(deny_log=True, nflog_group=7))
    text = " ".join(r.body for rules in ruleset.chains.values() for r in rules)
    assert "--nflog-group 7" in text and "DENY-I" in text
    ruleset = render(calculate(world(10, POLICIES, 2)), RenderOptions(deny_log=True, log_mode="log"))
    assert any("--log-prefix" in r.body for rules in ruleset.chains.values() for r in rules)


def _as_saved(ruleset) -> str:
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [f":{c} - [0:0]" for c in ruleset.chains]
    for b, hook in ruleset.hooks.items():
        lines.append(hook.line(b))
    for c, rules in ruleset.chains.items():
        lines += [r.line(c) for r in rules]
    return "\n".join([*lines, "COMMIT"])


def test_diff_only_touches_changed_rules():
    old = render(calculate(world(10, POLICIES, 3)))
    assert diff(old, parse_save(_as_saved(old))) == []
    new = render(calculate(world(10, POLICIES[:1], 3)))
    ops = diff(new, parse_save(_as_saved(old)))
    assert ops and all(op.chain not in (names.CHAIN_FORWARD, names.CHAIN_INPUT) for op in ops)
    script = restore_script(ops)
    assert script.startswith("*filter") and script.rstrip().endswith("COMMIT")
    assert "-X " in script  # the removed policy's chain is deleted


def test_sweep_foreign_builtin_rules_untouched():
    saved = "*filter\n:FORWARD ACCEPT [0:0]\n:rtd-old - [0:0]\n-A FORWARD -s 1.1.1.1/32 -j ACCEPT\n" \
            "-A FORWARD -m comment --comment \"rtd:zz\" -j rtd-old\nCOMMIT\n"
    ops = diff(render(calculate(world(5, POLICIES, 1))), parse_save(saved))
    deletes = [op for op in ops if op.kind == "delete" and op.chain == "FORWARD"]
    assert [op.position for op in deletes] == [2]
    assert any(op.kind == "delete_chain" and op.chain == "rtd-old" for op in ops)


# -- IPv6 ---------------------------------------------------------------------------------------------------
DUAL = [Pod("x", "a", {"app": "s"}, "n", ("10.1.0.1", "fd00::1"), (ContainerPort(80, "TCP", "web"),)),
        Pod("x", "b", {"app": "c"}, "n", ("10.1.0.2",)),
        Pod("x", "c", {"app": "c"}, "n", ("fd00::3", "fd00::30"))]
DUAL_EPS = [Endpoint("c1", "eth0", "", "rtd00000000001", ("10.1.0.1", "fd00::1"), "x", "a"),
            Endpoint("c2", "eth0", "", "rtd00000000002", ("10.1.0.2",), "x", "b"),
            Endpoint("c3", "eth0", "", "rtd00000000003", ("fd00::3", "fd00::30"), "x", "c")]
BLOCKS = {"metadata": {"name": "blocks", "namespace": "x"},
          "spec": {"podSelector": {}, "ingress": [{"from": [
              {"podSelector": {"matchLabels": {"app": "c"}}},
              {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]}},
              {"ipBlock": {"cidr": "::/0", "except": ["fd00:1::/64"]}},
              {"ipBlock": {"cidr": "fd00:2::/48"}}], "ports": [{"port": "web"}, {"port": 53, "protocol": "UDP"}]}]}}


def dual(policies=(BLOCKS,)):
    return calculate(PolicyInputs([Namespace("x")], DUAL, list(policies), DUAL_EPS, ["192.168.0.1", "fd99::1"]))


def _bodies(ruleset: Ruleset, chain: str) -> list[str]:
    return [r.body for r in ruleset.chains[chain]]


def test_ipv4_rendering_unchanged():
    """IPv4 output (and so every rule hash) is what the IPv4-only dataplane wrote: pinned digests."""
    ruleset = render(calculate(world(100, POLICIES, 10)))
    digest = hashlib.sha256("\n".join(f"{c} {r.hash} {r.body}" for c, rules in ruleset.chains.items()
                                      for r in rules).encode()).hexdigest()[:16]
    assert ruleset.chains[names.CHAIN_FORWARD][0].hash == "7mp72rjwnnhjkldp"
    # computed by the IPv4-only code, then by the one without peer x port products (a rule with several peers
    # matches their list:set)
    assert digest == "7d937215614c731c"
    assert render(calculate(world(100, POLICIES, 10)), family=4).chains == ruleset.chains


def test_ipv6_set_names_distinct_prefixed_and_short():
    calc = dual()
    for name in calc.ipsets:
        v6 = names.family_ipset_name(name, 6)
        assert v6 != name and v6.startswith(names.PREFIX) and len(v6) <= names.MAX_IPSET
        assert names.family_ipset_name(name, 4) == name
    assert names.family_ipset_name(names.IPSET_HOST, 6) == "rtd6-host-ips"
    assert len({names.family_ipset_name(n, f) for n in calc.ipsets for f in (4, 6)}) == 2 * len(calc.ipsets)
    assert names.tmp_ipset_name("rtd6-s-x") != names.tmp_ipset_name("rtd-s-x")


def test_ipv6_rules_reference_v6_sets_and_v4_rules_v4_sets():
    calc = dual()
    r4, r6 = render(calc, family=4), render(calc, family=6)
    assert set(r4.chains) == set(r6.chains) and r4.hooks == r6.hooks  # same chain names, own table each
    policy_chain, plan = next(iter(calc.policies.items()))
    (rule,) = plan.rules
    assert rule.peer_set is not None and calc.ipsets[rule.peer_set].kind == "list:set"
    referenced = {rule.peer_set} | {p.named_port_set for p in rule.ports or () if p.named_port_set}
    for ruleset, family in ((r4, 4), (r6, 6)):
        used = {w for b in _bodies(ruleset, policy_chain) for w in b.split() if w.startswith("rtd")}
        assert used == {names.family_ipset_name(n, family) for n in referenced}
        # the list:set holds the family's sets: the selector set and the one set of the rule's ipBlocks
        assert calc.ipsets[rule.peer_set].for_family(family).members == {
            names.family_ipset_name(n, family) for n in calc.ipsets
            if calc.ipsets[n].kind in ("hash:ip", "hash:net") and n != names.IPSET_HOST}
    assert "--match-set rtd6-host-ips src -j RETURN" in _bodies(r6, names.CHAIN_TO_DISPATCH)[0]
    assert "--match-set rtd-host-ips src -j RETURN" in _bodies(r4, names.CHAIN_TO_DISPATCH)[0]


def test_ipv6_anti_spoofing_128_and_only_v6_addresses():
    calc = dual()
    r4, r6 = render(calc, family=4), render(calc, family=6)
    fw = {ep.pod_key: ep.from_chain for ep in calc.endpoints}
    assert _bodies(r6, fw["x/a"])[1] == "! -s fd00::1/128 -j DROP"
    assert _bodies(r4, fw["x/a"])[1] == "! -s 10.1.0.1/32 -j DROP"
    # two IPv6 addresses: one mark rule each, then the drop; IPv4 for that pod: no address, everything dropped
    assert _bodies(r6, fw["x/c"])[1:4] == ["-s fd00::3/128 -j MARK --set-xmark 0x80000/0x80000",
                                           "-s fd00::30/128 -j MARK --set-xmark 0x80000/0x80000",
                                           "-m mark --mark 0x0/0x80000 -j DROP"]
    assert _bodies(r4, fw["x/c"])[1] == "-m mark --mark 0x0/0x80000 -j DROP"
    # an endpoint without IPv6: every IPv6 packet from it is spoofed
    assert _bodies(r6, fw["x/b"])[1] == "-m mark --mark 0x0/0x80000 -j DROP"
    assert not any("-s " in b for b in _bodies(r6, fw["x/b"]))


def test_icmpv6_rules_in_the_ipv6_fixed_chains_only():
    r4, r6 = render(dual(), family=4), render(dual(), family=6)
    assert not any("icmp" in r.body for rules in r4.chains.values() for r in rules)
    inp, fwd = _bodies(r6, names.CHAIN_INPUT), _bodies(r6, names.CHAIN_FORWARD)

    def accepted(bodies: list[str], iface: str) -> list[int]:
        return [int(b.split("--icmpv6-type ")[1].split()[0]) for b in bodies
                if b.startswith(f"{iface} rtd+ -p icmpv6 -m icmp6 --icmpv6-type ") and b.endswith("-j ACCEPT")]

    assert accepted(inp, "-i") == [133, 134, 135, 136, 137, 130, 131, 132, 143, 1, 2, 3, 4]
    assert accepted(fwd, "-i") == [1, 2, 3, 4] and accepted(fwd, "-o") == [1, 2, 3, 4]  # no ND/MLD forwarded
    assert not any("--icmpv6-type 128" in b or "--icmpv6-type 129" in b for b in inp + fwd)  # echo: policy
    for bodies in (inp, fwd):  # before conntrack and the dispatch (ND from a link-local source: no anti-spoofing)
        last_icmp = max(i for i, b in enumerate(bodies) if "icmp6" in b)
        first_other = min(i for i, b in enumerate(bodies) if "icmp6" not in b)
        assert last_icmp < first_other and "INVALID" in bodies[first_other]
    # the rest of each fixed chain is IPv4's
    assert inp[13:] == _bodies(r4, names.CHAIN_INPUT) and fwd[8:] == _bodies(r4, names.CHAIN_FORWARD)


def test_ip_block_sets_split_by_family_and_zero_prefix():
    calc = dual()
    (net,) = [s for s in calc.ipsets.values() if s.kind == "hash:net"]  # the rule's three ipBlocks: one set
    assert net.description == "net|10.0.0.0/8!10.9.0.0/16,::/0!fd00:1::/64,fd00:2::/48"
    # hash:net cannot hold ::/0: its halves; fd00:2::/48 adds nothing to ::/0 (and is not written)
    assert net.members == {"10.0.0.0/8", "10.9.0.0/16 nomatch", "::/1", "8000::/1", "fd00:1::/64 nomatch"}
    assert net.for_family(4).members == {"10.0.0.0/8", "10.9.0.0/16 nomatch"}
    assert net.for_family(6).members == {"::/1", "8000::/1", "fd00:1::/64 nomatch"}
    assert net.for_family(6).name == names.family_ipset_name(net.name, 6) and net.for_family(6).family == 6
    assert net.contains("2001:db8::1") and not net.contains("fd00:1::5") and net.contains("fd00:2::1")
    assert net.contains("10.1.2.3") and not net.contains("10.9.2.3") and not net.contains("192.168.1.1")
    zero4 = calculate(PolicyInputs([Namespace("x")], DUAL, [pol("z", {"podSelector": {}, "ingress": [
        {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}, ns="x")], DUAL_EPS, []))
    net = next(s for s in zero4.ipsets.values() if s.kind == "hash:net")
    assert net.members == {"0.0.0.0/1", "128.0.0.0/1"} and net.for_family(6).members == frozenset()


def test_selector_and_named_port_sets_split_by_family():
    calc = dual()
    sel = next(s for s in calc.ipsets.values() if s.kind == "hash:ip" and s.name != names.IPSET_HOST)
    assert sel.members == {"10.1.0.2", "fd00::3", "fd00::30"}
    assert sel.for_family(4).members == {"10.1.0.2"} and sel.for_family(6).members == {"fd00::3", "fd00::30"}
    port = next(s for s in calc.ipsets.values() if s.kind == "hash:ip,port")
    assert port.for_family(4).members == {"10.1.0.1,tcp:80"} and port.for_family(6).members == {"fd00::1,tcp:80"}
    host = calc.ipsets[names.IPSET_HOST]
    assert host.for_family(6).members == {"fd99::1"} and host.for_family(4).members == {"192.168.0.1"}
