"""ExaBGP API commands as text: what the speaker announces, withdraws and tears down. Pure.

Every command names its peer (`neighbor X ...`) and every announcement carries an explicit next hop of the
prefix's family (PeerConfig.next_hop: never ExaBGP's `next-hop self`, which cannot cross families). Every value
is re-checked against routed.bgp.grammar here: a value outside it raises BgpConfigError naming the peer, so a
scope id with a newline, a community with a trailing newline or anything else that would split a line never
becomes a command. The speaker writes the result only through routed.bgp.commands, which checks it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from routed.bgp import grammar
from routed.bgp.config import BgpConfigError, PeerConfig, unusable_next_hop
from routed.bgp.exabgp_conf import AFI, peer_label

CEASE_BFD_DOWN = 6  # NOTIFICATION Cease subcode "Other Configuration Change" (RFC 4486) when BFD says down


@dataclass(frozen=True)
class Announcement:
    """One prefix as announced to one peer: the exact command sent and the withdrawal that matches it."""

    prefix: str
    next_hop: str
    command: str
    withdraw: str


def _refuse(peer: PeerConfig, what: str, exc: ValueError) -> BgpConfigError:
    return BgpConfigError(f"{peer_label(peer)}: {what}: {exc}; not announced")


def announcement(peer: PeerConfig, prefix: str, communities: Sequence[str] = ()) -> Announcement | None:
    """The announcement of `prefix` to `peer`, or None when the session does not carry the prefix's family or has
    no usable next hop for it (config.resolve reported that by BGPPeer name). BgpConfigError naming the peer when
    the peer address, prefix, next hop or a community is outside the grammar."""
    try:
        address = grammar.address(peer.address)
    except ValueError as exc:
        raise _refuse(peer, "peer address", exc) from None
    try:
        route = grammar.prefix(prefix)
    except ValueError as exc:
        raise _refuse(peer, "prefix", exc) from None
    family = grammar.family_of(route)
    next_hop = peer.next_hop(family) if family in peer.families else ""
    if not next_hop:
        return None
    try:
        grammar.address(next_hop, family)
    except ValueError as exc:
        raise _refuse(peer, f"IPv{family} next hop", exc) from None
    if unusable_next_hop(next_hop):
        return None
    try:
        checked = [grammar.community(c) for c in communities]
    except ValueError as exc:
        raise _refuse(peer, f"communities of {route}", exc) from None
    std = [c for c in checked if not grammar.is_large_community(c)]
    large = [c for c in checked if grammar.is_large_community(c)]
    command = f"neighbor {address} announce route {route} next-hop {next_hop}"
    if std:
        command += f" community [ {' '.join(std)} ]"
    if large:
        command += f" large-community [ {' '.join(large)} ]"
    return Announcement(route, next_hop, command, f"neighbor {address} withdraw route {route} next-hop {next_hop}")


def end_of_rib(peer_address: str, family: int) -> str:
    """(The sink refuses it if the address is not one token of the grammar.)"""
    return f"neighbor {peer_address} announce eor {AFI[family]} unicast"


def teardown(peer_address: str, subcode: int = CEASE_BFD_DOWN) -> str:
    return f"neighbor {peer_address} teardown {subcode}"
