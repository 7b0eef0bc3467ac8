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
      routerID: 10.0.0.1               # per-node objects only; see "Router id" below
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
      addressFamilies: [IPv4, IPv6]    # unicast families of the session; default: the peerIP's family only
      ipv4NextHop: 10.1.1.2            # next hop announced for IPv4 prefixes (default: see "Next hops")
      ipv6NextHop: fd00:1:1::2         # next hop announced for IPv6 prefixes (global unicast)

Router id: spec.routerID, else the node's first IPv4 InternalIP, else (IPv6-only node) a stable 32-bit id
derived from the node name (SHA-256, mapped into 1.0.0.0-223.255.255.255: never 0.0.0.0, multicast or class E).
Two nodes may hash to the same id; set routerID on per-node objects where that matters (iBGP).

IPv6: two fabric designs, both on the same code paths (every family-dependent step takes the family):
- a separate session per family: a BGPPeer with an IPv6 peerIP; with nodeToNodeMesh, nodes with addresses of
  both families get one mesh session per family (first address of each family; the lower address connects);
- IPv6 unicast over the IPv4 session (or IPv4 over an IPv6 one): `addressFamilies: [IPv4, IPv6]`; both
  families are negotiated and each gets its own End-of-RIB. Changing a session's families re-establishes it
  (capabilities are exchanged in the OPEN); it is still a reload, not a restart, of ExaBGP.

Next hops: every prefix is announced with an explicit next hop of its own family, never ExaBGP's `next-hop
self` (which cannot cross families: it sends 0.0.0.0). Per session and family: spec.ipv4NextHop/ipv6NextHop,
else for the session's own family the node address sharing the longest prefix with the peer (the session's
local address), else the node's first address of that family (not link-local). A family without one is not
announced to that peer and is reported in `errors` by BGPPeer name. A node with one address of the other family
per uplink (two ToRs) needs the override on each BGPPeer: the first address is on the first uplink only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

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
FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}
FAMILIES = {name: version for version, name in FAMILY_NAMES.items()}


class BgpConfigError(RoutedError, ValueError):
    code = Code.BGP_CONFIG_INVALID


def _check_asn(v: int) -> int:
    if not 1 <= v <= _ASN_MAX:
        raise ValueError(f"AS number {v} out of range 1..{_ASN_MAX}")
    return v


def unusable_next_hop(address: str) -> str:
    """Why `address` cannot be announced (or installed) as a BGP next hop; "" when it can."""
    addr = ipaddress.ip_address(address)
    if addr.is_unspecified:
        return "unspecified address"
    if addr.is_multicast:
        return "multicast address"
    if addr.is_loopback:
        return "loopback address"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return "IPv4-mapped IPv6 address"
        if addr.is_link_local:
            return "link-local address"
    return ""


def _of_family(addresses: tuple[str, ...], family: int) -> list[str]:
    return [a for a in addresses if ipaddress.ip_address(a).version == family]


def local_address(addresses: tuple[str, ...], peer: str) -> str:
    """The node address sharing the longest prefix with the peer (its link address on a p2p/ToR subnet)."""
    target = ipaddress.ip_address(peer)
    best, best_len = "", -1
    for a in _of_family(addresses, target.version):
        addr = ipaddress.ip_address(a)
        common = addr.max_prefixlen - (int(addr) ^ int(target)).bit_length()
        if common > best_len:
            best, best_len = a, common
    return best


def first_addresses(addresses: tuple[str, ...]) -> tuple[str, ...]:
    """The first usable address of each family (IPv4 first): what a listening speaker binds to."""
    out = []
    for family in (4, 6):
        usable = [a for a in _of_family(addresses, family) if not unusable_next_hop(a)]
        if usable:
            out.append(usable[0])
    return tuple(out)


def next_hop_for(addresses: tuple[str, ...], peer: str, family: int, override: str = "") -> str:
    """The next hop to announce `family`'s prefixes with to `peer` (see the module docstring); "" if none."""
    if override:
        return override
    usable = tuple(a for a in _of_family(addresses, family) if not unusable_next_hop(a))
    if not usable:
        return ""
    if ipaddress.ip_address(peer).version == family:
        return local_address(usable, peer)
    return usable[0]


def derived_router_id(node_name: str) -> str:
    """A stable router id from the node name: 32 bits of SHA-256 mapped into 1.0.0.0-223.255.255.255."""
    h = int.from_bytes(hashlib.sha256(node_name.encode()).digest()[:4], "big")
    return str(ipaddress.IPv4Address((1 << 24) + h % (223 << 24)))


def router_id(spec_router_id: str, node: Node) -> str:
    """spec.routerID, else the first IPv4 InternalIP, else derived from the node name (IPv6-only nodes)."""
    v4 = _of_family(node.addresses, 4)
    return spec_router_id or (v4[0] if v4 else derived_router_id(node.name))


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
    addressFamilies: list[Literal["IPv4", "IPv6"]] = Field(
        default_factory=list, description="Unicast address families of this session (empty or unset: the peerIP's "
        "family only); [IPv4, IPv6] carries IPv6 over an IPv4 session (or IPv4 over an IPv6 one).")
    ipv4NextHop: str = Field("", description="Next hop announced for IPv4 prefixes on this session (default: the "
                             "node's local address for the peer, or its first IPv4 InternalIP).")
    ipv6NextHop: str = Field("", description="Global IPv6 next hop announced for IPv6 prefixes on this session "
                             "(default: the node's local address for the peer, or its first IPv6 InternalIP).")

    @field_validator("peerIP")
    @classmethod
    def _ip(cls, v: str) -> str:
        return str(ipaddress.ip_address(v))

    @field_validator("addressFamilies")
    @classmethod
    def _families(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate address family in {v}")
        return v

    @field_validator("ipv4NextHop", "ipv6NextHop")
    @classmethod
    def _next_hop(cls, v: str, info: ValidationInfo) -> str:
        if not v:
            return v
        addr = ipaddress.ip_address(v)
        family = 4 if info.field_name == "ipv4NextHop" else 6
        if addr.version != family:
            raise ValueError(f"{v} is not an {FAMILY_NAMES[family]} address")
        why = unusable_next_hop(str(addr))
        if why:
            raise ValueError(f"{v} cannot be a next hop: {why}")
        return str(addr)

    def families(self) -> tuple[int, ...]:
        """The session's address families (4, 6), in that order."""
        if not self.addressFamilies:
            return (ipaddress.ip_address(self.peerIP).version,)
        return tuple(sorted(FAMILIES[f] for f in self.addressFamilies))

    def next_hop_override(self, family: int) -> str:
        return self.ipv4NextHop if family == 4 else self.ipv6NextHop

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
        for family in (4, 6):
            if self.next_hop_override(family) and family not in self.families():
                raise ValueError(f"{FAMILY_NAMES[family].lower()}NextHop is set but {FAMILY_NAMES[family]} is not "
                                 f"one of the session's addressFamilies {[FAMILY_NAMES[f] for f in self.families()]}")
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
    families: tuple[int, ...] = ()  # address families of the session (4, 6); () means the address's own
    local_address: str = ""  # the session's source address ("": the kernel picks one)
    next_hops: tuple[tuple[int, str], ...] = ()  # (family, next hop) per family that can be announced

    def __post_init__(self) -> None:
        if not self.families:
            object.__setattr__(self, "families", (self.family,))

    @property
    def family(self) -> int:
        """The family of the session's transport (the peer address)."""
        return ipaddress.ip_address(self.address).version

    def next_hop(self, family: int) -> str:
        """The explicit next hop for `family`'s prefixes; "" when that family is not announced to this peer."""
        return dict(self.next_hops).get(family, "")


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
    listen: bool = False  # needed when a peer is passive on our side (binds first_addresses(local_addresses))
    services: ServicePolicy = field(default_factory=ServicePolicy)  # Service VIP advertisement (over the API)

    def peer(self, address: str) -> PeerConfig | None:
        for p in self.peers:
            if p.address == address:
                return p
        return None

    def session_key(self) -> tuple[Any, ...]:
        """What ExaBGP's config depends on (pod CIDRs, communities and next hops are announced over the API)."""
        return (self.asn, self.router_id, self.hold_time, self.keepalive, self.graceful_restart_time,
                tuple(replace(p, bfd=None, next_hops=()) for p in self.peers), self.listen, self.local_addresses)


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
    rid = router_id(spec.routerID, node)
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
        families = p.families()
        next_hops: list[tuple[int, str]] = []
        for family in families:
            nh = next_hop_for(node.addresses, p.peerIP, family, p.next_hop_override(family))
            if nh:
                next_hops.append((family, nh))
            else:
                fam = FAMILY_NAMES[family]
                errors.append(f"BGPPeer {name}: no {fam} next hop (node {node.name} has no usable {fam} address; "
                              f"set spec.{fam.lower()}NextHop): {fam} prefixes are not announced to {p.peerIP}")
        result[p.peerIP] = PeerConfig(
            address=p.peerIP, asn=p.asNumber, name=name, password=password, multihop=p.ebgpMultihop,
            ttl_security=p.ttlSecurity, max_prefixes=p.maxPrefixes,
            bfd=BfdTimers(p.bfd.minRxMs, p.bfd.minTxMs, p.bfd.multiplier) if p.bfd and p.bfd.enabled else None,
            families=families, local_address=local_address(node.addresses, p.peerIP), next_hops=tuple(next_hops),
        )
    listen = False
    if spec.nodeToNodeMesh:
        mine = first_addresses(node.addresses)
        for other in nodes:
            if other.name == node.name or not other.addresses:
                continue
            theirs = first_addresses(other.addresses)
            sessions = [(m, t) for m in mine for t in theirs
                        if ipaddress.ip_address(m).version == ipaddress.ip_address(t).version
                        and t not in result and t not in own]
            if not sessions:
                continue
            try:
                other_asn = _node_asn(spec, other)
            except BgpConfigError as e:
                errors.append(str(e))
                continue
            for my_addr, addr in sessions:  # one session per family both nodes have
                # the lower address connects, the higher one listens: no connection collisions
                passive = int(ipaddress.ip_address(addr)) < int(ipaddress.ip_address(my_addr))
                listen = listen or passive
                family = ipaddress.ip_address(addr).version
                result[addr] = PeerConfig(address=addr, asn=other_asn, name=f"mesh:{other.name}", passive=passive,
                                          families=(family,), local_address=my_addr, next_hops=((family, my_addr),))
    cfg = SpeakerConfig(
        node_name=node.name,
        asn=asn,
        router_id=rid,
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
