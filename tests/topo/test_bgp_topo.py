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


@pytest.mark.parametrize("router", ["frr", "bird"])
def test_dual_stack(request, router):
    topo = make(request, nodes=2, router=router, v6=True)
    start_all(topo)
    assert topo.tor_routes()["fd10:1::/64"] == [topo.node_addr6(1)]
    assert topo.node_routes(1)["fd10:2::/64"] == [topo.tor_addr6(1)]
    assert topo.node_routes(1)["10.244.2.0/24"] == [topo.tor_addr(1)]
    out = netns.ns_run(topo.node_ns(1), ["ping", "-6", "-c", "2", "-i", "0.2", "-W", "1", "-I", "fd10:1::1",
                                         "fd10:2::1"], check=False)
    assert out.returncode == 0, out.stdout
