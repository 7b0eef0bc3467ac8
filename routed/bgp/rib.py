"""ExaBGP JSON messages → per-peer learned routes (Adj-RIB-In), filters, graceful-restart staleness, and
what was actually sent per peer (Adj-RIB-Out as ExaBGP reports it). Pure: no I/O, time passed in.

Families: "ipv4 unicast" and "ipv6 unicast" announcements and withdrawals, End-of-RIB per (afi, safi), and the
families a received OPEN offers (multiprotocol capability) are parsed alike. ExaBGP reports an IPv6 route with
a global and a link-local next hop as two entries of the same prefix (one per next hop): they are merged into
one route whose next hop is the global one. Learned routes are filtered the same way in both families; a next
hop that cannot be installed (IPv4-mapped `::ffff:a.b.c.d` — what FRR sends over an IPv4 session when no IPv6
next hop is set —, unspecified, link-local over an IPv4 session, another family) rejects the route with a reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from routed.api_types import BgpRoute
from routed.bgp.config import unusable_next_hop

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Route:
    prefix: str
    nexthop: str
    as_path: tuple[int, ...] = ()
    communities: tuple[str, ...] = ()
    origin: str = ""
    med: int | None = None
    local_pref: int | None = None

    def as_dict(self) -> BgpRoute:
        return BgpRoute(prefix=self.prefix, nextHop=self.nexthop, asPath=list(self.as_path),
                        communities=list(self.communities), origin=self.origin, med=self.med,
                        localPref=self.local_pref)


@dataclass
class Message:
    """One ExaBGP API message, reduced to what the speaker needs."""

    type: str  # state | open | update | notification | other
    peer: str = ""
    direction: str = ""  # receive | send (update/open)
    state: str = ""  # connected | up | down (state)
    reason: str = ""
    announce: list[Route] = field(default_factory=list)
    withdraw: list[str] = field(default_factory=list)
    eor: tuple[str, str] | None = None  # (afi, safi)
    gr_time: int | None = None  # restart time of a received OPEN's graceful-restart capability
    families: tuple[str, ...] | None = None  # OPEN: the multiprotocol families offered, "ipv4 unicast", ...
    raw: dict[str, Any] = field(default_factory=dict)


def _as_path(attr: Any) -> tuple[int, ...]:
    out: list[int] = []
    if isinstance(attr, list):
        for x in attr:
            if isinstance(x, list):
                out += [int(a) for a in x]
            else:
                out.append(int(x))
    elif isinstance(attr, dict):
        for key in sorted(attr, key=lambda k: int(k) if str(k).isdigit() else 0):
            seg = attr[key]
            values = seg.get("value", []) if isinstance(seg, dict) else seg
            out += [int(a) for a in values]
    return tuple(out)


def _communities(attrs: dict[str, Any]) -> tuple[str, ...]:
    out: list[str] = []
    for c in attrs.get("community") or []:
        out.append(":".join(str(x) for x in c) if isinstance(c, list) else str(c))
    for c in attrs.get("large-community") or []:
        out.append(":".join(str(x) for x in c) if isinstance(c, list) else str(c))
    return tuple(out)


def _nexthop(raw: str) -> str:
    # IPv6 may come as "global,link-local"
    parts = [p.strip() for p in str(raw).split(",") if p.strip()]
    for p in parts:
        try:
            if not ipaddress.ip_address(p).is_link_local:
                return p
        except ValueError:
            continue
    return parts[0] if parts else ""


def _is_link_local(nexthop: str) -> bool:
    try:
        return ipaddress.ip_address(nexthop).is_link_local
    except ValueError:
        return False


def _family_name(raw: Any) -> str:
    """"ipv6/unicast" (capabilities) or "ipv6 unicast" (updates) -> "ipv6 unicast"."""
    return " ".join(str(raw).replace("/", " ").split())


def _nlri(entry: Any) -> str:
    if isinstance(entry, dict):
        return str(entry.get("nlri", ""))
    return str(entry)


def parse_message(line: str | bytes) -> Message:
    try:
        data = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return Message(type="other", raw={"text": line if isinstance(line, str) else line.decode(errors="replace")})
    if not isinstance(data, dict):
        return Message(type="other", raw={"value": data})
    mtype = str(data.get("type", "other"))
    neighbor = data.get("neighbor") or {}
    peer = str((neighbor.get("address") or {}).get("peer", ""))
    msg = Message(type=mtype, peer=peer, raw=data, direction=str(neighbor.get("direction", "")))
    if mtype == "state":
        msg.state = str(neighbor.get("state", ""))
        msg.reason = str(neighbor.get("reason", ""))
    elif mtype == "notification":
        msg.reason = str(data.get("notification", "") or neighbor.get("notification", ""))
    elif mtype == "open":
        caps = ((neighbor.get("open") or {}).get("capabilities")) or {}
        families: list[str] = []
        for cap in caps.values():
            if isinstance(cap, dict) and "graceful" in str(cap.get("name", "")):
                msg.gr_time = int(cap.get("time", 0) or 0)
            if isinstance(cap, dict) and cap.get("name") == "multiprotocol":
                families += [_family_name(f) for f in cap.get("families") or []]
        # no multiprotocol capability at all: IPv4 unicast only (RFC 4760)
        msg.families = tuple(dict.fromkeys(families)) if families else ("ipv4 unicast",)
    elif mtype == "update":
        message = neighbor.get("message") or {}
        if "eor" in message:
            eor = message["eor"] or {}
            msg.eor = (str(eor.get("afi", "")), str(eor.get("safi", "")))
            return msg
        update = message.get("update") or {}
        attrs = update.get("attribute") or {}
        as_path = _as_path(attrs.get("as-path"))
        comms = _communities(attrs)
        for family, by_nh in (update.get("announce") or {}).items():
            if not str(family).endswith("unicast") or not isinstance(by_nh, dict):
                continue
            hops: dict[str, str] = {}  # prefix -> next hop, a global one preferred over a link-local one
            for nh, entries in by_nh.items():
                for entry in entries or []:
                    prefix = _nlri(entry)
                    if prefix and (prefix not in hops or _is_link_local(hops[prefix])):
                        hops[prefix] = _nexthop(nh)
            for prefix, nexthop in hops.items():
                msg.announce.append(Route(
                    prefix=prefix, nexthop=nexthop, as_path=as_path, communities=comms,
                    origin=str(attrs.get("origin", "")), med=attrs.get("med"),
                    local_pref=attrs.get("local-preference"),
                ))
        for family, entries in (update.get("withdraw") or {}).items():
            if not str(family).endswith("unicast"):
                continue
            for entry in entries or []:
                prefix = _nlri(entry)
                if prefix:
                    msg.withdraw.append(prefix)
    return msg


# ------------------------------------------------------------------------------------------------
@dataclass
class LearnedRoute:
    route: Route
    since: float
    stale: bool = False


@dataclass
class Filters:
    own_asn: int = 0
    own_cidrs: tuple[str, ...] = ()
    own_addresses: tuple[str, ...] = ()
    accept_default: bool = False
    max_prefixes: dict[str, int] = field(default_factory=dict)  # peer -> limit
    _own: frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address] = field(
        default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._own = frozenset(ipaddress.ip_address(a) for a in self.own_addresses)

    def reject_reason(self, route: Route) -> str:
        try:
            net = ipaddress.ip_network(route.prefix, strict=False)
        except ValueError:
            return "invalid prefix"
        if self.own_asn and self.own_asn in route.as_path:
            return "own AS in path"
        if net.prefixlen == 0 and not self.accept_default:
            return "default route not accepted"
        for cidr in self.own_cidrs:
            own = ipaddress.ip_network(cidr, strict=False)
            if own.version == net.version and net.subnet_of(own):  # type: ignore[arg-type]
                return "inside own pod CIDR"
        try:
            nh = ipaddress.ip_address(route.nexthop)
        except ValueError:
            return "invalid next hop"
        if nh in self._own:
            return "next hop is this node"
        if nh.version != net.version:
            return "next hop family differs"
        if isinstance(nh, ipaddress.IPv6Address) and nh.ipv4_mapped is not None:
            return (f"IPv4-mapped next hop ::ffff:{nh.ipv4_mapped}: the peer sent no IPv6 next hop (it must set a global one, "
                    "e.g. FRR: route-map with `set ipv6 next-hop global`)")
        if isinstance(nh, ipaddress.IPv6Address) and nh.is_link_local:  # left by _resolve_link_local: IPv4 session
            return (f"link-local next hop {nh} over an IPv4 session: not reachable without an interface "
                    "(the peer must send a global IPv6 next hop)")
        why = unusable_next_hop(str(nh))
        if why:
            return f"next hop {nh} is unusable ({why})"
        return ""


def _version(prefix: str) -> int:
    try:
        return ipaddress.ip_network(prefix, strict=False).version
    except ValueError:
        return 0


def _resolve_link_local(peer: str, route: Route) -> Route:
    """An IPv6 next hop given only as link-local (FRR does that on a shared link) cannot be installed without
    an interface; over an IPv6 session the directly connected peer's own address is the same router. Over an
    IPv4 session there is no such address: the route keeps its link-local next hop and the filters reject it."""
    try:
        nh = ipaddress.ip_address(route.nexthop)
        if nh.version == 6 and nh.is_link_local and ipaddress.ip_address(peer).version == 6:
            return dataclasses.replace(route, nexthop=peer)
    except ValueError:
        pass
    return route


class Rib:
    """Adj-RIB-In per peer with filters; `desired()` gives prefix → next hops for the route table."""

    def __init__(self, filters: Filters | None = None) -> None:
        self.filters = filters or Filters()
        self.peers: dict[str, dict[str, LearnedRoute]] = {}
        self.max_prefix_hits: dict[str, int] = {}
        self.filtered: dict[str, int] = {}
        # prefix -> next hops a peer retracted (withdrawn, replaced, its routes cleared or dropped as stale) and no
        # peer announced again since; None once the route table prunes (nothing left to tell apart from the kernel)
        self._retracted: dict[str, set[str]] | None = {}

    def _retract(self, lrs: list[LearnedRoute]) -> None:
        if self._retracted is None:
            return
        for lr in lrs:
            try:
                prefix = str(ipaddress.ip_network(lr.route.prefix, strict=False))
            except ValueError:
                continue
            self._retracted.setdefault(prefix, set()).add(lr.route.nexthop)

    def retracted(self) -> dict[str, frozenset[str]]:
        """prefix -> next hops known to be gone (see `_retracted`): what a merging route table must not keep."""
        return {p: frozenset(h) for p, h in (self._retracted or {}).items() if h}

    def forget_retracted(self) -> None:
        """Stop tracking retracted next hops (the route table prunes from now on)."""
        self._retracted = None

    def set_filters(self, filters: Filters) -> None:
        self.filters = filters

    def announce(self, peer: str, route: Route, now: float) -> None:
        route = _resolve_link_local(peer, route)
        table = self.peers.setdefault(peer, {})
        current = table.get(route.prefix)
        if current is not None and current.route.nexthop != route.nexthop:
            self._retract([current])  # an implicit withdrawal of the old next hop
        if self._retracted is not None:
            with contextlib.suppress(ValueError):
                self._retracted.get(str(ipaddress.ip_network(route.prefix, strict=False)), set()).discard(
                    route.nexthop)
        table[route.prefix] = LearnedRoute(route, current.since if current and current.route == route else now)
        if current is None:
            limit = self.filters.max_prefixes.get(peer)
            eligible = sum(1 for lr in table.values() if not self.filters.reject_reason(lr.route))
            if limit is not None and not self.filters.reject_reason(route) and eligible > limit:
                self.max_prefix_hits[peer] = self.max_prefix_hits.get(peer, 0) + 1
                if self.max_prefix_hits[peer] == 1 or self.max_prefix_hits[peer] % 100 == 0:
                    log.warning("peer %s exceeds maxPrefixes %d: ignoring %s (%d ignored so far)", peer, limit,
                                route.prefix, self.max_prefix_hits[peer])

    def withdraw(self, peer: str, prefix: str) -> None:
        lr = self.peers.get(peer, {}).pop(prefix, None)
        if lr is not None:
            self._retract([lr])

    def mark_stale(self, peer: str) -> int:
        table = self.peers.get(peer, {})
        for lr in table.values():
            lr.stale = True
        return len(table)

    def drop_stale(self, peer: str, family: int | None = None) -> int:
        """Drop the peer's routes still stale (of one family: 4 or 6, at that family's End-of-RIB; all: None)."""
        table = self.peers.get(peer, {})
        stale = [p for p, lr in table.items() if lr.stale and (family is None or _version(p) == family)]
        self._retract([table.pop(p) for p in stale])
        return len(stale)

    def clear(self, peer: str) -> None:
        self._retract(list(self.peers.pop(peer, {}).values()))

    def forget_peers_except(self, peers: set[str]) -> None:
        for p in list(self.peers):
            if p not in peers:
                self.clear(p)

    def _evaluate(self, peer: str) -> list[tuple[LearnedRoute, str]]:
        """(route, reject reason or "") in arrival order, max-prefix applied."""
        limit = self.filters.max_prefixes.get(peer)
        accepted = 0
        out: list[tuple[LearnedRoute, str]] = []
        for lr in self.peers.get(peer, {}).values():
            reason = self.filters.reject_reason(lr.route)
            if not reason and limit is not None:
                if accepted >= limit:
                    reason = f"over maxPrefixes {limit}"
                else:
                    accepted += 1
            out.append((lr, reason))
        return out

    def accepted_count(self, peer: str) -> int:
        return sum(1 for _, reason in self._evaluate(peer) if not reason)

    def received(self, peer: str) -> list[BgpRoute]:
        out = []
        for lr, reason in self._evaluate(peer):
            d = lr.route.as_dict()
            d |= BgpRoute(peer=peer, since=lr.since, stale=lr.stale, accepted=not reason, rejected=reason)
            out.append(d)
        return out

    def desired(self, exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, frozenset[str]]:
        """prefix -> next hops of every accepted route, from every peer not in `exclude`."""
        hops: dict[str, set[str]] = {}
        for peer in self.peers:
            if peer in exclude:
                continue
            for lr, reason in self._evaluate(peer):
                if not reason:
                    hops.setdefault(str(ipaddress.ip_network(lr.route.prefix, strict=False)), set()).add(
                        lr.route.nexthop)
        return {p: frozenset(h) for p, h in hops.items()}


class AdjRibOut:
    """What ExaBGP reports it sent to each peer (updates with direction "send")."""

    def __init__(self) -> None:
        self.peers: dict[str, dict[str, tuple[Route, float]]] = {}
        self.eor_sent: dict[str, float] = {}

    def record(self, msg: Message, now: float) -> None:
        table = self.peers.setdefault(msg.peer, {})
        for r in msg.announce:
            table[r.prefix] = (r, now)
        for p in msg.withdraw:
            table.pop(p, None)

    def clear(self, peer: str) -> None:
        self.peers.pop(peer, None)
        self.eor_sent.pop(peer, None)

    def advertised(self, peer: str) -> list[BgpRoute]:
        out = []
        for r, t in self.peers.get(peer, {}).values():
            d = r.as_dict()
            d |= BgpRoute(peer=peer, sent=t)
            out.append(d)
        return out
