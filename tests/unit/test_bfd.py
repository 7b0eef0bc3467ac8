"""BFD control packets and the session state machine (RFC 5880), driven by two sessions talking to each other."""

from __future__ import annotations

import random

import pytest

from routed.bgp import bfd
from routed.bgp.bfd import DOWN, INIT, UP, Packet, Session


def test_packet_roundtrip_and_wire_layout() -> None:
    pkt = Packet(state=UP, diag=bfd.DIAG_DETECTION_EXPIRED, poll=True, detect_mult=5, my_disc=7, your_disc=9,
                 desired_min_tx_us=300_000, required_min_rx_us=200_000)
    raw = pkt.encode()
    assert len(raw) == 24
    assert raw[0] == (1 << 5) | 1  # version 1, diag 1
    assert raw[1] == (UP << 6) | 0x20  # state Up, poll
    assert raw[2] == 5 and raw[3] == 24
    assert bfd.decode(raw) == pkt


@pytest.mark.parametrize(("mutate", "why"), [
    (lambda b: b[:20], "shorter"),
    (lambda b: bytes([b[0] & 0x1F | (2 << 5)]) + b[1:], "version"),
    (lambda b: b[:2] + bytes([0]) + b[3:], "multiplier"),
    (lambda b: b[:1] + bytes([b[1] | 0x01]) + b[2:], "multipoint"),
    (lambda b: b[:4] + bytes(4) + b[8:], "my discriminator"),
    (lambda b: b[:3] + bytes([40]) + b[4:], "length"),
])
def test_invalid_packets_are_rejected(mutate, why: str) -> None:
    raw = Packet(state=UP, my_disc=1, your_disc=2).encode()
    with pytest.raises(bfd.InvalidPacket, match=why):
        bfd.decode(mutate(raw))


def test_zero_your_discriminator_only_in_down() -> None:
    bfd.decode(Packet(state=DOWN, my_disc=1, your_disc=0).encode())
    with pytest.raises(bfd.InvalidPacket, match="your discriminator"):
        bfd.decode(Packet(state=UP, my_disc=1, your_disc=0).encode())


class Link:
    """Two sessions exchanging packets in simulated time; `cut` drops everything."""

    def __init__(self, a: Session, b: Session) -> None:
        self.a, self.b, self.now, self.cut = a, b, 0.0, False
        self.rng = random.Random(1)
        self.sent: list[tuple[str, Packet]] = []

    def run(self, seconds: float, step: float = 0.005) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += step
            for src, dst in ((self.a, self.b), (self.b, self.a)):
                src.expired(self.now)
                if src.due(self.now):
                    pkt = src.packet(self.now, self.rng)
                    self.sent.append((src.peer, pkt))
                    if not self.cut:
                        dst.receive(bfd.decode(pkt.encode()), self.now)


def pair(tx_a: int = 100_000, rx_a: int = 100_000, tx_b: int = 300_000, rx_b: int = 300_000) -> Link:
    return Link(Session(peer="b", local_disc=11, desired_min_tx_us=tx_a, required_min_rx_us=rx_a),
                Session(peer="a", local_disc=22, desired_min_tx_us=tx_b, required_min_rx_us=rx_b))


def test_three_way_handshake_comes_up_and_learns_discriminators() -> None:
    link = pair()
    link.run(3.0)
    assert (link.a.state, link.b.state) == (UP, UP)
    assert (link.a.remote_disc, link.b.remote_disc) == (22, 11)
    states_a = [s for _, s, _ in link.a.transitions]
    assert states_a[:2] in ([INIT, UP], [UP])


def test_intervals_negotiate_to_the_slower_side_after_the_poll() -> None:
    link = pair(tx_a=100_000, rx_a=100_000, tx_b=300_000, rx_b=300_000)
    link.run(5.0)
    assert not link.a.poll_active and not link.b.poll_active
    # a sends no faster than b wants to receive; b no faster than max(its tx, a's rx)
    assert link.a.tx_interval_us() == 300_000
    assert link.b.tx_interval_us() == 300_000
    # a detects b's silence after b's multiplier × max(a's rx, b's tx)
    assert link.a.detection_time() == pytest.approx(0.9)
    # while not Up, packets went at most once a second (§6.8.3)
    first_up = min(t for t, s, _ in link.a.transitions if s == UP)
    early = [p for who, p in link.sent if who == "b" and p.state != UP]
    assert all(p.desired_min_tx_us >= 1_000_000 for p in early)
    assert first_up < 3.0
    # the poll went out and a final came back
    assert any(p.poll for who, p in link.sent if who == "b")
    assert any(p.final for who, p in link.sent if who == "a")


def test_silence_is_detected_within_detection_time() -> None:
    link = pair(tx_a=100_000, rx_a=100_000, tx_b=100_000, rx_b=100_000)
    link.run(5.0)
    assert link.a.state == UP
    link.cut = True
    cut_at = link.now
    link.run(1.0)
    assert link.a.state == DOWN and link.a.local_diag == bfd.DIAG_DETECTION_EXPIRED
    down_at = next(t for t, s, _ in link.a.transitions if s == DOWN)
    assert 0.2 < down_at - cut_at <= 0.3 + 0.01  # multiplier 3 × 100 ms
    link.cut = False
    link.run(4.0)
    assert (link.a.state, link.b.state) == (UP, UP)


def test_peer_signalling_down_takes_the_session_down() -> None:
    link = pair()
    link.run(3.0)
    assert link.b.state == UP
    link.b.receive(Packet(state=DOWN, diag=bfd.DIAG_PATH_DOWN, my_disc=11, your_disc=22), link.now)
    assert link.b.state == DOWN and link.b.local_diag == bfd.DIAG_NEIGHBOR_DOWN
    assert link.b.remote_diag == bfd.DIAG_PATH_DOWN


def test_packets_for_another_discriminator_are_ignored() -> None:
    s = Session(peer="x", local_disc=5)
    assert not s.receive(Packet(state=DOWN, my_disc=9, your_disc=6), 1.0)
    assert s.remote_disc == 0 and s.state == DOWN


def test_admin_down_from_peer_does_not_count_as_failure_of_a_down_session() -> None:
    s = Session(peer="x", local_disc=5)
    s.receive(Packet(state=bfd.ADMIN_DOWN, my_disc=9, your_disc=5), 1.0)
    assert s.state == DOWN and s.transitions == []
