"""ToR failure in the lab: freeze a ToR as a hung box, and measure what a pod-to-pod ping loses meanwhile.

A hung ToR is modelled as every FRR daemon stopped (SIGSTOP: its TCP sessions and BFD go silent, nothing is
withdrawn) with its links up. A network namespace's kernel keeps forwarding on its own, which a hung box does
not, so forwarding is switched off inside the ToR's namespace too (`net.ipv4.ip_forward=0` there only).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from routed import netns
from routed.lab.errors import LabError

PING_INTERVAL = 0.02  # 50 packets per second
_SEQ = re.compile(r"icmp_seq=(\d+)")


@dataclass
class Outage:
    sent: int
    received: int
    longest_gap_s: float  # the longest run of lost replies, in seconds of sending
    lost: int


def _rx_packets(tor_netns: str, ifname: str) -> int:
    out = netns.ns_run(tor_netns, ["ip", "-j", "-s", "link", "show", "dev", ifname]).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def carrying_tor(lab: Any, node_name: str, seconds: float = 1.0) -> str:
    """The ToR that receives most packets from the node over `seconds` — with a ping running, the ToR its flow
    hashes to (ECMP picks one next hop per flow; asking `ip route get` is not what the forwarding path does
    for every kernel, counting is)."""
    state = lab.state()
    node = state.node(node_name)
    links = [(up["tor"], next(t.netns for t in state.tors if t.name == up["tor"]), up["tor_ifname"])
             for up in node.uplinks]
    before = {tor: _rx_packets(ns, ifname) for tor, ns, ifname in links}
    time.sleep(seconds)
    delta = {tor: _rx_packets(ns, ifname) - before[tor] for tor, ns, ifname in links}
    busiest = max(delta, key=lambda tor: delta[tor])
    if delta[busiest] < seconds / PING_INTERVAL / 2:
        raise LabError(f"no ToR carries the ping from {node_name}: packets received per ToR {delta}")
    return busiest


def freeze_tor(lab: Any, tor_name: str) -> list[int]:
    """Stop every daemon of the ToR and its forwarding; returns the stopped PIDs (for `thaw_tor`)."""
    from routed.lab.bgp_setup import tor_router

    state = lab.state()
    tor = next(t for t in state.tors if t.name == tor_name)
    pids = sorted(tor_router(lab, state, tor_name).daemon_pids().values())
    if not pids:
        raise LabError(f"{tor_name} runs no daemons to stop")
    netns.ns_run(tor.netns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"])
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def thaw_tor(lab: Any, tor_name: str, pids: list[int]) -> None:
    state = lab.state()
    tor = next(t for t in state.tors if t.name == tor_name)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    netns.ns_run(tor.netns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])


class Ping:
    """`ping` at 50 pps from a pod's namespace; `stop()` returns what was lost."""

    def __init__(self, lab: Any, src_pod: str, dst_pod: str) -> None:
        state = lab.state()
        self.proc = subprocess.Popen(
            netns.ns_cmd(state.pods[src_pod].netns, ["ping", "-n", "-i", str(PING_INTERVAL), "-W", "1",
                                                     state.pods[dst_pod].ips[0]]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> Outage:
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=10)
        seqs = sorted({int(m.group(1)) for m in _SEQ.finditer(out)})
        sent_match = re.search(r"(\d+) packets transmitted", out)
        sent = int(sent_match.group(1)) if sent_match else (seqs[-1] if seqs else 0)
        received = set(seqs)
        longest = run = 0
        for seq in range(1, sent + 1):
            run = 0 if seq in received else run + 1
            longest = max(longest, run)
        return Outage(sent=sent, received=len(received), longest_gap_s=round(longest * PING_INTERVAL, 3),
                      lost=sent - len(received))
