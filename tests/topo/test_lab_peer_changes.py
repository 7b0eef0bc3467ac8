"""Hitless peer changes: adding or removing one BGPPeer reloads ExaBGP's configuration instead of restarting it,
so the node's other sessions are never reset (FRR's own counters and uptime say so)."""

from __future__ import annotations

import json

import pytest
import yaml

from routed.lab.bgp_setup import tor_router
from routed.lab.lab import Lab
from tests.helpers import holds_for, run_and_expect

pytestmark = [pytest.mark.requires_root, pytest.mark.topo]


@pytest.fixture(scope="module")
def lab():
    lab = Lab("tpeer")
    try:
        lab.up(nodes=2, tor="frr", tors=2)
        yield lab
    finally:
        lab.down(quiet=True)


def neighbor(lab: Lab, tor: str, address: str) -> dict:
    out = tor_router(lab, lab.state(), tor).vtysh(f"show bgp neighbors {address} json")
    return json.loads(out)[address]


def established(lab: Lab, tor: str, address: str) -> bool:
    return neighbor(lab, tor, address).get("bgpState") == "Established"


def counters(lab: Lab, tor: str, address: str) -> tuple[int, int]:
    n = neighbor(lab, tor, address)
    return n.get("connectionsEstablished", 0), n.get("connectionsDropped", 0)


def up_since(lab: Lab, tor: str, address: str) -> int:
    """When FRR says the session came up (epoch seconds; FRR derives it from the uptime, so it may move by 1)."""
    return int(neighbor(lab, tor, address).get("bgpTimerUpEstablishedEpoch", 0))


def test_adding_and_removing_a_peer_never_resets_the_other_session(lab, tmp_path):
    state = lab.state()
    node1 = state.node("node1")
    up1 = next(u for u in node1.uplinks if u["tor"] == "tor1")
    up2 = next(u for u in node1.uplinks if u["tor"] == "tor2")
    run_and_expect(lambda: established(lab, "tor1", up1["address"]) and established(lab, "tor2", up2["address"]),
                   True, timeout=60).check("both sessions up")
    before = counters(lab, "tor1", up1["address"])
    since = up_since(lab, "tor1", up1["address"])
    restarts = lab.agent_status("node1")["bgp"]["exabgpRestarts"]
    peer = {"apiVersion": "routed.dev/v1alpha1", "kind": "BGPPeer", "metadata": {"name": "node1-tor2"},
            "spec": {"peerIP": up2["tor_address"], "asNumber": state.tors[1].asn, "node": "node1"}}
    path = tmp_path / "peer.yaml"
    path.write_text(yaml.safe_dump(peer))

    def tor1_untouched() -> bool:
        return (established(lab, "tor1", up1["address"]) and counters(lab, "tor1", up1["address"]) == before
                and abs(up_since(lab, "tor1", up1["address"]) - since) <= 1)  # an unbroken uptime

    lab.delete(str(path))  # remove the tor2 peer of node1
    run_and_expect(lambda: established(lab, "tor2", up2["address"]), False, timeout=30).check("tor2 session gone")
    holds_for(tor1_untouched, True, 3).check("tor1's session kept while tor2's peer went")
    lab.apply(str(path))  # and add it back
    run_and_expect(lambda: established(lab, "tor2", up2["address"]), True, timeout=60).check("tor2 session back")
    holds_for(tor1_untouched, True, 3).check("tor1's session kept while tor2's peer came")
    bgp = lab.agent_status("node1")["bgp"]
    assert bgp["exabgpRestarts"] == restarts and bgp["exabgpReloads"] >= 2, bgp
