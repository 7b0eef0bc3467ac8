"""The lab's network: one or two ToR namespaces and N node namespaces, each node with an uplink per ToR.

Addressing (node i is 1-based, ToR k is 0-based):
  uplink of node i to ToR k: 10.(10+k).i.0/31 — ToR .0, node .1 ; node i's InternalIP = its first uplink address
  pod CIDR of node i: 10.244.i.0/24
Nodes have a default route to their ToR(s) (ECMP with two), which proxy ARP on pod veths needs.
"""

from __future__ import annotations

import logging

from routed import netns
from routed.lab.state import LabState, NodeState, TorState

log = logging.getLogger(__name__)

RACK_LABEL = "topology.routed.dev/rack"  # node label that as-per-rack ASNs are keyed on
TOR_ASN = 65000
NODE_ASN_BASE = 65100
MAX_NODES = 250


def node_name(index: int) -> str:
    return f"node{index}"


CONTROL_PLANE = {"ifname": "eth0", "address": "10.10.0.1", "tor_ifname": "ctl", "tor_address": "10.10.0.0"}
# a host outside the cluster behind ToR 1 (reaches Service VIPs the nodes announce)
EXTERNAL_CLIENT = {"ifname": "eth0", "address": "10.10.250.1", "tor_ifname": "ext", "tor_address": "10.10.250.0"}


def plan(lab: str, nodes: int, tors: int = 1, topology: str = "as-per-node", tor_kind: str = "static",
         datastore: str = "manifest") -> LabState:
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"--nodes must be between 1 and {MAX_NODES}")
    if tors not in (1, 2):
        raise ValueError("a lab has one or two ToRs")
    state = LabState(lab=lab, tor_kind=tor_kind, topology=topology, datastore=datastore)
    if datastore == "kube":  # the API server lives in its own namespace behind ToR 1, like a control-plane host
        state.control_plane = {**CONTROL_PLANE, "netns": f"rtd-{lab}-ctl", "tor": "tor1"}
    state.external = {**EXTERNAL_CLIENT, "netns": f"rtd-{lab}-ext", "tor": "tor1"}
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
        uplinks = [
            {
                "ifname": f"eth{k}",
                "address": f"10.{10 + k}.{i}.1",
                "tor": tor.name,
                "tor_ifname": f"n{i}",
                "tor_address": f"10.{10 + k}.{i}.0",
            }
            for k, tor in enumerate(state.tors)
        ]
        state.nodes.append(
            NodeState(
                name=node_name(i),
                netns=f"rtd-{lab}-{node_name(i)}",
                address=uplinks[0]["address"],
                pod_cidr=f"10.244.{i}.0/24",
                asn=asn,
                rack=rack,
                uplinks=uplinks,
            )
        )
    return state


def build(state: LabState) -> None:
    """Create every namespace and link of the plan; static ToR routes when the ToR speaks no BGP."""
    for tor in state.tors:
        netns.create(tor.netns)
        netns.sysctl(tor.netns, "net.ipv4.ip_forward", "1")
        netns.sysctl(tor.netns, "net.ipv4.fib_multipath_hash_policy", "1")
    for node in state.nodes:
        netns.create(node.netns)
        for key, value in (
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.fib_multipath_hash_policy", "1"),
            ("net.ipv4.conf.all.ignore_routes_with_linkdown", "1"),  # a dead uplink leaves ECMP at once
        ):
            netns.sysctl(node.netns, key, value)
        gateways = []
        for up in node.uplinks:
            tor = next(t for t in state.tors if t.name == up["tor"])
            netns.veth(node.netns, up["ifname"], tor.netns, up["tor_ifname"])
            netns.run(["ip", "-n", node.netns, "addr", "add", f"{up['address']}/31", "dev", up["ifname"]])
            netns.run(["ip", "-n", tor.netns, "addr", "add", f"{up['tor_address']}/31", "dev", up["tor_ifname"]])
            gateways.append(up)
        if len(gateways) == 1:
            netns.run(["ip", "-n", node.netns, "route", "add", "default", "via", gateways[0]["tor_address"]])
        else:
            hops: list[str] = []
            for up in gateways:
                hops += ["nexthop", "via", up["tor_address"], "dev", up["ifname"]]
            netns.run(["ip", "-n", node.netns, "route", "add", "default", *hops])
    for host in (state.control_plane, state.external):
        if not host:
            continue
        tor = next(t for t in state.tors if t.name == host["tor"])
        netns.create(host["netns"])
        netns.veth(host["netns"], host["ifname"], tor.netns, host["tor_ifname"])
        netns.run(["ip", "-n", host["netns"], "addr", "add", f"{host['address']}/31", "dev", host["ifname"]])
        netns.run(["ip", "-n", tor.netns, "addr", "add", f"{host['tor_address']}/31", "dev", host["tor_ifname"]])
        netns.run(["ip", "-n", host["netns"], "route", "add", "default", "via", host["tor_address"]])
    if state.tor_kind == "static":
        install_static_routes(state)


def install_static_routes(state: LabState) -> None:
    for tor in state.tors:
        for node in state.nodes:
            for up in node.uplinks:
                if up["tor"] == tor.name:
                    netns.run(["ip", "-n", tor.netns, "route", "replace", node.pod_cidr, "via", up["address"]])


def destroy(lab: str) -> list[str]:
    return netns.delete_all(f"rtd-{lab}-")
