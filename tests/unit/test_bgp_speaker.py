import asyncio
import json

from routed.bgp.config import resolve
from routed.bgp.manager import BgpInputs, BgpManager
from routed.bgp.rib import parse_message
from routed.bgp.services import Advertisement
from routed.bgp.speaker import Speaker, restart_key
from routed.config import BgpOptions
from routed.model import Node
from routed.routes import ApplyResult

NODE = Node(name="n1", pod_cidrs=("10.244.1.0/24",), addresses=("10.1.1.2",))
PEERS = [{"kind": "BGPPeer", "metadata": {"name": "tor"}, "spec": {"peerIP": "10.1.1.1", "asNumber": 65100}}]
CONFIGS = [{"kind": "BGPConfiguration", "metadata": {"name": "default"},
            "spec": {"asNumber": 65001, "communities": ["65000:100"]}}]


class FakeWriter:
    def __init__(self):
        self.lines = []

    def write(self, data):
        self.lines += data.decode().splitlines()

    def close(self):
        pass


def msg(**neighbor):
    return parse_message(json.dumps({"type": neighbor.pop("type"), "neighbor": {"address": {"peer": "10.1.1.1"},
                                                                                 **neighbor}}))


def upd(announce=(), withdraw=()):
    u = {"attribute": {"as-path": {"0": {"element": "as-sequence", "value": [65100, 65002]}}}}
    if announce:
        u["announce"] = {"ipv4 unicast": {"10.1.1.1": [{"nlri": p} for p in announce]}}
    if withdraw:
        u["withdraw"] = {"ipv4 unicast": [{"nlri": p} for p in withdraw]}
    return msg(type="update", direction="receive", message={"update": u})


def speaker(tmp_path, pod_cidrs=("10.244.1.0/24",)):
    sp = Speaker(str(tmp_path))
    node = Node(name="n1", pod_cidrs=pod_cidrs, addresses=("10.1.1.2",))
    sp.configure(resolve(node, [node], PEERS, CONFIGS, {}).config)
    sp.commands.attach(FakeWriter())
    return sp


def test_up_replays_then_eor_and_cidr_change(tmp_path):
    async def run():
        sp = speaker(tmp_path)
        sp.handle(msg(type="state", state="up"), 1.0)
        w = sp.commands.transport
        assert w.lines == ["neighbor 10.1.1.1 announce route 10.244.1.0/24 next-hop 10.1.1.2 community [ 65000:100 ]",
                           "neighbor 10.1.1.1 announce eor ipv4 unicast"]
        w.lines.clear()
        node = Node(name="n1", pod_cidrs=("10.245.1.0/24",), addresses=("10.1.1.2",))
        sp.configure(resolve(node, [node], PEERS, CONFIGS, {}).config)  # same sessions: API only
        assert w.lines == ["neighbor 10.1.1.1 withdraw route 10.244.1.0/24 next-hop 10.1.1.2",
                           "neighbor 10.1.1.1 announce route 10.245.1.0/24 next-hop 10.1.1.2 community [ 65000:100 ]"]
    asyncio.run(run())


def test_graceful_restart_stale_and_eor(tmp_path):
    async def run():
        sp = speaker(tmp_path)
        sp.handle(msg(type="open", direction="receive",
                      open={"capabilities": {"64": {"name": "graceful restart", "time": 120}}}), 0.5)
        sp.handle(msg(type="state", state="up"), 1.0)
        sp.handle(upd(announce=["10.244.2.0/24", "10.244.3.0/24"]), 1.1)
        assert set(sp.rib.desired()) == {"10.244.2.0/24", "10.244.3.0/24"}
        sp.handle(msg(type="state", state="down", reason="closing connection"), 2.0)  # TCP loss: keep, stale
        assert set(sp.rib.desired()) == {"10.244.2.0/24", "10.244.3.0/24"}
        assert "10.1.1.1" in sp._timers
        sp.handle(msg(type="state", state="up"), 3.0)
        sp.handle(upd(announce=["10.244.2.0/24"]), 3.1)
        sp.handle(msg(type="update", direction="receive", message={"eor": {"afi": "ipv4", "safi": "unicast"}}), 3.2)
        assert set(sp.rib.desired()) == {"10.244.2.0/24"}  # not re-advertised: gone at End-of-RIB
        assert sp.peers["10.1.1.1"].eor_received
        sp.handle(msg(type="state", state="down", reason="notification received (6,2)"), 4.0)  # clean close
        assert sp.rib.desired() == {}
    asyncio.run(run())


def test_sent_updates_recorded(tmp_path):
    async def run():
        sp = speaker(tmp_path)
        sp.handle(msg(type="state", state="up"), 1.0)
        sent = {"update": {"attribute": {"as-path": {"0": {"element": "as-sequence", "value": [65001]}},
                                         "community": [[65000, 100]]},
                           "announce": {"ipv4 unicast": {"10.1.1.2": [{"nlri": "10.244.1.0/24"}]}}}}
        sp.handle(msg(type="update", direction="send", message=sent), 1.1)
        st = sp.peer_status(sp.peers["10.1.1.1"])
        assert st["advertised"] == 1 and st["state"] == "established"
        assert sp.out.advertised("10.1.1.1")[0]["communities"] == ["65000:100"]
    asyncio.run(run())


class FakeRoutes:
    """Stands in for RouteTable: unit tests never touch a kernel table."""

    def __init__(self):
        self.last = ApplyResult()
        self.applied = []

    async def kernel(self):
        return {}

    async def apply(self, desired, prune=True, gone=None):
        self.applied.append((dict(desired), prune))
        return self.last

    async def flush(self):
        return 0

    async def close(self):
        pass


def test_manager_not_ready_when_exabgp_cannot_start(tmp_path):
    async def run():
        mgr = BgpManager("n1", str(tmp_path / "state"), str(tmp_path / "run"),
                         BgpOptions(exabgp=str(tmp_path / "no-such-exabgp")))
        mgr.routes = FakeRoutes()
        assert mgr.ready() == (False, "no BGP configuration for this node yet")
        await mgr.start()
        try:
            await mgr.update(BgpInputs(node=NODE, nodes=[NODE], peers=PEERS, configs=CONFIGS, secrets={}))
            for _ in range(100):
                if mgr.speaker.failures >= 3:
                    break
                await asyncio.sleep(0.1)
            ok, why = mgr.ready()
            assert not ok and "no-such-exabgp" in why, why
            assert mgr.status()["peers"][0]["state"] == "idle"
            # unchanged inputs: cheap no-op
            await mgr.update(BgpInputs(node=NODE, nodes=[NODE], peers=PEERS, configs=CONFIGS, secrets={}))
        finally:
            await mgr.stop(graceful=False)
    asyncio.run(run())


def test_prometheus_collector():
    from prometheus_client import CollectorRegistry, generate_latest

    from routed.bgp.metrics import BgpCollector

    class Fake:
        def metrics_snapshot(self):
            return {"routed_bgp_ready": 1, "routed_bgp_peer_established": {"10.1.1.1": 1},
                    "routed_bgp_exabgp_starts_total": 2, "routed_bgp_peer_max_prefix_exceeded_total": {"p": 3}}

    reg = CollectorRegistry()
    reg.register(BgpCollector(Fake()))
    text = generate_latest(reg).decode()
    assert "routed_bgp_ready 1.0" in text
    assert 'routed_bgp_peer_established{peer="10.1.1.1"} 1.0' in text
    assert "routed_bgp_exabgp_starts_total 2.0" in text
    assert 'routed_bgp_peer_max_prefix_exceeded_total{peer="p"} 3.0' in text


def test_peer_changes_reload_a_running_exabgp_and_listen_changes_restart_it(tmp_path):
    class Running:
        returncode = None
        pid = 4242

    async def run():
        sp = speaker(tmp_path)
        sp._proc = Running()  # type: ignore[assignment]
        sp._restart.clear()
        two = PEERS + [{"kind": "BGPPeer", "metadata": {"name": "tor2"}, "spec": {"peerIP": "10.1.2.1", "asNumber": 65200}}]
        sp.configure(resolve(NODE, [NODE], two, CONFIGS, {}).config)
        assert sp._reload_wanted.is_set() and not sp._restart.is_set()  # the tor session stays up
        assert "10.1.2.1" in open(sp.conf_path).read() and set(sp.peers) == {"10.1.1.1", "10.1.2.1"}
        sp._reload_wanted.clear()
        sp.configure(resolve(NODE, [NODE], PEERS, CONFIGS, {}).config)  # and removed again: a reload too
        assert sp._reload_wanted.is_set() and not sp._restart.is_set() and set(sp.peers) == {"10.1.1.1"}
        mesh = [{"kind": "BGPConfiguration", "metadata": {"name": "default"},
                 "spec": {"asNumber": 65001, "nodeToNodeMesh": True}}]
        other = Node(name="n2", pod_cidrs=("10.244.2.0/24",), addresses=("10.1.0.9",))  # lower: n1 listens
        sp.configure(resolve(NODE, [NODE, other], PEERS, mesh, {}).config)  # now it must listen: a restart
        assert sp._restart.is_set()

    asyncio.run(run())


def test_bfd_down_drops_even_graceful_restart_routes_and_tears_the_session_down(tmp_path):
    async def run():
        sp = speaker(tmp_path)
        sp.handle(msg(type="open", direction="receive",
                      open={"capabilities": {"64": {"name": "graceful restart", "time": 120}}}), 0.5)
        sp.handle(msg(type="state", state="up"), 1.0)
        sp.handle(upd(announce=["10.244.2.0/24"]), 1.1)
        sp.handle(msg(type="state", state="down", reason="closing connection"), 2.0)  # GR would keep them
        assert set(sp.desired_routes()) == {"10.244.2.0/24"}
        sp.handle(msg(type="state", state="up"), 3.0)
        sp.handle(upd(announce=["10.244.2.0/24"]), 3.1)
        sp.commands.transport.lines.clear()
        sp.bfd_down("10.1.1.1", "controlDetectionTimeExpired")
        assert sp.desired_routes() == {} and "10.1.1.1" not in sp._timers
        assert sp.commands.transport.lines == ["neighbor 10.1.1.1 teardown 6"]
        # the session comes back before BFD does: what it sends stays out of the kernel until BFD is Up
        sp.handle(msg(type="state", state="up"), 4.0)
        sp.handle(upd(announce=["10.244.2.0/24"]), 4.1)
        assert sp.desired_routes() == {} and set(sp.rib.desired()) == {"10.244.2.0/24"}
        sp.bfd_up("10.1.1.1")
        assert set(sp.desired_routes()) == {"10.244.2.0/24"}
    asyncio.run(run())


def test_bfd_block_parsed_and_kept_out_of_exabgps_config():
    def peers(bfd):
        spec = {"peerIP": "10.1.1.1", "asNumber": 65100, **({"bfd": bfd} if bfd is not None else {})}
        return [{"kind": "BGPPeer", "metadata": {"name": "tor"}, "spec": spec}]

    plain = resolve(NODE, [NODE], peers(None), CONFIGS, {}).config
    on = resolve(NODE, [NODE], peers({"minRxMs": 100}), CONFIGS, {}).config
    off = resolve(NODE, [NODE], peers({"enabled": False}), CONFIGS, {}).config
    assert plain.peers[0].bfd is None and off.peers[0].bfd is None
    assert (on.peers[0].bfd.min_rx_ms, on.peers[0].bfd.min_tx_ms, on.peers[0].bfd.multiplier) == (100, 300, 3)
    assert on.session_key() == plain.session_key()  # a BFD change never reloads ExaBGP
    bad = resolve(NODE, [NODE], peers({"minTxMs": 1, "multiplier": 0}), CONFIGS, {})
    assert bad.config.peers == () and any("bfd.minTxMs" in e and "bfd.multiplier" in e for e in bad.errors), bad.errors


def test_service_prefixes_announced_and_withdrawn_over_the_api(tmp_path):
    async def run():
        sp = speaker(tmp_path)
        sp.handle(msg(type="state", state="up"), 1.0)
        sp.commands.transport.lines.clear()
        vip = Advertisement("198.51.100.5/32", "loadBalancerIP", ("demo/web",), ("65000:300",))
        sp.set_service_routes({vip.prefix: vip})
        assert sp.commands.transport.lines == ["neighbor 10.1.1.1 announce route 198.51.100.5/32 next-hop 10.1.1.2 "
                                    "community [ 65000:100 65000:300 ]"]
        assert sp.route_source("198.51.100.5/32") == "Service demo/web"
        sp.commands.transport.lines.clear()
        sp.set_service_routes({vip.prefix: vip})  # the same set again: nothing sent
        assert sp.commands.transport.lines == []
        sp.set_service_routes({})
        assert sp.commands.transport.lines == ["neighbor 10.1.1.1 withdraw route 198.51.100.5/32 next-hop 10.1.1.2"]
    asyncio.run(run())


# -- IPv6 ------------------------------------------------------------------------------------------

DUAL = Node(name="n1", pod_cidrs=("10.244.1.0/24", "fd10:1::/64"), addresses=("10.1.1.2", "fd00:1:1::2"))
BOTH = [{"kind": "BGPPeer", "metadata": {"name": "tor"},
         "spec": {"peerIP": "10.1.1.1", "asNumber": 65100, "addressFamilies": ["IPv4", "IPv6"]}}]
SEPARATE = PEERS + [{"kind": "BGPPeer", "metadata": {"name": "tor-v6"},
                     "spec": {"peerIP": "fd00:1:1::1", "asNumber": 65100}}]
V6_OPEN = {"capabilities": {"1": {"name": "multiprotocol", "families": ["ipv4/unicast", "ipv6/unicast"]},
                            "64": {"name": "graceful restart", "time": 120}}}


def dual_speaker(tmp_path, node=DUAL, peers=BOTH):
    sp = Speaker(str(tmp_path))
    res = resolve(node, [node], peers, CONFIGS, {})
    sp.configure(res.config)
    sp.commands.attach(FakeWriter())
    return sp, res


def msg_from(peer, **neighbor):
    return parse_message(json.dumps({"type": neighbor.pop("type"), "neighbor": {"address": {"peer": peer},
                                                                                 **neighbor}}))


def assert_explicit_next_hops(lines):
    for line in lines:
        if " announce route " in line or " withdraw route " in line:
            nh = line.split(" next-hop ", 1)[1].split()[0]
            assert nh not in ("self", "0.0.0.0", "::"), line
            prefix = line.split(" route ", 1)[1].split()[0]
            assert (":" in nh) == (":" in prefix), line


def test_ipv6_over_the_ipv4_session_explicit_next_hops_and_eor_per_family(tmp_path):
    async def run():
        sp, res = dual_speaker(tmp_path)
        assert res.errors == []
        vip = Advertisement("fd20::5/128", "loadBalancerIP", ("demo/web",), ())
        sp.set_service_routes({vip.prefix: vip})
        sp.commands.transport.lines.clear()
        sp.handle(msg(type="open", direction="receive", open=V6_OPEN), 0.5)
        sp.handle(msg(type="state", state="up"), 1.0)  # replayed, then End-of-RIB per family
        w = sp.commands.transport
        assert w.lines == [
            "neighbor 10.1.1.1 announce route 10.244.1.0/24 next-hop 10.1.1.2 community [ 65000:100 ]",
            "neighbor 10.1.1.1 announce route fd10:1::/64 next-hop fd00:1:1::2 community [ 65000:100 ]",
            "neighbor 10.1.1.1 announce route fd20::5/128 next-hop fd00:1:1::2 community [ 65000:100 ]",
            "neighbor 10.1.1.1 announce eor ipv4 unicast",
            "neighbor 10.1.1.1 announce eor ipv6 unicast",
        ]
        st = sp.peers["10.1.1.1"]
        assert st.eor_sent and not st.eor_received
        sp.handle(msg(type="update", direction="receive", message={"eor": {"afi": "ipv4", "safi": "unicast"}}), 1.1)
        assert not st.eor_received  # IPv6's is still due
        sp.handle(msg(type="update", direction="receive", message={"eor": {"afi": "ipv6", "safi": "unicast"}}), 1.2)
        assert st.eor_received and sp.peer_status(st)["eorReceived"]
        # a pod CIDR change: the withdrawal names the same next hop as the announcement
        w.lines.clear()
        node = Node(name="n1", pod_cidrs=("10.244.1.0/24", "fd10:2::/64"), addresses=DUAL.addresses)
        sp.configure(resolve(node, [node], BOTH, CONFIGS, {}).config)
        assert w.lines == ["neighbor 10.1.1.1 withdraw route fd10:1::/64 next-hop fd00:1:1::2",
                           "neighbor 10.1.1.1 announce route fd10:2::/64 next-hop fd00:1:1::2 community [ 65000:100 ]"]
        w.lines.clear()
        await sp.stop(graceful=True)
        assert sorted(w.lines) == ["neighbor 10.1.1.1 withdraw route 10.244.1.0/24 next-hop 10.1.1.2",
                                   "neighbor 10.1.1.1 withdraw route fd10:2::/64 next-hop fd00:1:1::2",
                                   "neighbor 10.1.1.1 withdraw route fd20::5/128 next-hop fd00:1:1::2"]
    asyncio.run(run())


def test_peer_without_ipv6_gets_no_ipv6_eor(tmp_path):
    sp, _ = dual_speaker(tmp_path)
    v4_only = {"capabilities": {"1": {"name": "multiprotocol", "families": ["ipv4/unicast"]}}}
    sp.handle(msg(type="open", direction="receive", open=v4_only), 0.5)
    sp.handle(msg(type="state", state="up"), 1.0)
    assert [line for line in sp.commands.transport.lines if " eor " in line] == ["neighbor 10.1.1.1 announce eor ipv4 unicast"]
    st = sp.peers["10.1.1.1"]
    assert st.negotiated == (4,) and st.eor_sent
    sp.handle(msg(type="update", direction="receive", message={"eor": {"afi": "ipv4", "safi": "unicast"}}), 1.1)
    assert st.eor_received


def test_separate_sessions_each_carry_their_own_family(tmp_path):
    sp, res = dual_speaker(tmp_path, peers=SEPARATE)
    assert res.errors == []
    sp.handle(msg(type="state", state="up"), 1.0)
    sp.handle(msg_from("fd00:1:1::1", type="state", state="up"), 1.0)
    assert sp.commands.transport.lines == [
        "neighbor 10.1.1.1 announce route 10.244.1.0/24 next-hop 10.1.1.2 community [ 65000:100 ]",
        "neighbor 10.1.1.1 announce eor ipv4 unicast",
        "neighbor fd00:1:1::1 announce route fd10:1::/64 next-hop fd00:1:1::2 community [ 65000:100 ]",
        "neighbor fd00:1:1::1 announce eor ipv6 unicast",
    ]


def test_family_without_next_hop_is_never_announced(tmp_path):
    v4node = Node(name="n1", pod_cidrs=("10.244.1.0/24", "fd10:1::/64"), addresses=("10.1.1.2",))
    sp, res = dual_speaker(tmp_path, node=v4node)
    assert any(e.startswith("BGPPeer tor: no IPv6 next hop") for e in res.errors)
    sp.set_service_routes({"fd20::5/128": Advertisement("fd20::5/128", "clusterIP", (), ())})
    sp.handle(msg(type="state", state="up"), 1.0)
    lines = sp.commands.transport.lines
    assert not any("fd10:1::/64" in line or "fd20::5" in line for line in lines), lines
    assert lines[0] == "neighbor 10.1.1.1 announce route 10.244.1.0/24 next-hop 10.1.1.2 community [ 65000:100 ]"
    assert_explicit_next_hops(lines)


def test_announcements_never_use_next_hop_self_or_unspecified(tmp_path):
    v6only = Node(name="n1", pod_cidrs=("fd10:1::/64",), addresses=("fd00:1:1::2",))
    mesh = [{"kind": "BGPConfiguration", "metadata": {"name": "default"},
             "spec": {"asNumber": 65001, "nodeToNodeMesh": True}}]
    other = Node(name="n2", pod_cidrs=("10.244.2.0/24", "fd10:2::/64"), addresses=("10.1.1.3", "fd00:1:1::3"))
    cases = [(DUAL, BOTH, CONFIGS), (DUAL, SEPARATE, CONFIGS), (v6only, SEPARATE, CONFIGS),
             (DUAL, [], mesh), (v6only, [], mesh)]
    for k, (node, peers, configs) in enumerate(cases):
        (tmp_path / str(k)).mkdir()
        sp = Speaker(str(tmp_path / str(k)))
        sp.configure(resolve(node, [node, other], peers, configs, {}).config)
        sp.commands.attach(FakeWriter())
        sp.set_service_routes({"fd20::5/128": Advertisement("fd20::5/128", "clusterIP", (), ()),
                               "192.0.2.5/32": Advertisement("192.0.2.5/32", "clusterIP", (), ())})
        for p in sp.cfg.peers:
            sp.handle(msg_from(p.address, type="state", state="up"), 1.0)
            for ann in sp.desired_announcements(p).values():
                assert ann.next_hop not in ("", "0.0.0.0", "::") and "self" not in ann.command, ann
        assert any(" announce route " in line for line in sp.commands.transport.lines), k
        assert_explicit_next_hops(sp.commands.transport.lines)


def test_graceful_restart_stale_routes_per_family(tmp_path):
    async def run():
        sp, _ = dual_speaker(tmp_path)
        sp.handle(msg(type="open", direction="receive", open=V6_OPEN), 0.5)
        sp.handle(msg(type="state", state="up"), 1.0)
        u = {"attribute": {"as-path": {"0": {"element": "as-sequence", "value": [65100, 65002]}}},
             "announce": {"ipv4 unicast": {"10.1.1.1": [{"nlri": "10.244.2.0/24"}]},
                          "ipv6 unicast": {"fd00:1:1::1": [{"nlri": "fd10:2::/64"}]}}}
        sp.handle(msg(type="update", direction="receive", message={"update": u}), 1.1)
        assert sp.rib.desired() == {"10.244.2.0/24": frozenset({"10.1.1.1"}), "fd10:2::/64": frozenset({"fd00:1:1::1"})}
        sp.handle(msg(type="state", state="down", reason="closing connection"), 2.0)  # TCP loss: stale
        sp.handle(msg(type="open", direction="receive", open=V6_OPEN), 2.5)
        sp.handle(msg(type="state", state="up"), 3.0)
        sp.handle(msg(type="update", direction="receive", message={"eor": {"afi": "ipv4", "safi": "unicast"}}), 3.1)
        assert set(sp.rib.desired()) == {"fd10:2::/64"}  # IPv4 re-sent nothing; IPv6 not done yet
        assert "10.1.1.1" in sp._timers
        sp.handle(msg(type="update", direction="receive", message={"eor": {"afi": "ipv6", "safi": "unicast"}}), 3.2)
        assert sp.rib.desired() == {} and "10.1.1.1" not in sp._timers
        # the peer comes back without IPv6: its stale IPv6 routes go at once, no End-of-RIB will come for them
        sp.handle(upd(announce=["10.244.2.0/24"]), 3.3)
        sp.handle(msg(type="update", direction="receive", message={"update": u}), 3.4)
        sp.handle(msg(type="state", state="down", reason="closing connection"), 4.0)
        sp.handle(msg(type="open", direction="receive",
                      open={"capabilities": {"1": {"name": "multiprotocol", "families": ["ipv4/unicast"]},
                                             "64": {"name": "graceful restart", "time": 120}}}), 4.5)
        sp.handle(msg(type="state", state="up"), 5.0)
        assert set(sp.rib.desired()) == {"10.244.2.0/24"}
        sp.handle(msg(type="update", direction="receive", message={"eor": {"afi": "ipv4", "safi": "unicast"}}), 5.1)
        assert sp.rib.desired() == {} and sp.peers["10.1.1.1"].eor_received and "10.1.1.1" not in sp._timers
    asyncio.run(run())


def test_listening_on_both_families_is_a_restart_everything_else_a_reload(tmp_path):
    class Running:
        returncode = None
        pid = 4242

    mesh = [{"kind": "BGPConfiguration", "metadata": {"name": "default"},
             "spec": {"asNumber": 65001, "nodeToNodeMesh": True}}]
    lower = Node(name="n0", pod_cidrs=("10.244.0.0/24",), addresses=("10.1.0.9", "fd00::9"))
    v4 = resolve(NODE, [NODE, lower], [], mesh, {}).config
    both = resolve(DUAL, [DUAL, lower], [], mesh, {}).config
    assert restart_key(v4) == (True, ("10.1.1.2",)) and restart_key(both) == (True, ("10.1.1.2", "fd00:1:1::2"))

    async def run():
        sp, _ = dual_speaker(tmp_path, peers=PEERS)
        sp._proc = Running()  # type: ignore[assignment]
        sp._restart.clear()
        sp.configure(resolve(DUAL, [DUAL], BOTH, CONFIGS, {}).config)  # IPv6 added to the session: a reload
        assert sp._reload_wanted.is_set() and not sp._restart.is_set()
        assert "ipv6 unicast;" in open(sp.conf_path).read()
        sp.configure(v4)
        assert sp._restart.is_set()  # it listens now
        sp._restart.clear()
        sp.configure(both)  # and an IPv6 address to listen on appears
        assert sp._restart.is_set()
    asyncio.run(run())
