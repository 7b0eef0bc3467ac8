import asyncio
import json

from routed.bgp.config import resolve
from routed.bgp.manager import BgpInputs, BgpManager
from routed.bgp.rib import parse_message
from routed.bgp.speaker import Speaker
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
    sp._writer = FakeWriter()
    return sp


def test_up_replays_then_eor_and_cidr_change(tmp_path):
    async def run():
        sp = speaker(tmp_path)
        sp.handle(msg(type="state", state="up"), 1.0)
        w = sp._writer
        assert w.lines == ["neighbor 10.1.1.1 announce route 10.244.1.0/24 next-hop self community [ 65000:100 ]",
                           "neighbor 10.1.1.1 announce eor ipv4 unicast"]
        w.lines.clear()
        node = Node(name="n1", pod_cidrs=("10.245.1.0/24",), addresses=("10.1.1.2",))
        sp.configure(resolve(node, [node], PEERS, CONFIGS, {}).config)  # same sessions: API only
        assert w.lines == ["neighbor 10.1.1.1 withdraw route 10.244.1.0/24 next-hop self",
                           "neighbor 10.1.1.1 announce route 10.245.1.0/24 next-hop self community [ 65000:100 ]"]
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

    async def apply(self, desired, prune=True):
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
        sp._writer.lines.clear()
        sp.bfd_down("10.1.1.1", "controlDetectionTimeExpired")
        assert sp.desired_routes() == {} and "10.1.1.1" not in sp._timers
        assert sp._writer.lines == ["neighbor 10.1.1.1 teardown 6"]
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
    from routed.bgp.services import Advertisement

    async def run():
        sp = speaker(tmp_path)
        sp.handle(msg(type="state", state="up"), 1.0)
        sp._writer.lines.clear()
        vip = Advertisement("198.51.100.5/32", "loadBalancerIP", ("demo/web",), ("65000:300",))
        sp.set_service_routes({vip.prefix: vip})
        assert sp._writer.lines == ["neighbor 10.1.1.1 announce route 198.51.100.5/32 next-hop self "
                                    "community [ 65000:100 65000:300 ]"]
        assert sp.route_source("198.51.100.5/32") == "Service demo/web"
        sp._writer.lines.clear()
        sp.set_service_routes({vip.prefix: vip})  # the same set again: nothing sent
        assert sp._writer.lines == []
        sp.set_service_routes({})
        assert sp._writer.lines == ["neighbor 10.1.1.1 withdraw route 198.51.100.5/32 next-hop self"]
    asyncio.run(run())
