"""The node agent: wires the components (datastore → cache → CNI, policy, BGP, status publisher), the local API
and health, and runs them under one supervisor. It holds no logic of its own beyond the order of things:

1. the local API and /healthz /readyz answer at once (CNI calls get "try again later" until step 4);
2. the datastore starts; nothing touches the kernel before its first complete listing;
3. the CNI service reconciles the kernel, policy applies once;
4. CNI opens (every new endpoint is policed before its ADD returns), BGP and the status publisher start;
5. every `resync_interval` seconds all components re-check the kernel (drift repair).

The agent exits non-zero when a fatal task dies (routed/supervisor.py); a clean SIGTERM leaves pods wired and
policed. Restart policies per task are listed in HACKING.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

from cni.component import CniComponent
from policy.component import PolicyComponent, disabled_report
from routed import metrics
from routed.api import ApiServer
from routed.api_types import AgentStatus
from routed.bgp.component import BgpComponent, disabled_status
from routed.cache import ClusterCache
from routed.component import Component
from routed.config import AgentConfig
from routed.datastore.component import DatastoreComponent, make_datastore
from routed.health import HealthServer
from routed.logsetup import setup_logging
from routed.status_publisher import StatusPublisher
from routed.supervisor import Liveness, Supervisor

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.node_name = config.node_name
        self.started_at = time.time()
        self.stopping = asyncio.Event()
        self.supervisor = Supervisor()
        self.cache = ClusterCache()
        backend = make_datastore(config)
        self.datastore = DatastoreComponent(backend, self.cache, self.supervisor)
        self.cni = CniComponent(self.node_name, config.state_dir, config.mtu, self.cache, self.supervisor)
        self.policy: PolicyComponent | None = None
        if config.policy.enabled:
            self.policy = PolicyComponent(config.policy, self.node_name, self.cache, self.cni.endpoints,
                                          backend.report_event, backend.refresh_soon, self.supervisor)
            self.cni.service.hooks = self.policy
        self.bgp: BgpComponent | None = None
        if config.bgp.enabled:
            self.bgp = BgpComponent(self.node_name, config.bgp, config.state_dir,
                                    os.path.join(config.state_dir, "bgp"), self.cache, self.supervisor)
        self.publisher = StatusPublisher(self.node_name, backend, self.node_status, self.supervisor)
        self.api = ApiServer(config.socket_path)
        self.health = HealthServer(config.http_listen, self.liveness, self.readiness,
                                   metrics.REGISTRY) if config.http_listen else None

    def components(self) -> list[Component]:
        parts: list[Any] = [self.datastore, self.cni, self.policy, self.bgp, self.publisher]
        return [c for c in parts if c is not None]

    # -- health ---------------------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, list[str]]:
        reasons = [f"{c.name}: {why}" for c in self.components() for ok, why in [c.ready()] if not ok]
        reasons += self.supervisor.readiness()
        metrics.READY.set(0 if reasons else 1)
        return not reasons, reasons

    def liveness(self) -> tuple[bool, list[str]]:
        return self.supervisor.liveness()

    # -- running --------------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        os.makedirs(self.config.state_dir, exist_ok=True)
        self.api.register("status", self._api_status)
        for component in self.components():
            for method, handler in component.api_methods().items():
                self.api.register(method, handler)
        for cls, part in ((PolicyComponent, self.policy), (BgpComponent, self.bgp)):
            if part is None:
                self.api.register_unavailable(cls.METHODS, f"{cls.name} is disabled on this agent")
        await self.api.start()
        self.supervisor.spawn("api", self.api.serve, on_failure="fatal")
        if self.health is not None:
            await self.health.start()
        try:
            await self.datastore.start()
            if await self._stopped_before(self.datastore.synced.wait()):
                return self._exit_code()
            log.info("datastore synced: %s", self.cache.counts())
            await self.cni.start()
            if self.policy is not None:
                await self.policy.start()
            self.cni.open()
            if self.bgp is not None:
                await self.bgp.start()
            await self.publisher.start()
            self.supervisor.spawn("resync", self._resync_loop, required=False)
            log.info("agent for node %s running", self.node_name)
            await self._stopped_before(asyncio.Event().wait())
        finally:
            await self._shutdown()
        return self._exit_code()

    async def _stopped_before(self, awaitable: Any) -> bool:
        """Wait for `awaitable`; True if a stop (SIGTERM or a fatal task) came first."""
        work = asyncio.ensure_future(awaitable)
        stops = [asyncio.ensure_future(self.stopping.wait()), asyncio.ensure_future(self.supervisor.fatal.wait())]
        await asyncio.wait({work, *stops}, return_when=asyncio.FIRST_COMPLETED)
        for fut in (work, *stops):
            fut.cancel()
        return self.stopping.is_set() or self.supervisor.fatal.is_set()

    def _exit_code(self) -> int:
        if self.supervisor.fatal.is_set():
            log.error("agent exits non-zero: %s", self.supervisor.fatal_reason)
            return 1
        return 0

    async def _resync_loop(self, liveness: Liveness) -> None:
        while True:
            await asyncio.sleep(self.config.resync_interval)
            log.debug("periodic resync")
            for component in self.components():
                component.resync()

    async def _shutdown(self) -> None:
        log.info("agent shutting down")
        await self.api.stop()
        for component in reversed(self.components()):
            try:
                await component.stop()
            except Exception:
                log.exception("stopping %s failed", component.name)
        await self.supervisor.stop()
        if self.health is not None:
            await self.health.stop()
        log.info("agent stopped")

    # -- what the agent reports -----------------------------------------------------------------------
    def node_status(self) -> dict[str, Any]:
        """RoutedNodeStatus.status: readiness, endpoints, invalid policies, BGP sessions and advertisements."""
        ready, reasons = self.readiness()
        policy = self.policy.status() if self.policy is not None else disabled_report(self.node_name)
        status: dict[str, Any] = {"ready": ready, "reasons": reasons, "podCIDRs": self.cni.pod_cidrs(),
                                  "endpoints": len(self.cni.endpoints()),
                                  "invalidPolicies": len(policy["invalidPolicies"])}
        if self.bgp is not None:
            status |= self.bgp.node_status()
        return status

    async def _api_status(self, params: dict[str, Any]) -> AgentStatus:
        ready, reasons = self.readiness()
        live, live_reasons = self.liveness()
        return AgentStatus(
            node=self.node_name, ready=ready, reasons=reasons, live=live, liveReasons=live_reasons,
            uptimeSeconds=round(time.time() - self.started_at, 1), podCIDRs=self.cni.pod_cidrs(),
            endpoints=len(self.cni.endpoints()), datastore=self.datastore.status(), cni=self.cni.status(),
            policy=self.policy.status() if self.policy is not None else disabled_report(self.node_name),
            bgp=self.bgp.status() if self.bgp is not None else disabled_status(self.node_name),
            tasks=self.supervisor.status(),
        )


def run_agent(config: AgentConfig) -> int:
    setup_logging(config)
    return asyncio.run(Agent(config).run())
