"""BFD between the agents and FRR's bfdd on dual-homed ToRs: sessions Up on both sides, and a hung ToR (daemons
stopped, links up) is routed around well inside the BGP hold time. bench/bfd_failover.py measures the loss
with and without BFD in one run."""

from __future__ import annotations

import os

import pytest

from routed import api
from routed.lab import failover
from routed.lab.bgp_setup import tor_router
from routed.lab.lab import Lab
from routed.lab.routers import kernel_routes
from tests.helpers import run_and_expect

pytestmark = [pytest.mark.requires_root, pytest.mark.topo]
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "lab", "two-nodes.yaml")
HOLD_TIME = 9.0


@pytest.fixture(scope="module")
def lab():
    lab = Lab("tbfd")
    try:
        lab.up(nodes=2, files=[EXAMPLE], tor="frr", tors=2, bfd=True)
        yield lab
    finally:
        lab.down(quiet=True)


def agent_bfd(lab: Lab, node: str) -> dict[str, dict]:
    status = api.call(lab.paths.node_socket(node), "bgp.status")
    return {b["peer"]: b for b in status["bfd"]}


def frr_bfd(lab: Lab, tor: str) -> dict[str, dict]:
    return {p["peer"]: p for p in tor_router(lab, lab.state(), tor).bfd_peers()}


def all_up(lab: Lab) -> bool:
    state = lab.state()
    for node in state.nodes:
        sessions = agent_bfd(lab, node.name)
        if len(sessions) != len(node.uplinks) or any(s["state"] != "up" for s in sessions.values()):
            return False
    for tor in state.tors:
        peers = frr_bfd(lab, tor.name)
        if len(peers) != len(state.nodes) or any(p.get("status") != "up" for p in peers.values()):
            return False
    return True


def test_bfd_up_on_both_sides(lab):
    run_and_expect(lambda: all_up(lab), True, timeout=30).check("BFD Up on every agent and every ToR")
    state = lab.state()
    node = state.nodes[0]
    for up in node.uplinks:
        mine = agent_bfd(lab, node.name)[up["tor_address"]]
        theirs = frr_bfd(lab, up["tor"])[up["address"]]
        # the discriminators each side learned are the other side's own
        assert mine["remoteDiscriminator"] == theirs["id"] and theirs["remote-id"] == mine["localDiscriminator"]
        assert mine["txIntervalMs"] == 100 and mine["detectionTimeMs"] == 300
    status = api.call(lab.paths.node_socket(node.name), "status")
    assert {p["address"]: p["bfd"] for p in status["bgp"]["peers"]} == {
        up["tor_address"]: "up" for up in node.uplinks}


def test_hung_tor_is_routed_around_within_a_second(lab):
    run_and_expect(lambda: all_up(lab), True, timeout=30).check("BFD Up everywhere")
    state = lab.state()
    src, dst = "demo/client-1", "demo/web-2"
    node1 = state.node(state.pods[src].node)
    dst_cidr = state.node(state.pods[dst].node).pod_cidr
    ping = failover.Ping(lab, src, dst)
    tor = failover.carrying_tor(lab, node1.name)
    tor_address = next(u["tor_address"] for u in node1.uplinks if u["tor"] == tor)
    assert ping.proc.poll() is None, "ping running"
    pids = failover.freeze_tor(lab, tor)
    try:
        down = run_and_expect(lambda: agent_bfd(lab, node1.name)[tor_address],
                              lambda s: s["state"] == "down", timeout=HOLD_TIME / 2).check(
            f"BFD declares {tor} down well before the {HOLD_TIME:.0f} s hold time")
        assert down["localDiag"] == "controlDetectionTimeExpired"
        # the routes through the hung ToR are gone from the kernel; its ECMP sibling stays
        outcome = run_and_expect(lambda: {r["prefix"]: r["nexthops"] for r in kernel_routes(node1.netns)},
                                 lambda r: tor_address not in r.get(dst_cidr, [tor_address]), timeout=2)
        if not outcome.ok:  # say what the agent saw: its BFD and BGP view and the end of its log
            status = api.call(lab.paths.node_socket(node1.name), "bgp.status")
            received = api.call(lab.paths.node_socket(node1.name), "bgp.received")
            log_tail = lab.paths.agent_log(node1.name).read_text().splitlines()[-40:]
            pytest.fail(f"route via the hung ToR {tor_address} still in the kernel after 2 s: {outcome.last}\n"
                        f"bfd={status['bfd']}\npeers={status['peers']}\nreceived={received}\n" + "\n".join(log_tail))
        routes = outcome.last
        assert routes[dst_cidr], "the other ToR's next hop must stay"
        bgp = {p["address"]: p for p in api.call(lab.paths.node_socket(node1.name), "bgp.status")["peers"]}
        run_and_expect(lambda: {p["address"]: p["state"] for p in api.call(
            lab.paths.node_socket(node1.name), "bgp.status")["peers"]}[tor_address], lambda s: s != "established",
                       timeout=5).check("BGP session to the hung ToR torn down")
        assert "BFD down" in bgp[tor_address]["lastError"] or bgp[tor_address]["state"] != "established"
        outage = ping.stop()
    finally:
        if ping.proc.poll() is None:
            ping.proc.kill()
        failover.thaw_tor(lab, tor, pids)
    assert outage.received > 0
    assert outage.longest_gap_s < 2.0, f"{outage} (hold time {HOLD_TIME} s; bench/bfd_failover.py measures it)"
    # the ToR comes back: BFD Up, the session re-established, ECMP through both ToRs again
    run_and_expect(lambda: all_up(lab), True, timeout=30).check("BFD Up again after the ToR recovers")
    run_and_expect(lambda: sorted({r["prefix"]: r["nexthops"] for r in kernel_routes(node1.netns)}.get(dst_cidr, [])),
                   sorted(u["tor_address"] for u in node1.uplinks), timeout=30).check("ECMP via both ToRs again")
