"""One BFD speaker for tests/netns/test_bfd.py, run inside a test namespace.

    python -m tests.netns.bfd_node --local 10.9.1.1 --peer 10.9.1.2 --tx 100 --rx 100 --mult 3

Prints one JSON line per state change ({"event": "change", "t", "old", "new", "diag"}) and answers commands
read from stdin, one per line: `status` (prints {"event": "status", "status": [...], "counters": {...}}),
`timers TX RX MULT` (reconfigure), `remove` (drop the session: the peer is sent AdminDown), `quit`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from routed.bgp import bfd
from routed.bgp.bfd_net import BfdPeer, BfdService


def emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> None:
    def on_change(peer: str, old: int, new: int, diag: int) -> None:
        emit({"event": "change", "t": time.monotonic(), "old": bfd.STATE_NAMES[old], "new": bfd.STATE_NAMES[new],
              "diag": bfd.DIAG_NAMES[diag]})

    service = BfdService(on_change, port=args.port, bind_address=args.local)
    service.configure([BfdPeer(args.peer, args.rx, args.tx, args.mult)])
    emit({"event": "started"})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().split():
        if line[0] == "status":
            emit({"event": "status", "status": service.status(), "counters": service.counters})
        elif line[0] == "timers":
            tx, rx, mult = (int(x) for x in line[1:4])
            service.configure([BfdPeer(args.peer, rx, tx, mult)])
        elif line[0] == "remove":
            service.configure([])
        elif line[0] == "quit":
            break
    await service.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--local", required=True)
    parser.add_argument("--peer", required=True)
    parser.add_argument("--port", type=int, default=3784)
    parser.add_argument("--tx", type=int, default=300)
    parser.add_argument("--rx", type=int, default=300)
    parser.add_argument("--mult", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
