import base64

import pytest

from routed.bgp.config import (
    BgpConfigError,
    derived_router_id,
    first_addresses,
    next_hop_for,
    parse_configuration,
    parse_peer,
    resolve,
)
from routed.bgp.exabgp_conf import environment, render
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
    assert 'md5-password cGEic3M=;' in text and 'md5-base64 true;' in text
    assert "outgoing-ttl 3;" in text and "incoming-ttl 255;" in text
    assert "graceful-restart 60;" in text and "manual-eor true;" in text
    assert "local-address 10.1.1.2;" in text


def test_peer_kind_checked():
    with pytest.raises(BgpConfigError, match="expected BGPPeer"):
        parse_peer({"kind": "Pod", "metadata": {"name": "x"}, "spec": {}})


# -- IPv6 ------------------------------------------------------------------------------------------

DUAL = ("10.1.1.2", "fd00:1:1::2")


def dual(name="n1", addrs=DUAL, cidrs=("10.244.1.0/24", "fd10:1::/64"), labels=None):
    return Node(name=name, labels=labels or {}, pod_cidrs=tuple(cidrs), addresses=tuple(addrs))


def family_block(text, address):
    block = text.split(f"neighbor {address} {{", 1)[1].split("\n}", 1)[0]
    return block.split("family {", 1)[1].split("}", 1)[0].split()


def test_separate_ipv6_session():
    peers = [peer("tor", peerIP="10.1.1.1", asNumber=65100), peer("tor-v6", peerIP="fd00:1:1::1", asNumber=65100)]
    res = resolve(dual(), [], peers, [], {})
    assert res.errors == []
    v4, v6 = res.config.peers
    assert (v4.address, v4.families, v4.local_address, v4.next_hops) == ("10.1.1.1", (4,), "10.1.1.2",
                                                                         ((4, "10.1.1.2"),))
    assert (v6.address, v6.families, v6.local_address, v6.next_hops) == ("fd00:1:1::1", (6,), "fd00:1:1::2",
                                                                         ((6, "fd00:1:1::2"),))
    assert v6.next_hop(4) == "" and v6.next_hop(6) == "fd00:1:1::2"
    text = render(res.config, "/s", python="/py")
    assert family_block(text, "10.1.1.1") == ["ipv4", "unicast;"]
    assert family_block(text, "fd00:1:1::1") == ["ipv6", "unicast;"]
    assert "local-address fd00:1:1::2;" in text
    assert "next-hop" not in text  # next hops go over the API, explicitly per route


def test_ipv6_over_the_ipv4_session():
    peers = [peer("tor", peerIP="10.1.1.1", asNumber=65100, addressFamilies=["IPv4", "IPv6"])]
    res = resolve(dual(addrs=("10.1.1.2", "10.9.9.9", "fd00:1:1::2", "fd00:9::2")), [], peers, [], {})
    assert res.errors == []
    (p,) = res.config.peers
    # the session's own family: the local address; the other family: the node's first address of it
    assert p.families == (4, 6) and p.next_hops == ((4, "10.1.1.2"), (6, "fd00:1:1::2"))
    assert family_block(render(res.config, "/s", python="/py"), "10.1.1.1") == ["ipv4", "unicast;", "ipv6",
                                                                               "unicast;"]
    over = [peer("tor", peerIP="10.1.1.1", asNumber=65100, addressFamilies=["IPv6", "IPv4"],
                 ipv6NextHop="fd00:9::2", ipv4NextHop="10.9.9.9")]
    (p,) = resolve(dual(), [], over, [], {}).config.peers
    assert p.families == (4, 6) and p.next_hops == ((4, "10.9.9.9"), (6, "fd00:9::2"))


def test_family_without_next_hop_is_reported_by_peer_name_and_not_announced():
    peers = [peer("tor", peerIP="10.1.1.1", asNumber=65100, addressFamilies=["IPv4", "IPv6"])]
    res = resolve(node(), [], peers, [], {})  # IPv4-only node
    (p,) = res.config.peers
    assert p.families == (4, 6) and p.next_hops == ((4, "10.1.1.2"),) and p.next_hop(6) == ""
    assert len(res.errors) == 1 and res.errors[0].startswith("BGPPeer tor: no IPv6 next hop")
    assert "ipv6NextHop" in res.errors[0]
    # a link-local InternalIP is no next hop either
    res = resolve(dual(addrs=("10.1.1.2", "fe80::2")), [], peers, [], {})
    assert res.config.peers[0].next_hop(6) == "" and "no IPv6 next hop" in res.errors[0]
    # the override fills the gap
    fixed = [peer("tor", peerIP="10.1.1.1", asNumber=65100, addressFamilies=["IPv4", "IPv6"],
                  ipv6NextHop="2001:db8::2")]
    res = resolve(node(), [], fixed, [], {})
    assert res.errors == [] and res.config.peers[0].next_hop(6) == "2001:db8::2"


def test_next_hop_fields_validated():
    def bad(match, **spec):
        with pytest.raises(BgpConfigError, match=match):
            parse_peer(peer("x", peerIP="10.1.1.1", asNumber=1, **spec))

    bad("spec.ipv6NextHop.*link-local", addressFamilies=["IPv4", "IPv6"], ipv6NextHop="fe80::1")
    bad("spec.ipv6NextHop.*IPv4-mapped", addressFamilies=["IPv4", "IPv6"], ipv6NextHop="::ffff:10.1.1.2")
    bad("spec.ipv6NextHop.*unspecified", addressFamilies=["IPv4", "IPv6"], ipv6NextHop="::")
    bad("spec.ipv4NextHop.*unspecified", ipv4NextHop="0.0.0.0")
    bad("spec.ipv4NextHop.*not an IPv4", ipv4NextHop="fd00::1")
    bad("ipv6NextHop is set but IPv6 is not one of the session's addressFamilies", ipv6NextHop="fd00::2")
    bad("duplicate address family", addressFamilies=["IPv4", "IPv4"])
    bad("spec.addressFamilies", addressFamilies=["IPv5"])
    _, spec = parse_peer(peer("x", peerIP="fd00::1", asNumber=1, ipv6NextHop="FD00:0::2"))
    assert spec.families() == (6,) and spec.ipv6NextHop == "fd00::2"


def test_router_id_for_ipv6_only_nodes():
    v6only = dual(addrs=("fd00:1:1::2",), cidrs=("fd10:1::/64",))
    res = resolve(v6only, [v6only], [peer("tor", peerIP="fd00:1:1::1", asNumber=65100)], [], {})
    assert res.errors == [] and res.config is not None
    rid = res.config.router_id
    assert rid == derived_router_id("n1") == resolve(v6only, [], [], [], {}).config.router_id  # stable
    assert resolve(dual("n2", addrs=("fd00:1:2::2",)), [], [], [], {}).config.router_id != rid
    assert resolve(dual(addrs=("fd00:1:1::2", "10.1.1.2")), [], [], [], {}).config.router_id == "10.1.1.2"
    assert resolve(v6only, [], [], [conf("node.n1", routerID="192.0.2.1")], {}).config.router_id == "192.0.2.1"
    for i in range(3000):
        first = int(derived_router_id(f"node-{i}").split(".")[0])
        assert 1 <= first <= 223, i
    (p,) = res.config.peers
    assert p.next_hops == ((6, "fd00:1:1::2"),)
    assert "router-id " + rid + ";" in render(res.config, "/s", python="/py")


def test_ipv4_peer_of_an_ipv6_only_node_reports_the_missing_next_hop():
    v6only = dual(addrs=("fd00:1:1::2",), cidrs=("fd10:1::/64",))
    res = resolve(v6only, [], [peer("tor", peerIP="10.1.1.1", asNumber=65100)], [], {})
    assert res.config.peers[0].next_hops == () and res.errors[0].startswith("BGPPeer tor: no IPv4 next hop")


def test_mesh_per_family():
    nodes = [dual("n1", ("10.1.0.2", "fd00::2")), dual("n2", ("10.1.0.3", "fd00::3")),
             dual("n0", ("fd00::1", "10.1.0.1")),  # order of the addresses does not matter
             node("v4", "10.1.0.9"), dual("v6", ("fd00::9",), cidrs=("fd10:9::/64",))]
    cfg = resolve(nodes[0], nodes, [], [conf(asNumber=65000, nodeToNodeMesh=True)], {}).config
    got = {(p.address, p.name, p.passive, p.families, p.local_address, p.next_hops) for p in cfg.peers}
    assert got == {
        ("10.1.0.3", "mesh:n2", False, (4,), "10.1.0.2", ((4, "10.1.0.2"),)),
        ("fd00::3", "mesh:n2", False, (6,), "fd00::2", ((6, "fd00::2"),)),
        ("10.1.0.1", "mesh:n0", True, (4,), "10.1.0.2", ((4, "10.1.0.2"),)),
        ("fd00::1", "mesh:n0", True, (6,), "fd00::2", ((6, "fd00::2"),)),
        ("10.1.0.9", "mesh:v4", False, (4,), "10.1.0.2", ((4, "10.1.0.2"),)),
        ("fd00::9", "mesh:v6", False, (6,), "fd00::2", ((6, "fd00::2"),)),
    }
    assert cfg.listen
    # the v6-only node meshes over IPv6 only, and listens for the lower addresses there
    v6cfg = resolve(nodes[4], nodes, [], [conf(asNumber=65000, nodeToNodeMesh=True)], {}).config
    assert {(p.address, p.passive) for p in v6cfg.peers} == {("fd00::1", True), ("fd00::2", True), ("fd00::3", True)}


def test_listening_binds_the_first_address_of_each_family():
    nodes = [dual("n1", ("10.1.0.2", "10.7.0.2", "fe80::2", "fd00::2", "fd00::7")), dual("n0", ("10.1.0.1", "fd00::1"))]
    cfg = resolve(nodes[0], nodes, [], [conf(nodeToNodeMesh=True)], {}).config
    assert first_addresses(cfg.local_addresses) == ("10.1.0.2", "fd00::2")
    assert environment(cfg, 0, "/pid")["exabgp_tcp_bind"] == "10.1.0.2 fd00::2"
    assert environment(resolve(nodes[0], [], [], [], {}).config, 0, "/pid")["exabgp_tcp_bind"] == ""


def test_next_hop_for():
    addrs = ("10.1.1.2", "10.2.1.2", "fe80::1", "fd00:1:1::2", "fd00:2:1::2")
    assert next_hop_for(addrs, "10.2.1.1", 4) == "10.2.1.2"
    assert next_hop_for(addrs, "fd00:2:1::1", 6) == "fd00:2:1::2"
    assert next_hop_for(addrs, "10.2.1.1", 6) == "fd00:1:1::2"  # another family: the first one
    assert next_hop_for(addrs, "10.2.1.1", 6, "fd00:2:1::2") == "fd00:2:1::2"
    assert next_hop_for(("10.1.1.2",), "10.2.1.1", 6) == ""
