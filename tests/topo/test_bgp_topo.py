"""Multi-node BGP with real routers: FRR / BIRD / GoBGP ToRs, BgpManager + ExaBGP per node namespace."""

import os
import signal
import subprocess
import time

import pytest

from routed import netns
from tests.helpers import holds_for, run_and_expect
from tests.topo.bgp_topo import BgpTopo

pytestmark = [pytest.mark.topo, pytest.mark.netns]


@pytest.fixture(autouse=True)
def _root():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not os.path.exists("/usr/lib/frr/bgpd"):
        pytest.skip("FRR not installed")


def make(request, **kw):
    name = "rtd-bgp-" + request.node.name.replace("test_", "")[:8].replace("_", "")
    topo = BgpTopo(name, **kw)
    request.addfinalizer(lambda: _finish(request, topo))
    topo.build()
    return topo


def _finish(request, topo):
    rep = getattr(request.node, "rep_call", None)
    if rep is None or rep.failed:
        print(topo.logs())
    topo.cleanup()


def established(topo, i, n_peers=1):
    st = topo.status(i)["status"]
    return sum(1 for p in st["peers"] if p["state"] == "established") == n_peers


def start_all(topo, tors=1):
    for t in range(1, tors + 1):
        topo.start_tor(t)
    for i in range(1, topo.n + 1):
        topo.start_node(i)
    try:
        run_and_expect(topo.converged, bool, 30, ignore=(Exception,)).check("convergence")
    except AssertionError:
        print(topo.logs())
        raise


@pytest.mark.parametrize("router", ["frr", "bird"])
def test_routes_and_traffic(request, router):
    topo = make(request, nodes=3, router=router)
    start_all(topo)
    tor = topo.tor_routes()
    for i in (1, 2, 3):
        assert tor[f"10.244.{i}.0/24"] == [topo.node_addr(i)], tor
        routes = topo.node_routes(i)
        for j in (1, 2, 3):
            if j != i:
                assert routes[f"10.244.{j}.0/24"] == [topo.tor_addr(i)]
        assert f"10.244.{i}.0/24" not in routes
    assert topo.ping(1, 3).returncode == 0
    st = topo.status(1)
    peer = st["status"]["peers"][0]
    assert peer["state"] == "established" and peer["asNumber"] == 65100 and peer["advertised"] == 1
    adv = st["advertised"]
    assert adv == [dict(adv[0], prefix="10.244.1.0/24", asPath=[65001], communities=["65000:100"])]
    if router == "frr":  # FRR echoes every node's own prefix back: received, rejected, never installed
        echo = [r for r in st["received"] if r["prefix"] == "10.244.1.0/24"]
        assert echo and echo[0]["rejected"] == "own AS in path"
    assert st["ready"] is True
    assert st["metrics"]["routed_bgp_sessions_established"] == 1


def test_gobgp_tor(request):
    topo = make(request, nodes=2, router="gobgp")
    start_all(topo)
    assert topo.tor_routes()["10.244.1.0/24"] == [topo.node_addr(1)]
    assert topo.node_routes(1)["10.244.2.0/24"] == [topo.tor_addr(1)]
    assert topo.routers[1].established() == {topo.node_addr(1), topo.node_addr(2)}


def test_cidr_change_and_overlaps(request):
    topo = make(request, nodes=2)
    start_all(topo)
    frr = topo.routers[1]
    # the ToR originates: a route inside node1's CIDR, node1's link subnet (connected there), a default route
    frr.vtysh("configure terminal\nrouter bgp 65100\naddress-family ipv4 unicast\nnetwork 10.244.1.128/25\n"
              "network 10.1.1.0/24\nnetwork 0.0.0.0/0\nnetwork 10.99.0.0/16")
    run_and_expect(lambda: "10.99.0.0/16" in topo.node_routes(1), bool, 10,
                   ignore=(Exception,)).check("ToR-originated route")
    routes = topo.node_routes(1)
    assert "10.244.1.128/25" not in routes and "0.0.0.0/0" not in routes and "10.1.1.0/24" not in routes
    run_and_expect(lambda: "10.1.1.0/24" in topo.status(1)["status"]["routeConflicts"], bool, 5,
                   ignore=(Exception,)).check("conflict reported")
    assert "10.244.1.128/25" in topo.node_routes(2)  # node2 does not own it
    # pod CIDR change: the new one appears on the ToR and node2, the old one is withdrawn
    topo.cidrs[1] = ["10.245.1.0/24"]
    topo.write_spec(1)
    run_and_expect(lambda: "10.245.1.0/24" in topo.tor_routes() and "10.244.1.0/24" not in topo.tor_routes(),
                   bool, 10, ignore=(Exception,)).check("CIDR change on the ToR")
    run_and_expect(lambda: "10.245.1.0/24" in topo.node_routes(2)
                   and "10.244.1.0/24" not in topo.node_routes(2),
                   bool, 10, ignore=(Exception,)).check("CIDR change on node2")
    # node1 now accepts 10.244.1.128/25 (no longer inside its own CIDR)
    run_and_expect(lambda: "10.244.1.128/25" in topo.node_routes(1), bool, 10,
                   ignore=(Exception,)).check("node1 accepts 10.244.1.128/25")


def test_stopped_node_withdrawn(request):
    topo = make(request, nodes=3, hold=3, keepalive=1)
    start_all(topo)
    # clean stop: withdraw + close
    t0 = time.monotonic()
    topo.stop_node(2, graceful=True)
    run_and_expect(lambda: "10.244.2.0/24" not in topo.tor_routes(), bool, 5,
                   ignore=(Exception,)).check("withdraw on the ToR")
    run_and_expect(lambda: "10.244.2.0/24" not in topo.node_routes(1), bool, 5,
                   ignore=(Exception,)).check("withdraw on node1")
    assert time.monotonic() - t0 < 5
    assert topo.node_routes(2) == {}, "clean stop removes the node's learned routes"
    # frozen node (no keepalives): gone within the hold time
    exa = topo.exabgp_pid(3)
    harness = topo.procs[3].pid
    os.kill(harness, signal.SIGSTOP)
    os.kill(exa, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        run_and_expect(lambda: "10.244.3.0/24" not in topo.tor_routes(), bool, 3 + 3, interval=0.1,
                       ignore=(Exception,)).check("hold timer")
        assert time.monotonic() - t0 <= 3 + 1.5
        run_and_expect(lambda: "10.244.3.0/24" not in topo.node_routes(1), bool, 5,
                       ignore=(Exception,)).check("frozen node3's route gone from node1")
    finally:
        os.kill(exa, signal.SIGCONT)
        os.kill(harness, signal.SIGCONT)


def test_kill9_speaker_zero_loss(request):
    topo = make(request, nodes=2, gr_time=60)
    start_all(topo)
    ping = subprocess.Popen(netns.ns_cmd(topo.node_ns(1), ["ping", "-q", "-n", "-i", "0.02", "-w", "12", "-I",
                                                            "10.244.1.1", "10.244.2.1"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # some traffic flows before the kill: ping stays up (still sending) for 1 s
        holds_for(ping.poll, None, 1.0).check("ping running before the kill")
        topo.kill9_node(2)
        # the ToR (GR helper) keeps node2's route; node2 keeps its learned routes
        holds_for(lambda: {"tor": "10.244.2.0/24" in topo.tor_routes(),
                           "node2": "10.244.1.0/24" in topo.node_routes(2)},
                  {"tor": True, "node2": True}, 0.5).check("routes retained after kill -9")
        before = topo.node_routes(2)
        topo.start_node(2)
        run_and_expect(lambda: established(topo, 2), bool, 15,
                       ignore=(Exception,)).check("node2 re-established")
        run_and_expect(lambda: topo.status(2)["status"]["synced"], bool, 15,
                       ignore=(Exception,)).check("node2 End-of-RIB")
        assert topo.node_routes(2) == before, "routes must not be flushed/re-added after restart"
        frr_rib = topo.routers[1].rib()["routes"]["10.244.2.0/24"]
        assert not any(p.get("stale") for p in frr_rib), frr_rib
    finally:
        out, _ = ping.communicate(timeout=20)
    assert " 0% packet loss" in out, out


def test_md5(request):
    topo = make(request, nodes=2, passwords={1: "right-one", 2: "wrong"}, tor_passwords={1: "right-one", 2: "right"})
    topo.start_tor()
    topo.start_node(1)
    topo.start_node(2)
    run_and_expect(lambda: established(topo, 1), bool, 20,
                   ignore=(Exception,)).check("node1 with the right password")
    # node2 gets 3 s to (fail to) connect: its session must never come up meanwhile
    # (no status file yet counts as not up)
    holds_for(lambda: os.path.exists(topo.status_path(2)) and established(topo, 2), False, 3).check(
        "node2 (wrong password) never established")
    peer = topo.status(2)["status"]["peers"][0]
    assert peer["md5"] and peer["lastError"], peer
    assert topo.node_addr(2) not in topo.routers[1].established()
    assert "10.244.2.0/24" not in topo.tor_routes()


def test_dual_tor_ecmp(request):
    topo = make(request, nodes=2, tors=2)
    start_all(topo, tors=2)
    run_and_expect(lambda: len(topo.node_routes(1).get("10.244.2.0/24", [])) == 2, bool, 15,
                   ignore=(Exception,)).check("ECMP route")
    assert topo.node_routes(1)["10.244.2.0/24"] == sorted([topo.tor_addr(1, 1), topo.tor_addr(1, 2)])
    ping = subprocess.Popen(netns.ns_cmd(topo.node_ns(1), ["ping", "-q", "-n", "-i", "0.02", "-w", "6", "-I",
                                                            "10.244.1.1", "10.244.2.1"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # some traffic flows before ToR 2 dies: ping stays up (still sending) for 1 s
    holds_for(ping.poll, None, 1.0).check("ping running before ToR 2 dies")
    # ToR 2 dies: its links go down first (the nodes see no FIN/NOTIFICATION), then its daemons
    for i in (1, 2):
        netns.ns_run(topo.tor_ns(2), ["ip", "link", "set", f"n{i}", "down"])
    topo.routers[2].stop()
    # hold timer (3 s) expiry -> NOTIFICATION sent -> no graceful-restart retention -> path removed
    run_and_expect(lambda: topo.node_routes(1).get("10.244.2.0/24") == [topo.tor_addr(1, 1)], bool, 3 + 5,
                   ignore=(Exception,)).check("one path left")
    out, _ = ping.communicate(timeout=20)
    stats = out.split("packets transmitted, ")[1]
    sent = int(out.split(" packets transmitted")[0].split()[-1])
    received = int(stats.split(" received")[0])
    # the kernel moves flows off the dead-linkdown next hop at once; we measured a gap of about 1 s
    assert (sent - received) * 0.02 < 1.5, out
    assert topo.ping(1, 2).returncode == 0


def test_exabgp_crash_restarted_hitless(request):
    topo = make(request, nodes=2, gr_time=60)
    start_all(topo)
    before_tor = topo.tor_routes()["10.244.2.0/24"]
    before_node = topo.node_routes(2)
    old = topo.exabgp_pid(2)
    os.kill(old, signal.SIGKILL)
    run_and_expect(lambda: topo.exabgp_pid(2) not in (None, old), bool, 10,
                   ignore=(Exception,)).check("ExaBGP restarted by the speaker")
    assert topo.tor_routes()["10.244.2.0/24"] == before_tor  # ToR kept it (GR helper)
    run_and_expect(lambda: established(topo, 2), bool, 15, ignore=(Exception,)).check("re-established")
    run_and_expect(lambda: topo.status(2)["status"]["peers"][0]["eorReceived"], bool, 10,
                   ignore=(Exception,)).check("End-of-RIB received from the ToR")
    assert topo.node_routes(2) == before_node
    st = topo.status(2)
    assert st["ready"] and st["status"]["exabgpRestarts"] == 2
    assert topo.ping(2, 1).returncode == 0


@pytest.mark.parametrize("router", ["frr", "bird"])
def test_ibgp_route_reflector(request, router):
    topo = make(request, nodes=3, router=router, asns={1: 65100, 2: 65100, 3: 65100})
    start_all(topo)
    assert topo.node_routes(1)["10.244.2.0/24"] == [topo.tor_addr(1)]  # next-hop-self on the reflector
    st = topo.status(1)
    assert st["status"]["asNumber"] == 65100
    echo = [r for r in st["received"] if r["prefix"] == "10.244.1.0/24"]
    assert all(r["rejected"] for r in echo)
    assert topo.ping(1, 3).returncode == 0


def test_as_per_rack_frr_as_override(request):
    topo = make(request, nodes=3, asns={1: 65001, 2: 65001, 3: 65002})  # nodes 1, 2 in one rack AS
    start_all(topo)
    assert topo.node_routes(1)["10.244.2.0/24"] == [topo.tor_addr(1)]
    assert topo.ping(1, 2).returncode == 0


def advertised_hops(topo, i):
    """{(peer, prefix): next hop} of what node i's ExaBGP reported it sent."""
    return {(r["peer"], r["prefix"]): r["nextHop"] for r in topo.status(i)["advertised"]}


@pytest.mark.parametrize("router", ["frr", "bird"])
def test_dual_stack(request, router):
    """Design (a): a separate IPv6 session per link; each session carries its own family only."""
    topo = make(request, nodes=2, router=router, v6=True)
    start_all(topo)
    assert topo.tor_routes()["fd10:1::/64"] == [topo.node_addr6(1)]
    assert topo.node_routes(1)["fd10:2::/64"] == [topo.tor_addr6(1)]
    assert topo.node_routes(1)["10.244.2.0/24"] == [topo.tor_addr(1)]
    run_and_expect(lambda: advertised_hops(topo, 1), {(topo.tor_addr(1), "10.244.1.0/24"): topo.node_addr(1),
                                                      (topo.tor_addr6(1), "fd10:1::/64"): topo.node_addr6(1)},
                   10, ignore=(Exception,)).check("each family advertised on its own session, explicit next hop")
    assert topo.ping6(1, 2).returncode == 0


def test_ipv6_over_the_ipv4_session(request):
    """Design (b): IPv6 unicast over the IPv4 session (BGPPeer addressFamilies [IPv4, IPv6]): the ToR's kernel
    gets each node's IPv6 pod CIDR via the node's global IPv6 address, the nodes learn each other's via the
    ToR's (FRR route-map `set ipv6 next-hop global`); End-of-RIB in both families; reload and restart keep it."""
    topo = make(request, nodes=2, v6=True, v6_design="over-v4", gr_time=60)
    start_all(topo)
    tor = topo.tor_routes()
    for i in (1, 2):
        assert tor[f"fd10:{i}::/64"] == [topo.node_addr6(i)], tor
        assert tor[f"10.244.{i}.0/24"] == [topo.node_addr(i)], tor
    assert topo.node_routes(1)["fd10:2::/64"] == [topo.tor_addr6(1)]
    assert topo.node_routes(2)["fd10:1::/64"] == [topo.tor_addr6(2)]
    st = topo.status(1)
    (peer,) = st["status"]["peers"]
    assert peer["address"] == topo.tor_addr(1) and peer["state"] == "established"
    assert st["status"]["errors"] == []
    run_and_expect(lambda: advertised_hops(topo, 1), {(topo.tor_addr(1), "10.244.1.0/24"): topo.node_addr(1),
                                                      (topo.tor_addr(1), "fd10:1::/64"): topo.node_addr6(1)},
                   10, ignore=(Exception,)).check("both families on the IPv4 session, explicit next hops")
    run_and_expect(lambda: {r["prefix"]: r for r in topo.status(1)["received"]},  # the status file lags a little
                   {"fd10:2::/64": {"nextHop": topo.tor_addr6(1), "accepted": True, "peer": topo.tor_addr(1)},
                    "fd10:1::/64": {"accepted": False, "rejected": "own AS in path"}},
                   10, ignore=(Exception,)).check("node2's IPv6 CIDR learned over the IPv4 session")
    run_and_expect(lambda: topo.status(1)["status"], {"peers": [{"eorReceived": True, "eorSent": True}], "synced": True},
                   10, ignore=(Exception,)).check("End-of-RIB of both families from FRR")
    assert topo.ping6(1, 2).returncode == 0 and topo.ping(1, 2).returncode == 0

    # a peer change (node1 drops IPv6 from the session) is a reload, not a restart; the ToR loses fd10:1::/64
    # (the families are negotiated in the OPEN: ExaBGP re-establishes that one session)
    pid = topo.exabgp_pid(1)
    reloads = topo.status(1)["status"]["exabgpReloads"]
    topo.extra_peer_spec = {1: {"addressFamilies": ["IPv4"]}}
    topo.write_spec(1)
    run_and_expect(lambda: "fd10:1::/64" not in topo.tor_routes(), bool, 20,
                   ignore=(Exception,)).check("IPv6 gone from the ToR")
    run_and_expect(lambda: topo.status(1)["status"]["exabgpReloads"] > reloads, bool, 10,
                   ignore=(Exception,)).check("reloaded")
    assert topo.exabgp_pid(1) == pid and "10.244.1.0/24" in topo.tor_routes()
    topo.extra_peer_spec = {}
    topo.write_spec(1)
    run_and_expect(lambda: topo.tor_routes().get("fd10:1::/64") == [topo.node_addr6(1)], bool, 20,
                   ignore=(Exception,)).check("IPv6 back on the ToR after the reload")
    run_and_expect(topo.converged, bool, 20, ignore=(Exception,)).check("converged again")
    assert topo.exabgp_pid(1) == pid

    # ExaBGP killed: restarted; the ToR (GR helper) keeps both families meanwhile; node1 keeps its routes
    before = topo.node_routes(1)
    os.kill(pid, signal.SIGKILL)
    run_and_expect(lambda: topo.exabgp_pid(1) not in (None, pid), bool, 10,
                   ignore=(Exception,)).check("ExaBGP restarted by the speaker")
    tor = topo.tor_routes()
    assert tor["fd10:1::/64"] == [topo.node_addr6(1)] and tor["10.244.1.0/24"] == [topo.node_addr(1)]
    run_and_expect(lambda: established(topo, 1) and topo.status(1)["status"]["peers"][0]["eorReceived"], bool, 15,
                   ignore=(Exception,)).check("re-established, End-of-RIB of both families")
    assert topo.node_routes(1) == before
    assert topo.ping6(1, 2).returncode == 0


def test_ipv6_over_the_ipv4_session_dual_tor_ecmp(request):
    """Design (b) with two ToRs: each BGPPeer names its link's ipv6NextHop; node1's kernel gets node2's IPv6
    CIDR from both ToRs as one ECMP route."""
    topo = make(request, nodes=2, tors=2, v6=True, v6_design="over-v4")
    start_all(topo, tors=2)
    for t in (1, 2):
        assert topo.tor_routes(t)["fd10:1::/64"] == [topo.node_addr6(1, t)]
    both = sorted([topo.tor_addr6(1, 1), topo.tor_addr6(1, 2)])
    run_and_expect(lambda: topo.node_routes(1).get("fd10:2::/64"), lambda hops: hops == both, 15,
                   ignore=(Exception,)).check("IPv6 ECMP route")
    assert topo.node_routes(1)["10.244.2.0/24"] == sorted([topo.tor_addr(1, 1), topo.tor_addr(1, 2)])
    assert topo.ping6(1, 2).returncode == 0


def test_ipv4_mapped_next_hop_rejected(request):
    """FRR's default for IPv6 over an IPv4 session without an IPv6 next hop (no route-map, no IPv6 on its link):
    ::ffff:<its IPv4>. The node reports the route as rejected and never installs it."""
    topo = make(request, nodes=1, v6=True, v6_design="over-v4", tor_v6_next_hop=False, tor_link_v6=False,
                tor_originate6=("fd99::/48",))
    topo.start_tor()
    topo.start_node(1)

    def received():
        return {r["prefix"]: r for r in topo.status(1)["received"]}

    got = run_and_expect(lambda: received().get("fd99::/48"), bool, 20, ignore=(Exception,)).check(
        f"fd99::/48 received; logs:\n{topo.logs()}")
    assert got["nextHop"] in ("::ffff:10.1.1.1", "::ffff:a01:101"), got  # as ExaBGP spells it
    assert not got["accepted"] and got["rejected"].startswith("IPv4-mapped next hop ::ffff:10.1.1.1"), got
    holds_for(lambda: "fd99::/48" in topo.node_routes(1), False, 1.0).check("never installed")
