"""The lab's network: one or two ToR namespaces and N node namespaces, each node with an uplink per ToR.

Addressing (node i is 1-based, ToR k is 0-based), per the lab's IP family (ipv4 | ipv6 | dual):
  IPv4 uplink of node i to ToR k: 10.(10+k).i.0/31 — ToR .0, node .1; pod CIDR of node i: 10.244.i.0/24
  IPv6 uplink of node i to ToR k: fd00:(10+k):i::/64 — ToR ::1, node ::2; pod CIDR: fd00:10:244:i::/64 (i in hex)
  node i's InternalIPs = its uplink addresses (the first family's first uplink is its primary address)
Nodes have a default route per family to their ToR(s) (ECMP with two), which proxy ARP on pod veths needs.
The external client (and the kube control plane) sit behind ToR 1 the same way; the control plane is IPv4.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from typing import Any

from routed import netns
from routed.lab.state import FAMILIES, LabState, NodeState, TorState

log = logging.getLogger(__name__)

RACK_LABEL = "topology.routed.dev/rack"  # node label that as-per-rack ASNs are keyed on
TOR_ASN = 65000
NODE_ASN_BASE = 65100
MAX_NODES = 250


def node_name(index: int) -> str:
    return f"node{index}"


CONTROL_PLANE: dict[str, Any] = {"ifname": "eth0", "address": "10.10.0.1", "tor_ifname": "ctl", "tor_address": "10.10.0.0",
                 "addresses": ["10.10.0.1"], "tor_addresses": ["10.10.0.0"]}
V4_LINK, V6_LINK = 31, 64  # prefix length of every point-to-point link per family


def link_addresses(family: int, k: int, i: int) -> tuple[str, str]:
    """(host side, ToR side) of link i on ToR k (0-based) in one family."""
    if family == 4:
        return f"10.{10 + k}.{i}.1", f"10.{10 + k}.{i}.0"
    return f"fd00:{10 + k}:{i:x}::2", f"fd00:{10 + k}:{i:x}::1"


def pod_cidr(family: int, i: int) -> str:
    return f"10.244.{i}.0/24" if family == 4 else f"fd00:10:244:{i:x}::/64"


EXTERNAL_LINK = 250  # a host outside the cluster behind ToR 1 (reaches Service VIPs the nodes announce)


def _link(families: tuple[int, ...], ifname: str, tor_ifname: str, link: int, k: int = 0) -> dict[str, Any]:
    """Link `link` on ToR k: its interfaces and addresses per family (the first family's also as address and
    tor_address)."""
    pairs = [link_addresses(f, k, link) for f in families]
    return {"ifname": ifname, "tor_ifname": tor_ifname, "address": pairs[0][0], "tor_address": pairs[0][1],
            "addresses": [p[0] for p in pairs], "tor_addresses": [p[1] for p in pairs]}


def link_side_addresses(link: dict[str, Any], tor: bool = False) -> list[str]:
    """Every address of one side of a link (the host's, or the ToR's); older states have only `address`."""
    side = "tor_" if tor else ""
    return list(link.get(f"{side}addresses") or [link[f"{side}address"]])


def of_family(addresses: Iterable[str], family: int) -> list[str]:
    """The addresses of one IP version, in order."""
    return [a for a in addresses if ipaddress.ip_address(a).version == family]


def plan(lab: str, nodes: int, tors: int = 1, topology: str = "as-per-node", tor_kind: str = "static",
         datastore: str = "manifest", ip_family: str = "ipv4") -> LabState:
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"--nodes must be between 1 and {MAX_NODES}")
    if tors not in (1, 2):
        raise ValueError("a lab has one or two ToRs")
    if ip_family not in FAMILIES:
        raise ValueError(f"--ip-family: one of {', '.join(FAMILIES)}")
    families = FAMILIES[ip_family]
    if datastore == "kube" and 4 not in families:
        raise ValueError("--datastore kube needs IPv4 (the control plane is reached over IPv4): use --ip-family dual")
    state = LabState(lab=lab, tor_kind=tor_kind, topology=topology, datastore=datastore, ip_family=ip_family)
    if datastore == "kube":  # the API server lives in its own namespace behind ToR 1, like a control-plane host
        state.control_plane = {**CONTROL_PLANE, "netns": f"rtd-{lab}-ctl", "tor": "tor1"}
    state.external = {**_link(families, "eth0", "ext", EXTERNAL_LINK), "netns": f"rtd-{lab}-ext",
                      "tor": "tor1"}
    for k in range(tors):
        state.tors.append(
            TorState(name=f"tor{k + 1}", netns=f"rtd-{lab}-tor{k + 1}", asn=TOR_ASN + k if topology != "ibgp" else TOR_ASN,
                     kind=tor_kind, address=f"10.{10 + k}.0.254")
        )
    for i in range(1, nodes + 1):
        rack = f"rack{(i + 1) // 2}"
        if topology == "as-per-rack":
            asn = NODE_ASN_BASE + (i + 1) // 2
        elif topology == "ibgp":
            asn = TOR_ASN
        else:
            asn = NODE_ASN_BASE + i
        uplinks = [{**_link(families, f"eth{k}", f"n{i}", i, k), "tor": tor.name} for k, tor in enumerate(state.tors)]
        cidrs = [pod_cidr(f, i) for f in families]
        state.nodes.append(
            NodeState(
                name=node_name(i),
                netns=f"rtd-{lab}-{node_name(i)}",
                address=uplinks[0]["address"],
                pod_cidr=cidrs[0],
                asn=asn,
                rack=rack,
                uplinks=uplinks,
                pod_cidrs=cidrs,
            )
        )
    return state


def _prefixlen(address: str) -> int:
    return V4_LINK if ipaddress.ip_address(address).version == 4 else V6_LINK


def _add_address(ns: str, address: str, dev: str) -> None:
    extra = ["nodad"] if ipaddress.ip_address(address).version == 6 else []  # usable at once
    netns.run(["ip", "-n", ns, "addr", "add", f"{address}/{_prefixlen(address)}", "dev", dev, *extra])


def _default_routes(ns: str, links: list[dict[str, Any]]) -> None:
    """One default route per family via the ToR side of every link (ECMP over several)."""
    for version in (4, 6):
        hops = [(a, link["ifname"]) for link in links for a in of_family(link_side_addresses(link, tor=True), version)]
        if not hops:
            continue
        if len(hops) == 1:
            netns.run(["ip", "-n", ns, f"-{version}", "route", "add", "default", "via", hops[0][0]])
            continue
        args: list[str] = []
        for gateway, dev in hops:
            args += ["nexthop", "via", gateway, "dev", dev]
        netns.run(["ip", "-n", ns, f"-{version}", "route", "add", "default", *args])


ROUTER_SYSCTLS = (
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv4.fib_multipath_hash_policy", "1"),
    ("net.ipv6.conf.all.forwarding", "1"),
    ("net.ipv6.fib_multipath_hash_policy", "1"),
)
NODE_SYSCTLS = ROUTER_SYSCTLS + (
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
    ("net.ipv4.conf.all.ignore_routes_with_linkdown", "1"),  # a dead uplink leaves ECMP at once
    ("net.ipv6.conf.all.ignore_routes_with_linkdown", "1"),
)


def build(state: LabState) -> None:
    """Create every namespace and link of the plan; static ToR routes when the ToR speaks no BGP."""
    for tor in state.tors:
        netns.create(tor.netns)
        for key, value in ROUTER_SYSCTLS:
            netns.sysctl(tor.netns, key, value)
    for node in state.nodes:
        netns.create(node.netns)
        for key, value in NODE_SYSCTLS:
            netns.sysctl(node.netns, key, value)
        for up in node.uplinks:
            tor = next(t for t in state.tors if t.name == up["tor"])
            netns.veth(node.netns, up["ifname"], tor.netns, up["tor_ifname"])
            for address in link_side_addresses(up):
                _add_address(node.netns, address, up["ifname"])
            for address in link_side_addresses(up, tor=True):
                _add_address(tor.netns, address, up["tor_ifname"])
        _default_routes(node.netns, node.uplinks)
    for host in (state.control_plane, state.external):
        if not host:
            continue
        tor = next(t for t in state.tors if t.name == host["tor"])
        netns.create(host["netns"])
        netns.veth(host["netns"], host["ifname"], tor.netns, host["tor_ifname"])
        for address in link_side_addresses(host):
            _add_address(host["netns"], address, host["ifname"])
        for address in link_side_addresses(host, tor=True):
            _add_address(tor.netns, address, host["tor_ifname"])
        _default_routes(host["netns"], [host])
    if state.tor_kind == "static":
        install_static_routes(state)


def install_static_routes(state: LabState) -> None:
    for tor in state.tors:
        for node in state.nodes:
            for up in node.uplinks:
                if up["tor"] != tor.name:
                    continue
                for cidr in node.cidrs():
                    version = ipaddress.ip_network(cidr).version
                    via = of_family(link_side_addresses(up), version)[0]
                    netns.run(["ip", "-n", tor.netns, "route", "replace", cidr, "via", via])


def destroy(lab: str) -> list[str]:
    return netns.delete_all(f"rtd-{lab}-")
