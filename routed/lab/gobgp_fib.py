"""FIB for a GoBGP ToR in the lab: GoBGP has no kernel code of its own, so this loop copies its RIB into the
ToR namespace's kernel table (protocol 186, "bgp", like FRR's zebra), ECMP included.

Started by GobgpRouter inside the ToR namespace: `python -m routed.lab.gobgp_fib --port 50051`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from typing import Any

from routed.routes import RouteTable

log = logging.getLogger("routed.lab.gobgp_fib")
RTPROT_BGP = 186
NEXTHOP_ATTR_TYPES = (3, 14)  # NEXT_HOP, MP_REACH_NLRI


def desired_from_rib(rib: dict[str, Any]) -> dict[str, frozenset[str]]:
    """Prefix -> next hops of the paths GoBGP holds (several paths = ECMP, as multipath is on)."""
    desired: dict[str, frozenset[str]] = {}
    for prefix, paths in (rib or {}).items():
        hops = {
            attr["nexthop"]
            for path in paths
            if not path.get("withdrawal") and not path.get("stale")
            for attr in path.get("attrs") or []
            if attr.get("type") in NEXTHOP_ATTR_TYPES and attr.get("nexthop")
        }
        if hops:
            desired[prefix] = frozenset(hops)
    return desired


async def read_rib(port: int) -> dict[str, Any]:
    """GoBGP's global RIB of both families, prefix -> paths."""
    rib: dict[str, Any] = {}
    for family in ("ipv4", "ipv6"):
        proc = await asyncio.create_subprocess_exec(
            "gobgp", "-u", "127.0.0.1", "-p", str(port), "global", "rib", "-a", family, "-j",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError("gobgp did not answer")
        rib |= json.loads(out or b"{}") or {}
    return rib


async def run(port: int, interval: float) -> None:
    table = RouteTable(proto=RTPROT_BGP)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    last: dict[str, frozenset[str]] | None = None
    while not stop.is_set():
        try:
            desired = desired_from_rib(await read_rib(port))
            if desired != last:
                result = await table.apply(desired)
                log.info("FIB: +%s ~%s -%s", result.added, result.replaced, result.removed)
                last = desired
        except (RuntimeError, ValueError, OSError) as exc:
            log.warning("RIB read failed: %s", exc)
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass
    await table.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--interval", type=float, default=0.2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    asyncio.run(run(args.port, args.interval))


if __name__ == "__main__":
    main()
