"""Route table manager against a real kernel table inside an rtd-bgp-rt namespace."""

import asyncio
import os

import pytest

from routed import netns
from routed.lab.routers import kernel_routes
from routed.routes import RouteTable

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
    for desired, prune in steps:
        out.append(await table.apply(desired, prune=prune))
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
