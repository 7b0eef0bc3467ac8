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
