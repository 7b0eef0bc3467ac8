"""A minimal rtnetlink client for the per-pod hot path (veth, address, routes): plain struct-packed requests on a
netlink socket, one ACK each. pyroute2 costs ~0.6 ms of Python per request; these cost ~50 µs. Dumps and
everything off the hot path stay with pyroute2 (wiring.py)."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

from routed.errors import Code, RoutedOSError

NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_SETNEIGHTBL = 67
RTM_NEWADDR = 20
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
IFF_UP = 0x1
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 4, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFLA_AF_SPEC, IFLA_INET_CONF = 26, 1
IPV4_DEVCONF_FORWARDING, IPV4_DEVCONF_PROXY_ARP = 1, 3  # indexes of /proc/sys/net/ipv4/conf/<if>/* (1-based)
NDTA_NAME, NDTA_PARMS = 1, 6
NDTPA_IFINDEX, NDTPA_PROXY_DELAY = 1, 13
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_NODAD = 0x02  # no duplicate address detection: the address is usable at once (pod /128, host fe80::1)
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")
_NDTMSG = struct.Struct("=BxH")


class RtnlError(RoutedOSError):
    code = Code.WIRING_FAILED


def _attr(kind: int, payload: bytes) -> bytes:
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    off = 0
    while off + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, off)
        if length < _RTATTR.size:
            break
        out.setdefault(kind & 0x3FFF, data[off + _RTATTR.size : off + length])
        off += (length + 3) & ~3
    return out


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)


class Rtnl:
    """Synchronous requests on one rtnetlink socket (not thread-safe: one per thread or per call)."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock = sock or socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, msg_type: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        """Send one request with NLM_F_ACK; return the messages before the ACK; raise RtnlError on an error."""
        self.seq += 1
        seq = self.seq
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags | NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body)
        replies: list[tuple[int, bytes]] = []
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise RtnlError(0, "netlink socket closed")
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, rtype, _, rseq, _ = _NLMSGHDR.unpack_from(data, off)
                payload = data[off + _NLMSGHDR.size : off + length]
                off += (length + 3) & ~3
                if rseq != seq:
                    continue
                if rtype == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if code:
                        raise RtnlError(-code, os.strerror(-code))
                    return replies
                if rtype == NLMSG_DONE:
                    return replies
                replies.append((rtype, payload))

    # -- links -----------------------------------------------------------------------------------
    def add_veth(self, name: str, mtu: int, peer: str, peer_netns_fd: int, up: bool = True) -> None:
        peer_msg = (
            _ifinfo() + _attr(IFLA_IFNAME, peer.encode() + b"\0") + _attr(IFLA_MTU, struct.pack("=I", mtu))
            + _attr(IFLA_NET_NS_FD, struct.pack("=I", peer_netns_fd))
        )
        linkinfo = _attr(IFLA_INFO_KIND, b"veth\0") + _attr(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer_msg))
        body = (
            _ifinfo(flags=IFF_UP if up else 0, change=IFF_UP if up else 0)
            + _attr(IFLA_IFNAME, name.encode() + b"\0")
            + _attr(IFLA_MTU, struct.pack("=I", mtu))
            + _attr(IFLA_LINKINFO, linkinfo)
        )
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)

    def get_link(self, name: str) -> tuple[int, str] | None:
        """(ifindex, MAC) of the link called `name`, None if there is none."""
        try:
            replies = self.request(RTM_GETLINK, 0, _ifinfo() + _attr(IFLA_IFNAME, name.encode() + b"\0"))
        except RtnlError as exc:
            if exc.errno == 19:  # ENODEV
                return None
            raise
        for rtype, payload in replies:
            if rtype == RTM_NEWLINK:
                _, _, index, _, _ = _IFINFOMSG.unpack_from(payload)
                mac = _attrs(payload[_IFINFOMSG.size :]).get(IFLA_ADDRESS, b"")
                return index, ":".join(f"{b:02x}" for b in mac)
        return None

    def set_up(self, index: int, up: bool = True) -> None:
        self.request(RTM_NEWLINK, 0, _ifinfo(index, IFF_UP if up else 0, IFF_UP))

    def del_link(self, index: int) -> None:
        self.request(RTM_DELLINK, 0, _ifinfo(index))

    # -- per-interface settings (what /proc/sys/net/... holds, set over netlink: /proc/sys may be read-only) ----
    def set_ipv4_conf(self, index: int, values: dict[int, int]) -> None:
        """net.ipv4.conf.<if>.* by devconf index (IPV4_DEVCONF_*): IFLA_AF_SPEC / AF_INET / IFLA_INET_CONF."""
        conf = b"".join(_attr(key, struct.pack("=I", value)) for key, value in values.items())
        spec = _attr(socket.AF_INET, _attr(IFLA_INET_CONF, conf))
        self.request(RTM_SETLINK, 0, _ifinfo(index) + _attr(IFLA_AF_SPEC, spec))

    def set_arp_proxy_delay(self, index: int, msecs: int) -> None:
        """net.ipv4.neigh.<if>.proxy_delay: the arp_cache table's per-interface parameters (RTM_SETNEIGHTBL)."""
        parms = _attr(NDTPA_IFINDEX, struct.pack("=I", index)) + _attr(NDTPA_PROXY_DELAY, struct.pack("=Q", msecs))
        body = _NDTMSG.pack(socket.AF_INET, 0) + _attr(NDTA_NAME, b"arp_cache\0") + _attr(NDTA_PARMS, parms)
        self.request(RTM_SETNEIGHTBL, 0, body)

    # -- addresses and routes --------------------------------------------------------------------
    def add_addr(self, index: int, ip: str, prefixlen: int, nodad: bool = False) -> None:
        """Add `ip/prefixlen` (scope from the address: link for fe80::/10); nodad skips IPv6 DAD."""
        addr = ipaddress.ip_address(ip)
        family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
        scope = RT_SCOPE_LINK if addr.version == 6 and addr.is_link_local else RT_SCOPE_UNIVERSE
        flags = IFA_F_NODAD if nodad and addr.version == 6 else 0
        body = _IFADDRMSG.pack(family, prefixlen, flags, scope, index) + _attr(IFA_LOCAL, addr.packed)
        if addr.version == 4:
            body += _attr(IFA_ADDRESS, addr.packed)
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)

    def route(
        self,
        cmd: str,
        dst: str,
        dst_len: int,
        oif: int = 0,
        gateway: str | None = None,
        scope: int = RT_SCOPE_UNIVERSE,
        proto: int = RTPROT_BOOT,
        rtype: int = RTN_UNICAST,
    ) -> None:
        """cmd: "add" (fails if present), "replace" or "del" (scope RT_SCOPE_NOWHERE matches any scope)."""
        addr = ipaddress.ip_address(dst)
        family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
        body = _RTMSG.pack(family, dst_len, 0, 0, RT_TABLE_MAIN, proto, scope, rtype, 0)
        if dst_len:
            body += _attr(RTA_DST, addr.packed)
        if gateway:
            body += _attr(RTA_GATEWAY, ipaddress.ip_address(gateway).packed)
        if oif:
            body += _attr(RTA_OIF, struct.pack("=i", oif))
        if cmd == "del":
            self.request(RTM_DELROUTE, 0, body)
        elif cmd == "replace":
            self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)
        else:
            self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body)
