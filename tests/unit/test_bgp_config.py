import base64

import pytest

from routed.bgp.config import BgpConfigError, parse_configuration, parse_peer, resolve
from routed.bgp.exabgp_conf import render
from routed.model import Node


def node(name="n1", addr="10.1.1.2", labels=None, cidrs=("10.244.1.0/24",)):
    return Node(name=name, labels=labels or {}, pod_cidrs=tuple(cidrs), addresses=(addr,))


def peer(name, **spec):
    return {"apiVersion": "routed.dev/v1alpha1", "kind": "BGPPeer", "metadata": {"name": name}, "spec": spec}


def conf(name="default", **spec):
    return {"apiVersion": "routed.dev/v1alpha1", "kind": "BGPConfiguration", "metadata": {"name": name},
            "spec": spec}


def test_defaults():
    res = resolve(node(), [node()], [], [], {})
    assert res.errors == []
    cfg = res.config
    assert cfg.asn == 64512 and cfg.router_id == "10.1.1.2"
    assert (cfg.hold_time, cfg.keepalive, cfg.graceful_restart_time) == (9, 3, 120)
    assert cfg.pod_cidrs == ("10.244.1.0/24",)
    assert not cfg.accept_default and cfg.peers == ()


def test_asn_per_node_label_rack():
    configs = [conf(asNumber=65000, nodeASNumbers={"a": 65001}, asNumberLabel="asn", rackLabel="rack",
                    rackASNumbers={"r1": 65101})]
    assert resolve(node("a"), [], [], configs, {}).config.asn == 65001
    assert resolve(node("b", labels={"asn": "65077"}), [], [], configs, {}).config.asn == 65077
    assert resolve(node("c", labels={"rack": "r1"}), [], [], configs, {}).config.asn == 65101
    assert resolve(node("d", labels={"rack": "r9"}), [], [], configs, {}).config.asn == 65000
    bad = resolve(node("e", labels={"asn": "x"}), [], [], configs, {})
    assert any("label asn='x'" in e for e in bad.errors) and bad.config.asn == 65000


def test_per_node_override():
    configs = [conf(asNumber=65000, holdTime=30), conf("node.n1", routerID="1.2.3.4", holdTime=6)]
    cfg = resolve(node(), [], [], configs, {}).config
    assert (cfg.router_id, cfg.hold_time, cfg.keepalive, cfg.asn) == ("1.2.3.4", 6, 2, 65000)


def test_invalid_configuration_named():
    with pytest.raises(BgpConfigError, match=r"BGPConfiguration default: spec.holdTime"):
        parse_configuration(conf(holdTime=1))
    with pytest.raises(BgpConfigError, match=r"community"):
        parse_configuration(conf(communities=["65000:99999"]))
    with pytest.raises(BgpConfigError, match=r"keepaliveTime"):
        parse_configuration(conf(holdTime=9, keepaliveTime=5))
    with pytest.raises(BgpConfigError, match=r"spec.unknownField"):
        parse_configuration(conf(unknownField=1))
    assert parse_configuration(conf(communities=["65000:100", "4200000000:1:2"]))[1].communities


def test_bad_peer_does_not_take_down_others():
    peers = [peer("good", peerIP="10.1.1.1", asNumber=65100), peer("bad-ip", peerIP="10.1.1.999", asNumber=65100),
             peer("bad-asn", peerIP="10.1.1.3", asNumber=0),
             peer("both", peerIP="10.1.1.4", asNumber=1, node="n1", nodeSelector={"matchLabels": {}})]
    res = resolve(node(), [], peers, [], {})
    assert [p.address for p in res.config.peers] == ["10.1.1.1"]
    assert len(res.errors) == 3
    assert any(e.startswith("BGPPeer bad-ip: spec.peerIP") for e in res.errors)
    assert any(e.startswith("BGPPeer bad-asn: spec.asNumber") for e in res.errors)
    assert any("either node or nodeSelector" in e for e in res.errors)


def test_peer_selection():
    peers = [peer("all", peerIP="10.9.0.1", asNumber=65100),
             peer("mine", peerIP="10.9.0.2", asNumber=65100, node="n1"),
             peer("other", peerIP="10.9.0.3", asNumber=65100, node="n2"),
             peer("rack1", peerIP="10.9.0.4", asNumber=65100, nodeSelector={"matchLabels": {"rack": "r1"}}),
             peer("notrack2", peerIP="10.9.0.5", asNumber=65100,
                  nodeSelector={"matchExpressions": [{"key": "rack", "operator": "NotIn", "values": ["r2"]}]}),
             peer("self", peerIP="10.1.1.2", asNumber=65100)]
    res = resolve(node(labels={"rack": "r1"}), [], peers, [], {})
    assert [p.address for p in res.config.peers] == ["10.9.0.1", "10.9.0.2", "10.9.0.4", "10.9.0.5"]


def test_password_from_secret():
    secrets = {"routed-system/bgp": {"data": {"tor": base64.b64encode(b"s3cret").decode()}},
               "other/plain": {"stringData": {"k": "plain"}}}
    peers = [peer("a", peerIP="10.9.0.1", asNumber=1, password={"secretKeyRef": {"name": "bgp", "key": "tor"}}),
             peer("b", peerIP="10.9.0.2", asNumber=1,
                  password={"secretKeyRef": {"name": "plain", "key": "k", "namespace": "other"}}),
             peer("c", peerIP="10.9.0.3", asNumber=1, password={"secretKeyRef": {"name": "nope", "key": "k"}}),
             peer("d", peerIP="10.9.0.4", asNumber=1, password={"secretKeyRef": {"name": "bgp", "key": "x"}})]
    res = resolve(node(), [], peers, [], secrets)
    assert {p.address: p.password for p in res.config.peers} == {"10.9.0.1": "s3cret", "10.9.0.2": "plain"}
    assert any("BGPPeer c: secret nope not found" in e for e in res.errors)
    assert any("BGPPeer d:" in e and "no key 'x'" in e for e in res.errors)


def test_mesh():
    nodes = [node("n1", "10.1.1.2"), node("n2", "10.1.2.2"), node("n0", "10.1.0.2")]
    cfg = resolve(nodes[0], nodes, [], [conf(asNumber=65000, nodeToNodeMesh=True)], {}).config
    assert {(p.address, p.passive) for p in cfg.peers} == {("10.1.2.2", False), ("10.1.0.2", True)}
    assert cfg.listen


def test_exabgp_render():
    peers = [peer("a", peerIP="10.9.0.1", asNumber=65100, ebgpMultihop=3, maxPrefixes=10,
                  password={"secretKeyRef": {"name": "bgp", "key": "tor"}}),
             peer("b", peerIP="10.9.0.2", asNumber=65100, ttlSecurity=1)]
    secrets = {"x/bgp": {"stringData": {"tor": 'pa"ss'}}}
    cfg = resolve(node(), [], peers, [conf(gracefulRestartTime=60)], secrets).config
    text = render(cfg, "/run/x.sock", python="/py")
    assert "run /py -m routed.bgp.bridge /run/x.sock;" in text
    assert 'md5-password "pa\\"ss";' in text
    assert "outgoing-ttl 3;" in text and "incoming-ttl 255;" in text
    assert "graceful-restart 60;" in text and "manual-eor true;" in text
    assert "local-address 10.1.1.2;" in text


def test_peer_kind_checked():
    with pytest.raises(BgpConfigError, match="expected BGPPeer"):
        parse_peer({"kind": "Pod", "metadata": {"name": "x"}, "spec": {}})
