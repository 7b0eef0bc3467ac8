"""ExaBGP API process: relays ExaBGP's JSON (our stdin) to the agent's unix socket and the agent's commands
back to ExaBGP (our stdout). Stdlib only, started by ExaBGP as `python -m routed.bgp.bridge <socket>`.

It never stops reading stdin (a blocked API pipe hangs ExaBGP). It exits when either side closes; the agent
restarts ExaBGP (and with it this bridge) when needed.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

CONNECT_TIMEOUT = 10.0


def _connect(path: str) -> socket.socket:
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _agent_to_exabgp(sock: socket.socket) -> None:
    out = sys.stdout.buffer
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            out.write(data)
            out.flush()
    except OSError:
        pass
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m routed.bgp.bridge <agent-socket>\n")
        return 2
    sock = _connect(args[0])
    threading.Thread(target=_agent_to_exabgp, args=(sock,), daemon=True).start()
    inp = sys.stdin.buffer
    try:
        while True:
            line = inp.readline()
            if not line:
                break
            sock.sendall(line)
    except OSError:
        pass
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
