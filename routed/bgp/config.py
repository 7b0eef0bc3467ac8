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
import functools
import hashlib
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from routed import validation
from routed.bgp.services import ServicePolicy
from routed.errors import Code, RoutedError
from routed.model import Node
from routed.validation import InvalidValue, display_name, shown

API_GROUP = "routed.dev/v1alpha1"
DEFAULT_ASN = 64512
DEFAULT_HOLD = 9
DEFAULT_GR_TIME = 120
MAX_COMMUNITIES = 64  # per list (the CRDs' maxItems too)
MAX_CIDRS = 64  # per Service allow-list
MAX_SELECTOR_ITEMS = 64  # matchLabels entries, matchExpressions, values per expression
FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}
FAMILIES = {name: version for version, name in FAMILY_NAMES.items()}


class BgpConfigError(RoutedError, ValueError):
    code = Code.BGP_CONFIG_INVALID


def _check_asn(v: int) -> int:
    return validation.parse_asn(v, "AS number")


def _crd(*rules: tuple[str, str], pattern: str = "", max_length: int | None = None) -> dict[str, Any]:
    """Extra schema for the CRDs (scripts/kube_crds.py): CEL rules (rule, message), an anchored pattern built
    from a routed/validation.py source, a maxLength. The agent's own check is the field validator."""
    out: dict[str, Any] = {}
    if rules:
        out["x-kubernetes-validations"] = [{"rule": r, "message": m} for r, m in rules]
    if pattern:
        out["pattern"] = f"^(?:{pattern})$"
    if max_length is not None:
        out["maxLength"] = max_length
    return out


_CRD_IP = _crd(("isIP(self)", "must be an IP address (no scope ID)"), max_length=validation.MAX_IP_LENGTH)
_CRD_ASN: dict[str, Any] = {"minimum": 1, "maximum": validation.ASN_MAX}
_AsnValue = Annotated[int, Field(json_schema_extra=_CRD_ASN)]
_CRD_CIDR = _crd(("isCIDR(self) || isIP(self)", "must be a CIDR (no scope ID)"), max_length=validation.MAX_CIDR_LENGTH)
_CRD_COMMUNITY = _crd(pattern=validation.ANY_COMMUNITY_RE, max_length=32)
_CRD_SUBDOMAIN = _crd(pattern=f"(?:{validation.DNS_SUBDOMAIN_RE})?", max_length=validation.DNS_SUBDOMAIN_MAX)
_CRD_NAMESPACE = _crd(pattern=f"(?:{validation.DNS_LABEL_RE})?", max_length=validation.DNS_LABEL_MAX)
_CRD_SECRET_KEY = _crd(pattern=validation.SECRET_KEY_RE, max_length=validation.SECRET_KEY_MAX)
_CRD_LABEL_KEY = _crd(pattern=f"(?:{validation.LABEL_KEY_RE})?", max_length=validation.LABEL_KEY_MAX)
_CRD_LABEL_VALUE = _crd(pattern=validation.LABEL_VALUE_RE, max_length=validation.LABEL_NAME_MAX)


def _checked(*fields: str, check: Callable[[object, str], str], optional: bool = False) -> Any:
    """A pydantic field validator running a routed/validation.py check on text fields ("" passes when the field
    is `optional`: unset)."""
    def run(cls: type, v: str, info: ValidationInfo) -> str:
        return v if optional and v == "" else check(v, str(info.field_name))
    return field_validator(*fields)(classmethod(run))


def unusable_next_hop(address: str) -> str:
    """Why `address` cannot be announced (or installed) as a BGP next hop; "" when it can."""
    try:
        addr = validation.address(address, "next hop", allow_ipv4_mapped=True)
    except InvalidValue as e:
        return e.msg
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
    return [a for a in addresses if validation.address(a, "node address").version == family]


def local_address(addresses: tuple[str, ...], peer: str) -> str:
    """The node address sharing the longest prefix with the peer (its link address on a p2p/ToR subnet)."""
    target = validation.address(peer, "peer address")
    best, best_len = "", -1
    for a in _of_family(addresses, target.version):
        addr = validation.address(a, "node address")
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
    if validation.address(peer, "peer address").version == family:
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


_SpecT = TypeVar("_SpecT", bound=_Spec)


class ServiceCidr(_Spec):
    cidr: str = Field(json_schema_extra=_CRD_CIDR)

    _cidr = _checked("cidr", check=validation.parse_cidr)


class ServiceCommunities(_Spec):
    """Communities per advertisement type, added to the `communities` of the pod CIDR."""

    clusterIP: list[Annotated[str, Field(json_schema_extra=_CRD_COMMUNITY)]] = Field(
        default_factory=list, max_length=MAX_COMMUNITIES)
    externalIP: list[Annotated[str, Field(json_schema_extra=_CRD_COMMUNITY)]] = Field(
        default_factory=list, max_length=MAX_COMMUNITIES)
    loadBalancerIP: list[Annotated[str, Field(json_schema_extra=_CRD_COMMUNITY)]] = Field(
        default_factory=list, max_length=MAX_COMMUNITIES)

    @field_validator("clusterIP", "externalIP", "loadBalancerIP")
    @classmethod
    def _valid(cls, v: list[str]) -> list[str]:
        return _check_communities(v) or []


def _check_communities(v: list[str] | None) -> list[str] | None:
    return None if v is None else validation.parse_communities(v, "communities")


def _check_names(v: dict[str, int], check: Any, what: str) -> dict[str, int]:
    for key in v:
        check(key, what)
    return v


class BGPConfigurationSpec(_Spec):
    asNumber: int | None = Field(None, json_schema_extra=_CRD_ASN)
    nodeASNumbers: dict[str, _AsnValue] = Field(default_factory=dict, json_schema_extra={"maxProperties": 10000})
    asNumberLabel: str = Field("", json_schema_extra=_CRD_LABEL_KEY)
    rackLabel: str = Field("", json_schema_extra=_CRD_LABEL_KEY)
    rackASNumbers: dict[str, _AsnValue] = Field(default_factory=dict, json_schema_extra={"maxProperties": 10000})
    routerID: str = Field("", json_schema_extra=_crd(("self == '' || (isIP(self) && ip(self).family() == 4)",
                                                       "must be an IPv4 address"), max_length=15))
    holdTime: int | None = Field(None, ge=3, le=65535)
    keepaliveTime: int | None = Field(None, ge=1, le=21845)
    gracefulRestartTime: int | None = Field(None, ge=0, le=4095)
    communities: list[Annotated[str, Field(json_schema_extra=_CRD_COMMUNITY)]] | None = Field(
        None, max_length=MAX_COMMUNITIES)
    acceptDefaultRoute: bool | None = None
    nodeToNodeMesh: bool | None = None
    serviceClusterIPs: list[ServiceCidr] | None = Field(None, max_length=MAX_CIDRS)
    serviceExternalIPs: list[ServiceCidr] | None = Field(None, max_length=MAX_CIDRS)
    serviceLoadBalancerIPs: list[ServiceCidr] | None = Field(None, max_length=MAX_CIDRS)
    serviceCommunities: ServiceCommunities | None = None

    @field_validator("asNumber")
    @classmethod
    def _asn(cls, v: int | None) -> int | None:
        return None if v is None else _check_asn(v)

    @field_validator("nodeASNumbers", "rackASNumbers")
    @classmethod
    def _asns(cls, v: dict[str, int], info: ValidationInfo) -> dict[str, int]:
        check = validation.check_dns_subdomain if info.field_name == "nodeASNumbers" else validation.check_label_value
        for key, asn in v.items():
            check(key, "key")
            validation.parse_asn(asn, display_name(key))
        return v

    _label_keys = _checked("asNumberLabel", "rackLabel", check=validation.check_label_key, optional=True)
    _rid = _checked("routerID", check=functools.partial(validation.parse_ip, family=4), optional=True)

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
    name: str = Field(min_length=1, json_schema_extra=_CRD_SUBDOMAIN)
    key: str = Field(min_length=1, json_schema_extra=_CRD_SECRET_KEY)
    namespace: str = Field("", json_schema_extra=_CRD_NAMESPACE)

    _name = _checked("name", check=validation.check_dns_subdomain)
    _key = _checked("key", check=validation.check_secret_key)
    _namespace = _checked("namespace", check=validation.check_dns_label, optional=True)

    def where(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


class PasswordSource(_Spec):
    secretKeyRef: SecretKeyRef


class LabelSelectorRequirement(_Spec):
    key: str = Field(json_schema_extra=_CRD_LABEL_KEY)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[Annotated[str, Field(json_schema_extra=_CRD_LABEL_VALUE)]] = Field(
        default_factory=list, max_length=MAX_SELECTOR_ITEMS)

    _key = _checked("key", check=validation.check_label_key)

    @field_validator("values")
    @classmethod
    def _values(cls, v: list[str]) -> list[str]:
        return [validation.check_label_value(x, f"values[{i}]") for i, x in enumerate(v)]


class LabelSelector(_Spec):
    matchLabels: dict[str, Annotated[str, Field(json_schema_extra=_CRD_LABEL_VALUE)]] = Field(
        default_factory=dict, json_schema_extra={"maxProperties": MAX_SELECTOR_ITEMS})
    matchExpressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=MAX_SELECTOR_ITEMS)

    @field_validator("matchLabels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_SELECTOR_ITEMS:
            raise ValueError(f"more than {MAX_SELECTOR_ITEMS} labels")
        for key, value in v.items():
            validation.check_label_key(key, "key")
            validation.check_label_value(value, display_name(key))
        return v

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
    peerIP: str = Field(json_schema_extra=_CRD_IP)
    asNumber: int = Field(json_schema_extra=_CRD_ASN)
    node: str = Field("", json_schema_extra=_CRD_SUBDOMAIN)
    nodeSelector: LabelSelector | None = None
    password: PasswordSource | None = None
    ebgpMultihop: int | None = Field(None, ge=1, le=255)
    ttlSecurity: int | None = Field(None, ge=1, le=254)
    maxPrefixes: int | None = Field(None, ge=1)
    bfd: BfdSpec | None = None
    addressFamilies: list[Literal["IPv4", "IPv6"]] = Field(
        default_factory=list, max_length=2, description="Unicast address families of this session (empty or unset: the peerIP's "
        "family only); [IPv4, IPv6] carries IPv6 over an IPv4 session (or IPv4 over an IPv6 one).")
    ipv4NextHop: str = Field("", description="Next hop announced for IPv4 prefixes on this session (default: the "
                             "node's local address for the peer, or its first IPv4 InternalIP).",
                             json_schema_extra=_crd(("self == '' || (isIP(self) && ip(self).family() == 4)",
                                                     "must be an IPv4 address"), max_length=15))
    ipv6NextHop: str = Field("", description="Global IPv6 next hop announced for IPv6 prefixes on this session "
                             "(default: the node's local address for the peer, or its first IPv6 InternalIP).",
                             json_schema_extra=_crd(("self == '' || (isIP(self) && ip(self).family() == 6)",
                                                     "must be an IPv6 address (no scope ID)"),
                                                    max_length=validation.MAX_IP_LENGTH))

    _ip = _checked("peerIP", check=validation.parse_ip)
    _node = _checked("node", check=validation.check_dns_subdomain, optional=True)

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
        family = 4 if info.field_name == "ipv4NextHop" else 6
        addr = validation.parse_ip(v, str(info.field_name), family=family)
        why = unusable_next_hop(addr)
        if why:
            raise ValueError(f"{addr} cannot be a next hop: {why}")
        return addr

    def families(self) -> tuple[int, ...]:
        """The session's address families (4, 6), in that order."""
        if not self.addressFamilies:
            return (validation.ip_family(self.peerIP),)
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
    """'<kind> <name>: spec.<field>: <why>; ...' with every part that came from the object shown escaped."""
    if isinstance(err, ValidationError):
        parts = []
        for e in err.errors():
            loc = ".".join(display_name(x) if isinstance(x, str) else str(x) for x in e.get("loc", ()))
            msg = str(e.get("msg")).removeprefix("Value error, ")
            parts.append(f"spec.{loc}: {msg}" if loc else msg)
        return f"{kind} {display_name(name)}: " + "; ".join(parts)
    return f"{kind} {display_name(name)}: {err}"


def object_name(obj: Any) -> str:
    """metadata.name of a cluster object as text for messages ("" when missing)."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else ""


def _parse(kind: str, model: type[_SpecT], obj: Any) -> tuple[str, _SpecT]:
    name = object_name(obj)
    try:
        if not isinstance(obj, dict):
            raise BgpConfigError(f"not a mapping ({type(obj).__name__})")
        if obj.get("kind") not in (None, kind):
            raise BgpConfigError(f"kind is {shown(obj.get('kind'))}, expected {kind}")
        if not name:
            raise BgpConfigError("metadata.name is missing")
        validation.check_dns_subdomain(name, "metadata.name")
        spec = obj.get("spec") or {}
        if not isinstance(spec, dict):
            raise BgpConfigError(f"spec: not a mapping ({type(spec).__name__})")
        return name, model.model_validate(spec)
    except (ValidationError, ValueError) as e:
        raise BgpConfigError(_format_error(kind, name or "<unnamed>", e)) from None


def parse_configuration(obj: dict[str, Any]) -> tuple[str, BGPConfigurationSpec]:
    return _parse("BGPConfiguration", BGPConfigurationSpec, obj)


def parse_peer(obj: dict[str, Any]) -> tuple[str, BGPPeerSpec]:
    return _parse("BGPPeer", BGPPeerSpec, obj)


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
        return validation.ip_family(self.address)

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
    """The TCP MD5 password `ref` names. Refused with a BgpConfigError naming the Secret and key, never the
    value: missing, not base64 UTF-8, empty, over 80 bytes (the kernel's TCP MD5 key limit), or holding a
    control character (a trailing newline included)."""
    candidates: list[tuple[str, dict[str, Any]]] = []
    for key, obj in secrets.items():
        ns, _, name = key.rpartition("/")
        if name == ref.name and (not ref.namespace or ns == ref.namespace):
            candidates.append((display_name(key), obj))
    if not candidates:
        raise BgpConfigError(f"secret {ref.where()} not found")
    if len(candidates) > 1:
        raise BgpConfigError(f"secret {ref.name} exists in several namespaces; set secretKeyRef.namespace")
    where, obj = candidates[0]
    what = f"secret {where} key {ref.key}"
    string_data = obj.get("stringData") or {}
    data = obj.get("data") or {}
    if isinstance(string_data, dict) and ref.key in string_data:
        raw = string_data[ref.key]
        if not isinstance(raw, str):
            raise BgpConfigError(f"{what}: stringData value is not text")
        value = raw
    elif isinstance(data, dict) and ref.key in data:
        try:
            value = base64.b64decode(str(data[ref.key]), validate=True).decode()
        except binascii.Error:
            raise BgpConfigError(f"{what}: not valid base64") from None
        except UnicodeDecodeError:
            raise BgpConfigError(f"{what}: not UTF-8 text") from None
    else:
        raise BgpConfigError(f"secret {where} has no key {ref.key!r}")
    try:
        return validation.check_tcp_md5_key(value, what)
    except InvalidValue as e:
        raise BgpConfigError(e.msg) from None


def _node_asn(spec: BGPConfigurationSpec, node: Node) -> int:
    if node.name in spec.nodeASNumbers:
        return spec.nodeASNumbers[node.name]
    if spec.asNumberLabel and spec.asNumberLabel in node.labels:
        raw = node.labels[spec.asNumberLabel]
        try:
            return validation.parse_asn(raw, "label")
        except InvalidValue:
            raise BgpConfigError(f"node {display_name(node.name)}: label {spec.asNumberLabel}={shown(raw)} is not an "
                                 "AS number") from None
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


def _unexpected(err: Exception) -> str:
    """An exception nobody meant to raise, for `errors` (its text escaped: it may quote the input)."""
    return f"unexpected {type(err).__name__}: {shown(str(err), 200)}"


def _valid_node_addresses(node: Node, errors: list[str]) -> Node:
    """`node` with only addresses that pass the boundary (a Node built from a cluster object already has only
    those: its `problems` name what was dropped); what is dropped is reported under the Node's name."""
    errors.extend(node.problems)
    kept = tuple(validation.kept(node.addresses, validation.parse_ip, lambda i: f"Node {display_name(node.name)}: "
                                 f"address[{i}]", lambda message: errors.append(f"{message}; dropped")))
    return node if kept == node.addresses else replace(node, addresses=kept)


def _peer_config(name: str, p: BGPPeerSpec, node: Node, password: str | None,
                 errors: list[str]) -> PeerConfig:
    families = p.families()
    next_hops: list[tuple[int, str]] = []
    for family in families:
        nh = next_hop_for(node.addresses, p.peerIP, family, p.next_hop_override(family))
        if nh:
            next_hops.append((family, nh))
        else:
            fam = FAMILY_NAMES[family]
            errors.append(f"BGPPeer {name}: no {fam} next hop (node {display_name(node.name)} has no usable {fam} "
                          f"address; set spec.{fam.lower()}NextHop): {fam} prefixes are not announced to {p.peerIP}")
    return PeerConfig(
        address=p.peerIP, asn=p.asNumber, name=name, password=password, multihop=p.ebgpMultihop,
        ttl_security=p.ttlSecurity, max_prefixes=p.maxPrefixes,
        bfd=BfdTimers(p.bfd.minRxMs, p.bfd.minTxMs, p.bfd.multiplier) if p.bfd and p.bfd.enabled else None,
        families=families, local_address=local_address(node.addresses, p.peerIP), next_hops=tuple(next_hops),
    )


def _bgp_peers(node: Node, peers: list[dict[str, Any]], secrets: dict[str, dict[str, Any]],
               errors: list[str]) -> dict[str, PeerConfig]:
    """The BGPPeers selecting `node`, by address. Each one is resolved on its own: whatever goes wrong with one
    (invalid, its Secret missing or refused, a bug) is reported by its name and skips only that one."""
    own = set(node.addresses)
    result: dict[str, PeerConfig] = {}
    for obj in peers:
        name = display_name(object_name(obj) or "<unnamed>")
        try:
            _, p = parse_peer(obj)
            if not p.selects(node) or p.peerIP in own:
                continue
            password = _secret_value(p.password.secretKeyRef, secrets) if p.password else None
            if p.peerIP in result:
                raise BgpConfigError(f"peerIP {p.peerIP} already defined by {result[p.peerIP].name}")
            peer_errors: list[str] = []
            result[p.peerIP] = _peer_config(name, p, node, password, peer_errors)
            errors.extend(peer_errors)
        except BgpConfigError as e:
            msg = str(e)
            errors.append(msg if msg.startswith("BGPPeer") else f"BGPPeer {name}: {msg}")
        except Exception as e:  # one peer never takes the others down
            errors.append(f"BGPPeer {name}: {_unexpected(e)}")
    return result


def _mesh_peers(spec: BGPConfigurationSpec, node: Node, other: Node, taken: dict[str, PeerConfig],
                errors: list[str]) -> list[PeerConfig]:
    """The mesh sessions with `other`: one per family both nodes have a usable address of (the lower address
    connects, the higher one listens: no connection collisions)."""
    name = validation.check_dns_subdomain(other.name, "Node name")
    other = _valid_node_addresses(other, errors)
    own = set(node.addresses)
    mine = first_addresses(node.addresses)
    theirs = first_addresses(other.addresses)
    sessions = [(m, t) for m in mine for t in theirs
                if validation.ip_family(m) == validation.ip_family(t) and t not in taken and t not in own]
    if not sessions:
        return []
    other_asn = _node_asn(spec, other)
    out = []
    for my_addr, addr in sessions:
        passive = int(validation.address(addr, "address")) < int(validation.address(my_addr, "address"))
        family = validation.ip_family(addr)
        out.append(PeerConfig(address=addr, asn=other_asn, name=f"mesh:{name}", passive=passive,
                              families=(family,), local_address=my_addr, next_hops=((family, my_addr),)))
    return out


def _pod_cidrs(node: Node, errors: list[str]) -> tuple[str, ...]:
    return tuple(validation.kept(node.pod_cidrs, validation.parse_cidr,
                                 lambda i: f"Node {display_name(node.name)}: podCIDR[{i}]",
                                 lambda message: errors.append(f"{message}; not announced")))


def resolve(
    node: Node,
    nodes: list[Node],
    peers: list[dict[str, Any]],
    configs: list[dict[str, Any]],
    secrets: dict[str, dict[str, Any]],
) -> Resolution:
    """This node's SpeakerConfig. Never raises for a bad object: an invalid BGPConfiguration falls back to the
    defaults, an invalid BGPPeer or mesh Node is left out, an invalid Node address is dropped; each is named in
    `errors`, and the rest is resolved as if it were not there."""
    errors: list[str] = []
    node = _valid_node_addresses(node, errors)
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
    result = _bgp_peers(node, peers, secrets, errors)
    listen = False
    if spec.nodeToNodeMesh:
        for other in nodes:
            if other.name == node.name:
                continue
            try:
                mesh = _mesh_peers(spec, node, other, result, errors)
            except (BgpConfigError, InvalidValue) as e:
                msg = str(e)
                errors.append(msg if msg.startswith("node ") else f"mesh node {display_name(other.name)}: {msg}")
                continue
            except Exception as e:  # one node never takes the mesh down
                errors.append(f"mesh node {display_name(other.name)}: {_unexpected(e)}")
                continue
            for p in mesh:
                result[p.address] = p
                listen = listen or p.passive
    cfg = SpeakerConfig(
        node_name=node.name,
        asn=asn,
        router_id=rid,
        hold_time=hold,
        keepalive=keepalive,
        graceful_restart_time=DEFAULT_GR_TIME if spec.gracefulRestartTime is None else spec.gracefulRestartTime,
        communities=tuple(spec.communities or ()),
        accept_default=bool(spec.acceptDefaultRoute),
        pod_cidrs=_pod_cidrs(node, errors),
        local_addresses=tuple(node.addresses),
        peers=tuple(sorted(result.values(), key=lambda p: p.address)),
        listen=listen,
        services=_service_policy(spec),
    )
    return Resolution(cfg, errors)
