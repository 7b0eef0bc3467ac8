"""Route table manager against a real kernel table inside an rtd-bgp-rt namespace."""

import asyncio
import json
import os

import pytest

from routed import netns
from routed.bgp.manager import BgpInputs, BgpManager
from routed.bgp.rib import parse_message
from routed.config import BgpOptions
from routed.lab.routers import kernel_routes
from routed.model import Node
from routed.routes import Gone, RouteTable

pytestmark = pytest.mark.netns
PREFIX = "rtd-bgp-rt"
NS = f"{PREFIX}-a"
G1, G2 = "10.9.0.2", "10.9.0.3"


@pytest.fixture(scope="module")
def ns():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    netns.delete_all(PREFIX)
    netns.create(NS)
    netns.create(f"{PREFIX}-b")
    netns.veth(NS, "eth0", f"{PREFIX}-b", "eth0")
    netns.ns_run(NS, ["ip", "addr", "add", "10.9.0.1/24", "dev", "eth0"])
    yield NS
    netns.delete_all(PREFIX)


def routes(proto=None):
    return {r["prefix"]: r["nexthops"] for r in kernel_routes(NS, protocol=proto)}


def run(coro):
    return asyncio.run(coro)


async def apply_all(table, *steps):
    out = []
    for desired, prune, *gone in steps:
        out.append(await table.apply(desired, prune=prune, gone=gone[0] if gone else None))
    await table.close()
    return out


def test_apply_ecmp_idempotent_replace_remove(ns):
    t = RouteTable(netns=ns)
    d1 = {"10.50.1.0/24": frozenset({G1}), "10.50.2.0/24": frozenset({G1, G2})}
    r1, r2 = run(apply_all(t, (d1, True), (d1, True)))
    assert sorted(r1.added) == ["10.50.1.0/24", "10.50.2.0/24"]
    assert not r2.changed, "second apply must change nothing"
    assert routes("202") == {"10.50.1.0/24": [G1], "10.50.2.0/24": [G1, G2]}
    (r3,) = run(apply_all(RouteTable(netns=ns), ({"10.50.2.0/24": frozenset({G2})}, True)))
    assert r3.replaced == ["10.50.2.0/24"] and r3.removed == ["10.50.1.0/24"]
    assert routes("202") == {"10.50.2.0/24": [G2]}
    run(apply_all(RouteTable(netns=ns), ({}, True)))
    assert routes("202") == {}


def test_never_touches_other_protocols(ns):
    netns.ns_run(ns, ["ip", "route", "add", "10.60.0.0/24", "via", G1, "proto", "static"])
    netns.ns_run(ns, ["ip", "route", "add", "10.61.0.0/24", "via", G1, "proto", "201"])
    try:
        desired = {"10.60.0.0/24": frozenset({G2}), "10.9.0.0/24": frozenset({G2}), "10.62.0.0/24": frozenset({G2})}
        r1, r2 = run(apply_all(RouteTable(netns=ns), (desired, True), ({}, True)))
        assert sorted(r1.conflicts) == ["10.60.0.0/24", "10.9.0.0/24"]
        assert r1.added == ["10.62.0.0/24"] and r2.removed == ["10.62.0.0/24"]
        all_routes = routes()
        assert all_routes["10.60.0.0/24"] == [G1] and all_routes["10.61.0.0/24"] == [G1]
        assert "10.9.0.0/24" in all_routes  # connected route untouched
    finally:
        netns.ns_run(ns, ["ip", "route", "del", "10.60.0.0/24"], check=False)
        netns.ns_run(ns, ["ip", "route", "del", "10.61.0.0/24"], check=False)


def test_no_prune_keeps_previous_run_routes(ns):
    # a previous run left two routes; after restart only one peer has re-learned one of them
    run(apply_all(RouteTable(netns=ns), ({"10.70.1.0/24": frozenset({G1, G2}), "10.70.2.0/24": frozenset({G1})},
                                         True)))
    t = RouteTable(netns=ns)
    r1, r2 = run(apply_all(t, ({"10.70.1.0/24": frozenset({G1})}, False), ({"10.70.1.0/24": frozenset({G1})}, True)))
    assert not r1.changed  # kept both paths and the unlearned route
    assert r2.replaced == ["10.70.1.0/24"] and r2.removed == ["10.70.2.0/24"]
    assert routes("202") == {"10.70.1.0/24": [G1]}
    run(apply_all(RouteTable(netns=ns), ({}, True)))


def test_unreachable_next_hop_reported(ns):
    (r,) = run(apply_all(RouteTable(netns=ns), ({"10.80.0.0/24": frozenset({"192.0.2.1"})}, True)))
    assert "10.80.0.0/24" in r.errors and not r.added


H1, H2 = "fd09::2", "fd09::3"


def routes6(proto=None):
    return {r["prefix"]: r["nexthops"] for r in kernel_routes(NS, family=6, protocol=proto)}


def test_ipv6_ecmp_replace_idempotent_remove(ns):
    netns.ns_run(ns, ["ip", "-6", "addr", "replace", "fd09::1/64", "dev", "eth0", "nodad"])
    t = RouteTable(netns=ns)
    d1 = {"fd10:1::/64": frozenset({H1}), "fd10:2::/64": frozenset({H1, H2}), "10.50.9.0/24": frozenset({G1})}
    r1, r2 = run(apply_all(t, (d1, True), (d1, True)))
    assert sorted(r1.added) == ["10.50.9.0/24", "fd10:1::/64", "fd10:2::/64"] and not r1.errors, r1
    assert not r2.changed and not r2.errors, f"second apply must change nothing: {r2}"
    assert routes6("202") == {"fd10:1::/64": [H1], "fd10:2::/64": [H1, H2]}
    assert run(RouteTable(netns=ns).kernel()) == d1  # read back as written (the multipath route too)
    # multipath -> one path, one path -> multipath: each one atomic replace
    d2 = {"fd10:1::/64": frozenset({H1, H2}), "fd10:2::/64": frozenset({H2}), "10.50.9.0/24": frozenset({G1})}
    (r3,) = run(apply_all(RouteTable(netns=ns), (d2, True)))
    assert sorted(r3.replaced) == ["fd10:1::/64", "fd10:2::/64"] and not r3.errors, r3
    assert routes6("202") == {"fd10:1::/64": [H1, H2], "fd10:2::/64": [H2]}
    # no prune (after a restart): the kernel's paths are kept next to the learned ones
    (r4,) = run(apply_all(RouteTable(netns=ns), ({"fd10:2::/64": frozenset({H1})}, False)))
    assert r4.replaced == ["fd10:2::/64"] and routes6("202")["fd10:2::/64"] == [H1, H2]
    (r5,) = run(apply_all(RouteTable(netns=ns), ({"10.50.9.0/24": frozenset({G1})}, True)))
    assert sorted(r5.removed) == ["fd10:1::/64", "fd10:2::/64"] and not r5.errors, r5
    assert routes6("202") == {} and routes("202") == {"10.50.9.0/24": [G1]}
    run(apply_all(RouteTable(netns=ns), ({}, True)))
    assert routes6("202") == {} and routes("202") == {}


def test_ipv6_default_and_foreign_route(ns):
    netns.ns_run(ns, ["ip", "-6", "addr", "replace", "fd09::1/64", "dev", "eth0", "nodad"])
    netns.ns_run(ns, ["ip", "-6", "route", "add", "fd10:60::/64", "via", H1, "proto", "static"])
    try:
        desired = {"::/0": frozenset({H1, H2}), "fd10:60::/64": frozenset({H2})}
        (r1,) = run(apply_all(RouteTable(netns=ns), (desired, True)))
        assert r1.added == ["::/0"] and r1.conflicts == ["fd10:60::/64"], r1
        assert routes6("202") == {"::/0": [H1, H2]} and routes6()["fd10:60::/64"] == [H1]
        (r2,) = run(apply_all(RouteTable(netns=ns), ({}, True)))
        assert r2.removed == ["::/0"] and routes6("202") == {}
    finally:
        netns.ns_run(ns, ["ip", "-6", "route", "del", "fd10:60::/64"], check=False)


def test_merge_removes_only_next_hops_known_gone(ns):
    # a previous run left P over both next hops, Q over G1 and R over G2; nothing of them is re-learned yet
    p, q, r = "10.71.1.0/24", "10.71.2.0/24", "10.71.3.0/24"
    run(apply_all(RouteTable(netns=ns), ({p: frozenset({G1, G2}), q: frozenset({G1}), r: frozenset({G2})}, True)))
    try:
        (r1,) = run(apply_all(RouteTable(netns=ns), ({p: frozenset({G2})}, False, Gone(next_hops=frozenset({G1})))))
        assert r1.replaced == [p] and r1.removed == [q] and not r1.errors, r1  # G1 gone everywhere (BFD Down)
        assert routes("202") == {p: [G2], r: [G2]}
        (r2,) = run(apply_all(RouteTable(netns=ns), ({}, False, Gone(routes={p: frozenset({G2})}))))
        assert r2.removed == [p] and not r2.replaced, r2  # withdrawn: the last next hop gone, the route too
        assert routes("202") == {r: [G2]}  # never learned in this run: kept while merging
    finally:
        run(apply_all(RouteTable(netns=ns), ({}, True)))


def test_bfd_down_and_withdrawal_inside_the_startup_hold_reach_the_kernel(ns, tmp_path):
    """The manager's route pass (no ExaBGP: its messages are fed to the speaker) against the real table."""
    p, q = "10.72.1.0/24", "10.72.2.0/24"
    run(apply_all(RouteTable(netns=ns), ({p: frozenset({G1, G2}), q: frozenset({G1})}, True)))  # a previous run
    node = Node(name="n1", pod_cidrs=("10.244.1.0/24",), addresses=("10.9.0.1",))
    peers = [{"kind": "BGPPeer", "metadata": {"name": f"tor{i}"}, "spec": {"peerIP": ip, "asNumber": 65100 + i}}
             for i, ip in ((1, G1), (2, G2))]
    configs = [{"kind": "BGPConfiguration", "metadata": {"name": "default"}, "spec": {"asNumber": 65001}}]

    def msg(peer, **neighbor):
        return parse_message(json.dumps({"type": neighbor.pop("type"),
                                         "neighbor": {"address": {"peer": peer}, **neighbor}}))

    def update(peer, key, prefixes):
        u = {"attribute": {"as-path": {"0": {"element": "as-sequence", "value": [65100]}}},
             key: {"ipv4 unicast": {peer: [{"nlri": x} for x in prefixes]} if key == "announce"
                   else [{"nlri": x} for x in prefixes]}}
        return msg(peer, type="update", direction="receive", message={"update": u})

    async def scenario():
        (tmp_path / "run").mkdir()
        mgr = BgpManager("n1", str(tmp_path / "state"), str(tmp_path / "run"), BgpOptions())
        mgr.routes = RouteTable(netns=ns)
        try:
            await mgr.update(BgpInputs(node=node, nodes=[node], peers=peers, configs=configs, secrets={}))
            for tor in (G1, G2):  # both sessions up, P re-learned, no End-of-RIB: the hold goes on
                mgr.speaker.handle(msg(tor, type="state", state="up"), 1.0)
                mgr.speaker.handle(update(tor, "announce", [p]), 1.1)
            steps = [await mgr.apply_routes(), routes("202")]
            mgr.speaker.bfd_down(G1, "controlDetectionTimeExpired")
            steps += [await mgr.apply_routes(), routes("202")]
            mgr.speaker.handle(update(G2, "withdraw", [p]), 2.0)
            steps += [await mgr.apply_routes(), routes("202"), mgr.status()["synced"]]
            return steps
        finally:
            await mgr.routes.close()

    try:
        r1, k1, r2, k2, r3, k3, synced = run(scenario())
        assert not r1.changed and k1 == {p: [G1, G2], q: [G1]}, (r1, k1)  # merged: nothing lost
        assert r2.replaced == [p] and r2.removed == [q] and k2 == {p: [G2]}, (r2, k2)  # BFD Down: G1 at once
        assert r3.removed == [p] and k3 == {}, (r3, k3)  # withdrawn by the last peer
        assert not synced  # all of it inside the hold
    finally:
        run(apply_all(RouteTable(netns=ns), ({}, True)))
