"""BFD (RFC 5880, asynchronous mode; single hop per RFC 5881): control packets and the session state machine.

Pure: no I/O, time passed in (seconds, monotonic). routed/bgp/bfd_net.py moves the packets.

A session holds the RFC's state variables. `receive(packet, now)` applies §6.8.6 (validation, remote state,
timer negotiation, the poll/final sequence, the state transitions); `due(now)` says when the next periodic
packet is to be sent and `packet()` builds it; `expired(now)` applies the detection timeout (§6.8.4). While
not Up the session transmits at no less than one second (§6.8.3); on going Up it moves to the configured
intervals with a poll sequence, and an increased interval takes effect only once the poll has terminated.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

VERSION = 1
PACKET = struct.Struct("!BBBBIIIII")
LENGTH = PACKET.size  # 24: no authentication section

ADMIN_DOWN, DOWN, INIT, UP = 0, 1, 2, 3
STATE_NAMES = {ADMIN_DOWN: "adminDown", DOWN: "down", INIT: "init", UP: "up"}

# Diagnostic codes (§4.1)
DIAG_NONE = 0
DIAG_DETECTION_EXPIRED = 1
DIAG_ECHO_FAILED = 2
DIAG_NEIGHBOR_DOWN = 3
DIAG_FORWARDING_RESET = 4
DIAG_PATH_DOWN = 5
DIAG_ADMIN_DOWN = 7
DIAG_NAMES = {0: "none", 1: "controlDetectionTimeExpired", 2: "echoFunctionFailed", 3: "neighborSignaledSessionDown",
              4: "forwardingPlaneReset", 5: "pathDown", 6: "concatenatedPathDown", 7: "administrativelyDown",
              8: "reverseConcatenatedPathDown"}

SLOW_TX_US = 1_000_000  # while not Up (§6.8.3)


@dataclass(frozen=True)
class Packet:
    state: int
    diag: int = DIAG_NONE
    poll: bool = False
    final: bool = False
    detect_mult: int = 3
    my_disc: int = 0
    your_disc: int = 0
    desired_min_tx_us: int = SLOW_TX_US
    required_min_rx_us: int = SLOW_TX_US
    required_min_echo_rx_us: int = 0
    control_plane_independent: bool = False
    auth: bool = False
    demand: bool = False
    multipoint: bool = False

    def encode(self) -> bytes:
        flags = ((self.state & 3) << 6) | (0x20 if self.poll else 0) | (0x10 if self.final else 0) | (
            0x08 if self.control_plane_independent else 0) | (0x04 if self.auth else 0) | (
            0x02 if self.demand else 0) | (0x01 if self.multipoint else 0)
        return PACKET.pack((VERSION << 5) | (self.diag & 0x1F), flags, self.detect_mult, LENGTH, self.my_disc,
                           self.your_disc, self.desired_min_tx_us, self.required_min_rx_us,
                           self.required_min_echo_rx_us)


class InvalidPacket(ValueError):
    pass


def decode(data: bytes) -> Packet:
    """A control packet, validated as §6.8.6 asks before any session is looked at."""
    if len(data) < LENGTH:
        raise InvalidPacket(f"{len(data)} bytes: shorter than a control packet")
    vers_diag, flags, mult, length, my_disc, your_disc, tx, rx, echo = PACKET.unpack_from(data)
    if vers_diag >> 5 != VERSION:
        raise InvalidPacket(f"version {vers_diag >> 5}")
    if length < LENGTH or length > len(data):
        raise InvalidPacket(f"length field {length} with {len(data)} bytes")
    if flags & 0x04 and length < LENGTH + 2:
        raise InvalidPacket("authentication present but no section")
    if mult == 0:
        raise InvalidPacket("detect multiplier 0")
    if flags & 0x01:
        raise InvalidPacket("multipoint bit set")
    if my_disc == 0:
        raise InvalidPacket("my discriminator 0")
    state = flags >> 6
    if your_disc == 0 and state not in (DOWN, ADMIN_DOWN):
        raise InvalidPacket("your discriminator 0 in state " + STATE_NAMES[state])
    return Packet(state=state, diag=vers_diag & 0x1F, poll=bool(flags & 0x20), final=bool(flags & 0x10),
                  detect_mult=mult, my_disc=my_disc, your_disc=your_disc, desired_min_tx_us=tx,
                  required_min_rx_us=rx, required_min_echo_rx_us=echo, control_plane_independent=bool(flags & 0x08),
                  auth=bool(flags & 0x04), demand=bool(flags & 0x02), multipoint=False)


@dataclass
class Session:
    """One BFD session (the bfd.* variables of §6.8.1)."""

    peer: str
    local_disc: int
    desired_min_tx_us: int = 300_000  # configured (used once Up)
    required_min_rx_us: int = 300_000
    detect_mult: int = 3
    state: int = DOWN
    remote_state: int = DOWN
    remote_disc: int = 0
    local_diag: int = DIAG_NONE
    remote_diag: int = DIAG_NONE
    remote_min_rx_us: int = 1  # bfd.RemoteMinRxInterval starts at 1 µs (§6.8.1)
    remote_desired_tx_us: int = 0
    remote_detect_mult: int = 0
    poll_active: bool = False
    final_pending: bool = False  # answer a received Poll with Final in the next packet
    # what the peer was last told, and what it acknowledged (the timers in force)
    advertised_tx_us: int = SLOW_TX_US
    advertised_rx_us: int = SLOW_TX_US
    tx_in_force_us: int = SLOW_TX_US
    rx_in_force_us: int = SLOW_TX_US
    last_rx: float = 0.0
    next_tx: float = 0.0
    transitions: list[tuple[float, int, int]] = field(default_factory=list)  # (time, new state, diag)

    # -- timers -----------------------------------------------------------------------------------------
    def _wanted_timers(self) -> tuple[int, int]:
        if self.state != UP:
            return max(self.desired_min_tx_us, SLOW_TX_US), self.required_min_rx_us
        return self.desired_min_tx_us, self.required_min_rx_us

    def _retime(self) -> None:
        """Start a poll sequence when the timers we advertise change (§6.8.3)."""
        tx, rx = self._wanted_timers()
        if (tx, rx) == (self.advertised_tx_us, self.advertised_rx_us):
            return
        decreasing_tx = tx <= self.tx_in_force_us
        increasing_rx = rx >= self.rx_in_force_us
        self.advertised_tx_us, self.advertised_rx_us = tx, rx
        if self.state != UP or decreasing_tx:
            self.tx_in_force_us = tx  # not Up, or faster: at once
        if self.state != UP or increasing_rx:
            self.rx_in_force_us = rx
        self.poll_active = self.state == UP or self.remote_state == UP

    def configure(self, desired_min_tx_us: int, required_min_rx_us: int, detect_mult: int, now: float) -> None:
        """New configured timers: advertised at once, with a poll sequence while Up (§6.8.3)."""
        self.desired_min_tx_us, self.required_min_rx_us, self.detect_mult = (desired_min_tx_us, required_min_rx_us,
                                                                              detect_mult)
        self._retime()
        self.next_tx = min(self.next_tx, now)

    def tx_interval_us(self) -> int:
        return max(self.tx_in_force_us, self.remote_min_rx_us)

    def detection_time(self) -> float:
        """Seconds without a packet before the session goes Down (asynchronous mode, §6.8.4)."""
        return self.remote_detect_mult * max(self.rx_in_force_us, self.remote_desired_tx_us) / 1e6

    # -- receiving (§6.8.6) ---------------------------------------------------------------------------
    def receive(self, pkt: Packet, now: float) -> bool:
        """Apply a received packet; True when the state changed."""
        if pkt.auth:
            return False  # authentication is not configured here: such packets are discarded
        if pkt.your_disc and pkt.your_disc != self.local_disc:
            return False
        self.remote_disc = pkt.my_disc
        self.remote_state = pkt.state
        self.remote_diag = pkt.diag
        self.remote_min_rx_us = pkt.required_min_rx_us
        self.remote_desired_tx_us = pkt.desired_min_tx_us
        self.remote_detect_mult = pkt.detect_mult
        if pkt.final and self.poll_active:
            self.poll_active = False
            self.tx_in_force_us, self.rx_in_force_us = self.advertised_tx_us, self.advertised_rx_us
        self.last_rx = now
        if pkt.poll:
            self.final_pending = True
        if self.state == ADMIN_DOWN:
            return False
        before = self.state
        if pkt.state == ADMIN_DOWN:
            if self.state != DOWN:
                self._set(DOWN, DIAG_NEIGHBOR_DOWN, now)
        elif self.state == DOWN:
            if pkt.state == DOWN:
                self._set(INIT, DIAG_NONE, now)
            elif pkt.state == INIT:
                self._set(UP, DIAG_NONE, now)
        elif self.state == INIT:
            if pkt.state in (INIT, UP):
                self._set(UP, DIAG_NONE, now)
        elif pkt.state == DOWN:  # Up
            self._set(DOWN, DIAG_NEIGHBOR_DOWN, now)
        return self.state != before

    def _set(self, state: int, diag: int, now: float) -> None:
        self.state = state
        if state == UP:
            self.local_diag = DIAG_NONE
        elif diag:
            self.local_diag = diag
        if state == DOWN:
            self.remote_disc = 0 if diag == DIAG_DETECTION_EXPIRED else self.remote_disc
        self.transitions.append((now, state, self.local_diag))
        self._retime()
        self.next_tx = now  # tell the peer at once

    def expired(self, now: float) -> bool:
        """The detection timeout: True (and the session is Down) when the peer went silent for too long."""
        if self.state in (INIT, UP) and self.remote_detect_mult and now - self.last_rx > self.detection_time():
            self.remote_state = DOWN
            self._set(DOWN, DIAG_DETECTION_EXPIRED, now)
            return True
        return False

    # -- transmitting -----------------------------------------------------------------------------------
    def due(self, now: float) -> bool:
        return now >= self.next_tx or self.final_pending

    def packet(self, now: float, rng: random.Random | None = None) -> Packet:
        """The next control packet (periodic, or a Final answering a Poll); schedules the one after it with
        the RFC's jitter (75-100% of the interval, 75-90% with a detect multiplier of 1)."""
        final = self.final_pending
        self.final_pending = False
        pkt = Packet(state=self.state, diag=self.local_diag, poll=self.poll_active and not final, final=final,
                     detect_mult=self.detect_mult, my_disc=self.local_disc, your_disc=self.remote_disc,
                     desired_min_tx_us=self.advertised_tx_us, required_min_rx_us=self.advertised_rx_us)
        low, high = (0.75, 0.90) if self.detect_mult == 1 else (0.75, 1.0)
        self.next_tx = now + self.tx_interval_us() / 1e6 * (rng or random).uniform(low, high)
        return pkt
