"""Dual-stack and IPv6-only labs: every pod gets an address per family, each ToR kind (FRR, BIRD, GoBGP)
learns every node's IPv6 pod CIDR over BGP into its kernel, and IPv6 pod traffic crosses the fabric with the
pods' own addresses (no NAT, no encapsulation)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from routed import api, netns
from routed.lab.bgp_setup import tor_router
from routed.lab.lab import Lab
from routed.lab.routers import kernel_routes
from routed.lab.state import LabState
from tests.helpers import run_and_expect

pytestmark = [pytest.mark.requires_root, pytest.mark.topo]
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "lab", "two-nodes.yaml")


def v6(ips: list[str]) -> str:
    return next(ip for ip in ips if ipaddress.ip_address(ip).version == 6)


@contextlib.contextmanager
def tor_capture(tor_ns: str, iface: str, bpf: str) -> Iterator[list[str]]:
    """tcpdump on a ToR interface while the body runs; the list yielded holds its output afterwards."""
    captured: list[str] = []
    capture = subprocess.Popen(netns.ns_cmd(tor_ns, ["tcpdump", "-l", "-n", "--immediate-mode", "-i", iface, bpf]),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert capture.stderr is not None
        ok, banner, _ = run_and_expect(capture.stderr.readline, lambda line: "listening on" in line or not line,
                                       timeout=5)
        assert ok and "listening on" in banner, f"tcpdump not capturing: {banner!r}"
        yield captured
    finally:
        capture.terminate()
        out, _ = capture.communicate(timeout=10)
        captured.append(out)


def expect_tor_routes(state: LabState, family: int) -> None:
    """Each ToR's kernel: every node's pod CIDR of `family` via that node's uplink address of the family, by BGP."""
    for tor in state.tors:
        want = {}
        for node in state.nodes:
            cidr = next(c for c in node.cidrs() if ipaddress.ip_network(c).version == family)
            up = next(u for u in node.uplinks if u["tor"] == tor.name)
            want[cidr] = [next(a for a in up["addresses"] if ipaddress.ip_address(a).version == family)]

        def learned(tor_ns: str = tor.netns, wanted: dict[str, list[str]] = want) -> dict[str, list[str]]:
            return {r["prefix"]: r["nexthops"] for r in kernel_routes(tor_ns, family) if r["prefix"] in wanted}

        run_and_expect(learned, want, timeout=30).check(f"{tor.name} ({tor.kind}) kernel routes, IPv{family}")
        protocols = {r["prefix"]: r["protocol"] for r in kernel_routes(tor.netns, family) if r["prefix"] in want}
        assert set(protocols.values()) <= {"bgp", "bird"}, protocols  # BIRD installs its routes as proto bird


def expect_matrix(lab: Lab, family: int) -> None:
    rows = run_and_expect(lambda: lab.matrix(family=family), lambda rs: rs and all(r["allowed"] for r in rs),
                          timeout=20).check(f"every IPv{family} probe allowed")
    for row in rows:
        assert ipaddress.ip_address(row["ip"]).version == family
        assert row["server"] == row["to"]
        assert row["client_seen"] == row["from_ip"], f"NAT seen on {row}"


@pytest.fixture(scope="module", params=["frr", "bird", "gobgp"])
def dual_lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    lab = Lab(f"tds{request.param[:2]}")
    lab.up(nodes=3, files=[EXAMPLE], tor=request.param, ip_family="dual")
    yield lab
    lab.down()
    assert netns.list_ours(f"rtd-{lab.name}-") == []


def test_every_pod_has_both_families(dual_lab: Lab) -> None:
    state = dual_lab.state()
    assert len(state.pods) == 4
    for pod in state.pods.values():
        cidrs = state.node(pod.node).cidrs()
        assert [ipaddress.ip_address(ip).version for ip in pod.ips] == [4, 6], pod
        for ip, cidr in zip(pod.ips, cidrs, strict=True):
            assert ipaddress.ip_address(ip) in ipaddress.ip_network(cidr), (pod.key, ip, cidr)


def test_tor_kernel_has_every_ipv6_pod_cidr(dual_lab: Lab) -> None:
    state = dual_lab.state()
    expect_tor_routes(state, 6)
    expect_tor_routes(state, 4)
    # and each node installed the other nodes' IPv6 pod CIDRs (proto 202) via the ToR's IPv6 address
    for node in state.nodes:
        routes = {r["prefix"] for r in kernel_routes(node.netns, 6, "202")}
        others = {c for n in state.nodes if n is not node for c in n.cidrs() if ":" in c}
        assert others <= routes, (node.name, routes)


def test_cross_node_ipv6_tcp_udp_without_nat(dual_lab: Lab) -> None:
    expect_matrix(dual_lab, 6)
    expect_matrix(dual_lab, 4)


def test_tor_link_carries_pod_ipv6_addresses(dual_lab: Lab) -> None:
    state = dual_lab.state()
    src, dst = state.pods["demo/client-1"], state.pods["demo/web-2"]
    src_ip, dst_ip = v6(src.ips), v6(dst.ips)
    uplink = state.node(src.node).uplinks[0]["tor_ifname"]
    with tor_capture(state.tors[0].netns, uplink,
                     f"ip6 and tcp and src host {src_ip} and dst host {dst_ip} and dst port 80") as captured:
        run_and_expect(lambda: dual_lab.matrix(ports=[80], protocols=["tcp"], family=6),
                       lambda rows: rows and all(r["allowed"] for r in rows), timeout=10).check("IPv6 TCP 80")
    out = captured[0]
    # tcpdump's filter matched the plain IPv6 header: the pod addresses are the outer (only) header
    assert any(f"{src_ip}." in line and f"{dst_ip}.80" in line for line in out.splitlines()), out
    for node in state.nodes:
        links = json.loads(netns.run(["ip", "-n", node.netns, "-d", "-j", "link", "show"]).stdout)
        kinds = {(link.get("linkinfo") or {}).get("info_kind") for link in links}
        assert not kinds & {"vxlan", "ipip", "ip6tnl", "gre", "ip6gre", "geneve", "wireguard"}, kinds


def test_ipv6_only_lab() -> None:
    lab = Lab("tv6only")
    try:
        lab.up(nodes=2, files=[EXAMPLE], tor="frr", ip_family="ipv6")
        state = lab.state()
        for pod in state.pods.values():
            assert [ipaddress.ip_address(ip).version for ip in pod.ips] == [6], pod
        for node in state.nodes:  # no IPv4 address on any uplink
            assert "inet " not in netns.run(["ip", "-n", node.netns, "addr", "show", "dev", "eth0"]).stdout
        expect_tor_routes(state, 6)
        expect_matrix(lab, 6)
        status = lab.status()
        assert status["ipFamily"] == "ipv6"
        assert all(n["pod_cidrs"] == [n["pod_cidr"]] and ":" in n["pod_cidr"] for n in status["nodes"])
    finally:
        lab.down()
    assert netns.list_ours("rtd-tv6only-") == []


DENY_ALL = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "policies", "deny-all.yaml")
UDP_SEND = ("import socket,sys,time\n"
            "s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM); s.bind((sys.argv[1],0))\n"
            "for _ in range(20):\n    s.sendto(b'x',(sys.argv[2],80)); time.sleep(0.02)\n")


def packets_on_tor_link(lab: Lab, pod: str, src: str, dst: str) -> int:
    """IPv6 UDP packets from `src` to `dst`:80 seen on the ToR side of the pod's node uplink while the pod
    sends 20 of them from source address `src`."""
    state = lab.state()
    uplink = state.node(state.pods[pod].node).uplinks[0]["tor_ifname"]
    with tor_capture(state.tors[0].netns, uplink, f"ip6 and udp and src host {src} and dst host {dst}") as captured:
        netns.ns_run(state.pods[pod].netns, [sys.executable, "-c", UDP_SEND, src, dst], check=True)
    out = captured[0]
    return sum(1 for line in out.splitlines() if f"{src}." in line)


def test_ipv6_spoofed_source_is_dropped(dual_lab: Lab) -> None:
    if dual_lab.state().tor_kind != "frr":
        pytest.skip("the node's datapath does not depend on the ToR kind: FRR only")
    state = dual_lab.state()
    client, victim, target = (state.pods[k] for k in ("demo/client-1", "demo/client-2", "demo/web-2"))
    spoofed = v6(victim.ips)
    netns.ns_run(client.netns, ["ip", "-6", "addr", "add", f"{spoofed}/128", "dev", "eth0", "nodad"], check=True)
    try:
        # control: the real source leaves the node (the first packets may wait for neighbour discovery)
        assert packets_on_tor_link(dual_lab, client.key, v6(client.ips), v6(target.ips)) >= 15
        assert packets_on_tor_link(dual_lab, client.key, spoofed, v6(target.ips)) == 0
    finally:
        netns.ns_run(client.netns, ["ip", "-6", "addr", "del", f"{spoofed}/128", "dev", "eth0"])


def test_neighbour_discovery_under_deny_all(dual_lab: Lab) -> None:
    if dual_lab.state().tor_kind != "frr":
        pytest.skip("the node's datapath does not depend on the ToR kind: FRR only")
    state = dual_lab.state()
    pod = state.pods["demo/web-1"]
    node = state.node(pod.node)
    endpoint = next(e for e in api.call(dual_lab.paths.node_socket(node.name), "endpoints.list")
                    if e["podName"] == "web-1")
    dual_lab.apply(DENY_ALL)
    try:
        run_and_expect(lambda: dual_lab.matrix(ports=[80], protocols=["tcp"], family=6),
                       lambda rows: rows and not any(r["allowed"] for r in rows if r["from"] != r["to"]),
                       timeout=20).check("deny-all in force on IPv6")
        # both directions of neighbour discovery start from scratch under the policy
        netns.ns_run(pod.netns, ["ip", "-6", "neigh", "flush", "dev", "eth0"], check=True)
        netns.ns_run(node.netns, ["ip", "-6", "neigh", "flush", "dev", endpoint["hostIfname"]], check=True)
        # the node still reaches its pod (host traffic is exempt), resolving the pod's /128 by NS/NA
        assert netns.ns_run(node.netns, ["ping", "-c", "2", "-W", "1", v6(pod.ips)], check=False).returncode == 0
        # and the pod resolves its gateway fe80::1 (its own probe is denied by policy, the NS is not)
        netns.ns_run(pod.netns, ["ping", "-c", "1", "-W", "1", v6(state.pods["demo/web-2"].ips)], check=False)
        neigh = run_and_expect(lambda: netns.ns_run(pod.netns, ["ip", "-6", "neigh", "show", "fe80::1"],
                                                    check=False).stdout,
                               lambda out: any(s in out for s in ("REACHABLE", "STALE", "DELAY", "PROBE")),
                               timeout=5).check("fe80::1 resolved from inside the pod")
        assert "FAILED" not in neigh
    finally:
        dual_lab.delete(DENY_ALL)
    expect_matrix(dual_lab, 6)


@pytest.mark.parametrize("tor", ["frr", "bird"])
def test_ipv6_over_the_ipv4_session(tor: str) -> None:
    """The other fabric design: one IPv4 session per node and ToR carries IPv6 unicast with explicit global IPv6
    next hops both ways (the node's link address out, the ToR's link address in)."""
    lab = Lab(f"tv6o4{tor[:2]}")
    try:
        lab.up(nodes=2, files=[EXAMPLE], tor=tor, ip_family="dual", ipv6_over_ipv4=True)
        state = lab.state()
        sessions = lab.status()["tors"][0]["sessions"]
        assert sorted(s["peer"] for s in sessions) == sorted(n.address for n in state.nodes), sessions
        expect_tor_routes(state, 6)
        expect_tor_routes(state, 4)
        for node in state.nodes:  # learned over the IPv4 session, installed via the ToR's IPv6 link address
            tor_v6 = next(a for a in node.uplinks[0]["tor_addresses"] if ":" in a)
            routes = {r["prefix"]: r["nexthops"] for r in kernel_routes(node.netns, 6, "202")}
            others = {c for n in state.nodes if n is not node for c in n.cidrs() if ":" in c}
            assert others and all(routes.get(c) == [tor_v6] for c in others), (node.name, routes)
        expect_matrix(lab, 6)
    finally:
        lab.down()
    assert netns.list_ours(f"rtd-{lab.name}-") == []


def test_bfd_on_both_families() -> None:
    """BFD (RFC 5881: IPv4 TTL / IPv6 hop limit 255) on the IPv4 and the IPv6 session of every node, against
    FRR's bfdd; the discriminators each side learned are the other's."""
    lab = Lab("tv6bfd")
    try:
        lab.up(nodes=2, tor="frr", ip_family="dual", bfd=True)
        state = lab.state()
        tor = tor_router(lab, state, "tor1")
        want = {a for n in state.nodes for a in n.uplinks[0]["addresses"]}

        def frr_up() -> dict[str, str]:
            return {p["peer"]: p.get("status", "") for p in tor.bfd_peers()}

        run_and_expect(frr_up, dict.fromkeys(want, "up"), timeout=30).check("FRR: BFD up on both families")
        for node in state.nodes:
            sessions = {b["peer"]: b for b in api.call(lab.paths.node_socket(node.name), "bgp.status")["bfd"]}
            theirs = {p["peer"]: p for p in tor.bfd_peers()}
            for mine_addr, their_addr in zip(node.uplinks[0]["tor_addresses"], node.uplinks[0]["addresses"],
                                             strict=True):
                mine = sessions[mine_addr]
                assert mine["state"] == "up", mine
                assert mine["remoteDiscriminator"] == theirs[their_addr]["id"]
    finally:
        lab.down()
    assert netns.list_ours("rtd-tv6bfd-") == []
