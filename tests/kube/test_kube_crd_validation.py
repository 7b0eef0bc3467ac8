"""deploy/crds against a real kube-apiserver: hostile BGPPeer / BGPConfiguration text is refused by the apiserver
itself (CEL isIP/isCIDR, patterns, maxLength/maxItems, ASN bounds, all generated from routed/bgp/config.py and
routed/validation.py), and whatever the apiserver refuses the agent refuses too (routed/validation.py), so the
manifest datastore, which has no apiserver in front, is no way around it."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from kubernetes import client as k8s

from routed.bgp.config import BgpConfigError, parse_configuration, parse_peer
from tests.kube.kube_env import KubeEnv, get_deployed

pytestmark = pytest.mark.kube

INJECT = "\nannounce route 8.8.8.8/32 next-hop 10.0.0.66"


@pytest.fixture(scope="module")
def custom() -> k8s.CustomObjectsApi:
    env: KubeEnv = get_deployed()
    return k8s.CustomObjectsApi(env.api())


def _obj(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "routed.dev/v1alpha1", "kind": kind,
            "metadata": {"name": f"rtd-crdval-{uuid.uuid4().hex[:8]}"}, "spec": spec}


def _create(custom: k8s.CustomObjectsApi, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    plural = {"BGPPeer": "bgppeers", "BGPConfiguration": "bgpconfigurations"}[kind]
    obj = _obj(kind, spec)
    # dryRun: every admission and validation step runs, nothing is stored (no cleanup, no leftovers)
    return custom.create_cluster_custom_object("routed.dev", "v1alpha1", plural, obj, dry_run="All")


def _agent_refuses(kind: str, spec: dict[str, Any]) -> bool:
    parse = parse_peer if kind == "BGPPeer" else parse_configuration
    try:
        parse(_obj(kind, spec))
    except BgpConfigError:
        return True
    return False


PEER = {"peerIP": "10.0.1.1", "asNumber": 65000}

REFUSED = [
    ("BGPPeer", {**PEER, "peerIP": "2001:db8::1%x"}, "peerIP"),
    ("BGPPeer", {**PEER, "peerIP": "2001:db8::1%x" + INJECT}, "peerIP"),
    ("BGPPeer", {**PEER, "peerIP": "fe80::1%eth0"}, "peerIP"),
    ("BGPPeer", {**PEER, "peerIP": "10.0.1.1 "}, "peerIP"),
    ("BGPPeer", {**PEER, "peerIP": "::ffff:10.0.1.1"}, "peerIP"),
    ("BGPPeer", {**PEER, "peerIP": "010.0.1.1"}, "peerIP"),
    ("BGPPeer", {**PEER, "addressFamilies": ["IPv4", "IPv6"], "ipv6NextHop": "2001:db8::2%x" + INJECT},
     "ipv6NextHop"),
    ("BGPPeer", {**PEER, "ipv4NextHop": "2001:db8::2"}, "ipv4NextHop"),
    ("BGPPeer", {**PEER, "asNumber": 0}, "asNumber"),
    ("BGPPeer", {**PEER, "asNumber": 4294967296}, "asNumber"),
    ("BGPPeer", {**PEER, "node": "Node_A\n"}, "node"),
    ("BGPPeer", {**PEER, "password": {"secretKeyRef": {"name": "bgp", "key": "a/b"}}}, "key"),
    ("BGPPeer", {**PEER, "nodeSelector": {"matchLabels": {"rack": "r1\n"}}}, "matchLabels"),
    ("BGPPeer", {**PEER, "addressFamilies": ["IPv4", "IPv6", "IPv4"]}, "addressFamilies"),
    ("BGPConfiguration", {"communities": ["1:2\n"]}, "communities"),
    ("BGPConfiguration", {"communities": ["65000:100\nannounce route 8.8.8.8/32 next-hop self"]}, "communities"),
    ("BGPConfiguration", {"communities": ["65536:1"]}, "communities"),
    ("BGPConfiguration", {"communities": ["\u0661:1"]}, "communities"),
    ("BGPConfiguration", {"communities": [f"65000:{i}" for i in range(65)]}, "communities"),
    ("BGPConfiguration", {"serviceCommunities": {"clusterIP": ["1:2 "]}}, "clusterIP"),
    ("BGPConfiguration", {"serviceLoadBalancerIPs": [{"cidr": "198.51.100.0/24%x"}]}, "cidr"),
    ("BGPConfiguration", {"serviceClusterIPs": [{"cidr": "10.96.0.0/12\n"}]}, "cidr"),
    ("BGPConfiguration", {"routerID": "2001:db8::1"}, "routerID"),
    ("BGPConfiguration", {"asNumber": 4294967296}, "asNumber"),
    ("BGPConfiguration", {"rackLabel": "rack\nx"}, "rackLabel"),
]


@pytest.mark.parametrize("kind, spec, field", REFUSED, ids=[f"{k}-{f}-{i}" for i, (k, _, f) in enumerate(REFUSED)])
def test_the_apiserver_refuses_hostile_text(custom: k8s.CustomObjectsApi, kind: str, spec: dict[str, Any],
                                            field: str) -> None:
    with pytest.raises(k8s.ApiException) as err:
        _create(custom, kind, spec)
    assert err.value.status == 422, err.value
    assert field in str(err.value.body), err.value.body
    assert _agent_refuses(kind, spec), "the agent must refuse what the apiserver refuses (manifest datastore)"


ACCEPTED = [
    ("BGPPeer", {"peerIP": "2001:db8::1", "asNumber": 4294967295, "addressFamilies": ["IPv6", "IPv4"],
                 "ipv4NextHop": "10.1.1.2", "ipv6NextHop": "2001:db8::2",
                 "password": {"secretKeyRef": {"name": "bgp-secrets", "key": "tor.1", "namespace": "routed-system"}},
                 "nodeSelector": {"matchLabels": {"topology.routed.dev/rack": "r1"},
                                  "matchExpressions": [{"key": "kubernetes.io/os", "operator": "In",
                                                        "values": ["linux"]}]}}),
    ("BGPPeer", {**PEER, "node": "node-a.rack1", "ebgpMultihop": 2}),
    ("BGPConfiguration", {"asNumber": 64512, "communities": ["65000:100", "4200000000:1:2"], "routerID": "10.0.0.1",
                          "serviceClusterIPs": [{"cidr": "10.96.0.0/12"}, {"cidr": "fd00:96::/108"}],
                          "serviceExternalIPs": [{"cidr": "192.0.2.10"}],
                          "serviceCommunities": {"loadBalancerIP": ["65000:300"]},
                          "rackLabel": "topology.routed.dev/rack", "rackASNumbers": {"r1": 65101}}),
]


@pytest.mark.parametrize("kind, spec", ACCEPTED)
def test_the_apiserver_and_the_agent_accept_ordinary_objects(custom: k8s.CustomObjectsApi, kind: str,
                                                             spec: dict[str, Any]) -> None:
    created = _create(custom, kind, spec)
    assert created["spec"] == spec
    assert not _agent_refuses(kind, spec)
