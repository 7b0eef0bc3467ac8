"""Pure policy calculation: (namespaces, pods, policies, local endpoints) -> desired ipsets and chains.

No I/O. The dataplane renders the result; `policy.explain` evaluates the very same rule objects against
the very same ipset members, so what `explain` says is what the kernel does.
Rules grow with policies and local endpoints; cluster pods only ever become ipset members.

Family-neutral: a set holds the members of both IP families (pod IPv4 and IPv6 addresses, `ip,proto:port` of
either, ipBlocks of either), an endpoint plan all of the pod's addresses. The dataplane splits each set per
family (`IpSetSpec.for_family`: the family's kernel name, only that family's members), so an IPv4 ipBlock's
IPv6 set is empty and never matches an IPv6 flow, and vice versa.

A rule's cost is the sum of its peers and ports, never their product: all the rule's ipBlocks are one hash:net
set (their union, excepts as `nomatch` entries), several peer sets are one list:set, and its ports are one
alternative per protocol (a port or range, `-m multiport` up to 15 slots, else a bitmap:port set) plus one per
named port. A policy that would cost more than its budget (PolicyBudget, from sizes, before anything is
expanded) is invalid: its pods fail closed, the others are not affected.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from policy import names
from policy.model import EGRESS, INGRESS, PROTOCOLS, IpBlock, Peer, Policy, PortSpec, Rule, parse_policy
from policy.selectors import Selector
from routed.api_types import InvalidPolicy
from routed.model import Endpoint, Namespace, Pod

log = logging.getLogger(__name__)

DIRECTIONS = (INGRESS, EGRESS)
MULTIPORT_SLOTS = 15  # `-m multiport`: at most 15 ports, a range counts as two
STATIC_KINDS = frozenset({"hash:net", "bitmap:port", "list:set"})  # members follow from the policy alone


@dataclass(frozen=True)
class PolicyBudget:
    """What policies may cost on one node. Rules: policy chain rules in one family's table; sets: distinct sets
    (each is one kernel set per family); members: static set entries (ipBlock entries, port runs, list:set
    entries: what the policy itself writes; pods in selector sets are not counted, they grow with the cluster).
    A policy over `policy_*` is invalid; the policies are then admitted in namespace/name order while the
    node's totals stay within `node_*`, the rest are invalid too."""

    policy_rules: int = 2_000
    policy_sets: int = 200
    policy_members: int = 100_000
    node_rules: int = 50_000
    node_sets: int = 10_000
    node_members: int = 500_000


DEFAULT_BUDGET = PolicyBudget()


@dataclass(frozen=True)
class PolicyInputs:
    namespaces: list[Namespace]
    pods: list[Pod]
    policies: list[dict[str, Any]]  # raw NetworkPolicy dicts
    endpoints: list[Endpoint]  # local endpoints on this node
    node_ips: list[str]  # this node's own addresses (host -> local pod traffic stays allowed)
    budget: PolicyBudget = DEFAULT_BUDGET


def ip_family(addr: str) -> int:
    """4 or 6, from an address literal (cheap: runs per member)."""
    return 6 if ":" in addr else 4


def member_family(member: str) -> int:
    """The family of an ipset member: `ip`, `net[ nomatch]` or `ip,proto:port` (not of bitmap:port or list:set
    members, which have none)."""
    return ip_family(member.partition(",")[0])


def family_ips(ips: Iterable[str], family: int) -> tuple[str, ...]:
    return tuple(ip for ip in ips if ip_family(ip) == family)


def _valid_ips(ips: Iterable[str]) -> tuple[str, ...]:
    out = []
    for ip in ips:
        try:
            out.append(str(ipaddress.ip_address(ip)))
        except ValueError:
            log.debug("ignoring %r: not an IP address", ip)
    return tuple(out)


@dataclass(frozen=True)
class IpSetSpec:
    name: str
    kind: str  # hash:ip | hash:net | hash:ip,port | bitmap:port | list:set
    members: frozenset[str]  # hash:net: may end in " nomatch"; bitmap:port: "80" or "80-90"; list:set: set names
    description: str = ""
    family: int | None = None  # None: the calculation's set (both families); 4/6: one family's kernel set

    def for_family(self, family: int) -> IpSetSpec:
        """This set as the kernel holds it in `family`: the family's name and only that family's members
        (a bitmap:port set has the same ports in both; a list:set holds the family's sets)."""
        if self.kind == "bitmap:port":
            members = self.members
        elif self.kind == "list:set":
            members = frozenset(names.family_ipset_name(m, family) for m in self.members)
        else:
            members = frozenset(m for m in self.members if member_family(m) == family)
        return IpSetSpec(names.family_ipset_name(self.name, family), self.kind, members, self.description, family)

    def contains(self, ip: str, proto: str = "", port: int = 0) -> bool:
        """hash:* sets (a list:set needs the sets it holds: `in_set`)."""
        if self.kind == "hash:ip":
            return ip in self.members
        if self.kind == "hash:ip,port":
            return f"{ip},{proto.lower()}:{port}" in self.members
        return _net_contains(self.members, ip)

    def contains_port(self, port: int) -> bool:
        """bitmap:port sets."""
        return any(lo <= port <= hi for lo, hi in map(_run_bounds, self.members))


def in_set(sets: Mapping[str, IpSetSpec], name: str, ip: str) -> bool:
    """Whether `ip` matches set `name` as the kernel's set match sees it (a list:set: any set it holds)."""
    spec = sets[name]
    if spec.kind == "list:set":
        return any(in_set(sets, member, ip) for member in spec.members)
    return spec.contains(ip)


def _run_bounds(run: str) -> tuple[int, int]:
    lo, _, hi = run.partition("-")
    return int(lo), int(hi or lo)


def port_runs(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Port ranges merged into sorted, disjoint, non-adjacent runs."""
    runs: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if runs and lo <= runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], max(hi, runs[-1][1]))
        else:
            runs.append((lo, hi))
    return tuple(runs)


def run_text(lo: int, hi: int, sep: str = "-") -> str:
    return str(lo) if lo == hi else f"{lo}{sep}{hi}"


def multiport_slots(runs: Iterable[tuple[int, int]]) -> int:
    return sum(1 if lo == hi else 2 for lo, hi in runs)


def _net_contains(members: Iterable[str], ip: str) -> bool:
    """hash:net semantics: the most specific entry wins; `nomatch` entries exclude."""
    addr = ipaddress.ip_address(ip)
    best: tuple[int, bool] | None = None
    for m in members:
        text, _, flag = m.partition(" ")
        net = ipaddress.ip_network(text)
        if net.version == addr.version and addr in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, flag != "nomatch")
    return bool(best and best[1])


@dataclass(frozen=True)
class PortMatch:
    """One port alternative of a rule: a protocol with every port (no ranges), some ports (`ranges`; more than
    MULTIPORT_SLOTS: held by the bitmap:port set `port_set`), or a named port (`named_port_set`, destination
    `ip,proto:port`)."""

    protocol: str
    ranges: tuple[tuple[int, int], ...] = ()
    port_set: str | None = None
    named_port_set: str | None = None

    def matches(self, dst: str, protocol: str, port: int, sets: Mapping[str, IpSetSpec]) -> bool:
        if protocol != self.protocol:
            return False
        if self.named_port_set is not None:
            return sets[self.named_port_set].contains(dst, protocol, port)
        if self.port_set is not None:
            return sets[self.port_set].contains_port(port)
        return not self.ranges or any(lo <= port <= hi for lo, hi in self.ranges)


@dataclass(frozen=True)
class RuleMatch:
    """One NetworkPolicy rule: the peer is in `peer_set` (None: any peer) and the flow matches one of `ports`
    (None: any protocol and port). `peer_set` is the rule's only peer set, or the list:set of its `peers` (the
    selector sets and the one ipBlock set of the rule). Rendered as one iptables rule per port alternative."""

    rule_index: int
    peer_set: str | None = None
    peers: tuple[str, ...] = ()
    ports: tuple[PortMatch, ...] | None = None

    def matches(
        self, direction: str, src: str, dst: str, protocol: str, port: int, sets: Mapping[str, IpSetSpec]
    ) -> bool:
        if self.peer_set is not None and not in_set(sets, self.peer_set, src if direction == INGRESS else dst):
            return False
        return self.ports is None or any(p.matches(dst, protocol, port, sets) for p in self.ports)

    def rule_count(self) -> int:
        """iptables rules it renders to (in each family)."""
        return len(self.ports) if self.ports else 1


@dataclass(frozen=True)
class PolicyPlan:
    key: str
    direction: str
    chain: str
    rules: tuple[RuleMatch, ...]


@dataclass(frozen=True)
class EndpointPlan:
    host_ifname: str
    pod_key: str
    ips: tuple[str, ...]  # the addresses the workload may send from (both families)
    from_chain: str
    to_chain: str
    ingress: tuple[str, ...] | None  # policy chains, in order; None: no policy selects (allow)
    egress: tuple[str, ...] | None
    unknown_pod: bool = False  # the pod object is not known: both directions fail closed


@dataclass(frozen=True)
class PolicyProblem:
    key: str
    reasons: tuple[str, ...]
    fail_closed: tuple[str, ...]  # directions its selected pods are denied in

    def as_report(self) -> InvalidPolicy:
        return InvalidPolicy(policy=self.key, reasons=list(self.reasons), failClosed=list(self.fail_closed))


@dataclass
class Calculation:
    ipsets: dict[str, IpSetSpec]
    policies: dict[str, PolicyPlan]  # by chain name
    endpoints: list[EndpointPlan]
    problems: list[PolicyProblem]
    host_set: str = names.IPSET_HOST
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SetDef:
    """What one ipset holds, independent of the cluster's state: name, kind and what makes a member.

    Selector sets (hash:ip) hold the IPs of the pods a peer selects: pods in `namespace` (a peer without
    namespaceSelector: the policy's own) or in namespaces matching `namespace_selector`, matching `pod_selector`
    (None: every pod). Named-port sets (hash:ip,port) hold `ip,proto:port` of every pod declaring the port name.
    Static sets hold `static_members`: an ipBlock set (hash:net) the union of a rule's `blocks`, computed when
    first asked for (`member_bound` sizes it without); a port set (bitmap:port) port runs; a list:set the names
    of the sets it holds (`entries`).
    """

    name: str
    kind: str
    identity: str
    namespace: str | None = None
    namespace_selector: Selector | None = None
    pod_selector: Selector | None = None
    named_port: tuple[str, str] | None = None  # (protocol, port name)
    blocks: tuple[IpBlock, ...] = ()
    entries: frozenset[str] = frozenset()

    @property
    def static(self) -> bool:
        return self.kind in STATIC_KINDS

    @cached_property
    def static_members(self) -> frozenset[str]:
        if self.kind == "hash:net":
            return ip_block_entries(self.blocks)
        return self.entries

    def member_bound(self) -> int:
        """At most how many static members it has, from sizes alone (nothing expanded)."""
        if self.kind == "hash:net":
            return sum(1 + len(b.excepts) + (1 if b.cidr.endswith("/0") else 0) for b in self.blocks)
        return len(self.entries)


def selector_set(policy_ns: str, peer: Peer) -> SetDef:
    ns_part = peer.namespace_selector.canonical() if peer.namespace_selector is not None else f"ns={policy_ns}"
    pod_part = peer.pod_selector.canonical() if peer.pod_selector is not None else "all()"
    identity = f"sel|{ns_part}|{pod_part}"
    return SetDef(names.ipset_name("s", identity), "hash:ip", identity,
                  namespace=policy_ns if peer.namespace_selector is None else None,
                  namespace_selector=peer.namespace_selector, pod_selector=peer.pod_selector)


def ip_block_set(*blocks: IpBlock) -> SetDef:
    """One set for all the ipBlocks of a rule (their union), of either family (its set in a family none of
    them is of is empty)."""
    unique = tuple(dict.fromkeys(sorted(blocks, key=IpBlock.canonical)))
    identity = "net|" + ",".join(b.canonical() for b in unique)
    return SetDef(names.ipset_name("n", identity), "hash:net", identity, blocks=unique)


def port_set(runs: tuple[tuple[int, int], ...]) -> SetDef:
    """A bitmap:port set of these port runs (no protocol: the rule matches that)."""
    identity = "ports|" + ",".join(run_text(lo, hi) for lo, hi in runs)
    return SetDef(names.ipset_name("o", identity), "bitmap:port", identity,
                  entries=frozenset(run_text(lo, hi) for lo, hi in runs))


def list_set(members: Iterable[str]) -> SetDef:
    """A list:set of these sets: the peer is in any of them."""
    ordered = sorted(set(members))
    identity = "list|" + ",".join(ordered)
    return SetDef(names.ipset_name("l", identity), "list:set", identity, entries=frozenset(ordered))


def named_port_set(protocol: str, port_name: str) -> SetDef:
    identity = f"port|{protocol}|{port_name}"
    return SetDef(names.ipset_name("p", identity), "hash:ip,port", identity, named_port=(protocol, port_name))


NetKey = tuple[int, int, int]  # (version, network address as an int, prefix length)


def _net_key(text: str) -> NetKey:
    """A normalised network (IpBlock's text) as a key; IPv4 parsed by hand (ipaddress costs ~10 us each)."""
    address, _, plen = text.partition("/")
    if ":" in address:
        return 6, int(ipaddress.IPv6Address(address)), int(plen)
    a, b, c, d = (int(part) for part in address.split("."))
    return 4, a << 24 | b << 16 | c << 8 | d, int(plen)


def _net_text(key: NetKey) -> str:
    version, address, plen = key
    if version == 6:
        return f"{ipaddress.IPv6Address(address)}/{plen}"
    return f"{address >> 24}.{address >> 16 & 255}.{address >> 8 & 255}.{address & 255}/{plen}"


def ip_block_entries(blocks: Iterable[IpBlock]) -> frozenset[str]:
    """hash:net entries whose most-specific-entry-wins matching (`nomatch` entries exclude) is exactly the union
    of `blocks` (each: its cidr minus its excepts), at most one entry per distinct cidr or except.

    Every address has a most specific cidr or except containing it; whether it is in the union depends on that
    network alone (a block holds it iff the block's cidr contains that network and none of its excepts does).
    The networks are walked in prefix order (a parent before its children) with, on a stack, the blocks whose
    cidr contains the current network and how many of each block's excepts do; an entry is written only where
    the verdict differs from its parent's. A /0 (hash:net cannot hold one) is written as its two /1 halves.
    """
    block_list = list(blocks)
    starts: dict[NetKey, list[int]] = {}
    excepts: dict[NetKey, list[int]] = {}
    for i, block in enumerate(block_list):
        starts.setdefault(_net_key(block.cidr), []).append(i)
        for e in block.excepts:
            excepts.setdefault(_net_key(e), []).append(i)
    nodes = set(starts) | set(excepts)
    for version in {n[0] for n in nodes if n[2] == 0}:
        bits = 32 if version == 4 else 128
        nodes |= {(version, 0, 1), (version, 1 << (bits - 1), 1)}
    active = [False] * len(block_list)
    excepted = [0] * len(block_list)
    live = 0  # blocks containing the current network and none of whose excepts does
    stack: list[tuple[int, int, int, bool, NetKey]] = []  # (version, first, last address, verdict, network)
    out: list[str] = []

    def leave(key: NetKey) -> None:
        nonlocal live
        for b in excepts.get(key, ()):
            excepted[b] -= 1
            if excepted[b] == 0 and active[b]:
                live += 1
        for b in starts.get(key, ()):
            if not excepted[b]:
                live -= 1
            active[b] = False

    for key in sorted(nodes):
        version, first, plen = key
        last = first | ((1 << ((32 if version == 4 else 128) - plen)) - 1)
        while stack and not (stack[-1][0] == version and stack[-1][1] <= first <= stack[-1][2]):
            leave(stack.pop()[4])
        parent = stack[-1][3] if stack else False
        for b in starts.get(key, ()):
            active[b] = True
            if not excepted[b]:
                live += 1
        for b in excepts.get(key, ()):
            excepted[b] += 1
            if excepted[b] == 1 and active[b]:
                live -= 1
        verdict = live > 0
        if plen == 0:
            verdict = parent  # not written: its two halves are
        elif verdict != parent:
            out.append(_net_text(key) if verdict else f"{_net_text(key)} nomatch")
        stack.append((version, first, last, verdict, key))
    return frozenset(out)


def contributes(pod: Pod) -> bool:
    """Only pods with their own network and an address (either family) are ever set members."""
    return not pod.host_network and bool(pod.ips)


def pod_members(d: SetDef, pod: Pod, ns_labels: Mapping[str, str]) -> tuple[str, ...]:
    """What `pod` puts into set `d` (nothing when it is not a member); ns_labels: its namespace's labels."""
    if not contributes(pod):
        return ()
    if d.named_port is not None:
        protocol, port_name = d.named_port
        return tuple(f"{ip},{protocol.lower()}:{cp.port}" for cp in pod.ports
                     if cp.name == port_name and cp.protocol == protocol for ip in pod.ips)
    if d.kind != "hash:ip":
        return ()
    if d.namespace is not None:
        if pod.namespace != d.namespace:
            return ()
    elif d.namespace_selector is None or not d.namespace_selector.matches(ns_labels):
        return ()
    if d.pod_selector is not None and not d.pod_selector.matches(pod.labels):
        return ()
    return pod.ips


def local_pod_ips(endpoints: Iterable[Endpoint]) -> dict[str, tuple[str, ...]]:
    """pod key -> the addresses of its local endpoint (the one with the greatest host interface name that has
    any): what a pod whose object shows no address yet is known by."""
    out: dict[str, tuple[str, ...]] = {}
    for ep in sorted(endpoints, key=lambda e: e.host_ifname):
        if ep.ips:
            out[ep.pod_key] = tuple(ep.ips)
    return out


def default_namespace_labels(name: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name}


def namespace_labels_of(ns: Namespace) -> dict[str, str]:
    labels = dict(ns.labels)
    labels.setdefault("kubernetes.io/metadata.name", ns.name)
    return labels


def port_matches(ports: Iterable[PortSpec], define: Callable[[SetDef], str]) -> tuple[PortMatch, ...]:
    """A rule's ports as alternatives: per protocol (TCP, UDP, SCTP) every port, or its ports and ranges merged
    into runs (a bitmap:port set when more than multiport takes), then each named port (per destination pod) of
    a protocol not already open on every port."""
    every: set[str] = set()
    ranges: dict[str, list[tuple[int, int]]] = {}
    named: dict[tuple[str, str], None] = {}
    for p in ports:
        if p.name is not None:
            named[(p.protocol, p.name)] = None
        elif p.port is None:
            every.add(p.protocol)
        else:
            ranges.setdefault(p.protocol, []).append((p.port, p.end_port or p.port))
    out: list[PortMatch] = []
    for protocol in PROTOCOLS:
        if protocol in every:
            out.append(PortMatch(protocol))
        elif protocol in ranges:
            runs = port_runs(ranges[protocol])
            held_by = define(port_set(runs)) if multiport_slots(runs) > MULTIPORT_SLOTS else None
            out.append(PortMatch(protocol, runs, port_set=held_by))
    out += [PortMatch(protocol, named_port_set=define(named_port_set(protocol, name)))
            for protocol, name in named if protocol not in every]
    return tuple(out)


def rule_match(policy: Policy, index: int, rule: Rule, define: Callable[[SetDef], str]) -> RuleMatch:
    """One rule: its selector peers' sets and one set for all its ipBlocks, in a list:set when more than one."""
    peer_set: str | None = None
    peers: tuple[str, ...] = ()
    if rule.peers is not None:
        found = [define(selector_set(policy.namespace, p)) for p in rule.peers if p.ip_block is None]
        blocks = [p.ip_block for p in rule.peers if p.ip_block is not None]
        if blocks:
            found.append(define(ip_block_set(*blocks)))
        peers = tuple(dict.fromkeys(found))
        peer_set = peers[0] if len(peers) == 1 else define(list_set(peers))
    ports = port_matches(rule.ports, define) if rule.ports is not None else None
    return RuleMatch(rule_index=index, peer_set=peer_set, peers=peers, ports=ports)


def plan_policy(policy: Policy, direction: str, define: Callable[[SetDef], str]) -> PolicyPlan:
    """The chain of one policy direction; `define` is told every set it references and returns its name."""
    matches = [rule_match(policy, i, rule, define) for i, rule in enumerate(policy.rules(direction))]
    chain = names.policy_chain(policy.key, direction)
    return PolicyPlan(policy.key, direction, chain, tuple(dict.fromkeys(matches)))


def plan_sets(plan: PolicyPlan) -> set[str]:
    """Every set the plan's rules reference (a list:set's members too)."""
    out: set[str] = set()
    for rm in plan.rules:
        out.update(rm.peers)
        if rm.peer_set:
            out.add(rm.peer_set)
        for p in rm.ports or ():
            out.update(s for s in (p.port_set, p.named_port_set) if s)
    return out


# -- budget -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyCost:
    """What a policy costs: rules (in each family's table), the sets it references, their static members
    (an upper bound, from sizes: nothing is expanded to find it)."""

    rules: int = 0
    sets: frozenset[str] = frozenset()
    members: int = 0

    def text(self) -> str:
        return f"{self.rules} rules, {len(self.sets)} sets, {self.members} set entries"


def policy_cost(policy: Policy) -> PolicyCost:
    """Planned with a `define` that only records names: linear in the policy's size."""
    defs: dict[str, SetDef] = {}

    def define(d: SetDef) -> str:
        defs[d.name] = d
        return d.name

    rules = 0
    for direction in DIRECTIONS:
        if direction in policy.types:
            rules += sum(rm.rule_count() for rm in plan_policy(policy, direction, define).rules)
    return PolicyCost(rules, frozenset(defs), sum(d.member_bound() for d in defs.values()))


def policy_over_budget(cost: PolicyCost, budget: PolicyBudget) -> str | None:
    over = [f"{have} {what} (at most {limit})" for have, what, limit in (
        (cost.rules, "rules", budget.policy_rules), (len(cost.sets), "ipsets", budget.policy_sets),
        (cost.members, "set entries", budget.policy_members)) if have > limit]
    return f"over the per-policy budget: {', '.join(over)}" if over else None


def over_budget(policy: Policy, reason: str) -> Policy:
    """The policy as an invalid one: no rules, so the pods it selects are denied in its directions."""
    return dataclasses.replace(policy, ingress=(), egress=(), problems=(reason,))


class BudgetLedger:
    """The budget verdict of every policy: over its own budget (any policy), or over what the node has left: the
    policies this node uses (selecting a pod of a local endpoint) are admitted in namespace/name order while the
    node's totals allow. The totals are kept as policies come, go and are used, so the common case (everything
    fits) costs one policy's size per change."""

    def __init__(self, budget: PolicyBudget = DEFAULT_BUDGET) -> None:
        self.budget = budget
        self.costs: dict[str, PolicyCost] = {}  # policies within their own budget
        self.used: set[str] = set()  # policies this node uses
        self.own: dict[str, str] = {}  # key -> reason: over its own budget
        self.node: dict[str, str] = {}  # key -> reason: over the node's budget
        self._counted: set[str] = set()  # used and within their own budget: in the totals
        self._set_refs: Counter[str] = Counter()
        self._rules = 0
        self._members = 0

    def problems(self) -> dict[str, str]:
        return self.own | self.node

    def reason(self, key: str) -> str | None:
        """Why `key` is over budget (None: it is not)."""
        return self.own.get(key) or self.node.get(key)

    def take(self, policy: Policy, settle: bool = True) -> set[str]:
        """Take `policy` (a new version of its key); returns the keys whose verdict changed (after `settle`)."""
        before = self.problems()
        self._forget(policy.key)
        if policy.valid:
            cost = policy_cost(policy)
            reason = policy_over_budget(cost, self.budget)
            if reason is not None:
                self.own[policy.key] = f"{reason}; it would cost {cost.text()}"
            else:
                self.costs[policy.key] = cost
                self._count(policy.key)
        return self._changed(before) if settle else set()

    def remove(self, key: str) -> set[str]:
        before = self.problems()
        self._forget(key)
        self.used.discard(key)
        return self._changed(before)

    def use(self, key: str, used: bool = True, settle: bool = True) -> set[str]:
        """This node starts (or, used=False, stops) using policy `key`; returns the keys whose verdict changed."""
        if (key in self.used) == used:
            return set()
        before = self.problems()
        if used:
            self.used.add(key)
            self._count(key)
        else:
            self.used.discard(key)
            self._uncount(key)
        return self._changed(before) if settle else set()

    def _forget(self, key: str) -> None:
        self.own.pop(key, None)
        self._uncount(key)
        self.costs.pop(key, None)

    def _count(self, key: str) -> None:
        cost = self.costs.get(key)
        if cost is None or key not in self.used or key in self._counted:
            return
        self._counted.add(key)
        self._rules += cost.rules
        self._members += cost.members
        self._set_refs.update(cost.sets)

    def _uncount(self, key: str) -> None:
        if key not in self._counted:
            return
        cost = self.costs[key]
        self._counted.discard(key)
        self._rules -= cost.rules
        self._members -= cost.members
        self._set_refs.subtract(cost.sets)
        for name in cost.sets:
            if self._set_refs[name] <= 0:
                del self._set_refs[name]

    def _changed(self, before: dict[str, str]) -> set[str]:
        self.settle()
        after = self.problems()
        return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}

    def settle(self) -> None:
        """Admit the used policies within their own budget in namespace/name order while the node's totals
        allow."""
        b = self.budget
        self.node = {}
        if self._rules <= b.node_rules and self._members <= b.node_members and len(self._set_refs) <= b.node_sets:
            return
        rules = members = 0
        sets: set[str] = set()
        for key in sorted(self._counted, key=lambda k: tuple(k.split("/", 1))):
            cost = self.costs[key]
            fresh = len(cost.sets - sets)
            if rules + cost.rules > b.node_rules or members + cost.members > b.node_members \
                    or len(sets) + fresh > b.node_sets:
                self.node[key] = (f"over the node's budget ({b.node_rules} rules, {b.node_sets} ipsets, "
                                  f"{b.node_members} set entries for the policies of this node's pods, admitted "
                                  f"in namespace/name order): it would cost {cost.text()}")
                continue
            rules += cost.rules
            members += cost.members
            sets |= cost.sets


def used_policies(policies: Iterable[Policy], endpoint_pods: Iterable[Pod | None]) -> set[str]:
    """The policies that select the pod of a local endpoint in some direction (what the node programs)."""
    by_ns: dict[str, list[Policy]] = {}
    for policy in policies:
        by_ns.setdefault(policy.namespace, []).append(policy)
    return {p.key for pod in endpoint_pods if pod is not None for p in by_ns.get(pod.namespace, ())
            if any(policy_selects(p, pod, d) for d in DIRECTIONS)}


def host_set(node_ips: Iterable[str]) -> IpSetSpec:
    """The node's own addresses, both families (host -> local pod traffic stays allowed)."""
    return IpSetSpec(names.IPSET_HOST, "hash:ip", frozenset(_valid_ips(node_ips)), "node addresses")


def policy_selects(policy: Policy, pod: Pod, direction: str) -> bool:
    if pod.host_network or direction not in policy.types or pod.namespace != policy.namespace:
        return False
    return policy.whole_namespace or policy.pod_selector.matches(pod.labels)


def endpoint_plan(ep: Endpoint, pod: Pod | None, policies: Iterable[Policy],
                  plan_chain: Callable[[Policy, str], str]) -> EndpointPlan:
    """`policies`: those that may select the pod (its namespace's), in evaluation order."""
    chains: dict[str, tuple[str, ...] | None] = {}
    candidates = list(policies)
    for direction in DIRECTIONS:
        if pod is None:
            chains[direction] = ()
            continue
        selected = [p for p in candidates if policy_selects(p, pod, direction)]
        chains[direction] = tuple(plan_chain(p, direction) for p in selected) if selected else None
    return EndpointPlan(host_ifname=ep.host_ifname, pod_key=ep.pod_key, ips=tuple(ep.ips),
                        from_chain=names.endpoint_chain(ep.host_ifname, "from"),
                        to_chain=names.endpoint_chain(ep.host_ifname, "to"),
                        ingress=chains[INGRESS], egress=chains[EGRESS], unknown_pod=pod is None)


def unknown_pod_warning(plan: EndpointPlan) -> str:
    return f"endpoint {plan.host_ifname}: pod {plan.pod_key} unknown, failing closed"


def problems_of(policies: Iterable[Policy]) -> list[PolicyProblem]:
    """`policies`: as enforced (a policy over budget is invalid)."""
    return [PolicyProblem(p.key, p.problems, tuple(d for d in DIRECTIONS if d in p.types))
            for p in policies if not p.valid]


class Calculator:
    """Index of one PolicyInputs snapshot; memoises ipsets and policy plans."""

    def __init__(self, inputs: PolicyInputs) -> None:
        self.inputs = inputs
        self.ns_labels: dict[str, dict[str, str]] = {ns.name: namespace_labels_of(ns) for ns in inputs.namespaces}
        local_ips = local_pod_ips(inputs.endpoints)
        self.pods: dict[str, Pod] = {}
        for pod in inputs.pods:
            if not pod.ips and local_ips.get(pod.key):
                pod = Pod(pod.namespace, pod.name, pod.labels, pod.node_name, local_ips[pod.key], pod.ports,
                          pod.host_network)
            self.pods[pod.key] = pod
        self.pods_by_ns: dict[str, list[Pod]] = {}
        for pod in self.pods.values():
            if not pod.host_network and pod.ips:
                self.pods_by_ns.setdefault(pod.namespace, []).append(pod)
        # label index: pods carrying key=value (narrows selector scans to candidates)
        self.by_label: dict[tuple[str, str], list[Pod]] = {}
        for pods_of_ns in self.pods_by_ns.values():
            for pod in pods_of_ns:
                for item in pod.labels.items():
                    self.by_label.setdefault(item, []).append(pod)
        self.pod_by_ip: dict[str, Pod] = {}
        for pod in self.pods.values():
            if not pod.host_network:
                for ip in pod.ips:
                    self.pod_by_ip.setdefault(ip, pod)
        parsed = [parse_policy(p) for p in inputs.policies]
        ledger = BudgetLedger(inputs.budget)
        for policy in parsed:
            ledger.take(policy, settle=False)
        for key in used_policies(parsed, (self.pods.get(ep.pod_key) for ep in inputs.endpoints)):
            ledger.use(key, settle=False)
        ledger.settle()
        problems = ledger.problems()
        self.policies: list[Policy] = sorted(
            (over_budget(p, problems[p.key]) if p.key in problems else p for p in parsed),
            key=lambda p: (p.namespace, p.name))
        self.sets: dict[str, IpSetSpec] = {}
        self._plans: dict[tuple[str, str], PolicyPlan] = {}

    # -- selection ----------------------------------------------------------------------------------
    def namespace_labels(self, name: str) -> dict[str, str]:
        return self.ns_labels.get(name) or default_namespace_labels(name)

    def selecting(self, pod: Pod, direction: str) -> list[Policy]:
        return [p for p in self.policies if policy_selects(p, pod, direction)]

    def _candidates(self, d: SetDef) -> Iterable[Pod]:
        """The pods that may be members of `d` (narrowed by namespace and an `In` requirement)."""
        if d.named_port is not None:
            return self.pods.values()
        if d.namespace is not None:
            namespaces = {d.namespace}
        else:
            sel = d.namespace_selector
            namespaces = {ns for ns in self.pods_by_ns if sel is not None and sel.matches(self.namespace_labels(ns))}
        first_in = next((r for r in d.pod_selector.requirements if r.operator == "In"), None) if d.pod_selector else None
        if first_in is not None:
            return [pod for v in first_in.values for pod in self.by_label.get((first_in.key, v), ())
                    if pod.namespace in namespaces]
        return [pod for ns in sorted(namespaces) for pod in self.pods_by_ns.get(ns, ())]

    def define(self, d: SetDef) -> str:
        if d.name not in self.sets:
            if d.static:
                members = d.static_members
            else:
                members = frozenset(m for pod in self._candidates(d)
                                    for m in pod_members(d, pod, self.namespace_labels(pod.namespace)))
            self.sets[d.name] = IpSetSpec(d.name, d.kind, members, d.identity)
        return d.name

    def plan(self, policy: Policy, direction: str) -> PolicyPlan:
        cache_key = (policy.key, direction)
        if cache_key not in self._plans:
            self._plans[cache_key] = plan_policy(policy, direction, self.define)
        return self._plans[cache_key]

    def problems(self) -> list[PolicyProblem]:
        return problems_of(self.policies)

    # -- the whole node -------------------------------------------------------------------------------
    def calculate(self) -> Calculation:
        plans: dict[str, PolicyPlan] = {}
        endpoints: list[EndpointPlan] = []

        def plan_chain(policy: Policy, direction: str) -> str:
            plan = self.plan(policy, direction)
            plans[plan.chain] = plan
            return plan.chain

        for ep in sorted(self.inputs.endpoints, key=lambda e: e.host_ifname):
            pod = self.pods.get(ep.pod_key)
            endpoints.append(endpoint_plan(ep, pod, self.policies, plan_chain))
        used = set().union(*(plan_sets(p) for p in plans.values()))
        ipsets = {n: self.sets[n] for n in sorted(used)}
        host = host_set(self.inputs.node_ips)
        ipsets[names.IPSET_HOST] = self.sets[names.IPSET_HOST] = host
        warnings = [unknown_pod_warning(ep) for ep in endpoints if ep.unknown_pod]
        return Calculation(ipsets, dict(sorted(plans.items())), endpoints, self.problems(), names.IPSET_HOST, warnings)


def calculate(inputs: PolicyInputs) -> Calculation:
    return Calculator(inputs).calculate()
