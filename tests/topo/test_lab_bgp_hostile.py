"""Hostile BGP objects on real agents and a real FRR ToR (issue 17): a BGP password that breaks out of ExaBGP's
quotes, an IPv6 next hop carrying an API command, a Node whose addresses are not addresses. None of them starts a
process, reaches the ToR's RIB or stops BGP elsewhere: the object is named in the node's status (the password
never shown) and every other session stays up without a reset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from routed.lab.bgp_setup import advertise_services, tor_router
from routed.lab.lab import Lab
from routed.lab.routers import FrrRouter
from tests.helpers import holds_for, run_and_expect

pytestmark = [pytest.mark.requires_root, pytest.mark.topo]

INJECTED = "8.8.8.8/32"
UNUSED_PEER = "10.255.0.1"  # nobody answers: the hostile peers never get a session anyway


@pytest.fixture(scope="module")
def lab():
    lab = Lab("tbgph")
    try:
        lab.up(nodes=2, tor="frr")
        yield lab
    finally:
        lab.down(quiet=True)


def vtysh(lab: Lab, command: str) -> str:
    router = tor_router(lab, lab.state(), "tor1")
    assert isinstance(router, FrrRouter)
    return router.vtysh(command)


def sessions(lab: Lab) -> dict[str, tuple[str, int, int]]:
    """Every neighbour of the ToR: state and connections established/dropped (a reset moves the counters)."""
    out = json.loads(vtysh(lab, "show bgp neighbors json"))
    return {addr: (n.get("bgpState", ""), n.get("connectionsEstablished", 0), n.get("connectionsDropped", 0))
            for addr, n in out.items() if isinstance(n, dict)}


def tor_rib(lab: Lab) -> set[str]:
    out = json.loads(vtysh(lab, "show bgp ipv4 unicast json"))
    return set(out.get("routes", {}))


def errors(lab: Lab, node: str) -> list[str]:
    status = lab.agent_status(node) or {}
    return list((status.get("bgp") or {}).get("errors") or [])


def established_before(lab: Lab) -> dict[str, tuple[str, int, int]]:
    ok, seen, _ = run_and_expect(lambda: sessions(lab), lambda s: len(s) == 2 and
                                 all(v[0] == "Established" for v in s.values()), timeout=60)
    assert ok, f"sessions not up: {seen}"
    return seen


def peer(name: str, node: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "routed.dev/v1alpha1", "kind": "BGPPeer", "metadata": {"name": name},
            "spec": {"peerIP": UNUSED_PEER, "asNumber": 65001, "node": node, **spec}}


def test_password_breaking_out_of_quotes_runs_nothing_and_is_never_shown(lab):
    before = established_before(lab)
    marker = Path(f"/tmp/rtdpw{os.getpid()}")  # short: the one-line variant must fit the 80-byte key limit
    marker.unlink(missing_ok=True)
    password = f'a\\"; }}\nprocess p {{ run /bin/touch {marker}; encoder text; }}\n#'
    store = lab.store(lab.state())
    store.write({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "evil-pw", "namespace": "routed-system"},
                 "stringData": {"pw": password}})
    store.write(peer("evil-pw", "node1", password={"secretKeyRef": {"name": "evil-pw", "key": "pw"}}))
    ok, seen, _ = run_and_expect(lambda: errors(lab, "node1"), lambda e: any("evil-pw" in x for x in e), timeout=30)
    assert ok, f"node1 does not name the peer or its Secret: {seen}"
    status_text = json.dumps(lab.agent_status("node1"))
    for secret_part in ("process p {", str(marker), password):
        assert secret_part not in status_text, f"{secret_part!r} shown in the node status"
    assert holds_for(lambda: sessions(lab), before, 3.0).ok, "a session was reset"
    assert not marker.exists(), "ExaBGP ran the injected process"
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            assert str(marker).encode() not in cmdline, f"process {proc.name} runs the injected command"
    # on one line (no control character) the same break-out is a valid password: ExaBGP gets it as md5-base64
    one_line = password.replace("\n", " ")
    store.write({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "evil-pw", "namespace": "routed-system"},
                 "stringData": {"pw": one_line}})
    run_and_expect(lambda: errors(lab, "node1"), lambda e: not any("evil-pw" in x for x in e),
                   timeout=30).check("a printable password is accepted")
    assert holds_for(lambda: marker.exists(), False, 3.0).ok, "ExaBGP ran the injected process"
    assert holds_for(lambda: sessions(lab), before, 1.0).ok, "a session was reset"
    assert one_line not in json.dumps(lab.agent_status("node1"))
    store.delete(peer("evil-pw", "node1"))


def test_next_hop_carrying_an_api_command_never_reaches_the_tor(lab):
    before = established_before(lab)
    hostile = f"2001:db8::1%x\nannounce route {INJECTED} next-hop 10.0.0.66 local-preference 5000"
    store = lab.store(lab.state())
    store.write(peer("evil-nh", "node1", ipv6NextHop=hostile))
    ok, seen, _ = run_and_expect(lambda: errors(lab, "node1"), lambda e: any("evil-nh" in x for x in e), timeout=30)
    assert ok, f"node1 does not name the peer: {seen}"
    assert all("\n" not in e for e in seen), seen
    assert holds_for(lambda: INJECTED in tor_rib(lab), False, 3.0).ok, "the ToR learned the injected prefix"
    assert holds_for(lambda: sessions(lab), before, 1.0).ok, "a session was reset"
    store.delete(peer("evil-nh", "node1"))


def test_a_node_with_bad_addresses_never_stops_bgp_on_the_others(lab):
    before = established_before(lab)
    state = lab.state()
    store = lab.store(state)
    evil = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "evil"}, "spec": {"podCIDRs": [
        "10.99.0.0/24\nannounce route 8.8.8.8/32 next-hop self", "not-a-cidr"]}, "status": {"addresses": [
            {"type": "InternalIP", "address": "fd00::1%x y"}, {"type": "InternalIP", "address": "not-an-ip"}]}}
    store.write(evil)
    # a BGP change made afterwards is still applied everywhere: a new Service VIP range is announced
    rib_before = tor_rib(lab)
    advertise_services(lab, {"serviceLoadBalancerIPs": [{"cidr": "198.51.100.0/24"}]})
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "vip", "namespace": "default"},
               "spec": {"type": "LoadBalancer", "ports": [{"port": 80}], "externalTrafficPolicy": "Cluster"},
               "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}}}
    store.write(service)
    ok, rib, _ = run_and_expect(lambda: tor_rib(lab), lambda r: "198.51.100.7/32" in r, timeout=30)
    assert ok, f"the Service VIP was not announced after the bad Node: {sorted(rib - rib_before)}"
    assert INJECTED not in rib
    assert holds_for(lambda: sessions(lab), before, 2.0).ok, "a session was reset"
    store.delete(service)
    store.delete(evil)
