"""The BGP component: the BgpManager fed from the cluster cache, its views and its part of the node status.

Tasks: `bgp` (the reconciler: Node, BGPPeer, BGPConfiguration and Secret changes and the periodic resync mark
it dirty; a failed update is retried with backoff), plus the manager's `exabgp` (the ExaBGP child) and
`bgp-routes` (learned routes → kernel). All three restart on failure and are required.

Everything this component publishes (readiness reasons, status, the node status) passes the speaker's Redactor
once more (routed/bgp/redact.py): no configured password, in any spelling, leaves it.
"""

from __future__ import annotations

import logging
from typing import Any

from routed import metrics
from routed.api_types import BgpRoute, BgpStatus
from routed.backoff import Backoff
from routed.bgp.manager import BgpInputs, BgpManager
from routed.bgp.metrics import BgpCollector
from routed.cache import CacheChange, ClusterCache
from routed.component import ApiHandler
from routed.config import BgpOptions
from routed.reconcile import Reconciler
from routed.supervisor import Supervisor

log = logging.getLogger(__name__)

BGP_KINDS = frozenset({"Node", "BGPPeer", "BGPConfiguration", "Secret", "Service", "EndpointSlice"})


def disabled_status(node_name: str) -> BgpStatus:
    return BgpStatus(enabled=False, node=node_name, ready=True, reason="disabled", asNumber=None, routerID=None,
                     podCIDRs=[], communities=[], exabgpPid=None, exabgpRestarts=0, exabgpReloads=0, synced=True,
                     errors=[], updateError="", peers=[], bfd=[], serviceRoutes=0, routesInstalled=0, routeConflicts=[],
                     routeErrors={})


class BgpComponent:
    name = "bgp"
    METHODS = ("bgp.status", "bgp.advertised", "bgp.received")

    def __init__(self, node_name: str, options: BgpOptions, state_dir: str, run_dir: str, cache: ClusterCache,
                 supervisor: Supervisor) -> None:
        self.node_name = node_name
        self.options = options
        self.cache = cache
        self.supervisor = supervisor
        self.manager = BgpManager(node_name, state_dir, run_dir, options, supervisor=supervisor)
        self.reconciler = Reconciler("bgp", self._apply, Backoff(base=0.5, cap=30.0))
        self._collector = BgpCollector(self)
        self._redactor = self.manager.speaker.redactor

    async def start(self) -> None:
        metrics.REGISTRY.register(self._collector)
        await self.manager.start()
        self.cache.subscribe(self._on_cache_change)
        self.reconciler.mark_dirty()
        self.supervisor.spawn("bgp", self.reconciler.run, required=True)

    async def stop(self, graceful: bool | None = None) -> None:
        await self.supervisor.stop_task("bgp")
        await self.manager.stop(graceful=self.options.withdraw_on_shutdown if graceful is None else graceful)
        metrics.REGISTRY.unregister(self._collector)

    async def _on_cache_change(self, change: CacheChange) -> None:
        if not change.kinds.isdisjoint(BGP_KINDS):
            self.reconciler.mark_dirty()

    async def _apply(self) -> None:
        node = self.cache.node(self.node_name)
        if node is None:
            return  # nothing to speak for yet; the Node's arrival marks us dirty again
        await self.manager.update(BgpInputs(node=node, nodes=self.cache.nodes(), peers=self.cache.raw("BGPPeer"),
                                            configs=self.cache.raw("BGPConfiguration"),
                                            secrets=self.cache.secrets(), services=self.cache.raw("Service"),
                                            endpoint_slices=self.cache.raw("EndpointSlice")))

    def resync(self) -> None:
        self.manager.resync()
        self.reconciler.mark_dirty()

    # -- views --------------------------------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        if self.reconciler.failures:
            return False, self._redactor.clean(
                f"update failing ({self.reconciler.failures} in a row): {self.reconciler.last_error}")
        ok, why = self.manager.ready()
        return ok, self._redactor.clean(why)

    def status(self) -> BgpStatus:
        status = self.manager.status()
        clean = self._redactor.clean
        status["errors"] = [clean(e) for e in [*status["errors"], *self.manager.speaker.errors()]]
        status["updateError"] = clean(self.reconciler.last_error)
        status["reason"] = clean(status["reason"])
        for peer in status["peers"]:
            peer["lastError"] = clean(peer["lastError"])
        if self.reconciler.failures:
            status["ready"], status["reason"] = self.ready()
        return status

    def metrics_snapshot(self) -> dict[str, Any]:
        """The manager's metrics and the speaker's guard counters (routed/bgp/metrics.py)."""
        speaker = self.manager.speaker
        return {**self.manager.metrics_snapshot(),
                "routed_bgp_commands_refused_total": speaker.commands.refused,
                "routed_bgp_peers_refused": len(speaker.refused)}

    def node_status(self) -> dict[str, Any]:
        """This component's part of the RoutedNodeStatus object (sessions, prefixes actually advertised)."""
        bgp = self.manager.status()
        bfd = {b["peer"]: {"state": b["state"], "remoteDiscriminator": b["remoteDiscriminator"],
                           "txIntervalMs": b["txIntervalMs"], "detectionTimeMs": b["detectionTimeMs"],
                           "lastDiag": b["localDiag"], "downs": b["downs"]} for b in bgp["bfd"]}
        peers = [
            {"name": p["name"], "address": p["address"], "asNumber": p["asNumber"], "state": p["state"],
             "since": str(p["since"] or ""), "prefixesReceived": p["received"], "prefixesSent": p["advertised"],
             **({"bfd": bfd[p["address"]]} if p["address"] in bfd else {})}
            for p in bgp["peers"]
        ]
        return {
            "asNumber": bgp["asNumber"] or 0,
            "routerID": bgp["routerID"] or "",
            "peers": peers,
            "peersEstablished": sum(1 for p in peers if p["state"] == "established"),
            "advertised": sorted({r["prefix"] for r in self.manager.advertised(None)}),
        }

    def api_methods(self) -> dict[str, ApiHandler]:
        return dict(zip(self.METHODS, (self._api_status, self._api_advertised, self._api_received), strict=True))

    async def _api_status(self, params: dict[str, Any]) -> BgpStatus:
        return self.status()

    async def _api_advertised(self, params: dict[str, Any]) -> list[BgpRoute]:
        return self.manager.advertised(params.get("peer") or None)

    async def _api_received(self, params: dict[str, Any]) -> list[BgpRoute]:
        return self.manager.received(params.get("peer") or None)
