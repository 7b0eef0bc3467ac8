"""BGP in the lab with the real agent: FRR, BIRD 2 and GoBGP ToRs; ECMP; graceful restart; withdrawals; filters."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest

from routed import api, netns
from routed.constants import ROUTE_PROTO_BGP
from routed.lab.bgp_setup import HOLD_TIME, tor_router
from routed.lab.lab import Lab
from routed.lab.routers import kernel_routes
from tests.helpers import holds_for, run_and_expect
from tests.topo.lab_pods import one_pod_per_node

pytestmark = [pytest.mark.requires_root, pytest.mark.topo]


def bgp_routes(node_netns: str) -> dict[str, list[str]]:
    return {r["prefix"]: r["nexthops"] for r in kernel_routes(node_netns, protocol=str(ROUTE_PROTO_BGP))}


def tor_routes(tor_netns: str) -> dict[str, list[str]]:
    return {r["prefix"]: r["nexthops"] for r in kernel_routes(tor_netns)}


def up_with_pods(tmp_path, name: str, nodes: int, **kwargs) -> Lab:
    lab = Lab(name)
    manifest = tmp_path / "pods.yaml"
    manifest.write_text(one_pod_per_node(nodes))
    try:
        lab.up(nodes=nodes, files=[str(manifest)], **kwargs)
    except Exception:
        lab.down(quiet=True)
        raise
    return lab


def expect_full_routing(lab: Lab) -> None:
    state = lab.state()
    for tor in state.tors:
        want = {n.pod_cidr: sorted(u["address"] for u in n.uplinks if u["tor"] == tor.name) for n in state.nodes}
        ok, seen, _ = run_and_expect(lambda t=tor: tor_routes(t.netns),
                                     lambda r, w=want: all(r.get(c) == h for c, h in w.items()), timeout=30)
        for cidr, hops in want.items():
            assert seen.get(cidr) == hops, f"{tor.name}: {cidr} via {seen.get(cidr)}, want {hops}"
        assert ok, f"{tor.name}: routes {seen}, want {want}"
    for node in state.nodes:
        others = {n.pod_cidr for n in state.nodes if n.name != node.name}
        ok, seen, _ = run_and_expect(lambda n=node: bgp_routes(n.netns), lambda r, o=others: o <= set(r),
                                     timeout=30)
        assert ok, f"{node.name} learned {sorted(seen)}"
        assert node.pod_cidr not in seen, f"{node.name} installed its own prefix echoed back"


@pytest.mark.parametrize("tor", ["frr", "bird", "gobgp"])
def test_three_nodes_each_tor_kind(tmp_path, tor):
    lab = up_with_pods(tmp_path, f"tb{tor[:3]}", 3, tor=tor)
    try:
        expect_full_routing(lab)
        rows = run_and_expect(lambda: lab.matrix(protocols=["tcp"]), lambda rs: rs and all(r["allowed"] for r in rs),
                              timeout=20).check("every pod reaches every pod over TCP")
        assert all(r["client_seen"] == r["from_ip"] for r in rows)
        sessions = lab.status()["tors"][0]["sessions"]
        assert sum(1 for s in sessions if s["state"].lower() == "established") == 3, sessions
    finally:
        lab.down(quiet=True)
    assert netns.list_ours(f"rtd-tb{tor[:3]}-") == []


@pytest.fixture(scope="module")
def frr_lab(tmp_path_factory):
    lab = up_with_pods(tmp_path_factory.mktemp("frr"), "tbgp", 3, tor="frr")
    expect_full_routing(lab)
    yield lab
    lab.down(quiet=True)


def test_overlapping_and_own_routes_never_installed(frr_lab):
    state = frr_lab.state()
    node1 = state.node("node1")
    router = tor_router(frr_lab, state, "tor1")
    router.vtysh(f"configure terminal\nrouter bgp {state.tors[0].asn}\naddress-family ipv4 unicast\n"
                 "network 10.244.1.128/25\n")
    try:
        # node2 learns the /25 (proves it was announced) ...
        run_and_expect(lambda: bgp_routes(state.node("node2").netns), lambda r: "10.244.1.128/25" in r,
                       15).check("node2 learns 10.244.1.128/25")
        # ... node1 rejects it: it lies inside its own pod CIDR; and its own /24 echoed back is not installed
        received = api.call(frr_lab.paths.node_socket("node1"), "bgp.received")
        overlapping = [r for r in received if r["prefix"] == "10.244.1.128/25"]
        assert overlapping and not overlapping[0]["accepted"], received
        assert "10.244.1.128/25" not in bgp_routes(node1.netns)
        assert node1.pod_cidr not in bgp_routes(node1.netns)
    finally:
        router.vtysh(f"configure terminal\nrouter bgp {state.tors[0].asn}\naddress-family ipv4 unicast\n"
                     "no network 10.244.1.128/25\n")


def _agent_and_speaker_pids(lab: Lab, node: str) -> tuple[int, int]:
    status = api.call(lab.paths.node_socket(node), "status")
    return int(lab.paths.agent_pid(node).read_text()), int(status["bgp"]["exabgpPid"])


def test_kill_9_agent_loses_no_packets(frr_lab):
    state = frr_lab.state()
    src = state.pods["t/p2"]
    dst = state.pods["t/p1"]
    agent_pid, speaker_pid = _agent_and_speaker_pids(frr_lab, "node1")
    ping = subprocess.Popen(netns.ns_cmd(src.netns, ["ping", "-n", "-q", "-i", "0.02", "-w", "14", dst.ips[0]]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # let the ping loop get going: it stays up (still sending) for 1 s before the kill
        holds_for(ping.poll, None, 1.0).check("ping running before the kill")
        os.kill(agent_pid, signal.SIGKILL)
        try:
            os.kill(speaker_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        run_and_expect(lambda: int(frr_lab.paths.agent_pid("node1").read_text()),
                       lambda p: p != agent_pid, timeout=10).check("node1's agent restarted (new pid)")
        out, _ = ping.communicate(timeout=30)
    finally:
        if ping.poll() is None:
            ping.kill()
    match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert match, out
    sent, received = int(match.group(1)), int(match.group(2))
    assert sent > 300 and received == sent, out
    # and everything converges again after the restart
    run_and_expect(lambda: frr_lab.agent_status("node1") or {}, lambda s: s.get("ready"),
                   timeout=30).check("node1 ready after the restart")
    expect_full_routing(frr_lab)


def test_stopped_node_withdrawn_within_hold_time(frr_lab):
    state = frr_lab.state()
    node3 = state.node("node3")
    tor = state.tors[0]
    agent_pid, speaker_pid = _agent_and_speaker_pids(frr_lab, "node3")
    pids = [agent_pid, speaker_pid]
    for pid in pids:  # a node that stops dead: no FIN, no NOTIFICATION
        os.kill(pid, signal.SIGSTOP)
    try:
        ok, _, _ = run_and_expect(lambda: tor_routes(tor.netns), lambda r: node3.pod_cidr not in r,
                                  timeout=HOLD_TIME + 4)
        assert ok, f"{node3.pod_cidr} still on the ToR after the hold time"
        for other in ("node1", "node2"):
            run_and_expect(lambda o=other: bgp_routes(state.node(o).netns), lambda r: node3.pod_cidr not in r,
                           timeout=5).check(f"{other} withdrew {node3.pod_cidr}")
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    expect_full_routing(frr_lab)


def test_dual_homed_ecmp_survives_one_tor_down(tmp_path):
    lab = up_with_pods(tmp_path, "tecmp", 2, tor="frr", tors=2)
    try:
        expect_full_routing(lab)
        state = lab.state()
        node1 = state.node("node1")
        routes = bgp_routes(node1.netns)
        assert len(routes[state.node("node2").pod_cidr]) == 2, routes
        # ToR 1 fails: all its links go down
        tor1 = state.tors[0]
        for link in json.loads(netns.run(["ip", "-n", tor1.netns, "-j", "link", "show"]).stdout):
            if link["ifname"] != "lo":
                netns.run(["ip", "-n", tor1.netns, "link", "set", link["ifname"], "down"])
        run_and_expect(lambda: lab.matrix(protocols=["tcp"], timeout=0.5),
                       lambda rs: rs and all(r["allowed"] for r in rs),
                       timeout=HOLD_TIME + 10).check("every pod reaches every pod with ToR 1 down")
        single = run_and_expect(lambda: bgp_routes(node1.netns),
                                lambda r: len(r.get(state.node("node2").pod_cidr, [])) == 1,
                                timeout=HOLD_TIME + 5).check("one path left to node2's CIDR")
        assert single[state.node("node2").pod_cidr] == [state.node("node1").uplinks[1]["tor_address"]]
    finally:
        lab.down(quiet=True)


@pytest.mark.parametrize("topology", ["as-per-rack", "ibgp"])
def test_rack_and_ibgp_topologies(tmp_path, topology):
    lab = up_with_pods(tmp_path, f"t{topology[:4].replace('-', '')}", 3, tor="frr", topology_kind=topology)
    try:
        state = lab.state()
        asns = [n.asn for n in state.nodes]
        if topology == "as-per-rack":
            assert asns[0] == asns[1] != asns[2]  # node1 and node2 share rack1
        else:
            assert set(asns) == {state.tors[0].asn}
        expect_full_routing(lab)
        run_and_expect(lambda: lab.matrix(protocols=["tcp"]), lambda rs: rs and all(r["allowed"] for r in rs),
                       timeout=20).check("every pod reaches every pod over TCP")
    finally:
        lab.down(quiet=True)
