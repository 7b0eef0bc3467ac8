"""Render ExaBGP 5 configuration and environment for one node's speaker. Pure.

Each neighbour negotiates the unicast families of its PeerConfig (`family { ipv4 unicast; ipv6 unicast; }`:
IPv6 over an IPv4 session needs both); its `local-address` is the one config.py resolved (the same address the
same-family next hop is taken from). When listening, ExaBGP binds the node's first address of each family.

Nothing can break out of the config: ExaBGP unescapes a line before it reads quotes, so no quoting is safe and
none is used. Passwords go as base64 (`md5-password <base64>; md5-base64 true;`), names and descriptions not at
all, and every address, number and path is re-checked against routed.bgp.grammar as it is written. A peer with
a value outside that grammar (or a password with a control character, or over the kernel's 80-byte TCP MD5
key limit) is left out with a BgpConfigError naming the peer (`render_config`: the others are rendered); a bad
node-wide value (router id, AS number, timers, paths) fails the whole render. No error echoes a password.
"""

from __future__ import annotations

import base64
import sys
import unicodedata
from dataclasses import dataclass

from routed.bgp import grammar
from routed.bgp.config import BgpConfigError, PeerConfig, SpeakerConfig, first_addresses
from routed.bgp.redact import printable

PROCESS_NAME = "routed"
AFI = {4: "ipv4", 6: "ipv6"}
MD5_KEY_MAX = 80  # TCP_MD5SIG_MAXKEYLEN: the kernel's (and ExaBGP's) limit, in bytes
HOLD_MAX = 65535
GRACEFUL_RESTART_MAX = 4095  # 12 bits in the capability


def family_names(families: tuple[int, ...]) -> list[str]:
    """ExaBGP's names of unicast families: (4, 6) -> ["ipv4 unicast", "ipv6 unicast"]."""
    return [f"{AFI[f]} unicast" for f in families]


def peer_label(peer: PeerConfig) -> str:
    """How errors name a peer: its BGPPeer (or mesh) name and address, escaped."""
    name = str(peer.name)
    kind = "" if name.startswith("mesh:") else "BGPPeer "
    return f"{kind}{printable(name, 100)} (peer {grammar.shown(peer.address)})"


def md5_base64(password: object) -> str:
    """The password as ExaBGP's md5-base64 takes it; ValueError (never quoting the password) when it cannot be a
    TCP MD5 key: not text, a control character (a trailing newline counts), or over 80 bytes in UTF-8."""
    if not isinstance(password, str) or not password:
        raise ValueError("the password is not a non-empty text")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in password):
        raise ValueError("the password contains a control character (a trailing newline counts); "
                         "the session is not configured")
    key = password.encode("utf-8")
    if len(key) > MD5_KEY_MAX:
        raise ValueError(f"the password is longer than {MD5_KEY_MAX} bytes (the kernel's TCP MD5 key limit); "
                         "the session is not configured")
    return base64.b64encode(key).decode("ascii")


def _families(peer: PeerConfig) -> list[str]:
    families = peer.families
    if not families or any(isinstance(f, bool) or f not in AFI for f in families) or len(set(families)) != len(families):
        raise ValueError(f"address families {grammar.shown(families)} are not a set of 4 and 6")
    return family_names(tuple(families))


def neighbor_lines(cfg: SpeakerConfig, peer: PeerConfig) -> list[str]:
    """One `neighbor` block; BgpConfigError naming the peer when any of its values is outside the grammar."""
    try:
        address = grammar.address(peer.address)
        lines = [
            f"neighbor {address} {{",
            f"  router-id {grammar.ipv4(cfg.router_id)};",
            f"  local-as {grammar.asn(cfg.asn)};",
            f"  peer-as {grammar.asn(peer.asn)};",
            f"  hold-time {cfg.hold_time};",
            "  manual-eor true;",
            "  group-updates false;",
        ]
        if peer.local_address:
            lines.append(f"  local-address {grammar.address(peer.local_address, grammar.family_of(address))};")
        if not isinstance(peer.passive, bool):
            raise ValueError(f"passive {grammar.shown(peer.passive)} is not a boolean")
        if peer.passive:
            lines.append("  passive true;")
        if peer.password:
            lines.append(f"  md5-password {md5_base64(peer.password)};")
            lines.append("  md5-base64 true;")
        if peer.multihop and peer.ttl_security:
            raise ValueError("ebgpMultihop and ttlSecurity are exclusive")
        if peer.multihop:
            lines.append(f"  outgoing-ttl {grammar.integer(peer.multihop, 1, 255, 'ebgpMultihop')};")
        if peer.ttl_security:
            hops = grammar.integer(peer.ttl_security, 1, 254, "ttlSecurity")
            lines.append("  outgoing-ttl 255;")
            lines.append(f"  incoming-ttl {256 - hops};")
        lines.append("  capability {")
        if cfg.graceful_restart_time:
            lines.append(f"    graceful-restart {cfg.graceful_restart_time};")
        lines.append("  }")
        lines.append("  family {")
        lines += [f"    {f};" for f in _families(peer)]
        lines.append("  }")
    except ValueError as exc:
        raise BgpConfigError(f"{peer_label(peer)}: {exc}; not given to ExaBGP") from None
    return lines + [
        "  api {",
        f"    processes [ {PROCESS_NAME} ];",
        "    neighbor-changes;",
        "    receive { parsed; update; open; notification; }",
        "    send { parsed; update; }",
        "  }",
        "}",
        "",
    ]


def _check_node(cfg: SpeakerConfig, socket_path: str, python: str) -> None:
    """The values every neighbour block and the process share: one bad one and nothing can be rendered."""
    try:
        grammar.ipv4(cfg.router_id)
        grammar.asn(cfg.asn)
        hold = grammar.integer(cfg.hold_time, 0, HOLD_MAX, "holdTime")
        if 0 < hold < 3:
            raise ValueError(f"holdTime {hold} is neither 0 nor at least 3")
        grammar.integer(cfg.graceful_restart_time, 0, GRACEFUL_RESTART_MAX, "gracefulRestartTime")
        grammar.path(python)
        grammar.path(socket_path)
    except ValueError as exc:
        raise BgpConfigError(f"node {printable(str(cfg.node_name), 100)}: {exc}; ExaBGP's config not written") from None


@dataclass(frozen=True)
class Rendered:
    text: str
    peers: frozenset[str] = frozenset()  # addresses of the neighbours in `text`
    refused: tuple[tuple[str, str], ...] = ()  # (peer address, why: names the peer, never shows a password)


def render_config(cfg: SpeakerConfig, socket_path: str, python: str = sys.executable) -> Rendered:
    """The config with every peer that passes its checks; the others are listed in `refused`."""
    _check_node(cfg, socket_path, python)
    lines = [
        f"process {PROCESS_NAME} {{",
        f"  run {python} -m routed.bgp.bridge {socket_path};",
        "  encoder json;",
        "}",
        "",
    ]
    refused: list[tuple[str, str]] = []
    rendered: set[str] = set()
    for peer in cfg.peers:
        try:
            if peer.address in rendered:  # ExaBGP refuses a whole config with a duplicate neighbour
                raise BgpConfigError(f"{peer_label(peer)}: a second peer with this address; not given to ExaBGP")
            lines += neighbor_lines(cfg, peer)
            rendered.add(peer.address)
        except BgpConfigError as exc:
            refused.append((peer.address, exc.msg))
    return Rendered("\n".join(lines), frozenset(rendered), tuple(refused))


def render(cfg: SpeakerConfig, socket_path: str, python: str = sys.executable) -> str:
    """The whole config, or BgpConfigError for the first value outside the grammar."""
    rendered = render_config(cfg, socket_path, python)
    if rendered.refused:
        raise BgpConfigError(rendered.refused[0][1])
    return rendered.text


def environment(cfg: SpeakerConfig, listen_port: int, pid_file: str) -> dict[str, str]:
    """ExaBGP settings via environment: stay root (MD5 sockets), no CLI pipes, ack off, logs to stdout.
    BgpConfigError when a value (listen address, port, pid file) is outside the grammar."""
    try:
        bind = ""
        if cfg.listen or listen_port:
            bind = " ".join(grammar.address(a) for a in first_addresses(cfg.local_addresses))
        port = grammar.integer(listen_port or 179, 1, 65535, "listen port")
        grammar.path(pid_file)
    except ValueError as exc:
        raise BgpConfigError(f"node {printable(str(cfg.node_name), 100)}: {exc}; ExaBGP not started") from None
    return {
        "exabgp_daemon_user": "root",
        "exabgp_daemon_drop": "false",
        "exabgp_daemon_daemonize": "false",
        "exabgp_daemon_pid": pid_file,
        "exabgp_api_cli": "false",
        "exabgp_api_ack": "false",
        "exabgp_api_encoder": "json",
        "exabgp_api_respawn": "false",
        "exabgp_api_terminate": "true",
        "exabgp_tcp_bind": bind,
        "exabgp_tcp_port": str(port),
        "exabgp_log_destination": "stdout",
        "exabgp_log_level": "INFO",
        "exabgp_log_statistics": "false",
        "exabgp_log_packets": "false",
        "exabgp_log_rib": "false",
        "exabgp_log_message": "false",
        "exabgp_log_timers": "false",
        "exabgp_log_routes": "false",
        "exabgp_log_parser": "false",
        "exabgp_log_short": "true",
    }
