"""BGPConfiguration / BGPPeer (routed.dev/v1alpha1): validation and resolution for one node.

Pure: no I/O. `resolve()` turns the cluster's objects into the node's `SpeakerConfig`; an invalid object is
reported by kind/name in `errors` and skipped, never taking the valid ones down with it.

    apiVersion: routed.dev/v1alpha1
    kind: BGPConfiguration
    metadata: {name: default}          # "default" applies to all nodes; "node.<name>" overrides per node
    spec:
      asNumber: 64512                  # default ASN of every node
      nodeASNumbers: {node-a: 65001}   # ASN per node
      asNumberLabel: routed.dev/asn    # or: a node label carrying the ASN (e.g. set per rack)
      rackLabel: topology.routed.dev/rack
      rackASNumbers: {r1: 65101}       # or: ASN per rack, rack taken from the node label above
      routerID: 10.0.0.1               # default: the node's first InternalIP (per-node objects only)
      holdTime: 9                      # seconds; keepaliveTime defaults to holdTime / 3
      keepaliveTime: 3
      gracefulRestartTime: 120         # 0 disables graceful restart
      communities: ["65000:100"]
      acceptDefaultRoute: false
      nodeToNodeMesh: false
      serviceClusterIPs: [{cidr: 10.96.0.0/12}]        # Service VIPs (routed/bgp/services.py): every node
      serviceExternalIPs: [{cidr: 192.0.2.0/24}]       # announces these CIDRs, and /32s of Services inside
      serviceLoadBalancerIPs: [{cidr: 198.51.100.0/24}]   # them (Local traffic policy: nodes with endpoints)
      serviceCommunities: {loadBalancerIP: ["65000:300"]}

    kind: BGPPeer
    spec:
      peerIP: 10.0.1.1
      asNumber: 65000
      node: node-a                     # or nodeSelector: {matchLabels: {...}, matchExpressions: [...]}
      password: {secretKeyRef: {name: bgp-secrets, key: tor, namespace: routed-system}}
      ebgpMultihop: 2                  # TTL of outgoing packets (multihop eBGP)
      ttlSecurity: 1                   # GTSM: peer is at most this many hops away (exclusive with multihop)
      maxPrefixes: 1000
      bfd: {enabled: true, minRxMs: 300, minTxMs: 300, multiplier: 3}   # RFC 5880/5881 single hop; the
                                       # block's presence enables it, `enabled: false` keeps it off
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from routed.bgp.services import ServicePolicy
from routed.errors import Code, RoutedError
from routed.model import Node

API_GROUP = "routed.dev/v1alpha1"
DEFAULT_ASN = 64512
DEFAULT_HOLD = 9
DEFAULT_GR_TIME = 120
_COMMUNITY = re.compile(r"^(\d+):(\d+)$")
_LARGE_COMMUNITY = re.compile(r"^(\d+):(\d+):(\d+)$")
_ASN_MAX = 4294967295


class BgpConfigError(RoutedError, ValueError):
    code = Code.BGP_CONFIG_INVALID


def _check_asn(v: int) -> int:
    if not 1 <= v <= _ASN_MAX:
        raise ValueError(f"AS number {v} out of range 1..{_ASN_MAX}")
    return v


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ServiceCidr(_Spec):
    cidr: str

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        return str(ipaddress.ip_network(v, strict=False))


class ServiceCommunities(_Spec):
    """Communities per advertisement type, added to the `communities` of the pod CIDR."""

    clusterIP: list[str] = Field(default_factory=list)
    externalIP: list[str] = Field(default_factory=list)
    loadBalancerIP: list[str] = Field(default_factory=list)

    @field_validator("clusterIP", "externalIP", "loadBalancerIP")
    @classmethod
    def _valid(cls, v: list[str]) -> list[str]:
        return _check_communities(v) or []


def _check_communities(v: list[str] | None) -> list[str] | None:
    for c in v or []:
        m = _COMMUNITY.match(c)
        if m and all(int(x) <= 65535 for x in m.groups()):
            continue
        m = _LARGE_COMMUNITY.match(c)
        if m and all(int(x) <= _ASN_MAX for x in m.groups()):
            continue
        raise ValueError(f"community {c!r} is neither 'asn:value' (16-bit each) nor 'a:b:c' (large)")
    return v


class BGPConfigurationSpec(_Spec):
    asNumber: int | None = None
    nodeASNumbers: dict[str, int] = Field(default_factory=dict)
    asNumberLabel: str = ""
    rackLabel: str = ""
    rackASNumbers: dict[str, int] = Field(default_factory=dict)
    routerID: str = ""
    holdTime: int | None = Field(None, ge=3, le=65535)
    keepaliveTime: int | None = Field(None, ge=1, le=21845)
    gracefulRestartTime: int | None = Field(None, ge=0, le=4095)
    communities: list[str] | None = None
    acceptDefaultRoute: bool | None = None
    nodeToNodeMesh: bool | None = None
    serviceClusterIPs: list[ServiceCidr] | None = None
    serviceExternalIPs: list[ServiceCidr] | None = None
    serviceLoadBalancerIPs: list[ServiceCidr] | None = None
    serviceCommunities: ServiceCommunities | None = None

    @field_validator("asNumber")
    @classmethod
    def _asn(cls, v: int | None) -> int | None:
        return None if v is None else _check_asn(v)

    @field_validator("nodeASNumbers", "rackASNumbers")
    @classmethod
    def _asns(cls, v: dict[str, int]) -> dict[str, int]:
        for key, asn in v.items():
            try:
                _check_asn(asn)
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        return v

    @field_validator("routerID")
    @classmethod
    def _rid(cls, v: str) -> str:
        if v:
            ipaddress.IPv4Address(v)
        return v

    @field_validator("communities")
    @classmethod
    def _communities(cls, v: list[str] | None) -> list[str] | None:
        return _check_communities(v)

    @model_validator(mode="after")
    def _timers(self) -> BGPConfigurationSpec:
        if self.holdTime is not None and self.keepaliveTime is not None and self.keepaliveTime * 3 > self.holdTime:
            raise ValueError(f"keepaliveTime {self.keepaliveTime} must be at most holdTime/3 ({self.holdTime})")
        if self.rackASNumbers and not self.rackLabel:
            raise ValueError("rackASNumbers needs rackLabel")
        return self


class SecretKeyRef(_Spec):
    name: str = Field(min_length=1)
    key: str = Field(min_length=1)
    namespace: str = ""


class PasswordSource(_Spec):
    secretKeyRef: SecretKeyRef


class LabelSelectorRequirement(_Spec):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)


class LabelSelector(_Spec):
    matchLabels: dict[str, str] = Field(default_factory=dict)
    matchExpressions: list[LabelSelectorRequirement] = Field(default_factory=list)

    def matches(self, labels: dict[str, str]) -> bool:
        for k, v in self.matchLabels.items():
            if labels.get(k) != v:
                return False
        for req in self.matchExpressions:
            present = req.key in labels
            if req.operator == "In" and (not present or labels[req.key] not in req.values):
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
        return True


class BfdSpec(_Spec):
    enabled: bool = True
    minRxMs: int = Field(300, ge=10, le=60_000)  # below 10 ms an asyncio agent cannot keep its promises
    minTxMs: int = Field(300, ge=10, le=60_000)
    multiplier: int = Field(3, ge=1, le=255)


class BGPPeerSpec(_Spec):
    peerIP: str
    asNumber: int
    node: str = ""
    nodeSelector: LabelSelector | None = None
    password: PasswordSource | None = None
    ebgpMultihop: int | None = Field(None, ge=1, le=255)
    ttlSecurity: int | None = Field(None, ge=1, le=254)
    maxPrefixes: int | None = Field(None, ge=1)
    bfd: BfdSpec | None = None

    @field_validator("peerIP")
    @classmethod
    def _ip(cls, v: str) -> str:
        return str(ipaddress.ip_address(v))

    @field_validator("asNumber")
    @classmethod
    def _asn(cls, v: int) -> int:
        return _check_asn(v)

    @model_validator(mode="after")
    def _exclusive(self) -> BGPPeerSpec:
        if self.node and self.nodeSelector is not None:
            raise ValueError("set either node or nodeSelector, not both")
        if self.ebgpMultihop is not None and self.ttlSecurity is not None:
            raise ValueError("ebgpMultihop and ttlSecurity are mutually exclusive")
        return self

    def selects(self, node: Node) -> bool:
        if self.node:
            return self.node == node.name
        if self.nodeSelector is not None:
            return self.nodeSelector.matches(node.labels)
        return True


def _format_error(kind: str, name: str, err: Exception) -> str:
    if isinstance(err, ValidationError):
        parts = []
        for e in err.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()))
            parts.append(f"spec.{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return f"{kind} {name}: " + "; ".join(parts)
    return f"{kind} {name}: {err}"


def parse_configuration(obj: dict[str, Any]) -> tuple[str, BGPConfigurationSpec]:
    name = str((obj.get("metadata") or {}).get("name") or "")
    try:
        if obj.get("kind") not in (None, "BGPConfiguration"):
            raise BgpConfigError(f"kind is {obj.get('kind')!r}, expected BGPConfiguration")
        if not name:
            raise BgpConfigError("metadata.name is missing")
        return name, BGPConfigurationSpec.model_validate(obj.get("spec") or {})
    except (ValidationError, ValueError) as e:
        raise BgpConfigError(_format_error("BGPConfiguration", name or "<unnamed>", e)) from None


def parse_peer(obj: dict[str, Any]) -> tuple[str, BGPPeerSpec]:
    name = str((obj.get("metadata") or {}).get("name") or "")
    try:
        if obj.get("kind") not in (None, "BGPPeer"):
            raise BgpConfigError(f"kind is {obj.get('kind')!r}, expected BGPPeer")
        if not name:
            raise BgpConfigError("metadata.name is missing")
        return name, BGPPeerSpec.model_validate(obj.get("spec") or {})
    except (ValidationError, ValueError) as e:
        raise BgpConfigError(_format_error("BGPPeer", name or "<unnamed>", e)) from None


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BfdTimers:
    min_rx_ms: int = 300
    min_tx_ms: int = 300
    multiplier: int = 3


@dataclass(frozen=True)
class PeerConfig:
    """One BGP neighbour of this node, fully resolved."""

    address: str
    asn: int
    name: str  # BGPPeer name, or "mesh:<node>"
    password: str | None = None
    multihop: int | None = None
    ttl_security: int | None = None
    max_prefixes: int | None = None
    passive: bool = False  # wait for the peer to connect (node-to-node mesh: the higher address)
    bfd: BfdTimers | None = None  # BFD on for this peer (routed/bgp/bfd_net.py), not part of ExaBGP's config

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.address).version


@dataclass(frozen=True)
class SpeakerConfig:
    node_name: str
    asn: int
    router_id: str
    hold_time: int = DEFAULT_HOLD
    keepalive: int = DEFAULT_HOLD // 3
    graceful_restart_time: int = DEFAULT_GR_TIME
    communities: tuple[str, ...] = ()
    accept_default: bool = False
    pod_cidrs: tuple[str, ...] = ()
    local_addresses: tuple[str, ...] = ()
    peers: tuple[PeerConfig, ...] = ()
    listen: bool = False  # needed when a peer is passive on our side
    services: ServicePolicy = field(default_factory=ServicePolicy)  # Service VIP advertisement (over the API)

    def peer(self, address: str) -> PeerConfig | None:
        for p in self.peers:
            if p.address == address:
                return p
        return None

    def session_key(self) -> tuple[Any, ...]:
        """What ExaBGP's config depends on (pod CIDRs and communities are announced over the API)."""
        return (self.asn, self.router_id, self.hold_time, self.keepalive, self.graceful_restart_time,
                tuple(replace(p, bfd=None) for p in self.peers), self.listen, self.local_addresses)


@dataclass
class Resolution:
    config: SpeakerConfig | None
    errors: list[str] = field(default_factory=list)


def _secret_value(ref: SecretKeyRef, secrets: dict[str, dict[str, Any]]) -> str:
    candidates: list[tuple[str, dict[str, Any]]] = []
    for key, obj in secrets.items():
        ns, _, name = key.rpartition("/")
        if name == ref.name and (not ref.namespace or ns == ref.namespace):
            candidates.append((key, obj))
    if not candidates:
        where = f"{ref.namespace}/{ref.name}" if ref.namespace else ref.name
        raise BgpConfigError(f"secret {where} not found")
    if len(candidates) > 1:
        raise BgpConfigError(f"secret {ref.name} exists in several namespaces; set secretKeyRef.namespace")
    key, obj = candidates[0]
    string_data = obj.get("stringData") or {}
    if ref.key in string_data:
        return str(string_data[ref.key])
    data = obj.get("data") or {}
    if ref.key not in data:
        raise BgpConfigError(f"secret {key} has no key {ref.key!r}")
    try:
        return base64.b64decode(str(data[ref.key]), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as e:
        raise BgpConfigError(f"secret {key} key {ref.key!r} is not valid base64 text: {e}") from None


def _node_asn(spec: BGPConfigurationSpec, node: Node) -> int:
    if node.name in spec.nodeASNumbers:
        return spec.nodeASNumbers[node.name]
    if spec.asNumberLabel and spec.asNumberLabel in node.labels:
        raw = node.labels[spec.asNumberLabel]
        try:
            return _check_asn(int(raw))
        except ValueError:
            raise BgpConfigError(f"node {node.name}: label {spec.asNumberLabel}={raw!r} is not an AS number") from None
    if spec.rackLabel and node.labels.get(spec.rackLabel) in spec.rackASNumbers:
        return spec.rackASNumbers[node.labels[spec.rackLabel]]
    return spec.asNumber or DEFAULT_ASN


def _service_policy(spec: BGPConfigurationSpec) -> ServicePolicy:
    comms = spec.serviceCommunities or ServiceCommunities()
    return ServicePolicy(
        cluster_ip_cidrs=tuple(c.cidr for c in spec.serviceClusterIPs or []),
        external_ip_cidrs=tuple(c.cidr for c in spec.serviceExternalIPs or []),
        load_balancer_ip_cidrs=tuple(c.cidr for c in spec.serviceLoadBalancerIPs or []),
        communities={kind: tuple(v) for kind, v in (("clusterIP", comms.clusterIP), ("externalIP", comms.externalIP),
                                                     ("loadBalancerIP", comms.loadBalancerIP)) if v},
    )


def _merged_spec(configs: list[dict[str, Any]], node_name: str, errors: list[str]) -> BGPConfigurationSpec:
    by_name: dict[str, BGPConfigurationSpec] = {}
    for obj in configs:
        try:
            name, spec = parse_configuration(obj)
        except BgpConfigError as e:
            errors.append(str(e))
            continue
        by_name[name] = spec
    base = by_name.get("default")
    if base is None:
        others = [n for n in by_name if not n.startswith("node.")]
        if len(others) == 1:
            base = by_name[others[0]]
        elif others:
            errors.append(f"BGPConfiguration: several global objects {sorted(others)} and none named 'default'; "
                          "using built-in defaults")
    merged = (base or BGPConfigurationSpec()).model_dump()
    override = by_name.get(f"node.{node_name}")
    if override is not None:
        for key, value in override.model_dump(exclude_unset=True).items():
            merged[key] = value
    return BGPConfigurationSpec.model_validate(merged)


def resolve(
    node: Node,
    nodes: list[Node],
    peers: list[dict[str, Any]],
    configs: list[dict[str, Any]],
    secrets: dict[str, dict[str, Any]],
) -> Resolution:
    errors: list[str] = []
    try:
        spec = _merged_spec(configs, node.name, errors)
    except (ValidationError, ValueError) as e:
        errors.append(_format_error("BGPConfiguration", f"node.{node.name}", e))
        spec = BGPConfigurationSpec()
    try:
        asn = _node_asn(spec, node)
    except BgpConfigError as e:
        errors.append(str(e))
        asn = spec.asNumber or DEFAULT_ASN
    v4 = [a for a in node.addresses if ipaddress.ip_address(a).version == 4]
    router_id = spec.routerID or (v4[0] if v4 else "")
    if not router_id:
        errors.append(f"node {node.name}: no router id (no IPv4 InternalIP and no routerID); BGP disabled")
        return Resolution(None, errors)
    hold = spec.holdTime or DEFAULT_HOLD
    keepalive = spec.keepaliveTime or max(1, hold // 3)
    if keepalive * 3 > hold:
        keepalive = max(1, hold // 3)
    own = set(node.addresses)
    result: dict[str, PeerConfig] = {}
    for obj in peers:
        name = str((obj.get("metadata") or {}).get("name") or "<unnamed>")
        try:
            name, p = parse_peer(obj)
            if not p.selects(node):
                continue
            if p.peerIP in own:
                continue
            password = _secret_value(p.password.secretKeyRef, secrets) if p.password else None
            if p.peerIP in result:
                raise BgpConfigError(f"peerIP {p.peerIP} already defined by {result[p.peerIP].name}")
        except BgpConfigError as e:
            msg = str(e)
            errors.append(msg if msg.startswith("BGPPeer") else f"BGPPeer {name}: {msg}")
            continue
        result[p.peerIP] = PeerConfig(
            address=p.peerIP, asn=p.asNumber, name=name, password=password, multihop=p.ebgpMultihop,
            ttl_security=p.ttlSecurity, max_prefixes=p.maxPrefixes,
            bfd=BfdTimers(p.bfd.minRxMs, p.bfd.minTxMs, p.bfd.multiplier) if p.bfd and p.bfd.enabled else None,
        )
    listen = False
    if spec.nodeToNodeMesh:
        my_addr = node.addresses[0] if node.addresses else ""
        for other in nodes:
            if other.name == node.name or not other.addresses:
                continue
            addr = other.addresses[0]
            if addr in result or addr in own:
                continue
            try:
                other_asn = _node_asn(spec, other)
            except BgpConfigError as e:
                errors.append(str(e))
                continue
            fam_same = ipaddress.ip_address(addr).version == ipaddress.ip_address(my_addr).version if my_addr else False
            if not fam_same:
                continue
            # the lower address connects, the higher one listens: no connection collisions
            passive = int(ipaddress.ip_address(addr)) < int(ipaddress.ip_address(my_addr))  # same family here
            listen = listen or passive
            result[addr] = PeerConfig(address=addr, asn=other_asn, name=f"mesh:{other.name}", passive=passive)
    cfg = SpeakerConfig(
        node_name=node.name,
        asn=asn,
        router_id=router_id,
        hold_time=hold,
        keepalive=keepalive,
        graceful_restart_time=DEFAULT_GR_TIME if spec.gracefulRestartTime is None else spec.gracefulRestartTime,
        communities=tuple(spec.communities or ()),
        accept_default=bool(spec.acceptDefaultRoute),
        pod_cidrs=tuple(str(ipaddress.ip_network(c, strict=False)) for c in node.pod_cidrs),
        local_addresses=tuple(node.addresses),
        peers=tuple(sorted(result.values(), key=lambda p: p.address)),
        listen=listen,
        services=_service_policy(spec),
    )
    return Resolution(cfg, errors)
