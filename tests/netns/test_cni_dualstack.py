"""routed-cni on a dual-stack and on an IPv6-only node: one address per pod CIDR family, the IPv6 wiring
(pod /128 without DAD, default route via fe80::1, the host veth's fe80::1 and /128 route), real IPv6 traffic
pod to pod and node to pod, CHECK, the repair of a lost gateway address and a clean DEL."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from routed import netns
from tests.helpers import run_and_expect
from tests.netns.cni_support import (
    NODE_IP6,
    NodeEnv,
    cleanup_leftovers,
    default_agent_kind,
    tcp_fetch_cmd,
    tcp_server_cmd,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]
POD_CIDR = "10.86.0.0/24"
POD_CIDR6 = "fd00:86::/64"


@pytest.fixture(scope="module")
def node() -> Iterator[NodeEnv]:
    cleanup_leftovers()
    env = NodeEnv(uuid.uuid4().hex[:6], pod_cidr=POD_CIDR, pod_cidr6=POD_CIDR6, agent=default_agent_kind())
    try:
        env.start_agent()
        yield env
    finally:
        env.close()


def add(node: NodeEnv, name: str, version: str = "1.1.0") -> tuple[str, str, dict[str, Any]]:
    ns = node.pod_ns(name)
    container = "c" + uuid.uuid4().hex[:12]
    run = node.cni("ADD", container, ns, version, args=f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}")
    assert run.rc == 0, run
    return ns, container, run.json


def ips_of(result: dict[str, Any], version: int) -> list[str]:
    return [i["address"].split("/")[0] for i in result["ips"]
            if ipaddress.ip_interface(i["address"]).version == version]


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_result_lists_both_families_with_gateways(node: NodeEnv, version: str) -> None:
    ns, container, result = add(node, f"r{version.replace('.', '')}", version)
    by_family = {ipaddress.ip_interface(i["address"]).version: i for i in result["ips"]}
    assert set(by_family) == {4, 6}
    v4, v6 = by_family[4], by_family[6]
    assert v4["address"].endswith("/32") and ipaddress.ip_interface(v4["address"]).ip in ipaddress.ip_network(POD_CIDR)
    assert v6["address"].endswith("/128") and ipaddress.ip_interface(v6["address"]).ip in ipaddress.ip_network(POD_CIDR6)
    assert (v4["gateway"], v6["gateway"]) == ("169.254.1.1", "fe80::1")
    assert {"dst": "::/0", "gw": "fe80::1"} in result["routes"]
    assert {"dst": "0.0.0.0/0", "gw": "169.254.1.1"} in result["routes"]
    assert (v6.get("version") == "6") == (version == "0.4.0")
    check = node.cni("CHECK", container, ns, conf=node.netconf(version, prevResult=result))
    assert (check.rc, check.stdout) == (0, ""), check
    assert node.cni("DEL", container, ns, version).rc == 0
    node.delete_pod_ns(ns)


def test_ipv6_wiring_traffic_and_clean_del(node: NodeEnv) -> None:
    ns_a, ca, ra = add(node, "a6")
    ns_b, cb, rb = add(node, "b6")
    (ip_a,), (ip_b,) = ips_of(ra, 6), ips_of(rb, 6)
    host_if = ra["interfaces"][0]["name"]
    # pod side: the /128 with no DAD (not tentative), default via fe80::1 on eth0
    addr = node.ns(ns_a, ["ip", "-6", "addr", "show", "dev", "eth0"]).stdout
    assert f"{ip_a}/128" in addr and "tentative" not in addr.split(f"{ip_a}/128")[1].splitlines()[0]
    assert "default via fe80::1 dev eth0" in node.ns(ns_a, ["ip", "-6", "route", "show"]).stdout
    # host side: fe80::1 on the veth, a /128 proto 201 route, the IPv6 blackhole
    assert "fe80::1/64" in node.ns(node.host, ["ip", "-6", "addr", "show", "dev", host_if]).stdout
    routes = node.ns(node.host, ["ip", "-6", "route", "show", "proto", "201"]).stdout
    assert f"{ip_a} dev {host_if}" in routes
    assert f"blackhole {POD_CIDR6}" in routes
    servers = [subprocess.Popen(netns.ns_cmd(ns, tcp_server_cmd(8080, f"from-{ns}")), stdout=subprocess.PIPE)
               for ns in (ns_a, ns_b)]
    try:
        for s in servers:
            assert s.stdout is not None and s.stdout.readline().strip() == b"ready"
        assert node.ping(ns_a, ip_b) and node.ping(ns_b, ip_a)
        assert node.ping(node.host, ip_a)
        assert node.ns(ns_a, tcp_fetch_cmd(ip_b, 8080)).stdout == f"from-{ns_b}"
        assert node.ns(node.host, tcp_fetch_cmd(ip_a, 8080)).stdout == f"from-{ns_a}"
        # IPv4 keeps working beside it
        assert node.ns(ns_b, tcp_fetch_cmd(ips_of(ra, 4)[0], 8080)).stdout == f"from-{ns_a}"
        # the pod reaches the node's own uplink address over IPv6 (through fe80::1)
        assert node.ping(ns_a, NODE_IP6)
        # an unassigned address of the IPv6 pod CIDR is blackholed, not sent up
        assert not node.ping(ns_a, str(ipaddress.ip_network(POD_CIDR6)[0xfffe]))
    finally:
        for s in servers:
            s.kill()
            s.wait(timeout=5)
    # CHECK notices a lost gateway address
    node.ns(node.host, ["ip", "-6", "addr", "del", "fe80::1/64", "dev", host_if], check=True)
    check = node.cni("CHECK", ca, ns_a, conf=node.netconf("1.1.0", prevResult=ra))
    assert check.rc == 1 and "fe80::1" in check.json["msg"], check
    for ns, c in ((ns_a, ca), (ns_b, cb)):
        assert node.cni("DEL", c, ns).rc == 0
        node.delete_pod_ns(ns)
    assert node.api("ipam.show")["allocations"] == []
    run_and_expect(lambda: node.ns(node.host, ["ip", "-6", "route", "show", "proto", "201"]).stdout.split("\n")[0],
                   lambda out: out.startswith(f"blackhole {POD_CIDR6}"), timeout=10).check("only the blackhole left")


def test_ipam_show_has_a_pool_per_family(node: NodeEnv) -> None:
    pools = {p["cidr"]: p for p in node.api("ipam.show")["pools"]}
    assert pools[POD_CIDR]["family"] == 4 and pools[POD_CIDR]["size"] == 254
    assert pools[POD_CIDR6]["family"] == 6 and pools[POD_CIDR6]["size"] == 2**64 - 1


def test_ipv6_only_node() -> None:
    env = NodeEnv(uuid.uuid4().hex[:6], pod_cidr="", pod_cidr6="fd00:85::/64", agent=default_agent_kind())
    try:
        env.start_agent()
        ns_a, ca, ra = add(env, "o1")
        ns_b, cb, rb = add(env, "o2")
        assert [ipaddress.ip_interface(i["address"]).version for i in ra["ips"]] == [6]
        assert ra["routes"] == [{"dst": "::/0", "gw": "fe80::1"}]
        assert "inet " not in env.ns(ns_a, ["ip", "addr", "show", "dev", "eth0"]).stdout
        assert env.ping(ns_a, ips_of(rb, 6)[0])
        for ns, c in ((ns_a, ca), (ns_b, cb)):
            assert env.cni("DEL", c, ns).rc == 0
    finally:
        env.close()
