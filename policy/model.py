"""NetworkPolicy (networking.k8s.io/v1) dicts -> typed, validated objects.

`parse_policy` never raises: an invalid policy comes back with `problems` set, no rules, and the
directions it fails closed in, so its pods are denied (not opened) while the other policies keep working.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from policy.selectors import Selector, SelectorError, parse_selector
from routed import validation
from routed.errors import Code, RoutedError

INGRESS = "Ingress"
EGRESS = "Egress"
PROTOCOLS = ("TCP", "UDP", "SCTP")


class PolicyError(RoutedError, ValueError):
    code = Code.POLICY_INVALID


@dataclass(frozen=True)
class IpBlock:
    cidr: str  # normalised network, e.g. "10.0.0.0/8"
    excepts: tuple[str, ...] = ()

    @property
    def version(self) -> int:
        return validation.ip_family(self.cidr)

    def contains(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        if addr.version != self.version or addr not in ipaddress.ip_network(self.cidr):
            return False
        return not any(addr in ipaddress.ip_network(e) for e in self.excepts)

    def canonical(self) -> str:
        return self.cidr + "".join(f"!{e}" for e in self.excepts)


@dataclass(frozen=True)
class Peer:
    """One `from`/`to` item. Selectors: None = field absent. Both set = AND (pods in matching namespaces)."""

    pod_selector: Selector | None = None
    namespace_selector: Selector | None = None
    ip_block: IpBlock | None = None


@dataclass(frozen=True)
class PortSpec:
    protocol: str = "TCP"
    port: int | None = None  # None: every port of the protocol
    end_port: int | None = None
    name: str | None = None  # named port (resolved per destination pod)


@dataclass(frozen=True)
class Rule:
    peers: tuple[Peer, ...] | None = None  # None: every peer (field empty or missing)
    ports: tuple[PortSpec, ...] | None = None  # None: every port


@dataclass(frozen=True)
class Policy:
    namespace: str
    name: str
    pod_selector: Selector
    types: frozenset[str]
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    problems: tuple[str, ...] = ()
    whole_namespace: bool = False  # invalid podSelector: fail closed for every pod of the namespace
    uid: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def valid(self) -> bool:
        return not self.problems

    def rules(self, direction: str) -> tuple[Rule, ...]:
        return self.ingress if direction == INGRESS else self.egress


def _invalid_cidr(exc: validation.InvalidValue, text: object) -> str:
    """'<field>: invalid CIDR <text escaped>', with the reason when it says more than that."""
    head = f"{exc.what}: invalid CIDR {validation.shown(text)}"
    return head if exc.reason.endswith("is not an IP CIDR") else f"{head} ({exc.reason})"


def _parse_ip_block(obj: Any, where: str) -> IpBlock:
    if not isinstance(obj, Mapping):
        raise PolicyError(f"{where}: must be a mapping")
    cidr_text = obj.get("cidr")
    if not cidr_text:
        raise PolicyError(f"{where}.cidr: required")
    # IPv4-mapped CIDRs stay allowed: a valid (if odd) IPv6 block, matched as such by ip6tables.
    try:
        cidr = validation.network(cidr_text, f"{where}.cidr", allow_ipv4_mapped=True)
    except validation.InvalidValue as exc:
        raise PolicyError(_invalid_cidr(exc, cidr_text)) from None
    raw_excepts = obj.get("except") or []
    if not isinstance(raw_excepts, list):
        raise PolicyError(f"{where}.except: must be a list")
    excepts: list[str] = []
    for i, e in enumerate(raw_excepts):
        try:
            net = validation.network(e, f"{where}.except[{i}]", allow_ipv4_mapped=True)
        except validation.InvalidValue as exc:
            raise PolicyError(_invalid_cidr(exc, e)) from None
        if net.version != cidr.version or not net.subnet_of(cidr):  # type: ignore[arg-type]
            raise PolicyError(f"{where}.except[{i}]: {net} is not inside cidr {cidr}")
        excepts.append(str(net))
    return IpBlock(str(cidr), tuple(sorted(set(excepts))))


def _parse_peer(obj: Any, where: str) -> Peer:
    if not isinstance(obj, Mapping):
        raise PolicyError(f"{where}: must be a mapping")
    unknown = set(obj) - {"podSelector", "namespaceSelector", "ipBlock"}
    if unknown:
        raise PolicyError(f"{where}: unknown field(s) {sorted(unknown)}")
    has_sel = obj.get("podSelector") is not None or obj.get("namespaceSelector") is not None
    if obj.get("ipBlock") is not None:
        if has_sel:
            raise PolicyError(f"{where}: ipBlock cannot be combined with podSelector/namespaceSelector")
        return Peer(ip_block=_parse_ip_block(obj["ipBlock"], f"{where}.ipBlock"))
    if not has_sel:
        raise PolicyError(f"{where}: must set podSelector, namespaceSelector or ipBlock")
    try:
        pod = parse_selector(obj["podSelector"], f"{where}.podSelector") if obj.get("podSelector") is not None else None
        ns = (
            parse_selector(obj["namespaceSelector"], f"{where}.namespaceSelector")
            if obj.get("namespaceSelector") is not None
            else None
        )
    except SelectorError as exc:
        raise PolicyError(str(exc)) from exc
    return Peer(pod_selector=pod, namespace_selector=ns)


def _parse_port(obj: Any, where: str) -> PortSpec:
    if not isinstance(obj, Mapping):
        raise PolicyError(f"{where}: must be a mapping")
    proto = obj.get("protocol") or "TCP"
    if proto not in PROTOCOLS:
        raise PolicyError(f"{where}.protocol: unknown protocol {proto!r} (want TCP, UDP or SCTP)")
    port = obj.get("port")
    end = obj.get("endPort")
    if port is None:
        if end is not None:
            raise PolicyError(f"{where}.endPort: needs a numeric port")
        return PortSpec(protocol=proto)
    if isinstance(port, str) and not port.isdigit():
        if end is not None:
            raise PolicyError(f"{where}.endPort: not allowed with named port {port!r}")
        if not (1 <= len(port) <= 15) or not port.replace("-", "").isalnum() or not port.islower():
            raise PolicyError(f"{where}.port: invalid port name {port!r}")
        return PortSpec(protocol=proto, name=port)
    if isinstance(port, bool) or not isinstance(port, int | str):
        raise PolicyError(f"{where}.port: must be a number or a name, got {port!r}")
    num = int(port)
    if not 1 <= num <= 65535:
        raise PolicyError(f"{where}.port: {num} out of range 1-65535")
    if end is not None:
        if isinstance(end, bool) or not isinstance(end, int):
            raise PolicyError(f"{where}.endPort: must be a number, got {end!r}")
        if not 1 <= end <= 65535:
            raise PolicyError(f"{where}.endPort: {end} out of range 1-65535")
        if end < num:
            raise PolicyError(f"{where}.endPort: {end} is below port {num}")
        if end == num:
            end = None
    return PortSpec(protocol=proto, port=num, end_port=end)


def _parse_rules(items: Any, direction: str) -> tuple[Rule, ...]:
    peer_field = "from" if direction == INGRESS else "to"
    where0 = direction.lower()
    if items is None:
        return ()
    if not isinstance(items, list):
        raise PolicyError(f"spec.{where0}: must be a list")
    rules: list[Rule] = []
    for i, item in enumerate(items):
        where = f"spec.{where0}[{i}]"
        if item is None:
            item = {}
        if not isinstance(item, Mapping):
            raise PolicyError(f"{where}: must be a mapping")
        unknown = set(item) - {peer_field, "ports"}
        if unknown:
            raise PolicyError(f"{where}: unknown field(s) {sorted(unknown)}")
        raw_peers = item.get(peer_field)
        raw_ports = item.get("ports")
        if raw_peers is not None and not isinstance(raw_peers, list):
            raise PolicyError(f"{where}.{peer_field}: must be a list")
        if raw_ports is not None and not isinstance(raw_ports, list):
            raise PolicyError(f"{where}.ports: must be a list")
        peers = (
            tuple(_parse_peer(p, f"{where}.{peer_field}[{j}]") for j, p in enumerate(raw_peers))
            if raw_peers
            else None
        )
        ports = tuple(_parse_port(p, f"{where}.ports[{j}]") for j, p in enumerate(raw_ports)) if raw_ports else None
        rules.append(Rule(peers=peers, ports=ports))
    return tuple(rules)


def inferred_types(spec: Mapping[str, Any]) -> frozenset[str] | None:
    """policyTypes as the API server defaults them; None if the field is present but malformed."""
    types = spec.get("policyTypes")
    if types:
        if not isinstance(types, list) or any(t not in (INGRESS, EGRESS) for t in types):
            return None
        return frozenset(types)
    result = {INGRESS}
    if spec.get("egress"):  # len(egress) != 0, exactly like the API server's defaulting
        result.add(EGRESS)
    return frozenset(result)


def parse_policy(obj: Any) -> Policy:
    """Never raises: an invalid policy has `problems`, no rules, and fails closed in its directions."""
    meta = (obj.get("metadata") if isinstance(obj, Mapping) else None) or {}
    namespace = str(meta.get("namespace") or "default")
    name = str(meta.get("name") or "")
    uid = str(meta.get("uid") or "")
    spec_any = obj.get("spec") if isinstance(obj, Mapping) else None
    spec: Mapping[str, Any] = spec_any if isinstance(spec_any, Mapping) else {}
    types = inferred_types(spec)
    problems: list[str] = []
    if not isinstance(obj, Mapping):
        problems.append("not a mapping")
    elif not isinstance(spec_any, Mapping):
        problems.append("spec: missing or not a mapping")
    if not name:
        problems.append("metadata.name: missing")
    if types is None:
        problems.append(f"spec.policyTypes: invalid {spec.get('policyTypes')!r} (want Ingress and/or Egress)")
        types = frozenset({INGRESS, EGRESS})
    pod_selector = Selector()
    whole_namespace = False
    try:
        pod_selector = parse_selector(spec.get("podSelector"), "spec.podSelector")
    except SelectorError as exc:
        problems.append(str(exc))
        whole_namespace = True
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    try:
        ingress = _parse_rules(spec.get("ingress"), INGRESS)
    except PolicyError as exc:
        problems.append(str(exc))
    try:
        egress = _parse_rules(spec.get("egress"), EGRESS)
    except PolicyError as exc:
        problems.append(str(exc))
    if problems:
        return Policy(namespace, name, pod_selector, types, (), (), tuple(problems), whole_namespace, uid)
    return Policy(namespace, name, pod_selector, types, ingress, egress, (), False, uid)
