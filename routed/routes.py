"""Route table manager: desired BGP routes (prefix → next hops) → kernel, protocol ROUTE_PROTO_BGP only.

- IPv4 and IPv6 (families 2 and 10) on the same path: prefixes of both families are dumped, compared and
  written alike (tests/netns/test_bgp_routes.py checks IPv6 multipath replace and read-back with pyroute2).
- ECMP: several next hops become one multipath route; a change is one atomic `replace`.
- Idempotent: the kernel is read back and only differing prefixes are written.
- Never touches routes of another protocol; a prefix that already has a foreign route (same destination in
  the same table) is not installed and is reported as a conflict.
- `prune=False` (after a restart, until every peer's End-of-RIB): next hops already in the kernel are kept next
  to the learned ones, so forwarding never loses a path while peers re-advertise; only next hops known to be
  gone (`Gone`: withdrawn in this run, or the address of a peer whose BFD went Down) are removed, and a route left
  with none is deleted.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from routed.constants import ROUTE_PROTO_BGP

log = logging.getLogger(__name__)

MAIN_TABLE = 254
Desired = Mapping[str, frozenset[str]]


@dataclass
class ApplyResult:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.replaced or self.removed)


@dataclass(frozen=True)
class Gone:
    """Next hops known to be gone, removed from the kernel even when merging (`prune=False`)."""

    routes: Mapping[str, frozenset[str]] = field(default_factory=dict)  # prefix -> next hops retracted
    next_hops: frozenset[str] = frozenset()  # gone for every prefix (peers whose BFD went Down)

    def of(self, prefix: str) -> frozenset[str]:
        return self.routes.get(prefix, frozenset()) | self.next_hops


def _gateways(msg: Any) -> frozenset[str]:
    gw = msg.get_attr("RTA_GATEWAY")
    if gw:
        return frozenset({gw})
    hops: set[str] = set()
    for nh in msg.get_attr("RTA_MULTIPATH") or []:
        g = nh.get_attr("RTA_GATEWAY")
        if g:
            hops.add(g)
    return frozenset(hops)


def _prefix(msg: Any) -> str:
    family = msg["family"]
    dst = msg.get_attr("RTA_DST") or ("0.0.0.0" if family == 2 else "::")
    return str(ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False))


class RouteTable:
    def __init__(self, proto: int = ROUTE_PROTO_BGP, table: int = MAIN_TABLE, netns: str | None = None) -> None:
        self.netns = netns  # None: the namespace this process runs in (the agent's node)
        self.proto = proto
        self.table = table
        self._ipr: AsyncIPRoute | None = None
        self.last: ApplyResult = ApplyResult()

    async def _conn(self) -> AsyncIPRoute:
        if self._ipr is None:
            self._ipr = AsyncIPRoute(netns=self.netns) if self.netns else AsyncIPRoute()
            await self._ipr.setup_endpoint()
        return self._ipr

    async def close(self) -> None:
        if self._ipr is not None:
            try:
                res = self._ipr.close()
                if hasattr(res, "__await__"):
                    await res
            except Exception:
                pass
            self._ipr = None

    async def _dump(self) -> tuple[dict[str, frozenset[str]], set[str]]:
        """(our routes: prefix → gateways, prefixes with a foreign route in the same table)."""
        ipr = await self._conn()
        ours: dict[str, frozenset[str]] = {}
        foreign: set[str] = set()
        for family in (2, 10):
            async for msg in await ipr.route("dump", family=family):
                table = msg.get_attr("RTA_TABLE") or msg["table"]
                if table != self.table:
                    continue
                prefix = _prefix(msg)
                if msg["proto"] == self.proto:
                    ours[prefix] = _gateways(msg)
                else:
                    foreign.add(prefix)
        return ours, foreign

    async def kernel(self) -> dict[str, frozenset[str]]:
        ours, _ = await self._dump()
        return ours

    async def apply(self, desired: Desired, prune: bool = True, gone: Gone | None = None) -> ApplyResult:
        """Write `desired` (prefix -> next hops); `prune`: remove everything else of ours, else merge with the
        kernel's next hops except those in `gone`."""
        gone = gone or Gone()
        result = ApplyResult()
        try:
            ours, foreign = await self._dump()
        except (OSError, NetlinkError) as e:
            await self.close()
            result.errors["*"] = f"route dump failed: {e}"
            self.last = result
            return result
        ipr = await self._conn()
        for prefix, hops in sorted(desired.items()):
            if not hops:
                continue
            if prefix in foreign:
                result.conflicts.append(prefix)
                continue
            want = frozenset(hops) if prune else frozenset(hops) | (ours.get(prefix, frozenset()) - gone.of(prefix))
            have = ours.get(prefix)
            if have != want:
                await self._write(ipr, prefix, want, have, result)
        rest = sorted(set(ours) - {p for p, h in desired.items() if h and p not in foreign})
        for prefix in rest:
            if prune:
                await self._write(ipr, prefix, frozenset(), ours[prefix], result)
            elif prefix not in foreign:  # merging: only what is known to be gone goes
                keep = ours[prefix] - gone.of(prefix)
                if keep != ours[prefix]:
                    await self._write(ipr, prefix, keep, ours[prefix], result)
        if result.changed or result.errors or result.conflicts:
            log.info("routes: +%d ~%d -%d conflicts=%s errors=%s", len(result.added), len(result.replaced),
                     len(result.removed), result.conflicts, result.errors)
        self.last = result
        return result

    async def _write(self, ipr: AsyncIPRoute, prefix: str, want: frozenset[str], have: frozenset[str] | None,
                     result: ApplyResult) -> None:
        """One prefix to `want` (empty: deleted), as one atomic replace; recorded in `result`."""
        if not want:
            try:
                await ipr.route("del", dst=prefix, proto=self.proto, table=self.table)
            except NetlinkError as e:
                if e.code != 3:  # ESRCH: already gone
                    result.errors[prefix] = f"{e.code}: {e}"
                    return
            result.removed.append(prefix)
            return
        kwargs: dict[str, Any] = {"dst": prefix, "proto": self.proto, "table": self.table}
        ordered = sorted(want)
        if len(ordered) == 1:
            kwargs["gateway"] = ordered[0]
        else:
            kwargs["multipath"] = [{"gateway": g} for g in ordered]
        try:
            await ipr.route("replace", **kwargs)
        except NetlinkError as e:
            result.errors[prefix] = f"{e.code}: {e}"
            return
        (result.replaced if have is not None else result.added).append(prefix)

    async def flush(self) -> int:
        """Remove every route of our protocol (clean shutdown without graceful restart)."""
        res = await self.apply({}, prune=True)
        return len(res.removed)
