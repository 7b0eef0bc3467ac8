"""BGP in the lab: real ToR routers (FRR, BIRD 2 or GoBGP) and the BGPConfiguration/BGPPeer objects the agents read.

Each ToR peers with the uplink addresses of every node attached to it; each node gets one BGPPeer per ToR and
IP family (a separate IPv6 session beside the IPv4 one in a dual-stack lab: `<node>-<tor>` for the first
family, `<node>-<tor>-v6` for IPv6 next to IPv4), or with `--ipv6-over-ipv4` one IPv4 session per ToR carrying
IPv6 unicast too (BGPPeer addressFamilies + ipv6NextHop; FRR and BIRD send their link's IPv6 next hop).
ASNs follow the lab topology: AS per node (default), AS per rack (from the node's rack label), or iBGP with
the ToR as route reflector.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from routed.lab import topology
from routed.lab.routers import Neighbor, Router, make_router
from routed.lab.state import LabState, TorState

log = logging.getLogger(__name__)

HOLD_TIME = 9
KEEPALIVE = 3
BFD_TIMERS = {"minRxMs": 100, "minTxMs": 100, "multiplier": 3}  # 300 ms detection, both sides


def _router(lab: Any, tor: TorState, state: LabState) -> Router:
    router = make_router(tor.kind, workdir=str(lab.paths.root / "routers" / tor.name), hold_time=HOLD_TIME,
                         keepalive=KEEPALIVE)
    router.netns = tor.netns
    router.asn = tor.asn
    router.router_id = tor.address
    router.neighbors = _neighbors(tor, state)
    if state.bfd:
        router.bfd = (BFD_TIMERS["multiplier"], BFD_TIMERS["minRxMs"], BFD_TIMERS["minTxMs"])
    return router


def _neighbors(tor: TorState, state: LabState) -> list[Neighbor]:
    """The ToR's neighbours: every uplink address of its nodes, or (IPv6 over IPv4) the IPv4 one carrying IPv6
    too, with the ToR's own IPv6 address on that link as the next hop it sends."""
    out: list[Neighbor] = []
    for node in state.nodes:
        for up in node.uplinks:
            if up["tor"] != tor.name:
                continue
            addresses = topology.link_side_addresses(up)
            if state.ipv6_over_ipv4:
                out.append(Neighbor(address=topology.of_family(addresses, 4)[0], asn=node.asn,
                                    ipv6_next_hop=topology.of_family(topology.link_side_addresses(up, tor=True), 6)[0]))
            else:
                out += [Neighbor(address=address, asn=node.asn) for address in addresses]
    return out


def peer_name(node: str, tor: str, index: int, address: str) -> str:
    """The BGPPeer of one session: `<node>-<tor>` for the first family, `-v6` for IPv6 beside IPv4."""
    return f"{node}-{tor}" if index == 0 else f"{node}-{tor}-v{ipaddress.ip_address(address).version}"


def bgp_objects(state: LabState) -> list[dict[str, Any]]:
    spec: dict[str, Any] = {"holdTime": HOLD_TIME, "keepaliveTime": KEEPALIVE, "gracefulRestartTime": 120,
                            "nodeToNodeMesh": False}
    if state.topology == "as-per-rack":
        racks = sorted({n.rack for n in state.nodes})
        spec |= {"rackLabel": topology.RACK_LABEL,
                 "rackASNumbers": {r: next(n.asn for n in state.nodes if n.rack == r) for r in racks}}
    elif state.topology == "ibgp":
        spec |= {"asNumber": state.tors[0].asn}
    else:
        spec |= {"nodeASNumbers": {n.name: n.asn for n in state.nodes}}
    objects: list[dict[str, Any]] = [
        {"apiVersion": "routed.dev/v1alpha1", "kind": "BGPConfiguration", "metadata": {"name": "default"},
         "spec": spec}
    ]
    for node in state.nodes:
        for up in node.uplinks:
            tor = next(t for t in state.tors if t.name == up["tor"])
            tor_addresses = topology.link_side_addresses(up, tor=True)
            if state.ipv6_over_ipv4:  # one IPv4 session per ToR carrying both families
                tor_addresses = topology.of_family(tor_addresses, 4)
            for index, address in enumerate(tor_addresses):
                peer_spec: dict[str, Any] = {"peerIP": address, "asNumber": tor.asn, "node": node.name}
                if state.ipv6_over_ipv4:  # this link's own IPv6 address: the ToR reaches it directly
                    peer_spec |= {"addressFamilies": ["IPv4", "IPv6"], "ipv6NextHop": topology.of_family(topology.link_side_addresses(up), 6)[0]}
                if state.bfd:
                    peer_spec["bfd"] = dict(BFD_TIMERS)
                objects.append({
                    "apiVersion": "routed.dev/v1alpha1", "kind": "BGPPeer",
                    "metadata": {"name": peer_name(node.name, tor.name, index, address)}, "spec": peer_spec,
                })
    return objects


def start_routers(lab: Any, state: LabState) -> None:
    store = lab.store(state)
    for obj in bgp_objects(state):
        store.write(obj)
    for tor in state.tors:
        router = _router(lab, tor, state)
        router.start(tor.netns, tor.asn, tor.address, router.neighbors, graceful_restart=True, ecmp=True)
        log.info("%s: %s AS %d with %d neighbours", tor.name, tor.kind, tor.asn, len(router.neighbors))


def router_sessions(lab: Any, state: LabState, tor: TorState) -> list[dict[str, Any]]:
    sessions = _router(lab, tor, state).sessions()
    by_address = {a: node.name for node in state.nodes for up in node.uplinks for a in topology.link_side_addresses(up)}
    return [{**s, "node": by_address.get(s["peer"], ""), "prefixes": s.get("received", "")} for s in sessions]


def tor_router(lab: Any, state: LabState, tor_name: str) -> Router:
    return _router(lab, next(t for t in state.tors if t.name == tor_name), state)


def advertise_services(lab: Any, spec: dict[str, Any]) -> None:
    """Merge Service advertisement fields (serviceLoadBalancerIPs, ...) into the lab's BGPConfiguration."""
    config = bgp_objects(lab.state())[0]
    config["spec"] |= spec
    lab.store().write(config)
