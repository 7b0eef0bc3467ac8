"""Pure policy calculation: (namespaces, pods, policies, local endpoints) -> desired ipsets and chains.

No I/O. The dataplane renders the result; `policy.explain` evaluates the very same rule objects against
the very same ipset members, so what `explain` says is what the kernel does.
Rules grow with policies and local endpoints; cluster pods only ever become ipset members.

Family-neutral: a set holds the members of both IP families (pod IPv4 and IPv6 addresses, `ip,proto:port` of
either, ipBlocks of either), an endpoint plan all of the pod's addresses. The dataplane splits each set per
family (`IpSetSpec.for_family`: the family's kernel name, only that family's members), so an IPv4 ipBlock's
IPv6 set is empty and never matches an IPv6 flow, and vice versa.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from policy import names
from policy.model import EGRESS, INGRESS, IpBlock, Peer, Policy, PortSpec, Rule, parse_policy
from policy.selectors import Selector
from routed.api_types import InvalidPolicy
from routed.model import Endpoint, Namespace, Pod

log = logging.getLogger(__name__)

DIRECTIONS = (INGRESS, EGRESS)


@dataclass(frozen=True)
class PolicyInputs:
    namespaces: list[Namespace]
    pods: list[Pod]
    policies: list[dict[str, Any]]  # raw NetworkPolicy dicts
    endpoints: list[Endpoint]  # local endpoints on this node
    node_ips: list[str]  # this node's own addresses (host -> local pod traffic stays allowed)


def ip_family(addr: str) -> int:
    """4 or 6, from an address literal (cheap: runs per member)."""
    return 6 if ":" in addr else 4


def member_family(member: str) -> int:
    """The family of an ipset member: `ip`, `net[ nomatch]` or `ip,proto:port`."""
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
    kind: str  # hash:ip | hash:net | hash:ip,port
    members: frozenset[str]  # hash:net members may end in " nomatch" (ipBlock except)
    description: str = ""
    family: int | None = None  # None: the calculation's set (both families); 4/6: one family's kernel set

    def for_family(self, family: int) -> IpSetSpec:
        """This set as the kernel holds it in `family`: the family's name and only that family's members."""
        members = frozenset(m for m in self.members if member_family(m) == family)
        return IpSetSpec(names.family_ipset_name(self.name, family), self.kind, members, self.description, family)

    def contains(self, ip: str, proto: str = "", port: int = 0) -> bool:
        if self.kind == "hash:ip":
            return ip in self.members
        if self.kind == "hash:ip,port":
            return f"{ip},{proto.lower()}:{port}" in self.members
        return _net_contains(self.members, ip)


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
class RuleMatch:
    """One allow rule of a policy chain (a peer x port combination of one NetworkPolicy rule)."""

    rule_index: int
    protocol: str | None = None  # None: any protocol
    port: int | None = None
    end_port: int | None = None
    peer_set: str | None = None  # ingress: source in set; egress: destination in set
    named_port_set: str | None = None  # destination ip,proto:port in set

    def matches(
        self, direction: str, src: str, dst: str, protocol: str, port: int, sets: dict[str, IpSetSpec]
    ) -> bool:
        if self.protocol is not None and protocol != self.protocol:
            return False
        if self.port is not None and not self.port <= port <= (self.end_port or self.port):
            return False
        if self.peer_set is not None:
            peer_ip = src if direction == INGRESS else dst
            if not sets[self.peer_set].contains(peer_ip):
                return False
        if self.named_port_set is not None and not sets[self.named_port_set].contains(dst, protocol, port):
            return False
        return True


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
    ipBlock sets (hash:net) hold `static_members`.
    """

    name: str
    kind: str
    identity: str
    namespace: str | None = None
    namespace_selector: Selector | None = None
    pod_selector: Selector | None = None
    named_port: tuple[str, str] | None = None  # (protocol, port name)
    static_members: frozenset[str] = frozenset()


def selector_set(policy_ns: str, peer: Peer) -> SetDef:
    ns_part = peer.namespace_selector.canonical() if peer.namespace_selector is not None else f"ns={policy_ns}"
    pod_part = peer.pod_selector.canonical() if peer.pod_selector is not None else "all()"
    identity = f"sel|{ns_part}|{pod_part}"
    return SetDef(names.ipset_name("s", identity), "hash:ip", identity,
                  namespace=policy_ns if peer.namespace_selector is None else None,
                  namespace_selector=peer.namespace_selector, pod_selector=peer.pod_selector)


def ip_block_set(block: IpBlock) -> SetDef:
    """An ipBlock of either family (its set in the other family is empty)."""
    identity = f"net|{block.canonical()}"
    members: set[str] = set()
    if block.cidr not in block.excepts:
        net = ipaddress.ip_network(block.cidr)
        # hash:net cannot hold /0 (0.0.0.0/0 or ::/0): split it into two /1 halves.
        parts = list(net.subnets(1)) if net.prefixlen == 0 else [net]
        members.update(str(p) for p in parts)
        members.update(f"{e} nomatch" for e in block.excepts if ipaddress.ip_network(e).prefixlen > 0)
    return SetDef(names.ipset_name("n", identity), "hash:net", identity, static_members=frozenset(members))


def named_port_set(protocol: str, port_name: str) -> SetDef:
    identity = f"port|{protocol}|{port_name}"
    return SetDef(names.ipset_name("p", identity), "hash:ip,port", identity, named_port=(protocol, port_name))


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


def _port_matches(port: PortSpec, define: Callable[[SetDef], str]) -> dict[str, Any]:
    if port.name is not None:
        return {"protocol": port.protocol, "named_port_set": define(named_port_set(port.protocol, port.name))}
    return {"protocol": port.protocol, "port": port.port, "end_port": port.end_port}


def _rule_matches(policy: Policy, index: int, rule: Rule, define: Callable[[SetDef], str]) -> list[RuleMatch]:
    peer_opts: list[dict[str, Any]] = [{}]
    if rule.peers is not None:
        peer_opts = []
        for peer in rule.peers:
            d = ip_block_set(peer.ip_block) if peer.ip_block is not None else selector_set(policy.namespace, peer)
            peer_opts.append({"peer_set": define(d)})
    port_opts: list[dict[str, Any]] = [{}]
    if rule.ports is not None:
        port_opts = [_port_matches(p, define) for p in rule.ports]
    return [RuleMatch(rule_index=index, **peer, **port) for peer in peer_opts for port in port_opts]


def plan_policy(policy: Policy, direction: str, define: Callable[[SetDef], str]) -> PolicyPlan:
    """The chain of one policy direction; `define` is told every set it references and returns its name."""
    matches: list[RuleMatch] = []
    for i, rule in enumerate(policy.rules(direction)):
        matches.extend(_rule_matches(policy, i, rule, define))
    chain = names.policy_chain(policy.key, direction)
    return PolicyPlan(policy.key, direction, chain, tuple(dict.fromkeys(matches)))


def plan_sets(plan: PolicyPlan) -> set[str]:
    return {s for rm in plan.rules for s in (rm.peer_set, rm.named_port_set) if s}


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
        self.policies: list[Policy] = sorted(
            (parse_policy(p) for p in inputs.policies), key=lambda p: (p.namespace, p.name)
        )
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
            if d.kind == "hash:net":
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
