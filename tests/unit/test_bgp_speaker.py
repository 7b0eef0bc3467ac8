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
