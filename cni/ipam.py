"""Host-local style IPAM over the node's pod CIDR(s), persisted under `<state_dir>/ipam/`.

Store: one JSON document `<state_dir>/ipam/allocations.json`, rewritten atomically (temp file + rename) while
holding an exclusive `fcntl.flock` on `<state_dir>/ipam/lock`. Every operation re-reads the document under the
lock, so concurrent callers are safe whether they are threads of the agent (each call opens its own lock file
description, and flock conflicts between descriptions) or separate processes.

Each allocation records its attachment's key (cni/names.py `attachment_key`) with its containerId and ifname.
Store version 1 used an ambiguous key (`<containerId>_<ifname>`); a version 1 document is migrated in place
(keys recomputed from containerId and ifname) the first time it is read, so an upgraded agent keeps every
allocation.

Allocation policy:
- one address per CIDR family (IPv4 and/or IPv6) per attachment (containerId + ifname);
- IPv4: the network and broadcast addresses are never handed out (except in /31 and /32, RFC 3021);
  the first usable address *is* handed out: pods reach the node through 169.254.1.1 (routed veth), so the pod
  CIDR needs no gateway address;
- IPv6: the subnet-router anycast address (the all-zero host part) is skipped;
- round robin: the search starts after the last address handed out in that CIDR, so a released address is not
  reused at once (stale conntrack entries and ARP caches age out first).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from cni.names import attachment_key
from routed.api_types import IpamAllocation, IpamPool, IpamShow
from routed.errors import Code, RoutedError

log = logging.getLogger(__name__)

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
STORE_VERSION = 2  # 2: unambiguous attachment keys (1: `<containerId>_<ifname>`)


class IpamError(RoutedError):
    """The allocation store cannot be read or written."""

    code = Code.IO_FAILURE


class IpamExhausted(IpamError):
    """Every address of a pod CIDR is taken."""

    code = Code.IPAM_EXHAUSTED


class AlreadyAllocated(IpamError):
    """The attachment (containerId, ifname) already holds an address."""

    code = Code.ALREADY_EXISTS


def _usable_range(net: IpNetwork) -> tuple[int, int]:
    first, last = int(net.network_address), int(net.broadcast_address)
    if net.version == 4 and net.prefixlen < 31:
        return first + 1, last - 1
    if net.version == 6 and net.prefixlen < 127:
        return first + 1, last
    return first, last


class Ipam:
    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, "ipam")
        self.path = os.path.join(self.dir, "allocations.json")
        self.lock_path = os.path.join(self.dir, "lock")
        self._thread_lock = threading.Lock()  # flock already serialises; this keeps one fd per process busy
        os.makedirs(self.dir, exist_ok=True)

    # -- store -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Exclusive access to the document; changes made to it are written back on a clean exit."""
        with self._thread_lock:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                doc = self._read()
                if self._migrate(doc):
                    self._write(doc)
                before = json.dumps(doc, sort_keys=True)
                yield doc
                if json.dumps(doc, sort_keys=True) != before:
                    self._write(doc)
            finally:
                os.close(fd)  # releases the flock

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            return {"version": STORE_VERSION, "allocations": {}, "last": {}}
        except ValueError as exc:
            raise IpamError(f"IPAM store {self.path} is corrupt: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("allocations"), dict):
            raise IpamError(f"IPAM store {self.path} is corrupt: no allocations map")
        doc.setdefault("last", {})
        return doc

    def _migrate(self, doc: dict[str, Any]) -> bool:
        """Bring an older document to STORE_VERSION; True if it changed."""
        version = doc.get("version", 1)
        if not isinstance(version, int) or version >= STORE_VERSION:
            return False
        for ip, owner in doc["allocations"].items():
            container_id, ifname = owner.get("containerId"), owner.get("ifname")
            if isinstance(container_id, str) and isinstance(ifname, str):
                owner["key"] = attachment_key(container_id, ifname)
            else:
                log.warning("IPAM store %s: allocation %s names no containerId/ifname; CNI GC will release it",
                            self.path, ip)
        doc["version"] = STORE_VERSION
        log.info("IPAM store %s migrated from version %d to %d (%d allocations kept)", self.path, version,
                 STORE_VERSION, len(doc["allocations"]))
        return True

    def _write(self, doc: dict[str, Any]) -> None:
        tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def check_usable(self) -> None:
        """Raises IpamError if the store cannot be read or written (readiness)."""
        with self._locked():
            pass
        if not os.access(self.dir, os.W_OK):
            raise IpamError(f"IPAM directory {self.dir} is not writable")

    # -- operations ------------------------------------------------------------------------------
    def allocate(self, cidrs: Sequence[str], container_id: str, ifname: str) -> list[str]:
        """One address per CIDR family (the first CIDR of each family); returns the plain IPs.

        Raises AlreadyAllocated if the attachment already holds addresses (nothing changes then),
        IpamExhausted naming the CIDR when a CIDR is full (nothing is kept).
        """
        nets = self._pick_networks(cidrs)
        key = attachment_key(container_id, ifname)
        with self._locked() as doc:
            allocations: dict[str, dict[str, str]] = doc["allocations"]
            held = [ip for ip, owner in allocations.items() if owner.get("key") == key]
            if held:
                raise AlreadyAllocated(
                    f"container {container_id} ifname {ifname} already holds {', '.join(sorted(held))}"
                )
            taken = {ipaddress.ip_address(ip) for ip in allocations}
            chosen: list[tuple[IpNetwork, IpAddress]] = []
            for net in nets:
                ip = self._next_free(net, taken, doc["last"].get(str(net)))
                if ip is None:
                    raise IpamExhausted(
                        f"no free address left in pod CIDR {net} ({len(self._held_in(net, taken))} allocated)"
                    )
                chosen.append((net, ip))
            for net, ip in chosen:
                allocations[str(ip)] = {
                    "key": key,
                    "containerId": container_id,
                    "ifname": ifname,
                    "cidr": str(net),
                }
                doc["last"][str(net)] = str(ip)
        out = [str(ip) for _, ip in chosen]
        log.info("allocated %s to %s/%s", out, container_id, ifname)
        return out

    @staticmethod
    def _held_in(net: IpNetwork, taken: Iterable[IpAddress]) -> list[IpAddress]:
        return [ip for ip in taken if ip.version == net.version and ip in net]

    @staticmethod
    def _pick_networks(cidrs: Sequence[str]) -> list[IpNetwork]:
        """The first CIDR of each family (one address per family)."""
        if not cidrs:
            raise IpamError("this node has no pod CIDR yet")
        picked: dict[int, IpNetwork] = {}
        for cidr in cidrs:
            try:
                net = ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise IpamError(f"invalid pod CIDR {cidr!r}: {exc}") from exc
            picked.setdefault(net.version, net)
        return [picked[v] for v in sorted(picked)]

    @staticmethod
    def _next_free(net: IpNetwork, taken: set[IpAddress], last: str | None) -> IpAddress | None:
        lo, hi = _usable_range(net)
        if hi < lo:
            return None
        start = lo
        if last:
            with contextlib.suppress(ValueError):
                last_ip = int(ipaddress.ip_address(last))
                if lo <= last_ip < hi:
                    start = last_ip + 1
        size = hi - lo + 1
        cls = ipaddress.IPv4Address if net.version == 4 else ipaddress.IPv6Address
        for i in range(size):
            candidate = cls(lo + (start - lo + i) % size)
            if candidate not in taken:
                return candidate
        return None

    def release(self, container_id: str, ifname: str) -> list[str]:
        """Release every address of the attachment; a missing reservation is not an error."""
        key = attachment_key(container_id, ifname)
        with self._locked() as doc:
            allocations = doc["allocations"]
            released = [ip for ip, owner in allocations.items() if owner.get("key") == key]
            for ip in released:
                del allocations[ip]
        if released:
            log.info("released %s of %s/%s", released, container_id, ifname)
        return released

    def release_ips(self, container_id: str, ifname: str, ips: Iterable[str]) -> None:
        """Release exactly these addresses if they still belong to the attachment (rollback of an ADD)."""
        key = attachment_key(container_id, ifname)
        with self._locked() as doc:
            for ip in ips:
                owner = doc["allocations"].get(ip)
                if owner and owner.get("key") == key:
                    del doc["allocations"][ip]

    def get(self, container_id: str, ifname: str) -> list[str]:
        key = attachment_key(container_id, ifname)
        with self._locked() as doc:
            return sorted(ip for ip, owner in doc["allocations"].items() if owner.get("key") == key)

    def gc(self, valid_attachments: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
        """Release every reservation whose (containerId, ifname) is not in `valid_attachments`."""
        valid = {attachment_key(c, i) for c, i in valid_attachments}
        with self._locked() as doc:
            allocations = doc["allocations"]
            stale = [ip for ip, owner in allocations.items() if owner.get("key") not in valid]
            removed = [
                {"ip": ip, "containerId": allocations[ip].get("containerId", ""), "ifname": allocations[ip].get("ifname", "")}
                for ip in stale
            ]
            for ip in stale:
                del allocations[ip]
        if removed:
            log.info("GC released %s", removed)
        return removed

    def show(self, cidrs: Sequence[str] = ()) -> IpamShow:
        with self._locked() as doc:
            allocations = [
                IpamAllocation(ip=ip, containerId=owner.get("containerId", ""), ifname=owner.get("ifname", ""))
                for ip, owner in doc["allocations"].items()
            ]
        allocations.sort(key=lambda a: (ipaddress.ip_address(a["ip"]).version, ipaddress.ip_address(a["ip"])))
        taken = {ipaddress.ip_address(a["ip"]) for a in allocations}
        pools = []
        for cidr in cidrs:
            net = ipaddress.ip_network(cidr, strict=False)
            lo, hi = _usable_range(net)
            pools.append(IpamPool(cidr=str(net), family=net.version, size=max(0, hi - lo + 1),
                                  allocated=len(self._held_in(net, taken))))
        return IpamShow(cidrs=list(cidrs), pools=pools, allocations=allocations)
