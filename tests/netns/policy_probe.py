"""Probe many (dst, port, proto[, src]) targets in parallel from inside a pod namespace; prints JSON bools.
Either family: the destination's address decides."""

from __future__ import annotations

import json
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

IP_FREEBIND = 15
IPV6_FREEBIND = 78


def _bind(s: socket.socket, src: str) -> None:
    """A source address the pod may not own (the anti-spoofing tests)."""
    if ":" in src:
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    else:
        s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    s.bind((src, 0))


def probe(target: list) -> bool:
    dst, port, proto = target[0], int(target[1]), target[2]
    src = target[3] if len(target) > 3 else None
    timeout = float(target[4]) if len(target) > 4 else 0.5
    kind = socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, kind)
    s.settimeout(timeout)
    try:
        if src:
            _bind(s, src)
        if proto == "TCP":
            s.connect((dst, port))
            return s.recv(16) == b"ok"
        s.sendto(b"hi", (dst, port))
        data, _ = s.recvfrom(16)
        return data == b"ok"
    except OSError:
        return False
    finally:
        s.close()


def main() -> None:
    targets = json.loads(sys.argv[1])
    with ThreadPoolExecutor(max_workers=max(1, min(64, len(targets)))) as pool:
        print(json.dumps(list(pool.map(probe, targets))))


if __name__ == "__main__":
    main()
