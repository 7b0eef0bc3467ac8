"""The one place a line reaches ExaBGP's API: `CommandSink.send(line)`.

ExaBGP reads its API process's output as ASCII lines and runs each as a command, so one stray newline is a second
command and one non-ASCII byte breaks its reader. The sink writes a line only when it is exactly one of the
commands routed builds (routed.bgp.announce), every address, prefix and community in it re-checked in canonical
form; anything else — a control character, a non-ASCII character, an unknown command — is refused: logged
(repr-escaped, cut short), counted (`refused`, metric `routed_bgp_commands_refused_total`) and never written.

The transport is the API bridge's connection (an asyncio StreamWriter, or anything with write/close): attached
when the bridge connects, detached when it goes; with none attached nothing is written.
"""

from __future__ import annotations

import logging
import re
from typing import Protocol

from routed.bgp import grammar

log = logging.getLogger(__name__)

LOGGED_MAX = 200
_A = r"[0-9a-f:.]{2,45}"
_P = _A + r"/[0-9]{1,3}"
_STD = r"[0-9]{1,5}:[0-9]{1,5}"
_LARGE = r"[0-9]{1,10}:[0-9]{1,10}:[0-9]{1,10}"
_ANNOUNCE = re.compile(
    rf"neighbor ({_A}) announce route ({_P}) next-hop ({_A})"
    rf"(?: community \[((?: {_STD})+) \])?(?: large-community \[((?: {_LARGE})+) \])?", re.ASCII)
_WITHDRAW = re.compile(rf"neighbor ({_A}) withdraw route ({_P}) next-hop ({_A})", re.ASCII)
_EOR = re.compile(rf"neighbor ({_A}) announce eor (?:ipv4|ipv6) unicast", re.ASCII)
_TEARDOWN = re.compile(rf"neighbor ({_A}) teardown ([0-9]{{1,3}})", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Transport(Protocol):
    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


def refusal(line: object) -> str:
    """Why `line` must not reach ExaBGP; "" when it is one well-formed command of routed's grammar."""
    if not isinstance(line, str):
        return "not text"
    if _CONTROL.search(line):
        return "control character"
    if not line.isascii():
        return "non-ASCII character"
    try:
        if m := _ANNOUNCE.fullmatch(line):
            peer, prefix, next_hop, std, large = m.groups()
            grammar.address(peer)
            family = grammar.family_of(grammar.prefix(prefix))
            grammar.address(next_hop, family)
            for c in (std or "").split() + (large or "").split():
                grammar.community(c)
        elif m := _WITHDRAW.fullmatch(line):
            peer, prefix, next_hop = m.groups()
            grammar.address(peer)
            grammar.address(next_hop, grammar.family_of(grammar.prefix(prefix)))
        elif m := _EOR.fullmatch(line):
            grammar.address(m.group(1))
        elif m := _TEARDOWN.fullmatch(line):
            grammar.address(m.group(1))
            grammar.integer(int(m.group(2)), 1, 255, "subcode")
        else:
            return "not a command routed sends"
    except ValueError as exc:
        return str(exc)
    return ""


class CommandSink:
    def __init__(self) -> None:
        self.transport: Transport | None = None
        self.sent = 0
        self.refused = 0
        self.last_refusal = ""  # why the last refused line was refused (never the line itself)

    @property
    def connected(self) -> bool:
        return self.transport is not None

    def attach(self, transport: Transport) -> None:
        """The bridge connected: lines go to it from now on (a previous connection is closed)."""
        if self.transport is not None and self.transport is not transport:
            self.transport.close()
        self.transport = transport

    def detach(self, transport: Transport | None = None) -> None:
        """The bridge went (only `transport`, when given, is detached: a newer connection stays)."""
        if self.transport is None or (transport is not None and transport is not self.transport):
            return
        old, self.transport = self.transport, None
        old.close()

    def send(self, line: str) -> bool:
        """Write `line` to ExaBGP if it is one well-formed command; True when written."""
        why = refusal(line)
        if why:
            self.refused += 1
            self.last_refusal = why
            log.error("refused a command for ExaBGP (%s): %s", why, grammar.shown(line, LOGGED_MAX))
            return False
        if self.transport is None:
            return False
        log.debug("-> exabgp: %s", line)
        self.transport.write((line + "\n").encode("ascii"))
        self.sent += 1
        return True
