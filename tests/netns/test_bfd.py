"""BFD between two agents' BFD services in two namespaces joined by a veth: real UDP 3784, real TTLs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from routed import netns
from tests.helpers import run_and_expect

pytestmark = pytest.mark.netns
PREFIX = "rtd-bfdt"
A, B = f"{PREFIX}-a", f"{PREFIX}-b"
IP_A, IP_B = "10.9.1.1", "10.9.1.2"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def link():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    netns.delete_all(PREFIX)
    netns.create(A)
    netns.create(B)
    netns.veth(A, "eth0", B, "eth0")
    netns.ns_run(A, ["ip", "addr", "add", f"{IP_A}/24", "dev", "eth0"])
    netns.ns_run(B, ["ip", "addr", "add", f"{IP_B}/24", "dev", "eth0"])
    yield
    netns.delete_all(PREFIX)


class Node:
    def __init__(self, ns: str, local: str, peer: str, tx: int, rx: int, mult: int) -> None:
        self.proc = subprocess.Popen(
            netns.ns_cmd(ns, [sys.executable, "-m", "tests.netns.bfd_node", "--local", local, "--peer", peer,
                              "--tx", str(tx), "--rx", str(rx), "--mult", str(mult)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        run_and_expect(lambda: self.of("started"), lambda e: bool(e), timeout=10).check("BFD node started")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.events.append(json.loads(line))

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["event"] == kind]

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def status(self) -> dict[str, Any]:
        before = len(self.of("status"))
        self.send("status")
        return run_and_expect(lambda: self.of("status")[before:], lambda s: bool(s), timeout=5).check("status")[0]

    def session(self) -> dict[str, Any]:
        sessions = self.status()["status"]
        return sessions[0] if sessions else {}

    def state(self) -> str:
        return self.session().get("state", "")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.send("quit")
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def pair(link):
    nodes = [Node(A, IP_A, IP_B, tx=100, rx=200, mult=3), Node(B, IP_B, IP_A, tx=300, rx=50, mult=4)]
    yield nodes
    for n in nodes:
        n.close()


def test_sessions_come_up_and_negotiate_timers(pair):
    a, b = pair
    for node in pair:
        run_and_expect(node.state, "up", timeout=10).check("session up")
    sa, sb = a.session(), b.session()
    assert sa["remoteDiscriminator"] == sb["localDiscriminator"] and sb["remoteDiscriminator"] == sa["localDiscriminator"]
    # once the poll sequence of going Up has ended: TX = max(own desired TX, peer's required RX)
    run_and_expect(lambda: a.session()["txIntervalMs"], 100.0, timeout=5).check("A sends every 100 ms")
    run_and_expect(lambda: b.session()["txIntervalMs"], 300.0, timeout=5).check("B sends every 300 ms")
    # detection time = peer's multiplier x max(own required RX, peer's desired TX)
    assert a.session()["detectionTimeMs"] == 4 * 300.0
    run_and_expect(lambda: b.session()["detectionTimeMs"], 3 * 100.0, timeout=5).check("B detects in 300 ms")
    assert 49152 <= sa["sourcePort"] <= 65535
    assert a.status()["counters"]["dropped_ttl"] == 0


def test_silent_peer_is_detected_within_the_detection_time(pair):
    a, b = pair
    run_and_expect(a.state, "up", timeout=10).check("up")
    run_and_expect(lambda: b.session()["detectionTimeMs"], 300.0, timeout=5).check("timers negotiated")
    downs_before = len([e for e in a.of("change") if e["new"] == "down"])
    os.kill(b.proc.pid, signal.SIGSTOP)  # B's control plane freezes; the link stays up
    stopped = time.monotonic()
    down = run_and_expect(lambda: [e for e in a.of("change") if e["new"] == "down"][downs_before:],
                          lambda d: bool(d), timeout=5).check("A declares the session down")[0]
    assert down["diag"] == "controlDetectionTimeExpired"
    assert down["t"] - stopped < 1.2 + 0.3, f"detected after {down['t'] - stopped:.2f}s (detection time 1.2 s)"
    os.kill(b.proc.pid, signal.SIGCONT)
    for node in pair:
        run_and_expect(node.state, "up", timeout=15).check("session back up")


def test_timer_change_keeps_the_session_up(pair):
    a, b = pair
    for node in pair:
        run_and_expect(node.state, "up", timeout=10).check("up")
    changes = len(a.of("change")) + len(b.of("change"))
    a.send("timers 50 400 5")
    run_and_expect(lambda: b.session()["detectionTimeMs"], 5 * 50.0, timeout=5).check("B uses A's new TX")
    run_and_expect(lambda: a.session()["detectionTimeMs"], 4 * 400.0, timeout=5).check("A uses its new RX")
    assert len(a.of("change")) + len(b.of("change")) == changes, "a timer change must not flap the session"
    assert a.state() == "up" and b.state() == "up"


def test_removed_session_tells_the_peer_admin_down(pair):
    a, b = pair
    for node in pair:
        run_and_expect(node.state, "up", timeout=10).check("up")
    a.send("remove")
    down = run_and_expect(lambda: [e for e in b.of("change") if e["new"] == "down"], lambda d: bool(d),
                          timeout=5).check("B goes down")[0]
    assert down["diag"] == "neighborSignaledSessionDown"  # not a detection timeout: A said AdminDown


def test_packets_with_ttl_below_255_are_dropped(pair):
    a, b = pair
    run_and_expect(a.state, "up", timeout=10).check("up")
    session = b.session()
    # a well-formed packet for A's session, from B's address, but one hop further away (TTL 254)
    my_disc, your_disc = session["localDiscriminator"], session["remoteDiscriminator"]
    sender = ("import socket,struct;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
              f"s.setsockopt(socket.IPPROTO_IP,socket.IP_TTL,254);s.bind(('{IP_B}',49999));"
              f"s.sendto(struct.pack('!BBBBIIIII',0x20,0xC0,3,24,{my_disc},{your_disc},100000,100000,0),"
              f"('{IP_A}',3784))")
    netns.ns_run(B, [sys.executable, "-c", sender])
    run_and_expect(lambda: a.status()["counters"]["dropped_ttl"], 1, timeout=5).check("TTL 254 dropped")
    assert a.state() == "up"
