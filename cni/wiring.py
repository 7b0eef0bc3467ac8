"""Kernel work for one pod attachment (routed veth, Calico-style), with pyroute2. Blocking: call from threads.

Pod side (in CNI_NETNS): veth end named CNI_IFNAME, MTU, each pod IP as /32 or /128 (IPv6 without DAD, so it
is usable at once); IPv4: a scope-link route to 169.254.1.1 and the default route via it; IPv6: the default
route via fe80::1 on the veth. Host side (the current netns, i.e. the node): veth `rtd<hash>`, proxy_arp=1,
proxy_delay=0, forwarding=1 (IPv4), the fixed link-local fe80::1/64 without DAD when the pod has an IPv6
address, and a /32 (/128) route per pod IP (protocol ROUTE_PROTO_LOCAL). Blackhole routes for the node's pod
CIDR(s) (same protocol).

IPv6 gateway: a fixed link-local address on the host side rather than the veth's generated one read back
after the link comes up: it is known before the link exists (the CNI result and every pod say the same
fe80::1), it needs no wait for DAD or for the kernel's address generation, and it does not change when the
host veth is re-created by a repair. The pod's neighbour solicitation for fe80::1 is answered by the host
veth itself (no proxy NDP); the host resolves the pod's /128 on the veth by ordinary neighbour discovery.
Node prerequisites, as for kube-proxy: net.ipv4.ip_forward=1 and, with IPv6 pods, net.ipv6.conf.all.forwarding=1.
Each call opens its own short-lived netlink handles (≈1 ms), so calls are thread-safe.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni.names import is_host_veth_name
from cni.netnsfd import NetnsGone, netlink_socket_in, open_netns
from cni.result import POD_GATEWAY_V4, POD_GATEWAY_V6, Interface
from cni.rtnl import IPV4_DEVCONF_FORWARDING, IPV4_DEVCONF_PROXY_ARP, Rtnl, RtnlError
from routed.constants import ROUTE_PROTO_LOCAL
from routed.errors import Code, RoutedError

log = logging.getLogger(__name__)

RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255  # in a delete request: match any scope (what `ip route del` sends)
RTN_UNICAST = 1
RTN_BLACKHOLE = 6
DEFAULT_MTU = 1500
GATEWAY_V6_PREFIXLEN = 64


class WiringError(RoutedError):
    code = Code.WIRING_FAILED


class CheckError(WiringError):
    code = Code.CHECK_FAILED


@dataclass(frozen=True)
class Wired:
    host: Interface
    pod: Interface


@contextlib.contextmanager
def host_handle() -> Iterator[IPRoute]:
    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


_local = threading.local()


def thread_rtnl() -> Rtnl:
    """A node-netns rtnetlink socket owned by the calling thread and kept for its lifetime (the agent's pool
    threads are long-lived)."""
    rt = getattr(_local, "rtnl", None)
    if rt is None:
        rt = _local.rtnl = Rtnl()
    return rt


@contextlib.contextmanager
def pod_handle(netns_path: str) -> Iterator[IPRoute]:
    fd = open_netns(netns_path)
    try:
        sock = netlink_socket_in(fd)
    finally:
        os.close(fd)
    ipr = IPRoute(use_socket=sock)
    try:
        yield ipr
    finally:
        ipr.close()
        sock.close()


def _link_index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _has_ipv6(ips: Iterable[str]) -> bool:
    """Whether the pod has an IPv6 address (then its host veth carries the gateway fe80::1)."""
    return any(ipaddress.ip_address(ip).version == 6 for ip in ips)


def _host_len(ip: str) -> int:
    return ipaddress.ip_address(ip).max_prefixlen


# -- node-level state ------------------------------------------------------------------------------
def default_route_mtu() -> int:
    """MTU of the interface carrying the default route of the current netns; 1500 if there is none."""
    try:
        with host_handle() as ipr:
            for route in ipr.get_default_routes(family=2) or []:
                oif = route.get("oif") or route.get("RTA_OIF")
                if oif:
                    links = ipr.get_links(oif)
                    if links:
                        return int(links[0].get("mtu") or DEFAULT_MTU)
    except (NetlinkError, OSError) as exc:
        log.warning("cannot read the uplink MTU (%s); using %d", exc, DEFAULT_MTU)
    return DEFAULT_MTU


def ensure_blackholes(cidrs: Sequence[str]) -> None:
    """Blackhole routes (protocol ROUTE_PROTO_LOCAL) for exactly `cidrs`; our blackholes for other CIDRs go."""
    wanted = {str(ipaddress.ip_network(c, strict=False)) for c in cidrs}
    with host_handle() as ipr:
        for family in (2, 10):
            for route in ipr.get_routes(family=family, proto=ROUTE_PROTO_LOCAL, type=RTN_BLACKHOLE) or []:
                dst = f"{route.get('dst')}/{route['dst_len']}"
                if dst not in wanted:
                    log.info("removing blackhole %s (no longer a pod CIDR of this node)", dst)
                    with contextlib.suppress(NetlinkError):
                        ipr.route("del", dst=dst, type=RTN_BLACKHOLE, proto=ROUTE_PROTO_LOCAL)
        for dst in sorted(wanted):
            ipr.route("replace", dst=dst, type=RTN_BLACKHOLE, proto=ROUTE_PROTO_LOCAL)


def host_veths() -> dict[str, int]:
    """Our host-side pod veths in the current netns: name -> index."""
    with host_handle() as ipr:
        out = {}
        for link in ipr.get_links():
            name = link.get("ifname") or ""
            if is_host_veth_name(name):
                out[name] = link["index"]
        return out


def local_pod_routes() -> list[tuple[str, int]]:
    """Our per-pod routes (protocol ROUTE_PROTO_LOCAL, unicast): (dst "ip/len", oif)."""
    out = []
    with host_handle() as ipr:
        for family in (2, 10):
            for route in ipr.get_routes(family=family, proto=ROUTE_PROTO_LOCAL, type=RTN_UNICAST) or []:
                out.append((f"{route.get('dst')}/{route['dst_len']}", int(route.get("oif") or 0)))
    return out


# What the host side of a pod veth needs, as /proc/sys shows it (read there; written over netlink, so the agent's
# container can keep /proc/sys read-only): proxy ARP answers the pod's ARP for 169.254.1.1, with no delay (the
# default holds replies up to 0.8 s), and forwarding from the pod.
HOST_SETTINGS = (("ipv4/conf/{}/proxy_arp", "1"), ("ipv4/conf/{}/forwarding", "1"), ("ipv4/neigh/{}/proxy_delay", "0"))


def configure_host_side(rtnl: Rtnl, index: int) -> None:
    rtnl.set_ipv4_conf(index, {IPV4_DEVCONF_FORWARDING: 1, IPV4_DEVCONF_PROXY_ARP: 1})
    rtnl.set_arp_proxy_delay(index, 0)


def ip_forwarding(version: int) -> bool:
    """The node forwards this IP family (net.ipv4.ip_forward, net.ipv6.conf.all.forwarding; node prerequisites,
    as for kube-proxy): replies from the fabric to pods are forwarded by the uplink's setting, which only the
    node's owner should change."""
    path = "/proc/sys/net/ipv4/ip_forward" if version == 4 else "/proc/sys/net/ipv6/conf/all/forwarding"
    try:
        return open(path).read().strip() == "1"
    except OSError:
        return True  # cannot tell: do not block on it


def host_gateways_v6() -> set[int]:
    """Indexes of the links in the current netns holding the pods' IPv6 gateway fe80::1."""
    with host_handle() as ipr:
        return {int(a["index"]) for a in ipr.get_addr(family=10) or []
                if a.get_attr("IFA_ADDRESS") == POD_GATEWAY_V6}


def add_gateway_v6(rtnl: Rtnl, index: int) -> None:
    with contextlib.suppress(RtnlError):  # EEXIST: already there
        rtnl.add_addr(index, POD_GATEWAY_V6, GATEWAY_V6_PREFIXLEN, nodad=True)


def host_side_drift(host_name: str) -> list[str]:
    """The host settings of this veth that differ from HOST_SETTINGS ("key=value" wanted)."""
    drift = []
    for key, value in HOST_SETTINGS:
        path = "/proc/sys/net/" + key.format(host_name)
        try:
            current = open(path).read().strip()
        except OSError:
            continue
        if current != value:
            drift.append(f"{key.format(host_name)}={value}")
    return drift


def repair_host_side(endpoints: Iterable[tuple[str, Sequence[str]]]) -> list[str]:
    """Restore what ADD set up on the host side of each (host veth, pod IPs) whose veth still exists: the
    per-pod routes (protocol ROUTE_PROTO_LOCAL), the veth's sysctls and, for IPv6 pods, its fe80::1. Reads
    first, writes only what differs; returns what it restored (empty when the kernel already matched)."""
    wanted = list(endpoints)
    veths = host_veths()
    have = set(local_pod_routes())
    gateways_v6 = host_gateways_v6() if any(_has_ipv6(ips) for _, ips in wanted) else set()  # no dump for IPv4 only
    repaired: list[str] = []
    host = thread_rtnl()
    for host_name, ips in wanted:
        index = veths.get(host_name)
        if index is None:
            continue  # the veth itself is gone (the pod's netns went): a DEL or GC cleans up
        if index not in gateways_v6 and _has_ipv6(ips):
            add_gateway_v6(host, index)
            repaired.append(f"address {POD_GATEWAY_V6}/{GATEWAY_V6_PREFIXLEN} dev {host_name}")
        for ip in ips:
            if (f"{ip}/{_host_len(ip)}", index) not in have:
                host.route("replace", ip, _host_len(ip), oif=index, scope=RT_SCOPE_LINK, proto=ROUTE_PROTO_LOCAL)
                repaired.append(f"route {ip}/{_host_len(ip)} dev {host_name}")
        drift = host_side_drift(host_name)
        if drift:
            configure_host_side(host, index)
            repaired += drift
    return repaired


def delete_link(name: str) -> bool:
    rt = thread_rtnl()
    link = rt.get_link(name)
    if link is None:
        return False
    with contextlib.suppress(RtnlError):
        rt.del_link(link[0])
    return True


def delete_route(dst: str) -> None:
    with host_handle() as ipr, contextlib.suppress(NetlinkError):
        ipr.route("del", dst=dst, proto=ROUTE_PROTO_LOCAL, scope=RT_SCOPE_NOWHERE)


# -- one attachment --------------------------------------------------------------------------------
def add_endpoint(host_name: str, netns_path: str, ifname: str, ips: Sequence[str], mtu: int) -> Wired:
    """Create and configure the veth pair; on any failure undo everything done here and raise.

    Hot path, raw rtnetlink (cni/rtnl.py): veth add with the host side up, get, route; in the pod: get, up,
    address, 2 routes. The kernel's veth creation (~1.3 ms) is then most of the cost."""
    nsfd = open_netns(netns_path)
    created = False
    host = thread_rtnl()
    try:
        try:
            host.add_veth(host_name, mtu, ifname, nsfd)
        except RtnlError as exc:
            if exc.errno != errno.EEXIST:
                raise
            stale = host.get_link(host_name)
            if stale is None:
                raise WiringError(f"interface {ifname} already exists in {netns_path}") from None
            # left behind by a crashed ADD of the same attachment (the caller checked no endpoint owns it)
            log.warning("removing stale host veth %s before re-creating it", host_name)
            host.del_link(stale[0])
            try:
                host.add_veth(host_name, mtu, ifname, nsfd)
            except RtnlError as exc2:
                if exc2.errno == errno.EEXIST:
                    raise WiringError(f"interface {ifname} already exists in {netns_path}") from None
                raise
        created = True
        host_link = host.get_link(host_name)
        if host_link is None:
            raise WiringError(f"host veth {host_name} vanished right after creation")
        host_idx, host_mac = host_link
        configure_host_side(host, host_idx)
        if _has_ipv6(ips):
            host.add_addr(host_idx, POD_GATEWAY_V6, GATEWAY_V6_PREFIXLEN, nodad=True)
        with Rtnl(netlink_socket_in(nsfd)) as pod:
            pod_link = pod.get_link(ifname)
            if pod_link is None:
                raise WiringError(f"pod side {ifname} not found in {netns_path}")
            pod_idx, pod_mac = pod_link
            pod.set_up(pod_idx)
            for ip in ips:
                pod.add_addr(pod_idx, ip, _host_len(ip), nodad=True)
                if ipaddress.ip_address(ip).version == 4:
                    pod.route("add", POD_GATEWAY_V4, 32, oif=pod_idx, scope=RT_SCOPE_LINK)
                    pod.route("add", "0.0.0.0", 0, oif=pod_idx, gateway=POD_GATEWAY_V4)
                else:  # the host veth's fixed link-local is on-link by definition
                    pod.route("add", "::", 0, oif=pod_idx, gateway=POD_GATEWAY_V6)
        for ip in ips:
            host.route(
                "replace", ip, _host_len(ip), oif=host_idx, scope=RT_SCOPE_LINK, proto=ROUTE_PROTO_LOCAL
            )
        return Wired(
            host=Interface(name=host_name, mac=host_mac, mtu=mtu),
            pod=Interface(name=ifname, mac=pod_mac, mtu=mtu, sandbox=netns_path),
        )
    except BaseException:
        if created:
            with contextlib.suppress(Exception):
                delete_link(host_name)  # takes the peer, its addresses and our /32 routes with it
        raise
    finally:
        os.close(nsfd)


def del_endpoint(host_name: str, ips: Iterable[str]) -> None:
    """Remove the veth pair (the peer goes with it) and our /32 routes. Missing pieces are fine."""
    delete_link(host_name)
    rt = thread_rtnl()
    for ip in ips:
        with contextlib.suppress(RtnlError):
            rt.route("del", ip, _host_len(ip), scope=RT_SCOPE_NOWHERE, proto=ROUTE_PROTO_LOCAL)


def detach_endpoint(host_name: str, ips: Iterable[str]) -> bool:
    """The fast half of a DEL: drop our /32 routes and take the host veth down (the pod loses carrier), so no
    packet reaches or leaves the pod any more. Deleting the veth costs the kernel ~20 ms (synchronize_net) and is
    left to `delete_link`, which the caller runs after answering. Returns whether the link was there."""
    rt = thread_rtnl()
    for ip in ips:
        with contextlib.suppress(RtnlError):
            rt.route("del", ip, _host_len(ip), scope=RT_SCOPE_NOWHERE, proto=ROUTE_PROTO_LOCAL)
    link = rt.get_link(host_name)
    if link is None:
        return False
    with contextlib.suppress(RtnlError):
        rt.set_up(link[0], up=False)
    return True


def check_endpoint(host_name: str, netns_path: str, ifname: str, ips: Sequence[str]) -> None:
    """Raise CheckError describing the first difference from what ADD created."""
    with host_handle() as host:
        host_idx = _link_index(host, host_name)
        if host_idx is None:
            raise CheckError(f"host veth {host_name} does not exist")
        link = host.get_links(host_idx)[0]
        if link.get("state") != "up" and not (link.get("flags", 0) & 1):
            raise CheckError(f"host veth {host_name} is down")
        for ip in ips:
            routes = host.get_routes(
                family=2 if ipaddress.ip_address(ip).version == 4 else 10, dst=ip, proto=ROUTE_PROTO_LOCAL
            )
            if not any(r.get("oif") == host_idx and r["dst_len"] == _host_len(ip) for r in routes or []):
                raise CheckError(f"no route to {ip} via {host_name} (protocol {ROUTE_PROTO_LOCAL})")
        try:
            proxy = open(f"/proc/sys/net/ipv4/conf/{host_name}/proxy_arp").read().strip()
        except OSError:
            proxy = "?"
        if proxy != "1":
            raise CheckError(f"proxy_arp is {proxy} on {host_name}, want 1")
        if _has_ipv6(ips) and not any(
            a.get_attr("IFA_ADDRESS") == POD_GATEWAY_V6 for a in host.get_addr(family=10, index=host_idx) or []
        ):
            raise CheckError(f"host veth {host_name} lacks the pods' IPv6 gateway {POD_GATEWAY_V6}")
    try:
        with pod_handle(netns_path) as pod:
            pod_idx = _link_index(pod, ifname)
            if pod_idx is None:
                raise CheckError(f"interface {ifname} does not exist in {netns_path}")
            have = {
                (a.get("address"), a["prefixlen"]) for a in pod.get_addr(index=pod_idx) or []
            }
            for ip in ips:
                if (ip, _host_len(ip)) not in have:
                    raise CheckError(f"{ifname} in {netns_path} lacks {ip}/{_host_len(ip)}")
            if any(ipaddress.ip_address(ip).version == 4 for ip in ips):
                routes = pod.get_routes(family=2) or []
                if not any(
                    r.get("dst") == POD_GATEWAY_V4 and r.get("oif") == pod_idx and r["scope"] == RT_SCOPE_LINK
                    for r in routes
                ):
                    raise CheckError(f"no scope-link route to {POD_GATEWAY_V4} on {ifname}")
                if not any(
                    r["dst_len"] == 0 and r.get("gateway") == POD_GATEWAY_V4 and r.get("oif") == pod_idx
                    for r in routes
                ):
                    raise CheckError(f"no default route via {POD_GATEWAY_V4} on {ifname}")
            if _has_ipv6(ips) and not any(
                r["dst_len"] == 0 and r.get("gateway") == POD_GATEWAY_V6 and r.get("oif") == pod_idx
                for r in pod.get_routes(family=10) or []
            ):
                raise CheckError(f"no default route via {POD_GATEWAY_V6} on {ifname}")
    except NetnsGone as exc:
        raise CheckError(str(exc)) from None
