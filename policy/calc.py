"""Pure policy calculation: (namespaces, pods, policies, local endpoints) -> desired ipsets and chains.

No I/O. The dataplane renders the result; `policy.explain` evaluates the very same rule objects against
the very same ipset members, so what `explain` says is what the kernel does.
Rules grow with policies and local endpoints; cluster pods only ever become ipset members.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from policy import names
from policy.model import EGRESS, INGRESS, IpBlock, Peer, Policy, PortSpec, Rule, parse_policy
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


@dataclass(frozen=True)
class IpSetSpec:
    name: str
    kind: str  # hash:ip | hash:net | hash:ip,port
    members: frozenset[str]  # hash:net members may end in " nomatch" (ipBlock except)
    description: str = ""

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
    ips: tuple[str, ...]  # IPv4 addresses the workload may send from
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


def _v4(ips: Iterable[str]) -> tuple[str, ...]:
    """The IPv4 addresses (the dataplane is IPv4; IPv6 addresses are skipped). Cheap: runs per pod."""
    return tuple(ip for ip in ips if ip.count(".") == 3 and ":" not in ip)


class Calculator:
    """Index of one PolicyInputs snapshot; memoises ipsets and policy plans."""

    def __init__(self, inputs: PolicyInputs) -> None:
        self.inputs = inputs
        self.ns_labels: dict[str, dict[str, str]] = {}
        for ns in inputs.namespaces:
            labels = dict(ns.labels)
            labels.setdefault("kubernetes.io/metadata.name", ns.name)
            self.ns_labels[ns.name] = labels
        local_ips = {ep.pod_key: _v4(ep.ips) for ep in inputs.endpoints}
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
        return self.ns_labels.get(name, {"kubernetes.io/metadata.name": name})

    def policy_selects(self, policy: Policy, pod: Pod, direction: str) -> bool:
        if pod.host_network or direction not in policy.types or pod.namespace != policy.namespace:
            return False
        return policy.whole_namespace or policy.pod_selector.matches(pod.labels)

    def selecting(self, pod: Pod, direction: str) -> list[Policy]:
        return [p for p in self.policies if self.policy_selects(p, pod, direction)]

    def peer_pods(self, policy_ns: str, peer: Peer) -> list[Pod]:
        if peer.namespace_selector is None:
            namespaces = {policy_ns}
        else:
            sel = peer.namespace_selector
            namespaces = {ns for ns in self.pods_by_ns if sel.matches(self.namespace_labels(ns))}
        pod_sel = peer.pod_selector
        first_in = next((r for r in pod_sel.requirements if r.operator == "In"), None) if pod_sel else None
        if first_in is not None:
            candidates: Iterable[Pod] = [
                pod for v in first_in.values for pod in self.by_label.get((first_in.key, v), ())
                if pod.namespace in namespaces
            ]
        else:
            candidates = [pod for ns in sorted(namespaces) for pod in self.pods_by_ns.get(ns, ())]
        return [pod for pod in candidates if pod_sel is None or pod_sel.matches(pod.labels)]

    # -- ipsets ---------------------------------------------------------------------------------------
    def _add_set(self, spec: IpSetSpec) -> str:
        self.sets.setdefault(spec.name, spec)
        return spec.name

    def peer_set(self, policy_ns: str, peer: Peer) -> str | None:
        if peer.ip_block is not None:
            return self.ip_block_set(peer.ip_block)
        ns_part = peer.namespace_selector.canonical() if peer.namespace_selector is not None else f"ns={policy_ns}"
        pod_part = peer.pod_selector.canonical() if peer.pod_selector is not None else "all()"
        identity = f"sel|{ns_part}|{pod_part}"
        name = names.ipset_name("s", identity)
        if name not in self.sets:
            members = frozenset(ip for pod in self.peer_pods(policy_ns, peer) for ip in _v4(pod.ips))
            self._add_set(IpSetSpec(name, "hash:ip", members, identity))
        return name

    def ip_block_set(self, block: IpBlock) -> str | None:
        if block.version != 4:
            return None  # the IPv4 dataplane: an IPv6 block matches nothing here
        identity = f"net|{block.canonical()}"
        name = names.ipset_name("n", identity)
        if name not in self.sets:
            members: set[str] = set()
            if block.cidr not in block.excepts:
                net = ipaddress.ip_network(block.cidr)
                # hash:net cannot hold /0: split it into two /1 halves.
                parts = list(net.subnets(1)) if net.prefixlen == 0 else [net]
                members.update(str(p) for p in parts)
                members.update(f"{e} nomatch" for e in block.excepts if ipaddress.ip_network(e).prefixlen > 0)
            self._add_set(IpSetSpec(name, "hash:net", frozenset(members), identity))
        return name

    def named_port_set(self, protocol: str, port_name: str) -> str:
        identity = f"port|{protocol}|{port_name}"
        name = names.ipset_name("p", identity)
        if name not in self.sets:
            members: set[str] = set()
            for pod in self.pods.values():
                if pod.host_network:
                    continue
                for cp in pod.ports:
                    if cp.name == port_name and cp.protocol == protocol:
                        members.update(f"{ip},{protocol.lower()}:{cp.port}" for ip in _v4(pod.ips))
            self._add_set(IpSetSpec(name, "hash:ip,port", frozenset(members), identity))
        return name

    # -- policies -------------------------------------------------------------------------------------
    def _port_matches(self, port: PortSpec) -> dict[str, Any]:
        if port.name is not None:
            return {"protocol": port.protocol, "named_port_set": self.named_port_set(port.protocol, port.name)}
        return {"protocol": port.protocol, "port": port.port, "end_port": port.end_port}

    def _rule_matches(self, policy: Policy, index: int, rule: Rule) -> list[RuleMatch]:
        peer_opts: list[dict[str, Any]] = [{}]
        if rule.peers is not None:
            peer_opts = []
            for peer in rule.peers:
                name = self.peer_set(policy.namespace, peer)
                if name is not None:
                    peer_opts.append({"peer_set": name})
        port_opts: list[dict[str, Any]] = [{}]
        if rule.ports is not None:
            port_opts = [self._port_matches(p) for p in rule.ports]
        return [RuleMatch(rule_index=index, **peer, **port) for peer in peer_opts for port in port_opts]

    def plan(self, policy: Policy, direction: str) -> PolicyPlan:
        cache_key = (policy.key, direction)
        if cache_key not in self._plans:
            matches: list[RuleMatch] = []
            for i, rule in enumerate(policy.rules(direction)):
                matches.extend(self._rule_matches(policy, i, rule))
            chain = names.policy_chain(policy.key, direction)
            self._plans[cache_key] = PolicyPlan(policy.key, direction, chain, tuple(dict.fromkeys(matches)))
        return self._plans[cache_key]

    def problems(self) -> list[PolicyProblem]:
        out = []
        for p in self.policies:
            if not p.valid:
                out.append(PolicyProblem(p.key, p.problems, tuple(d for d in DIRECTIONS if d in p.types)))
        return out

    # -- the whole node -------------------------------------------------------------------------------
    def calculate(self) -> Calculation:
        plans: dict[str, PolicyPlan] = {}
        endpoints: list[EndpointPlan] = []
        warnings: list[str] = []
        for ep in sorted(self.inputs.endpoints, key=lambda e: e.host_ifname):
            pod = self.pods.get(ep.pod_key)
            chains: dict[str, tuple[str, ...] | None] = {}
            for direction in DIRECTIONS:
                if pod is None:
                    chains[direction] = ()
                    continue
                selected = self.selecting(pod, direction)
                if not selected:
                    chains[direction] = None
                    continue
                order = []
                for policy in selected:
                    plan = self.plan(policy, direction)
                    plans[plan.chain] = plan
                    order.append(plan.chain)
                chains[direction] = tuple(order)
            if pod is None:
                warnings.append(f"endpoint {ep.host_ifname}: pod {ep.pod_key} unknown, failing closed")
            endpoints.append(
                EndpointPlan(
                    host_ifname=ep.host_ifname,
                    pod_key=ep.pod_key,
                    ips=_v4(ep.ips),
                    from_chain=names.endpoint_chain(ep.host_ifname, "from"),
                    to_chain=names.endpoint_chain(ep.host_ifname, "to"),
                    ingress=chains[INGRESS],
                    egress=chains[EGRESS],
                    unknown_pod=pod is None,
                )
            )
        host = IpSetSpec(names.IPSET_HOST, "hash:ip", frozenset(_v4(self.inputs.node_ips)), "node addresses")
        used: set[str] = {names.IPSET_HOST}
        for plan in plans.values():
            for rm in plan.rules:
                used.update(s for s in (rm.peer_set, rm.named_port_set) if s)
        ipsets = {n: self.sets[n] for n in sorted(used - {names.IPSET_HOST})}
        ipsets[names.IPSET_HOST] = host
        self.sets[names.IPSET_HOST] = host
        return Calculation(ipsets, dict(sorted(plans.items())), endpoints, self.problems(), names.IPSET_HOST, warnings)


def calculate(inputs: PolicyInputs) -> Calculation:
    return Calculator(inputs).calculate()
