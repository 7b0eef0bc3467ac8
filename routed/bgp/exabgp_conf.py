"""Render ExaBGP 5 configuration and environment for one node's speaker. Pure.

Each neighbour negotiates the unicast families of its PeerConfig (`family { ipv4 unicast; ipv6 unicast; }`:
IPv6 over an IPv4 session needs both); its `local-address` is the one config.py resolved (the same address the
same-family next hop is taken from). When listening, ExaBGP binds the node's first address of each family.
"""

from __future__ import annotations

import sys

from routed.bgp.config import PeerConfig, SpeakerConfig, first_addresses

PROCESS_NAME = "routed"
AFI = {4: "ipv4", 6: "ipv6"}


def family_names(families: tuple[int, ...]) -> list[str]:
    """ExaBGP's names of unicast families: (4, 6) -> ["ipv4 unicast", "ipv6 unicast"]."""
    return [f"{AFI[f]} unicast" for f in families]


def _families(peer: PeerConfig) -> list[str]:
    return family_names(peer.families)


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(cfg: SpeakerConfig, socket_path: str, python: str = sys.executable) -> str:
    lines = [
        f"process {PROCESS_NAME} {{",
        f"  run {python} -m routed.bgp.bridge {socket_path};",
        "  encoder json;",
        "}",
        "",
    ]
    for peer in cfg.peers:
        local = peer.local_address
        lines += [
            f"neighbor {peer.address} {{",
            f"  description {_quote(peer.name)};",
            f"  router-id {cfg.router_id};",
            f"  local-as {cfg.asn};",
            f"  peer-as {peer.asn};",
            f"  hold-time {cfg.hold_time};",
            "  manual-eor true;",
            "  group-updates false;",
        ]
        if local:
            lines.append(f"  local-address {local};")
        if peer.passive:
            lines.append("  passive true;")
        if peer.password:
            lines.append(f"  md5-password {_quote(peer.password)};")
        if peer.multihop:
            lines.append(f"  outgoing-ttl {peer.multihop};")
        if peer.ttl_security:
            lines.append("  outgoing-ttl 255;")
            lines.append(f"  incoming-ttl {256 - peer.ttl_security};")
        lines.append("  capability {")
        if cfg.graceful_restart_time:
            lines.append(f"    graceful-restart {cfg.graceful_restart_time};")
        lines.append("  }")
        lines.append("  family {")
        lines += [f"    {f};" for f in _families(peer)]
        lines.append("  }")
        lines += [
            "  api {",
            f"    processes [ {PROCESS_NAME} ];",
            "    neighbor-changes;",
            "    receive { parsed; update; open; notification; }",
            "    send { parsed; update; }",
            "  }",
            "}",
            "",
        ]
    return "\n".join(lines)


def environment(cfg: SpeakerConfig, listen_port: int, pid_file: str) -> dict[str, str]:
    """ExaBGP settings via environment: stay root (MD5 sockets), no CLI pipes, ack off, logs to stdout."""
    bind = ""
    if cfg.listen or listen_port:
        bind = " ".join(first_addresses(cfg.local_addresses))
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
        "exabgp_tcp_port": str(listen_port or 179),
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
