"""BFD over UDP (RFC 5881, single hop): the sockets and timers around the pure sessions of routed/bgp/bfd.py.

One receive socket per IP family on UDP 3784 (opened only while some peer of that family has BFD enabled)
delivers every control packet; a packet whose IPv4 TTL or IPv6 hop limit is not 255 is dropped (§5 of RFC
5881: the peer is one hop away). Each session sends from its own socket of the peer's family: a source port
in 49152-65535 kept for the session's life, TTL/hop limit 255, CS6, connected to the peer's port 3784. Packets are matched to sessions by Your Discriminator, or by source address while the
peer does not know ours yet (RFC 5880 §6.8.6). One task (`bfd`) sends the periodic packets and applies the
detection timeouts; it sleeps until the earliest of them and is woken when a packet needs an answer.
`on_change(peer, old_state, new_state, diag)` reports every state transition.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from routed.api_types import BfdPeerStatus
from routed.bgp import bfd
from routed.supervisor import Liveness, Supervisor

log = logging.getLogger(__name__)

CONTROL_PORT = 3784
SOURCE_PORTS = (49152, 65535)
SINGLE_HOP_TTL = 255
# Linux <netinet/in.h>: ask for the received TTL as ancillary data (the socket module lacks IP_RECVTTL)
IP_RECVTTL = 12
IP_TTL_CMSG = socket.IP_TTL
IPV6_RECVHOPLIMIT, IPV6_HOPLIMIT = 51, 52  # Linux <netinet/in.h> (RFC 3542)
TOS_NETWORK_CONTROL = 0xC0  # DSCP CS6, as routing protocols use

ChangeCallback = Callable[[str, int, int, int], None]


@dataclass(frozen=True)
class BfdPeer:
    """What a BGPPeer's `bfd` block asks for one neighbour."""

    address: str
    min_rx_ms: int = 300
    min_tx_ms: int = 300
    multiplier: int = 3


@dataclass
class _Endpoint:
    peer: BfdPeer
    session: bfd.Session
    sock: socket.socket
    source_port: int
    since: float = field(default_factory=time.time)
    packets_in: int = 0
    packets_out: int = 0
    send_errors: int = 0
    ups: int = 0
    downs: int = 0


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _local_for(family: socket.AddressFamily, bind_address: str) -> str:
    """The configured bind address if it is of this family, else the family's wildcard."""
    if _family(bind_address) == family:
        return bind_address
    return "::" if family == socket.AF_INET6 else "0.0.0.0"


def _open_sender(peer: str, port: int, rng: random.Random, local: str) -> tuple[socket.socket, int]:
    family = _family(peer)
    local = _local_for(family, local)
    for _ in range(64):
        source = rng.randint(*SOURCE_PORTS)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, SINGLE_HOP_TTL)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, TOS_NETWORK_CONTROL)
            else:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, SINGLE_HOP_TTL)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, TOS_NETWORK_CONTROL)
            sock.bind((local, source))
            sock.connect((peer, port))
            sock.setblocking(False)
            return sock, source
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, "no free BFD source port in 49152-65535")


def received_ttl(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancdata:
        if ((level == socket.IPPROTO_IP and kind == IP_TTL_CMSG) or (level == socket.IPPROTO_IPV6 and kind == IPV6_HOPLIMIT)) \
                and len(data) >= 4:
            return int(struct.unpack("=i", data[:4])[0])
    return None


class BfdService:
    def __init__(self, on_change: ChangeCallback, supervisor: Supervisor | None = None,
                 port: int = CONTROL_PORT, bind_address: str = "0.0.0.0") -> None:
        self.on_change = on_change
        self.supervisor = supervisor or Supervisor()
        self.port = port
        self.bind_address = bind_address
        self.endpoints: dict[str, _Endpoint] = {}
        self.counters = {"packets_in": 0, "packets_out": 0, "dropped_ttl": 0, "dropped_invalid": 0,
                         "dropped_no_session": 0}
        self.last_error = ""
        self._rx: dict[socket.AddressFamily, socket.socket] = {}  # one receive socket per family in use
        self._wake = asyncio.Event()
        self._rng = random.Random()
        self._task_started = False

    # -- configuration ----------------------------------------------------------------------------
    def configure(self, peers: Iterable[BfdPeer]) -> None:
        """Make the sessions match `peers`: new ones start Down, removed ones say AdminDown and go, changed
        timers are renegotiated with a poll sequence (the session stays Up)."""
        wanted = {p.address: p for p in peers}
        for address in list(self.endpoints):
            if address not in wanted:
                self._remove(address)
        families = {_family(a) for a in wanted}
        for family in families - set(self._rx):
            self._open_receiver(family)
        for family in set(self._rx) - families:
            self._close_receiver(family)
        now = time.monotonic()
        for address, peer in wanted.items():
            ep = self.endpoints.get(address)
            if ep is None:
                self._add(peer, now)
            elif ep.peer != peer:
                ep.peer = peer
                ep.session.configure(peer.min_tx_ms * 1000, peer.min_rx_ms * 1000, peer.multiplier, now)
        self._wake.set()

    def _add(self, peer: BfdPeer, now: float) -> None:
        used = {ep.session.local_disc for ep in self.endpoints.values()}
        disc = 0
        while disc == 0 or disc in used:
            disc = self._rng.getrandbits(32)
        sock, source = _open_sender(peer.address, self.port, self._rng, self.bind_address)
        session = bfd.Session(peer=peer.address, local_disc=disc, desired_min_tx_us=peer.min_tx_ms * 1000,
                              required_min_rx_us=peer.min_rx_ms * 1000, detect_mult=peer.multiplier)
        session.next_tx = now
        self.endpoints[peer.address] = _Endpoint(peer=peer, session=session, sock=sock, source_port=source)
        log.info("BFD session to %s (discriminator %d, source port %d, %d/%d ms x%d)", peer.address, disc, source,
                 peer.min_tx_ms, peer.min_rx_ms, peer.multiplier)
        if not self._task_started:
            self._task_started = True
            self.supervisor.spawn("bfd", self._run, required=True)

    def _remove(self, address: str) -> None:
        ep = self.endpoints.pop(address)
        ep.session.state, ep.session.local_diag = bfd.ADMIN_DOWN, bfd.DIAG_ADMIN_DOWN
        self._transmit(ep, time.monotonic())  # the peer takes AdminDown as "not a failure" (§6.8.16)
        ep.sock.close()
        log.info("BFD session to %s removed", address)

    def _open_receiver(self, family: socket.AddressFamily) -> None:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # IPv4 has its own socket
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
            sock.bind((_local_for(family, self.bind_address), self.port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._rx[family] = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable, sock)

    def _close_receiver(self, family: socket.AddressFamily | None = None) -> None:
        """Close one family's receive socket (None: all of them)."""
        for fam in [family] if family is not None else list(self._rx):
            sock = self._rx.pop(fam, None)
            if sock is None:
                continue
            with contextlib.suppress(RuntimeError, ValueError):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    async def stop(self) -> None:
        for address in list(self.endpoints):
            self._remove(address)
        self._close_receiver()
        if self._task_started:
            await self.supervisor.stop_task("bfd")
            self._task_started = False

    # -- packets ----------------------------------------------------------------------------------
    def _on_readable(self, sock: socket.socket) -> None:
        while True:
            try:
                data, ancdata, _flags, addr = sock.recvmsg(512, socket.CMSG_SPACE(4))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.last_error = f"receive: {exc}"
                return
            self._on_packet(data, received_ttl(ancdata), addr[0], time.monotonic())

    def _on_packet(self, data: bytes, ttl: int | None, source: str, now: float) -> None:
        if ttl is not None and ttl != SINGLE_HOP_TTL:
            self.counters["dropped_ttl"] += 1
            return
        try:
            pkt = bfd.decode(data)
        except bfd.InvalidPacket as exc:
            self.counters["dropped_invalid"] += 1
            log.debug("BFD packet from %s dropped: %s", source, exc)
            return
        ep = self._match(pkt, source)
        if ep is None:
            self.counters["dropped_no_session"] += 1
            return
        self.counters["packets_in"] += 1
        ep.packets_in += 1
        old = ep.session.state
        if ep.session.receive(pkt, now):
            self._changed(ep, old)
        if ep.session.final_pending or ep.session.state != old:
            self._wake.set()

    def _match(self, pkt: bfd.Packet, source: str) -> _Endpoint | None:
        if pkt.your_disc:
            for ep in self.endpoints.values():
                if ep.session.local_disc == pkt.your_disc:
                    return ep if ep.peer.address == source else None
            return None
        return self.endpoints.get(source)

    def _transmit(self, ep: _Endpoint, now: float) -> None:
        pkt = ep.session.packet(now, self._rng)
        try:
            ep.sock.send(pkt.encode())
            ep.packets_out += 1
            self.counters["packets_out"] += 1
        except OSError as exc:  # no route yet, or the link is down: the detection timer decides
            ep.send_errors += 1
            self.last_error = f"send to {ep.peer.address}: {exc}"

    def _changed(self, ep: _Endpoint, old: int) -> None:
        new = ep.session.state
        ep.since = time.time()
        if new == bfd.UP:
            ep.ups += 1
        elif old == bfd.UP:
            ep.downs += 1
        diag = ep.session.local_diag
        log.log(logging.WARNING if old == bfd.UP else logging.INFO, "BFD %s: %s -> %s (%s)", ep.peer.address,
                bfd.STATE_NAMES[old], bfd.STATE_NAMES[new], bfd.DIAG_NAMES.get(diag, diag))
        self.on_change(ep.peer.address, old, new, diag)

    async def _run(self, liveness: Liveness) -> None:
        while True:
            now = time.monotonic()
            deadline = now + 1.0
            with liveness.busy("BFD timers"):
                for ep in list(self.endpoints.values()):
                    s = ep.session
                    old = s.state
                    if s.expired(now):
                        self._changed(ep, old)
                    if s.due(now):
                        self._transmit(ep, now)
                    deadline = min(deadline, s.next_tx)
                    if s.state in (bfd.INIT, bfd.UP) and s.remote_detect_mult:
                        deadline = min(deadline, s.last_rx + s.detection_time() + 0.001)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, deadline - time.monotonic()))

    # -- views ------------------------------------------------------------------------------------
    def status(self) -> list[BfdPeerStatus]:
        out = []
        for address, ep in sorted(self.endpoints.items()):
            s = ep.session
            out.append(BfdPeerStatus(
                peer=address, state=bfd.STATE_NAMES[s.state], remoteState=bfd.STATE_NAMES[s.remote_state],
                localDiscriminator=s.local_disc, remoteDiscriminator=s.remote_disc,
                localDiag=bfd.DIAG_NAMES.get(s.local_diag, str(s.local_diag)),
                remoteDiag=bfd.DIAG_NAMES.get(s.remote_diag, str(s.remote_diag)),
                txIntervalMs=s.tx_interval_us() / 1000, detectionTimeMs=s.detection_time() * 1000,
                configuredMinTxMs=ep.peer.min_tx_ms, configuredMinRxMs=ep.peer.min_rx_ms,
                multiplier=ep.peer.multiplier, remoteMultiplier=s.remote_detect_mult, sourcePort=ep.source_port,
                since=ep.since, ups=ep.ups, downs=ep.downs, packetsIn=ep.packets_in, packetsOut=ep.packets_out,
                sendErrors=ep.send_errors,
            ))
        return out

    def state(self, address: str) -> int | None:
        ep = self.endpoints.get(address)
        return ep.session.state if ep else None
