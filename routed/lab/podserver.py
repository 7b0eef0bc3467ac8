"""The lab's pod workload: answers on its TCP and UDP ports with its name and the client address it saw.

Run inside a pod namespace: `python -m routed.lab.podserver --name ns/pod --tcp 80,81 --udp 80,81`.
The reply (one JSON line) lets the matrix prove the connection reached the right pod without NAT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
from typing import Any

log = logging.getLogger("routed.lab.podserver")


def reply(name: str, client: str) -> bytes:
    if client.startswith("::ffff:") and "." in client:  # an IPv4 client of the dual-stack socket
        client = client[len("::ffff:"):]
    return json.dumps({"pod": name, "client": client}).encode() + b"\n"


def dual_stack_socket(kind: socket.SocketKind, port: int) -> socket.socket:
    """One socket on [::]:port taking IPv4 (as mapped addresses) and IPv6, whatever the pod's families."""
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    return sock


class UdpResponder(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: Any = None  # the selector datagram transport (not a DatagramTransport subclass)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(reply(self.name, addr[0]), addr)


async def serve(name: str, tcp_ports: list[int], udp_ports: list[int]) -> None:
    async def on_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        writer.write(reply(name, peer[0] if peer else ""))
        try:
            await writer.drain()
        finally:
            writer.close()

    loop = asyncio.get_running_loop()
    servers = [await asyncio.start_server(on_tcp, sock=dual_stack_socket(socket.SOCK_STREAM, port))
               for port in tcp_ports]
    for port in udp_ports:
        await loop.create_datagram_endpoint(lambda: UdpResponder(name),
                                            sock=dual_stack_socket(socket.SOCK_DGRAM, port))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("%s serving tcp %s udp %s", name, tcp_ports, udp_ports)
    await stop.wait()
    for server in servers:
        server.close()


def _ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p.strip()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--tcp", default="")
    parser.add_argument("--udp", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    asyncio.run(serve(args.name, _ports(args.tcp), _ports(args.udp)))


if __name__ == "__main__":
    main()
