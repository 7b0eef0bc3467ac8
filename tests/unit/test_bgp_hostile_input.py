"""Hostile cluster objects on the BGP side: each bad one is named in `errors` and left out, the rest keeps
working (routed/bgp/config.py resolve, routed/bgp/services.py, BgpManager.update, Node.from_k8s)."""

from __future__ import annotations

import asyncio
import base64
import logging

import pytest

from routed.bgp.config import resolve
from routed.bgp.manager import BgpInputs, BgpManager
from routed.bgp.services import ServicePolicy, advertisements
from routed.config import BgpOptions
from routed.model import Node, Pod

INJECT = "\nannounce route 8.8.8.8/32 next-hop 10.0.0.66 local-preference 5000"
PASSWORD_LIKE = "pwn-Secret-Value"


def node(name="n1", addresses=("10.1.1.2",), cidrs=("10.244.1.0/24",), labels=None):
    return Node(name=name, labels=labels or {}, pod_cidrs=tuple(cidrs), addresses=tuple(addresses))


def k8s_node(name, *addresses, cidrs=("10.244.9.0/24",)):
    return {"kind": "Node", "metadata": {"name": name}, "spec": {"podCIDRs": list(cidrs)},
            "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]
                       + [{"type": "Hostname", "address": name}]}}


def peer(name, **spec):
    return {"apiVersion": "routed.dev/v1alpha1", "kind": "BGPPeer", "metadata": {"name": name}, "spec": spec}


def conf(name="default", **spec):
    return {"kind": "BGPConfiguration", "metadata": {"name": name}, "spec": spec}


def secret(**data):
    return {"data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def no_raw_text(errors, *secrets):
    """Nothing from the hostile input reaches an error unescaped (one ASCII line each), no secret at all."""
    for e in errors:
        assert "\n" not in e and "\r" not in e and e.isascii() and e.isprintable(), e
        for f in secrets:
            assert f not in e, e


GOOD = peer("good", peerIP="10.1.1.1", asNumber=65100)


@pytest.mark.parametrize("bad, field", [
    (peer("scope", peerIP="2001:db8::1%x", asNumber=65100), "spec.peerIP"),
    (peer("scope-inject", peerIP="2001:db8::1%x" + INJECT, asNumber=65100), "spec.peerIP"),
    (peer("nh6", peerIP="10.1.1.5", asNumber=65100, addressFamilies=["IPv4", "IPv6"],
          ipv6NextHop="2001:db8::1%x" + INJECT), "spec.ipv6NextHop"),
    (peer("nh4", peerIP="10.1.1.6", asNumber=65100, ipv4NextHop="10.1.1.2 "), "spec.ipv4NextHop"),
    (peer("mapped", peerIP="::ffff:10.1.1.7", asNumber=65100), "spec.peerIP"),
    (peer("digits", peerIP="\u0661\u0660.1.1.8", asNumber=65100), "spec.peerIP"),
    (peer("node-name", peerIP="10.1.1.9", asNumber=65100, node="n1\n}"), "spec.node"),
    (peer("selector", peerIP="10.1.1.10", asNumber=65100, nodeSelector={"matchLabels": {"a\nb": "c"}}),
     "spec.nodeSelector.matchLabels"),
    (peer("Bad_Name\n", peerIP="10.1.1.11", asNumber=65100), "metadata.name"),
    (peer("secret-ref", peerIP="10.1.1.12", asNumber=65100,
          password={"secretKeyRef": {"name": "bgp\n", "key": "tor"}}), "spec.password.secretKeyRef.name"),
])
def test_a_bad_peer_is_named_and_the_good_one_stays(bad, field):
    res = resolve(node(), [node()], [GOOD, bad], [], {})
    assert [p.address for p in res.config.peers] == ["10.1.1.1"]
    assert len(res.errors) == 1 and field in res.errors[0], res.errors
    name = bad["metadata"]["name"]
    assert res.errors[0].startswith(f"BGPPeer {name}:" if name.isidentifier() or "-" in name else "BGPPeer '")
    no_raw_text(res.errors)


def test_a_bad_community_keeps_the_defaults_and_says_why():
    res = resolve(node(), [], [GOOD], [conf(asNumber=65001, communities=["65000:100", "1:2\n"])], {})
    assert res.config.peers[0].address == "10.1.1.1" and res.config.communities == ()
    assert any("BGPConfiguration default: spec.communities" in e and "control character" in e for e in res.errors)
    no_raw_text(res.errors)
    ok = resolve(node(), [], [], [conf(communities=["65000:0100", "4200000000:1:2"])], {})
    assert ok.errors == [] and ok.config.communities == ("65000:100", "4200000000:1:2")


@pytest.mark.parametrize("value, reason", [
    ("x" * 81, "81 bytes"),
    (PASSWORD_LIKE + "\n", "trailing newline"),
    (PASSWORD_LIKE + '"; }\nprocess pwn { run sh -c "id"; encoder text; }', "control character"),
])
def test_a_refused_password_names_the_secret_and_key_never_the_value(value, reason):
    secrets = {"routed-system/bgp": secret(tor=value, ok="fine-password")}
    peers = [peer("tor1", peerIP="10.1.1.1", asNumber=65100, password={"secretKeyRef": {"name": "bgp", "key": "tor"}}),
             peer("tor2", peerIP="10.1.1.3", asNumber=65100, password={"secretKeyRef": {"name": "bgp", "key": "ok"}})]
    res = resolve(node(), [], peers, [], secrets)
    assert {p.name: p.password for p in res.config.peers} == {"tor2": "fine-password"}
    assert len(res.errors) == 1
    assert res.errors[0].startswith("BGPPeer tor1: secret routed-system/bgp key tor: ") and reason in res.errors[0]
    no_raw_text(res.errors, PASSWORD_LIKE, "xxxx", "pwn")


def test_password_from_string_data_is_checked_too():
    secrets = {"ns/bgp": {"stringData": {"k": "abc\r\n"}}}
    res = resolve(node(), [], [peer("p", peerIP="10.1.1.1", asNumber=1,
                                    password={"secretKeyRef": {"name": "bgp", "key": "k"}})], [], secrets)
    assert res.config.peers == () and "trailing newline" in res.errors[0] and "abc" not in res.errors[0]


def test_an_unexpected_error_in_one_peer_skips_only_that_peer():
    # a Secret that is not a mapping (a bug or a corrupt cache entry) raises inside the resolution of one peer
    secrets = {"ns/odd": "not a mapping"}
    peers = [GOOD, peer("odd", peerIP="10.1.1.3", asNumber=1, password={"secretKeyRef": {"name": "odd", "key": "k"}})]
    res = resolve(node(), [], peers, [], secrets)  # type: ignore[arg-type]
    assert [p.name for p in res.config.peers] == ["good"]
    assert res.errors and res.errors[0].startswith("BGPPeer odd: unexpected AttributeError")


def test_a_node_address_that_is_not_plain_is_dropped_with_a_warning_and_the_rest_kept(caplog):
    caplog.set_level(logging.WARNING, logger="routed.model")
    n = Node.from_k8s(k8s_node("n2", "10.1.2.2%x" + INJECT, "fe80::2%eth0", "not-an-ip", "10.1.2.3", "fd00::3",
                               cidrs=("10.244.2.0/24\n", "10.244.3.7/24")))
    assert n.addresses == ("10.1.2.3", "fd00::3") and n.pod_cidrs == ("10.244.3.0/24",)
    assert len(n.problems) == 4 and all(p.startswith("Node n2: ") for p in n.problems)
    assert any("InternalIP address[0]" in p and "control character" in p for p in n.problems)
    assert any("InternalIP address[1]" in p and "scope IDs" in p for p in n.problems)
    assert any("spec.podCIDRs[0]" in p and "control character" in p for p in n.problems)
    no_raw_text(n.problems)
    warned = [r.getMessage() for r in caplog.records]
    assert sum("Node n2:" in m for m in warned) == 4
    Node.from_k8s(k8s_node("n2", "10.1.2.2%x" + INJECT, "fe80::2%eth0", "not-an-ip", "10.1.2.3", "fd00::3",
                           cidrs=("10.244.2.0/24\n", "10.244.3.7/24")))
    assert len(caplog.records) == len(warned)  # the typed views are rebuilt often: warned once


def test_pod_ips_go_through_the_same_parser():
    pod = Pod.from_k8s({"metadata": {"name": "p", "namespace": "x"},
                        "status": {"podIPs": [{"ip": "fe80::1%eth0"}, {"ip": " 10.0.0.1"}, {"ip": "10.0.0.2"},
                                              {"ip": "2001:DB8::2"}]}})
    assert pod.ips == ("10.0.0.2", "2001:db8::2")


def test_a_bad_mesh_node_never_stops_the_mesh_with_the_others():
    me = Node.from_k8s(k8s_node("n1", "10.0.0.1"))
    nodes = [me,
             Node.from_k8s(k8s_node("n2", "10.0.0.2%x" + INJECT)),  # its only address is dropped: no session
             Node.from_k8s(k8s_node("n3", "garbage", "10.0.0.3")),  # bad address dropped, the good one used
             Node(name="n4", addresses=("10.0.0.4%x",)),  # built around from_k8s: resolve checks again
             Node(name="Bad\nName", addresses=("10.0.0.5",)),
             Node(name="n6", addresses=("10.0.0.6",), labels=None),  # type: ignore[arg-type]  # raises inside
             Node.from_k8s(k8s_node("n7", "10.0.0.7"))]
    res = resolve(me, nodes, [], [conf(nodeToNodeMesh=True, asNumberLabel="asn")], {})
    assert {p.name: p.address for p in res.config.peers} == {"mesh:n3": "10.0.0.3", "mesh:n7": "10.0.0.7"}
    text = "\n".join(res.errors)
    assert "Node n2: InternalIP address[0]" in text and "Node n3: InternalIP address[0]" in text
    assert "Node n4: address" in text
    assert "mesh node 'Bad\\nName'" in text and "mesh node n6: unexpected TypeError" in text
    no_raw_text(res.errors)


def test_an_own_bad_address_is_dropped_and_bgp_keeps_the_good_one():
    me = Node(name="n1", addresses=("10.1.1.2%x", "10.1.1.2"), pod_cidrs=("10.244.1.0/24", "nope"))
    res = resolve(me, [me], [GOOD], [], {})
    assert res.config.local_addresses == ("10.1.1.2",) and res.config.pod_cidrs == ("10.244.1.0/24",)
    assert res.config.peers[0].next_hop(4) == "10.1.1.2"
    assert any("Node n1: address" in e for e in res.errors) and any("podCIDR" in e for e in res.errors)


def test_a_bad_service_ip_is_named_and_the_other_services_announced():
    policy = ServicePolicy(cluster_ip_cidrs=("10.96.0.0/12",), load_balancer_ip_cidrs=("198.51.100.0/24",
                                                                                       "bogus/99"))
    services = [
        {"metadata": {"name": "ok", "namespace": "a"}, "spec": {"clusterIPs": ["10.96.0.10"]}},
        {"metadata": {"name": "evil", "namespace": "a"},
         "spec": {"clusterIPs": ["fe80::1%x" + INJECT, "10.96.0.11"]},
         "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7\n"}]}}},
        {"metadata": {"name": "broken", "namespace": "a"}, "spec": "not a mapping"},
    ]
    problems: list[str] = []
    ads = advertisements("n1", policy, services, [], problems)
    assert set(ads) == {"10.96.0.0/12", "198.51.100.0/24", "10.96.0.10/32", "10.96.0.11/32"}
    assert ads["10.96.0.11/32"].services == ("a/evil",)
    text = "\n".join(problems)
    assert "Service a/evil: spec.clusterIPs" in text and "Service a/evil: status.loadBalancer" in text
    assert "Service a/broken: malformed" in text and "serviceLoadBalancerIPs[1]" in text
    no_raw_text(problems)


def test_bgp_manager_update_does_not_raise_on_bad_objects_and_reports_them(tmp_path):
    async def run():
        mgr = BgpManager("n1", str(tmp_path / "state"), str(tmp_path / "run"),
                         BgpOptions(exabgp=str(tmp_path / "no-such-exabgp")))
        (tmp_path / "run").mkdir()  # not started: the speaker only writes its config
        me = Node.from_k8s(k8s_node("n1", "10.0.0.1", "10.0.0.1%x"))
        other = Node.from_k8s(k8s_node("n2", "not-an-ip", "10.0.0.2"))
        peers = [GOOD, peer("evil", peerIP="10.1.1.9%x" + INJECT, asNumber=1)]
        configs = [conf(nodeToNodeMesh=True, serviceClusterIPs=[{"cidr": "10.96.0.0/12"}])]
        services = [{"metadata": {"name": "s", "namespace": "a"}, "spec": {"clusterIPs": ["10.96.0.1%x"]}}]
        await mgr.update(BgpInputs(node=me, nodes=[me, other], peers=peers, configs=configs, secrets={},
                                   services=services))
        assert {p.name for p in mgr.config.peers} == {"good", "mesh:n2"}
        errors = mgr.status()["errors"]
        assert any(e.startswith("BGPPeer evil: spec.peerIP") for e in errors)
        assert any(e.startswith("Node n1: InternalIP") for e in errors)
        assert any(e.startswith("Node n2: InternalIP") for e in errors)
        assert any(e.startswith("Service a/s: spec.clusterIPs") for e in errors)
        no_raw_text(errors)
    asyncio.run(run())


def test_a_malformed_node_object_parses_to_what_is_usable():
    n = Node.from_k8s({"metadata": {"name": "n9", "labels": {"ok": "v", "bad": 5}}, "spec": ["x"],
                       "status": {"addresses": "10.0.0.9"}})
    assert (n.name, n.labels, n.addresses, n.pod_cidrs) == ("n9", {"ok": "v"}, (), ())
    assert Node.from_k8s({"metadata": "x"}).name == ""
