"""Tiny TCP/UDP server run inside a test pod namespace: TCP answers "ok" and closes, UDP echoes "ok".
Both families: TCP on 0.0.0.0 and :: (IPv6 only), UDP bound per address of either family."""

from __future__ import annotations

import socket
import sys
import threading


def family_of(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def tcp(port: int, addr: str) -> None:
    s = socket.socket(family_of(addr), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if ":" in addr:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port))
    s.listen(128)
    while True:
        conn, _ = s.accept()
        try:
            conn.sendall(b"ok")
        except OSError:
            pass
        conn.close()


def udp(port: int, addr: str) -> None:
    # bound per address: a reply must leave from the address the request was sent to (conntrack)
    s = socket.socket(family_of(addr), socket.SOCK_DGRAM)
    s.bind((addr, port))
    while True:
        _, peer = s.recvfrom(2048)
        s.sendto(b"ok", peer)


def main() -> None:
    tcp_ports = [int(p) for p in sys.argv[1].split(",") if p]
    udp_ports = [int(p) for p in sys.argv[2].split(",") if p]
    threads = [threading.Thread(target=tcp, args=(p, a), daemon=True) for p in tcp_ports for a in ("0.0.0.0", "::")]
    addrs = sys.argv[3].split(",") if len(sys.argv) > 3 else ["0.0.0.0"]
    threads += [threading.Thread(target=udp, args=(p, a), daemon=True) for p in udp_ports for a in addrs]
    for t in threads:
        t.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
