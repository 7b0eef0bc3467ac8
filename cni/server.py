"""Agent-side CNI service: IPAM, wiring, endpoint store and hooks, for requests cni/exec.py has validated.

Runs inside the node's network namespace: host-side wiring happens in the current netns, pod-side wiring in the
CNI_NETNS path. Blocking netlink and file work runs in a dedicated thread pool; calls for the same attachment are
serialised, different attachments run in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from pyroute2.netlink.exceptions import NetlinkError

from cni import wiring
from cni.ipam import Ipam, IpamError
from cni.names import attachment_key, host_veth_name
from cni.netnsfd import NetnsGone
from cni.request import SUPPORTED_VERSIONS, VALID_ATTACHMENTS_KEY, CniRequest
from cni.result import build_add_result, version_result
from cni.store import EndpointStore
from routed.api_types import IpamShow
from routed.errors import Code, NotAvailable, RoutedError, TryAgainLater
from routed.model import Endpoint

log = logging.getLogger(__name__)
T = TypeVar("T")
WORKERS = 8


class EndpointHooks(Protocol):
    async def endpoint_added(self, endpoint: Endpoint) -> None: ...  # raising fails the ADD, which is undone

    async def endpoint_removed(self, endpoint: Endpoint) -> None: ...


class CniService:
    def __init__(
        self,
        node_name: str,
        state_dir: str,
        pod_cidrs: Callable[[], list[str]],
        mtu: int | None = None,
        hooks: EndpointHooks | None = None,
    ) -> None:
        self.node_name = node_name
        self.state_dir = state_dir
        self.pod_cidrs = pod_cidrs
        self.mtu = mtu
        self.hooks = hooks
        self.ipam = Ipam(state_dir)
        self.store = EndpointStore(state_dir)
        self._pool: ThreadPoolExecutor | None = None
        self._uplink_mtu = wiring.DEFAULT_MTU
        self._key_locks: dict[str, list[Any]] = {}  # key -> [asyncio.Lock, users]
        self._in_flight: dict[str, tuple[str, str]] = {}  # attachment key -> (containerId, ifname) with an ADD under way (GC leaves them alone)
        self._pending_deletes: dict[str, asyncio.Task[None]] = {}  # host veth -> its deferred deletion
        self._started = False

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="cni")
        await self.run_blocking(self.store.load)
        self._uplink_mtu = await self.run_blocking(wiring.default_route_mtu)
        await self.run_blocking(self._reconcile)
        self._started = True
        log.info("CNI service started: %d endpoints, pod MTU %d", len(self.store.all()), self.effective_mtu({}))

    async def stop(self) -> None:
        self._started = False
        if self._pending_deletes:
            await asyncio.gather(*self._pending_deletes.values(), return_exceptions=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _reconcile(self) -> None:
        """Blackholes for the current CIDRs; sweep rtd* veths, proto-201 routes and IPAM entries nobody owns."""
        cidrs = self.pod_cidrs()
        if cidrs:
            wiring.ensure_blackholes(cidrs)
        endpoints = self.store.all()
        wanted_links = {ep.host_ifname for ep in endpoints}
        veths = wiring.host_veths()
        for name in sorted(set(veths) - wanted_links):
            log.warning("removing orphan host veth %s (no persisted endpoint)", name)
            wiring.delete_link(name)
        for ep in endpoints:
            if ep.host_ifname not in veths:
                log.warning("endpoint %s/%s: host veth %s is missing", ep.container_id, ep.ifname, ep.host_ifname)
        wanted_routes = {
            (f"{ip}/{32 if ':' not in ip else 128}", veths.get(ep.host_ifname)) for ep in endpoints for ip in ep.ips
        }
        for dst, oif in wiring.local_pod_routes():
            if (dst, oif) not in wanted_routes:
                log.warning("removing orphan pod route %s (oif %d)", dst, oif)
                wiring.delete_route(dst)
        released = self.ipam.gc((ep.container_id, ep.ifname) for ep in endpoints)
        if released:
            log.warning("released IPAM reservations without an endpoint: %s", released)

    # -- queries -------------------------------------------------------------------------------------
    def endpoints(self) -> list[Endpoint]:
        return self.store.all()

    def ipam_show(self) -> IpamShow:
        return self.ipam.show(self.pod_cidrs())

    def ready(self) -> tuple[bool, str]:
        if not self._started:
            return False, "CNI service not started"
        if not self._wired_cidrs():
            return False, f"node {self.node_name} has no pod CIDR yet"
        for version in sorted({ipaddress.ip_network(c, strict=False).version for c in self._wired_cidrs()}):
            if not wiring.ip_forwarding(version):
                setting = "net.ipv4.ip_forward" if version == 4 else "net.ipv6.conf.all.forwarding"
                return False, (f"IPv{version} forwarding is off on this node ({setting}=0): "
                               "pods could not reach off the node")
        try:
            self.ipam.check_usable()
        except (IpamError, OSError) as exc:
            return False, f"IPAM unusable: {exc}"
        return True, "ready"

    def effective_mtu(self, config: dict[str, Any]) -> int:
        mtu = config.get("mtu")
        return int(mtu) if isinstance(mtu, int) and not isinstance(mtu, bool) else (self.mtu or self._uplink_mtu)

    # -- API -----------------------------------------------------------------------------------------
    async def handle(self, req: CniRequest) -> Any:
        """Serve one validated CNI request (cni/exec.py parsed it); the result dict, or None for no output."""
        if req.command == "VERSION":
            return version_result(req.cni_version, SUPPORTED_VERSIONS)
        if req.command == "STATUS":
            ok, reason = self.ready()
            if not ok:
                raise NotAvailable(reason)
            return None
        if not self._started:
            raise TryAgainLater("the CNI service is starting; try again later")
        if req.command == "GC":
            return await self._gc(req)
        key = attachment_key(req.container_id, req.ifname)
        async with self._attachment_lock(key):
            if req.command == "ADD":
                return await self._add(req, key)
            if req.command == "DEL":
                return await self._del(req)
            return await self._check(req)

    @contextlib.asynccontextmanager
    async def _attachment_lock(self, key: str) -> AsyncIterator[None]:
        """Serialise calls for one attachment; the lock is dropped once nobody holds or waits for it."""
        entry = self._key_locks.get(key)
        if entry is None:
            entry = self._key_locks[key] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0 and self._key_locks.get(key) is entry:
                del self._key_locks[key]

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    async def _add(self, req: CniRequest, key: str) -> dict[str, Any]:
        ctx = f"{req.container_id}/{req.ifname} pod {req.pod_namespace}/{req.pod_name}"
        if self.store.get(req.container_id, req.ifname) is not None:
            raise RoutedError(f"container {req.container_id} already has interface {req.ifname} (DEL it first)",
                              code=Code.ALREADY_EXISTS)
        cidrs = self._wired_cidrs()
        if not cidrs:
            raise TryAgainLater(f"node {self.node_name} has no pod CIDR yet; try again later")
        self._in_flight[key] = (req.container_id, req.ifname)
        ips: list[str] = []
        host_name = host_veth_name(req.container_id, req.ifname)
        wired = persisted = hooked = False
        endpoint: Endpoint | None = None
        try:
            ips = await self.run_blocking(self.ipam.allocate, cidrs, req.container_id, req.ifname)  # IpamError has its code
            pending = self._pending_deletes.get(host_name)
            if pending is not None:  # the same attachment was deleted a moment ago: let the old veth go first
                await asyncio.shield(pending)
            mtu = self.effective_mtu(req.config)
            try:
                result = await self.run_blocking(wiring.add_endpoint, host_name, req.netns, req.ifname, ips, mtu)
            except NetnsGone:
                raise
            except (wiring.WiringError, NetlinkError, OSError) as exc:
                raise wiring.WiringError(f"wiring {ctx} failed: {exc}", type(exc).__name__) from None
            wired = True
            endpoint = Endpoint(
                container_id=req.container_id,
                ifname=req.ifname,
                netns=req.netns,
                host_ifname=host_name,
                ips=tuple(ips),
                pod_namespace=req.pod_namespace,
                pod_name=req.pod_name,
            )
            await self.run_blocking(self.store.put, endpoint)
            persisted = True
            if self.hooks is not None:
                hooked = True
                try:
                    await self.hooks.endpoint_added(endpoint)
                except Exception as exc:
                    log.exception("endpoint hook refused %s", ctx)
                    raise RoutedError(f"endpoint {ctx} not accepted: {exc}", code=Code.HOOK_FAILED) from None
            log.info("ADD %s: %s via %s", ctx, ips, host_name)
            prev = req.config.get("prevResult")
            return build_add_result(
                req.cni_version,
                result.host,
                result.pod,
                [f"{ip}/{32 if ':' not in ip else 128}" for ip in ips],
                dns=req.config.get("dns") or None,
                prev_result=prev if isinstance(prev, dict) else None,
            )
        except BaseException:
            log.warning("ADD %s failed; undoing (wired=%s persisted=%s ips=%s)", ctx, wired, persisted, ips)
            undo = self._undo_add(req, host_name, ips, wired, persisted, endpoint if hooked else None)
            await asyncio.shield(undo)
            raise
        finally:
            self._in_flight.pop(key, None)

    def _wired_cidrs(self) -> list[str]:
        """The node's pod CIDRs (spec.podCIDRs: one per family, IPv4 and/or IPv6)."""
        return list(self.pod_cidrs())

    async def _undo_add(
        self,
        req: CniRequest,
        host_name: str,
        ips: list[str],
        wired: bool,
        persisted: bool,
        hooked: Endpoint | None,
    ) -> None:
        try:
            if hooked is not None and self.hooks is not None:
                with contextlib.suppress(Exception):
                    await self.hooks.endpoint_removed(hooked)
            if persisted:
                await self.run_blocking(self.store.remove, req.container_id, req.ifname)
            if wired:
                await self.run_blocking(wiring.del_endpoint, host_name, ips)
            if ips:
                await self.run_blocking(self.ipam.release_ips, req.container_id, req.ifname, ips)
        except Exception:
            log.exception("undoing the failed ADD of %s/%s left something behind", req.container_id, req.ifname)

    async def _del(self, req: CniRequest) -> None:
        endpoint = self.store.get(req.container_id, req.ifname)
        if endpoint is not None:
            await self._remove_endpoint(endpoint)
            return
        # Not persisted (never added, already deleted, or an ADD that crashed): clean what may be left.
        host_name = host_veth_name(req.container_id, req.ifname)
        ips = await self.run_blocking(self.ipam.get, req.container_id, req.ifname)
        await self.run_blocking(wiring.del_endpoint, host_name, ips)
        await self.run_blocking(self.ipam.release, req.container_id, req.ifname)
        log.info("DEL %s/%s: nothing persisted, cleaned %s", req.container_id, req.ifname, ips or "nothing")

    async def _remove_endpoint(self, endpoint: Endpoint) -> None:
        if self.hooks is not None:
            try:
                await self.hooks.endpoint_removed(endpoint)
            except Exception:
                log.exception("endpoint_removed hook failed for %s/%s", endpoint.container_id, endpoint.ifname)
        try:
            present = await self.run_blocking(wiring.detach_endpoint, endpoint.host_ifname, endpoint.ips)
        except (NetlinkError, OSError) as exc:
            raise wiring.WiringError(f"removing {endpoint.host_ifname} failed: {exc}") from None
        await self.run_blocking(self.ipam.release, endpoint.container_id, endpoint.ifname)
        await self.run_blocking(self.store.remove, endpoint.container_id, endpoint.ifname)
        if present:
            self._schedule_delete(endpoint.host_ifname)
        log.info("DEL %s/%s: removed %s %s", endpoint.container_id, endpoint.ifname, endpoint.host_ifname, endpoint.ips)

    def _schedule_delete(self, host_name: str) -> None:
        """Delete the (already detached, down) veth after the DEL has been answered."""

        async def finish() -> None:
            try:
                await self.run_blocking(wiring.delete_link, host_name)
            except Exception:
                log.exception("deleting host veth %s failed (the next restart or GC sweeps it)", host_name)
            finally:
                if self._pending_deletes.get(host_name) is task:
                    del self._pending_deletes[host_name]

        task = asyncio.get_running_loop().create_task(finish())
        self._pending_deletes[host_name] = task

    async def _check(self, req: CniRequest) -> None:
        endpoint = self.store.get(req.container_id, req.ifname)
        if endpoint is None:
            raise wiring.CheckError(f"no endpoint for container {req.container_id} ifname {req.ifname}")
        prev = req.config.get("prevResult") or {}
        prev_ips = {str(ip.get("address", "")).split("/")[0] for ip in prev.get("ips") or [] if isinstance(ip, dict)}
        missing = [ip for ip in endpoint.ips if ip not in prev_ips]
        if missing:
            raise wiring.CheckError(f"prevResult does not list {', '.join(missing)}")
        names = {i.get("name") for i in prev.get("interfaces") or [] if isinstance(i, dict)}
        if req.ifname not in names:
            raise wiring.CheckError(f"prevResult does not list interface {req.ifname}")
        await self.run_blocking(wiring.check_endpoint, endpoint.host_ifname, req.netns, req.ifname, list(endpoint.ips))

    async def _gc(self, req: CniRequest) -> None:
        if VALID_ATTACHMENTS_KEY not in req.config:
            log.info("GC without %s: nothing to do", VALID_ATTACHMENTS_KEY)
            return None
        valid = {
            attachment_key(a["containerID"], a["ifname"]) for a in req.config[VALID_ATTACHMENTS_KEY]
        } | set(self._in_flight)
        for endpoint in self.store.all():
            key = attachment_key(endpoint.container_id, endpoint.ifname)
            if key in valid:
                continue
            async with self._attachment_lock(key):
                if self.store.get(endpoint.container_id, endpoint.ifname) is not None:
                    log.info("GC removes %s/%s", endpoint.container_id, endpoint.ifname)
                    await self._remove_endpoint(endpoint)
        keep = [(ep.container_id, ep.ifname) for ep in self.store.all()] + list(self._in_flight.values())
        await self.run_blocking(self.ipam.gc, keep)
        wanted_links = {ep.host_ifname for ep in self.store.all()} | {
            host_veth_name(c, i) for c, i in self._in_flight.values()
        }
        for name in set(await self.run_blocking(wiring.host_veths)) - wanted_links:
            log.info("GC removes orphan host veth %s", name)
            with contextlib.suppress(NetlinkError, OSError):
                await self.run_blocking(wiring.delete_link, name)
        return None
