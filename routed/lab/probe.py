"""Connectivity probes run inside a source pod namespace: every target at once, short timeouts.

stdin: {"targets": [{"to": "ns/pod", "ip": "10.244.1.5", "port": 80, "protocol": "TCP"}, ...], "timeout": 1.0}
stdout: {"results": [{"to", "ip", "port", "protocol", "allowed", "server": "ns/pod"|null, "client_seen": ip|null}]}
A probe is allowed only when the pod server answered; UDP is sent up to three times within the timeout.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any


def _parse_reply(data: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(data.decode().strip() or "{}")
        return parsed if isinstance(parsed, dict) else {}
    except ValueError:
        return {}


async def probe_tcp(ip: str, port: int, timeout: float) -> dict[str, Any] | None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
    except (OSError, TimeoutError):
        return None
    try:
        data = await asyncio.wait_for(reader.readline(), timeout)
        return _parse_reply(data) if data else None
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()


class _UdpClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable: keep waiting until the deadline
        pass


async def probe_udp(ip: str, port: int, timeout: float) -> dict[str, Any] | None:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(_UdpClient, remote_addr=(ip, port))
    try:
        tries = 3
        for _ in range(tries):
            transport.sendto(b"probe\n")
            try:
                data = await asyncio.wait_for(asyncio.shield(client.answer), timeout / tries)
                return _parse_reply(data)
            except TimeoutError:
                continue
        return None
    finally:
        transport.close()


async def run(targets: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    async def one(target: dict[str, Any]) -> dict[str, Any]:
        proto = str(target["protocol"]).upper()
        if proto == "TCP":
            answer = await probe_tcp(target["ip"], int(target["port"]), timeout)
        elif proto == "UDP":
            answer = await probe_udp(target["ip"], int(target["port"]), timeout)
        else:
            answer = None  # SCTP cannot be carried by this kernel; reported as not allowed
        return {
            **target,
            "protocol": proto,
            "allowed": answer is not None,
            "server": (answer or {}).get("pod"),
            "client_seen": (answer or {}).get("client"),
        }

    return list(await asyncio.gather(*(one(t) for t in targets)))


def main() -> None:
    request = json.load(sys.stdin)
    results = asyncio.run(run(request["targets"], float(request.get("timeout", 1.0))))
    json.dump({"results": results}, sys.stdout)


if __name__ == "__main__":
    main()
