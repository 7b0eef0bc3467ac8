"""The CNI component: the CNI service behind the local API, its metrics, and the repair of its kernel state.

It answers CNI calls only once `open()` is called (the agent does that after policy's first sync, so every new
endpoint is policed before its ADD returns); until then ADD/DEL/CHECK get "try again later" and STATUS "not
available". The repair reconciler (restart policy: restart) runs on pod CIDR changes and on the periodic
resync: it restores the node's blackholes and each endpoint's host routes and sysctls when someone removed them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cni import wiring
from cni.exec import CniAnswer, answer, decode_params, run_invocation
from cni.request import CniRequest
from cni.server import CniService, EndpointHooks
from cni.store import endpoint_to_dict
from routed import metrics
from routed.api_types import CniStatus, EndpointRecord, IpamShow
from routed.backoff import Backoff
from routed.cache import CacheChange, ClusterCache
from routed.component import ApiHandler
from routed.errors import NotAvailable, TryAgainLater
from routed.reconcile import Reconciler
from routed.supervisor import Supervisor

log = logging.getLogger(__name__)

NOT_SERVING = "agent is starting: waiting for the datastore's first sync and the first policy apply"


class CniComponent:
    name = "cni"

    def __init__(self, node_name: str, state_dir: str, mtu: int | None, cache: ClusterCache,
                 supervisor: Supervisor, hooks: EndpointHooks | None = None) -> None:
        self.node_name = node_name
        self.cache = cache
        self.supervisor = supervisor
        self.service = CniService(node_name, state_dir, self.pod_cidrs, mtu, hooks=hooks)
        self.serving = False
        self.repairs = 0
        self.repair = Reconciler("cni repair", self._repair, Backoff(base=0.5, cap=30.0))
        self._pod_cidrs: tuple[str, ...] = ()

    def pod_cidrs(self) -> list[str]:
        node = self.cache.node(self.node_name)
        return list(node.pod_cidrs) if node else []

    async def start(self) -> None:
        self._pod_cidrs = tuple(self.pod_cidrs())
        if not self._pod_cidrs:
            log.warning("node %s has no pod CIDR yet: CNI ADD will fail until it has one", self.node_name)
        await self.service.start()
        metrics.ENDPOINTS.set(len(self.service.endpoints()))
        self.cache.subscribe(self._on_cache_change)
        self.supervisor.spawn("cni-repair", self.repair.run, required=False)

    def open(self) -> None:
        self.serving = True

    async def stop(self) -> None:
        self.serving = False
        await self.supervisor.stop_task("cni-repair")
        await self.service.stop()

    async def _on_cache_change(self, change: CacheChange) -> None:
        if "Node" in change.kinds and tuple(self.pod_cidrs()) != self._pod_cidrs:
            self._pod_cidrs = tuple(self.pod_cidrs())
            self.repair.mark_dirty()

    async def _repair(self) -> None:
        endpoints = [(ep.host_ifname, list(ep.ips)) for ep in self.service.endpoints()]
        await self.service.run_blocking(wiring.ensure_blackholes, self.pod_cidrs())
        restored = await self.service.run_blocking(wiring.repair_host_side, endpoints)
        if restored:
            self.repairs += len(restored)
            log.warning("resync restored what someone removed: %s", "; ".join(restored))

    def resync(self) -> None:
        self.repair.mark_dirty()

    # -- views --------------------------------------------------------------------------------------
    def endpoints(self) -> list[Any]:
        return self.service.endpoints()

    def ready(self) -> tuple[bool, str]:
        if not self.serving:
            return False, "CNI service not serving yet"
        return self.service.ready()

    def status(self) -> CniStatus:
        ready, reason = self.ready()
        return CniStatus(ready=ready, reason=reason, serving=self.serving, endpoints=len(self.service.endpoints()),
                         podCIDRs=self.pod_cidrs(), mtu=self.service.effective_mtu({}), repairs=self.repairs)

    # -- local API ----------------------------------------------------------------------------------
    def api_methods(self) -> dict[str, ApiHandler]:
        return {"cni": self._api_cni, "ipam.show": self._api_ipam, "endpoints.list": self._api_endpoints}

    async def _api_cni(self, params: dict[str, Any]) -> CniAnswer:
        """One invocation forwarded by the routed-cni shim (cni/exec.py has the protocol)."""
        environ, stdin = decode_params(params)
        command = environ.get("CNI_COMMAND", "").upper()
        started = time.perf_counter()
        code, stdout = await run_invocation(self._serve, environ, stdin)
        metrics.CNI_REQUESTS.labels(command, "ok" if code == 0 else "error").inc()
        metrics.CNI_SECONDS.labels(command).observe(time.perf_counter() - started)
        metrics.ENDPOINTS.set(len(self.service.endpoints()))
        return answer(code, stdout)

    async def _serve(self, req: CniRequest) -> Any:
        if not self.serving and req.command != "VERSION":
            if req.command == "STATUS":
                raise NotAvailable(NOT_SERVING)
            raise TryAgainLater(NOT_SERVING, "try again later")
        return await self.service.handle(req)

    async def _api_ipam(self, params: dict[str, Any]) -> IpamShow:
        return self.service.ipam_show()

    async def _api_endpoints(self, params: dict[str, Any]) -> list[EndpointRecord]:
        return [endpoint_to_dict(e) for e in self.service.endpoints()]
