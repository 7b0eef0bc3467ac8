"""A policy costs the sum of its peers and ports, never their product: a rule's ipBlocks are one hash:net set
(their exact union), several peers one list:set, its ports one alternative per protocol (a multiport rule, or a
bitmap:port set beyond 15 slots) plus one per named port; the ipset scripts create and destroy those in an
order the kernel accepts."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from policy import names
from policy.calc import (
    IpSetSpec,
    PolicyInputs,
    PortMatch,
    calculate,
    ip_block_entries,
    named_port_set,
    plan_policy,
    policy_cost,
)
from policy.dataplane.ipsets import ActualSet, IpsetDataplane, kernel_members, parse_save
from policy.model import IpBlock, parse_policy
from policy.render import render
from routed.model import ContainerPort, Endpoint, Namespace, Pod

# -- the union of ipBlocks as one hash:net set ----------------------------------------------------------------
V4 = [ipaddress.ip_network(n) for n in ("0.0.0.0/0", "10.0.0.0/24", "10.0.0.0/25", "10.0.0.128/25", "10.0.0.0/26",
                                        "10.0.0.64/26", "10.0.0.0/28", "10.0.0.16/28", "10.0.0.1/32", "10.0.0.2/32",
                                        "10.0.0.130/32", "10.0.0.128/30")]
V6 = [ipaddress.ip_network(n) for n in ("::/0", "fd00::/120", "fd00::/121", "fd00::80/121", "fd00::1/128",
                                        "fd00::81/128", "8000::/1")]
PROBES = ([str(a) for a in ipaddress.ip_network("10.0.0.0/24")] + ["10.0.1.1", "192.168.1.1", "0.0.0.1"]
          + [str(a) for a in ipaddress.ip_network("fd00::/120")] + ["fd00::1:1", "2001:db8::1", "8000::1"])
PROBE_ADDRESSES = [ipaddress.ip_address(a) for a in PROBES]


@st.composite
def ip_blocks(draw: st.DrawFn) -> IpBlock:
    cidr = draw(st.sampled_from(V4 + V6))
    inside = [n for n in V4 + V6 if n.version == cidr.version and n.subnet_of(cidr)]  # type: ignore[arg-type]
    excepts = draw(st.lists(st.sampled_from(inside), max_size=4))
    return IpBlock(str(cidr), tuple(sorted({str(e) for e in excepts})))


def hash_net_matches(entries: frozenset[str], ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """The kernel's hash:net test: the most specific entry containing the address decides; nomatch excludes."""
    containing = [(ipaddress.ip_network(e.split()[0]), e.endswith(" nomatch")) for e in entries]
    found = [(net.prefixlen, not nomatch) for net, nomatch in containing if net.version == ip.version and ip in net]
    return bool(found) and max(found)[1]


@settings(max_examples=300, deadline=None)
@given(st.lists(ip_blocks(), min_size=1, max_size=6))
def test_ip_block_entries_are_the_exact_union(blocks):
    entries = ip_block_entries(blocks)
    nets = [(ipaddress.ip_network(b.cidr), [ipaddress.ip_network(e) for e in b.excepts]) for b in blocks]
    for ip in PROBE_ADDRESSES:
        in_union = any(ip.version == c.version and ip in c and not any(ip in e for e in ex) for c, ex in nets)
        assert hash_net_matches(entries, ip) == in_union, (ip, sorted(entries))
    assert all(IpSetSpec("x", "hash:net", entries).contains(str(ip)) == hash_net_matches(entries, ip)
               for ip in PROBE_ADDRESSES[::17])  # what explain evaluates
    distinct = {b.cidr for b in blocks} | {e for b in blocks for e in b.excepts}
    assert len(entries) <= len(distinct) + 2  # a /0 is written as its halves
    assert not any(e.split()[0].endswith("/0") for e in entries)  # hash:net cannot hold a /0


def test_ip_block_union_cases():
    # an except of one block inside another block's cidr stays allowed by that block
    assert ip_block_entries([IpBlock("10.0.0.0/8", ("10.1.0.0/16",)), IpBlock("10.1.2.0/24")]) == {
        "10.0.0.0/8", "10.1.0.0/16 nomatch", "10.1.2.0/24"}
    # one block's cidr is another's except: the first keeps it in (no entry may be both match and nomatch)
    assert ip_block_entries([IpBlock("10.1.0.0/16", ("10.1.2.0/24",)), IpBlock("10.0.0.0/8", ("10.1.0.0/16",))]) \
        == {"10.0.0.0/8", "10.1.2.0/24 nomatch"}
    assert ip_block_entries([IpBlock("10.0.0.0/8", ("10.0.0.0/8",))]) == frozenset()  # excepted whole
    assert ip_block_entries([IpBlock("0.0.0.0/0", ("0.0.0.0/1",))]) == {"128.0.0.0/1"}


# -- linear growth ---------------------------------------------------------------------------------------------
def _policy(n_blocks: int, n_ports: int, n_selectors: int = 0, named: int = 0) -> dict:
    peers = [{"ipBlock": {"cidr": f"10.{i // 256}.{i % 256}.0/24", "except": [f"10.{i // 256}.{i % 256}.128/25"]}}
             for i in range(n_blocks)]
    peers += [{"podSelector": {"matchLabels": {"app": f"a{i}"}}} for i in range(n_selectors)]
    ports = [{"port": 1000 + 2 * i} for i in range(n_ports)]
    ports += [{"port": 30000 + 10 * i, "endPort": 30005 + 10 * i, "protocol": "UDP"} for i in range(n_ports)]
    ports += [{"port": f"p{i}"} for i in range(named)]
    return {"metadata": {"name": "big", "namespace": "x"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                     "ingress": [{"from": peers, "ports": ports}], "egress": [{"to": peers, "ports": ports}]}}


def _figures(n_blocks: int, n_ports: int, n_selectors: int = 0, named: int = 0) -> tuple[int, int, int]:
    """(policy chain rules in one family, ipsets, set entries) of the node."""
    pod = Pod("x", "a", {"app": "s"}, "n", ("10.200.0.1", "fd00::1"), (ContainerPort(80, "TCP", "p0"),))
    ep = Endpoint("c", "eth0", "", "rtd00000000001", pod.ips, "x", "a")
    calc = calculate(PolicyInputs([Namespace("x")], [pod], [_policy(n_blocks, n_ports, n_selectors, named)], [ep], []))
    assert not calc.problems
    ruleset = render(calc, family=4)
    rules = sum(len(ruleset.chains[chain]) for chain in calc.policies)
    return rules, len(calc.ipsets), sum(len(s.members) for s in calc.ipsets.values())


def test_rules_and_sets_grow_with_the_sum_of_peers_and_ports_not_their_product():
    small = _figures(1, 1)
    big = _figures(800, 800)
    # 800 x 800 (and 800 UDP ranges): still one rule per protocol and direction, the same sets
    assert small[0] == big[0] == 4 and small[1] == 1 + 1 and big[1] == 1 + 2 + 1  # ipBlocks, port sets, host
    assert big[2] <= 2 * 800 + 2 * 800 + 1  # the union's entries, the port runs
    # selectors and named ports add a set and (named ports) a rule each: the sum
    rules, sets, _ = _figures(800, 800, n_selectors=20, named=5)
    assert rules == 2 * (2 + 5) and sets == 1 + 20 + 1 + 2 + 5 + 1  # ipBlocks, selectors, list, ports, named, host
    for n, m in ((10, 10), (100, 300), (400, 50)):
        assert _figures(n, m)[0] <= 4 and _figures(n, m, n_selectors=3)[1] <= 3 + 5


def test_port_alternatives_per_protocol():
    policy = parse_policy({"metadata": {"name": "p", "namespace": "x"}, "spec": {"podSelector": {}, "ingress": [
        {"ports": [{"port": 80}, {"port": 81}, {"port": 79, "endPort": 80}, {"port": 90, "endPort": 95},
                   {"port": 53, "protocol": "UDP"}, {"port": "web"}, {"protocol": "SCTP"},
                   {"port": "dns", "protocol": "SCTP"}]},
        {"ports": [{"port": 2 * i + 1} for i in range(16)]}]}})
    first, second = plan_policy(policy, "Ingress", lambda d: d.name).rules
    # TCP ports and ranges merged into runs; SCTP open on every port makes its named port redundant
    assert first.ports == (PortMatch("TCP", ((79, 81), (90, 95))), PortMatch("UDP", ((53, 53),)), PortMatch("SCTP"),
                           PortMatch("TCP", named_port_set=named_port_set("TCP", "web").name))
    assert second.ports is not None and second.ports[0].port_set is not None  # 16 ports: over multiport's 15
    assert policy_cost(policy).rules == 4 + 1


def test_render_uses_multiport_then_a_port_set():
    eps = [Endpoint("c", "eth0", "", "rtd00000000001", ("10.0.0.1",), "x", "a")]
    pods = [Pod("x", "a", {}, "n", ("10.0.0.1",))]

    def bodies(ports):
        pol = {"metadata": {"name": "p", "namespace": "x"},
               "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": ports}]}}
        calc = calculate(PolicyInputs([Namespace("x")], pods, [pol], eps, []))
        return [r.body for r in render(calc, family=6).chains[names.policy_chain("x/p", "Ingress")]], calc

    few, _ = bodies([{"port": 80}, {"port": 8000, "endPort": 8080}])
    assert len(few) == 1 and "-p tcp -m set --match-set rtd6-n-" in few[0] and "-m multiport --dports 80,8000:8080" in few[0]
    many, calc = bodies([{"port": 1000 + 3 * i} for i in range(16)])
    (port_set,) = [s for s in calc.ipsets.values() if s.kind == "bitmap:port"]
    assert len(many) == 1 and f"-m set --match-set {names.family_ipset_name(port_set.name, 6)} dst -j MARK" in many[0]
    assert port_set.for_family(6).members == port_set.members == {str(1000 + 3 * i) for i in range(16)}


# -- ipset scripts ---------------------------------------------------------------------------------------------
def test_bitmap_port_read_back_as_runs_and_family_from_the_name():
    saved = ("create rtd6-o-x bitmap:port range 0-65535\nadd rtd6-o-x 80\nadd rtd6-o-x 81\nadd rtd6-o-x 82\n"
             "add rtd6-o-x 443\ncreate rtd-l-y list:set size 8\nadd rtd-l-y rtd-s-z\n")
    sets = parse_save(saved)
    assert sets["rtd6-o-x"].members == {"80-82", "443"} and sets["rtd6-o-x"].family == 6
    assert sets["rtd-l-y"].members == {"rtd-s-z"} and sets["rtd-l-y"].family == 4
    assert kernel_members(IpSetSpec("rtd6-o-x", "bitmap:port", frozenset({"80-82", "443"}))) == sets["rtd6-o-x"].members


def test_list_sets_created_after_and_destroyed_before_their_members():
    dp = IpsetDataplane()
    desired = {"rtd-l-a": IpSetSpec("rtd-l-a", "list:set", frozenset({"rtd-s-b", "rtd-n-c"}), family=4),
               "rtd-s-b": IpSetSpec("rtd-s-b", "hash:ip", frozenset({"10.0.0.1"}), family=4),
               "rtd-n-c": IpSetSpec("rtd-n-c", "hash:net", frozenset({"10.0.0.0/8"}), family=4),
               "rtd-o-d": IpSetSpec("rtd-o-d", "bitmap:port", frozenset({"80-90"}), family=4)}
    lines = dp.phase1_script(desired, {})
    creates = [line.split()[1] for line in lines if line.startswith("create")]
    assert creates[-1] == "rtd-l-a" and "create rtd-l-a list:set size 8" in lines
    assert "create rtd-o-d bitmap:port range 0-65535" in lines and "add rtd-o-d 80-90" in lines
    actual = {n: ActualSet(n, s.kind, set(s.members)) for n, s in desired.items()}
    assert dp.phase2_script({}, actual)[0] == "destroy rtd-l-a"
