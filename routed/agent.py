"""The node agent: datastore → cache → CNI service, policy dataplane and BGP speaker, plus local API and health.

Nothing is written to the kernel before the datastore's first listing is in; after that every consumer
reconciles desired state against the kernel. A clean SIGTERM leaves pods wired and policed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Any

from routed import metrics
from routed.api import ApiError, ApiServer
from routed.cache import ClusterCache, changed_any
from routed.config import AgentConfig
from routed.datastore.base import Datastore
from routed.model import Endpoint

log = logging.getLogger(__name__)

POLICY_KINDS = ("Pod", "Namespace", "NetworkPolicy", "Node")
BGP_KINDS = ("Node", "BGPPeer", "BGPConfiguration", "Secret")
POLICY_RETRY_MAX_SECONDS = 30.0


def make_datastore(config: AgentConfig) -> Datastore:
    if config.datastore == "kube":
        from routed.datastore.kube import KubeDatastore

        return KubeDatastore(kubeconfig=config.kubeconfig, namespace=config.kube_namespace, node_name=config.node_name)
    from routed.datastore.manifest import ManifestDatastore

    return ManifestDatastore(config.manifest_dir)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.node_name = config.node_name
        self.cache = ClusterCache()
        self.datastore = make_datastore(config)
        self.synced = asyncio.Event()
        self.api = ApiServer(config.socket_path)
        self.started_at = time.time()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._cni: Any = None  # set once the CNI service may serve requests (after policy's first sync)
        self._cni_service: Any = None  # started (kernel reconciled, endpoints loaded), maybe not serving yet
        self._policy: Any = None
        self._policy_lock = asyncio.Lock()
        self._policy_dirty = asyncio.Event()
        self._policy_error = ""
        self._policy_ok = not config.policy.enabled
        self._drop_labels: set[str] = set()  # endpoints that have a drop-counter series
        self._reported_invalid: dict[str, str] = {}  # policy key -> reasons already reported as an Event
        self._bgp: Any = None
        self._bgp_dirty = asyncio.Event()
        self._pod_cidrs: tuple[str, ...] = ()

    # ---- wiring of the parts -------------------------------------------------------------------------

    def pod_cidrs(self) -> list[str]:
        node = self.cache.node(self.node_name)
        return list(node.pod_cidrs) if node else []

    def readiness(self) -> tuple[bool, list[str]]:
        reasons: list[str] = []
        if not self.synced.is_set():
            reasons.append("waiting for the datastore's first sync")
        if self._cni is None:
            reasons.append("CNI service not started")
        else:
            ok, why = self._cni.ready()
            if not ok:
                reasons.append(f"CNI: {why}")
        if self.config.policy.enabled and not self._policy_ok:
            reasons.append(f"policy: {self._policy_error or 'not applied yet'}")
        if self._bgp is not None:
            ok, why = self._bgp.ready()
            if not ok:
                reasons.append(f"BGP: {why}")
        metrics.READY.set(0 if reasons else 1)
        return not reasons, reasons

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        os.makedirs(self.config.state_dir, exist_ok=True)
        self._register_api()
        await self.api.start()
        health = None
        if self.config.http_listen:
            from routed.health import HealthServer

            health = HealthServer(self.config.http_listen, self.readiness, metrics.REGISTRY)
            await health.start()
        self.cache.subscribe(self._on_cache_change)
        self._tasks.append(asyncio.create_task(self.datastore.run(self.cache.apply, self.synced), name="datastore"))
        try:
            await self._wait_or_stop(self.synced.wait())
            if self._stop.is_set():
                return
            metrics.DATASTORE_SYNCED.set(1)
            log.info("datastore synced: %s", self.cache.counts())
            await self._start_cni()
            await self._start_policy()
            self._cni = self._cni_service  # only now: every new endpoint is policed before its ADD returns
            await self._start_bgp()
            self._tasks.append(asyncio.create_task(self._status_loop(), name="status"))
            log.info("agent for node %s running", self.node_name)
            await self._stop.wait()
        finally:
            await self._shutdown(health)

    async def _wait_or_stop(self, awaitable: Any) -> None:
        waiter = asyncio.ensure_future(awaitable)
        stopper = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for fut in (waiter, stopper):
            if not fut.done():
                fut.cancel()

    async def _shutdown(self, health: Any) -> None:
        log.info("agent shutting down")
        await self.api.stop()
        if self._bgp is not None:
            with contextlib.suppress(Exception):
                await self._bgp.stop(graceful=self.config.bgp.withdraw_on_shutdown)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._cni_service is not None:
            await self._cni_service.stop()
        if health is not None:
            await health.stop()
        log.info("agent stopped")

    async def _on_cache_change(self, kinds: frozenset[str]) -> None:
        for kind, count in self.cache.counts().items():
            metrics.DATASTORE_OBJECTS.labels(kind).set(count)
        if not self.synced.is_set():
            return
        if changed_any(kinds, POLICY_KINDS):
            self._policy_dirty.set()
        if changed_any(kinds, BGP_KINDS):
            self._bgp_dirty.set()
        if "Node" in kinds and self._cni_service is not None:
            cidrs = tuple(self.pod_cidrs())
            if cidrs != self._pod_cidrs:
                self._pod_cidrs = cidrs
                await self._cni_service.on_pod_cidrs_changed()

    # ---- CNI -----------------------------------------------------------------------------------------

    async def _start_cni(self) -> None:
        from cni.server import CniService

        self._pod_cidrs = tuple(self.pod_cidrs())
        if not self._pod_cidrs:
            log.warning("node %s has no pod CIDR yet: CNI ADD will fail until it has one", self.node_name)
        cni = CniService(self.node_name, self.config.state_dir, self.pod_cidrs, self.config.mtu, hooks=self)
        await cni.start()
        self._cni_service = cni
        metrics.ENDPOINTS.set(len(cni.endpoints()))

    async def _handle_cni(self, params: dict[str, Any]) -> Any:
        command = str(params.get("command", "")).upper()
        if self._cni is None:
            if command == "STATUS":
                raise ApiError(50, "agent is starting: waiting for the datastore's first sync")
            raise ApiError(11, "agent is starting: waiting for the datastore's first sync", "try again later")
        started = time.perf_counter()
        result = "error"
        try:
            response = await self._cni.handle(params)
            result = "ok"
            return response
        finally:
            metrics.CNI_REQUESTS.labels(command, result).inc()
            metrics.CNI_SECONDS.labels(command).observe(time.perf_counter() - started)
            metrics.ENDPOINTS.set(len(self._cni.endpoints()))

    # EndpointHooks, called by the CNI service
    async def endpoint_added(self, endpoint: Endpoint) -> None:
        """Program the new endpoint's policy before the ADD returns: no packet goes unpoliced."""
        if self._policy is None:
            return
        if self.cache.pod(endpoint.pod_namespace, endpoint.pod_name) is None:
            await self._wait_for_pod(endpoint)
        async with self._policy_lock:
            inputs = self._policy_inputs(extra=endpoint)
            report = await asyncio.to_thread(self._policy.ensure_endpoint, inputs)
        self._record_policy_report(report)

    async def endpoint_removed(self, endpoint: Endpoint) -> None:
        self._policy_dirty.set()

    async def _wait_for_pod(self, endpoint: Endpoint, timeout: float = 2.0) -> None:
        """The Pod object normally precedes the CNI ADD; give a lagging watch a moment to deliver it."""
        refresh = getattr(self.datastore, "refresh_soon", None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if refresh is not None:
                refresh()
            if self.cache.pod(endpoint.pod_namespace, endpoint.pod_name) is not None:
                return
            await asyncio.sleep(0.05)
        log.warning("pod %s unknown to the datastore at ADD: its endpoint is policed without labels", endpoint.pod_key)

    # ---- policy --------------------------------------------------------------------------------------

    def _policy_inputs(self, extra: Endpoint | None = None) -> Any:
        from policy.calc import PolicyInputs

        endpoints = list(self._cni_service.endpoints()) if self._cni_service is not None else []
        if extra is not None and all(
            (e.container_id, e.ifname) != (extra.container_id, extra.ifname) for e in endpoints
        ):
            endpoints.append(extra)
        node = self.cache.node(self.node_name)
        return PolicyInputs(
            namespaces=self.cache.namespaces(),
            pods=self.cache.pods(),
            policies=self.cache.raw("NetworkPolicy"),
            endpoints=endpoints,
            node_ips=list(node.addresses) if node else [],
        )

    async def _start_policy(self) -> None:
        if not self.config.policy.enabled:
            return
        from policy.controller import PolicyController

        self._policy = PolicyController(self.config.policy, self.node_name)
        try:  # the first sync completes before any CNI ADD is served
            async with self._policy_lock:
                report = await asyncio.to_thread(self._policy.sync, self._policy_inputs())
            self._record_policy_report(report)
        except Exception as exc:
            self._policy_error = f"first apply failed: {exc}"
            log.exception("first policy sync failed; retrying in the background")
            self._policy_dirty.set()
        self._tasks.append(asyncio.create_task(self._policy_loop(), name="policy"))

    async def _policy_loop(self) -> None:
        backoff = 0.5
        while True:
            await self._policy_dirty.wait()
            self._policy_dirty.clear()
            started = time.perf_counter()
            try:
                async with self._policy_lock:
                    report = await asyncio.to_thread(self._policy.sync, self._policy_inputs())
                self._record_policy_report(report)
                metrics.POLICY_SYNC_SECONDS.observe(time.perf_counter() - started)
                backoff = 0.5
            except Exception as exc:
                # Keep the last good state in the kernel; retry with backoff and stay not-ready.
                metrics.POLICY_SYNC_FAILURES.inc()
                self._policy_ok = False
                self._policy_error = f"apply failed: {exc}"
                log.exception("policy sync failed; retrying in %.1fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, POLICY_RETRY_MAX_SECONDS)
                self._policy_dirty.set()

    def _record_policy_report(self, report: Any) -> None:
        self._policy_ok = True
        self._policy_error = ""
        summary = self._policy.report()
        invalid = summary.get("invalid_policies") or []
        metrics.POLICY_INVALID.set(len(invalid))
        self._report_invalid_policies(invalid)
        metrics.POLICY_RULES.set(summary.get("rules") or 0)
        metrics.POLICY_IPSETS.set(summary.get("ipsets") or 0)
        if not summary.get("ready", True):
            self._policy_ok = False
            self._policy_error = str(summary.get("last_error") or "dataplane not ready")

    async def _refresh_drop_counters(self) -> None:
        """Per-endpoint drop counters read back from iptables: periodic, off the event loop and off the CNI path."""
        if self._policy is None:
            return
        drops = await asyncio.to_thread(self._policy.drop_counters)
        for endpoint, count in drops.items():
            metrics.POLICY_DROPS.labels(endpoint).set(count)
        for gone in self._drop_labels - set(drops):
            metrics.POLICY_DROPS.remove(gone)
        self._drop_labels = set(drops)

    def _report_invalid_policies(self, invalid: list[dict[str, Any]]) -> None:
        """One Warning Event per invalid policy (and per change of its reasons), from the nodes that have pods in
        its namespace: those are where it fails closed. A fixed or deleted policy may be reported again later."""
        local_namespaces = {e.pod_namespace for e in (self._cni_service.endpoints() if self._cni_service else [])}
        current = {str(item.get("policy")): "; ".join(item.get("reasons") or []) for item in invalid}
        for key, reasons in current.items():
            namespace, _, name = key.partition("/")
            if self._reported_invalid.get(key) == reasons or namespace not in local_namespaces:
                continue
            item = next(i for i in invalid if str(i.get("policy")) == key)
            closed = ", ".join(item.get("fail_closed") or []) or "nothing"
            message = f"{reasons}. Pods it selects on node {self.node_name} fail closed for: {closed}."
            involved = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "namespace": namespace,
                        "name": name}
            task = asyncio.get_running_loop().create_task(
                self.datastore.report_event(involved, "InvalidNetworkPolicy", message))
            task.add_done_callback(_log_task_error)
            self._reported_invalid[key] = reasons
        for key in set(self._reported_invalid) - set(current):
            del self._reported_invalid[key]

    # ---- BGP -----------------------------------------------------------------------------------------

    async def _start_bgp(self) -> None:
        if not self.config.bgp.enabled:
            return
        from routed.bgp.manager import BgpManager

        run_dir = os.path.join(self.config.state_dir, "bgp")
        from routed.bgp.metrics import BgpCollector

        self._bgp = BgpManager(self.node_name, self.config.state_dir, run_dir, self.config.bgp)
        metrics.REGISTRY.register(BgpCollector(self._bgp))
        await self._bgp.start()
        self._bgp_dirty.set()
        self._tasks.append(asyncio.create_task(self._bgp_loop(), name="bgp"))

    async def _bgp_loop(self) -> None:
        from routed.bgp.manager import BgpInputs

        while True:
            await self._bgp_dirty.wait()
            self._bgp_dirty.clear()
            node = self.cache.node(self.node_name)
            if node is None:
                continue
            inputs = BgpInputs(
                node=node,
                nodes=self.cache.nodes(),
                peers=self.cache.raw("BGPPeer"),
                configs=self.cache.raw("BGPConfiguration"),
                secrets=self.cache.secrets(),
            )
            try:
                await self._bgp.update(inputs)
            except Exception:
                log.exception("BGP update failed")

    # ---- node status object -------------------------------------------------------------------------

    def node_status(self) -> dict[str, Any]:
        """What this node publishes about itself (RoutedNodeStatus.status): readiness, BGP sessions and the
        prefixes it actually advertised."""
        ready, reasons = self.readiness()
        status: dict[str, Any] = {
            "ready": ready,
            "reasons": reasons,
            "podCIDRs": self.pod_cidrs(),
            "endpoints": len(self._cni.endpoints()) if self._cni else 0,
            "invalidPolicies": len(self._policy.report().get("invalid_policies") or []) if self._policy else 0,
        }
        if self._bgp is not None:
            bgp = self._bgp.status()
            advertised = self._bgp.advertised(None)
            peers = [
                {"name": p.get("name", ""), "address": p.get("address", ""), "asNumber": p.get("asn", 0),
                 "state": p.get("state", ""), "since": str(p.get("since") or ""),
                 "prefixesReceived": p.get("received", 0), "prefixesSent": p.get("advertised", 0)}
                for p in bgp.get("peers", [])
            ]
            status |= {
                "asNumber": bgp.get("asn") or 0,
                "routerID": bgp.get("router_id") or "",
                "peers": peers,
                "peersEstablished": sum(1 for p in peers if p["state"] == "established"),
                "advertised": sorted({r["prefix"] for r in advertised}),
            }
        return status

    async def _status_loop(self, interval: float = 10.0) -> None:
        last: dict[str, Any] | None = None
        while True:
            try:
                await self._refresh_drop_counters()
            except Exception as exc:
                log.warning("could not read drop counters: %s", exc)
            status = self.node_status()
            if status != last:
                try:
                    await self.datastore.write_status(self.node_name, status)
                    last = status
                except Exception as exc:  # the API may be down; try again next round
                    log.warning("could not publish node status: %s", exc)
            await asyncio.sleep(interval)

    # ---- local API -----------------------------------------------------------------------------------

    def _register_api(self) -> None:
        self.api.register("cni", self._handle_cni)
        self.api.register("status", self._api_status)
        self.api.register("ipam.show", self._api_ipam)
        self.api.register("endpoints.list", self._api_endpoints)
        self.api.register("bgp.status", self._api_bgp("status"))
        self.api.register("bgp.advertised", self._api_bgp("advertised"))
        self.api.register("bgp.received", self._api_bgp("received"))
        self.api.register("policy.report", self._api_policy_report)
        self.api.register("policy.explain", self._api_policy_explain)
        self.api.register("policy.show", self._api_policy_show)

    async def _api_status(self, params: dict[str, Any]) -> dict[str, Any]:
        ready, reasons = self.readiness()
        return {
            "node": self.node_name,
            "ready": ready,
            "reasons": reasons,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "pod_cidrs": self.pod_cidrs(),
            "endpoints": len(self._cni.endpoints()) if self._cni else 0,
            "datastore": {"kind": self.config.datastore, "synced": self.synced.is_set(), "objects": self.cache.counts()},
            "policy": self._policy.report() if self._policy is not None else {"enabled": self.config.policy.enabled},
            "bgp": self._bgp.status() if self._bgp is not None else {"enabled": self.config.bgp.enabled},
        }

    def _need(self, part: Any, what: str) -> Any:
        if part is None:
            raise ApiError(103, f"{what} is not running on this agent")
        return part

    async def _api_ipam(self, params: dict[str, Any]) -> dict[str, Any]:
        return self._need(self._cni, "CNI service").ipam_show()

    async def _api_endpoints(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        from cni.store import endpoint_to_dict  # the same shape as the persisted endpoint records

        return [endpoint_to_dict(e) for e in self._need(self._cni, "CNI service").endpoints()]

    def _api_bgp(self, view: str) -> Any:
        async def handler(params: dict[str, Any]) -> Any:
            bgp = self._need(self._bgp, "BGP")
            if view == "status":
                return bgp.status()
            return getattr(bgp, view)(params.get("peer") or None)

        return handler

    async def _api_policy_report(self, params: dict[str, Any]) -> Any:
        return self._need(self._policy, "policy").report()

    def _pod_or_ip(self, ref: str) -> Any:
        if "/" in ref:
            ns, name = ref.split("/", 1)
            pod = self.cache.pod(ns, name)
            if pod is None:
                raise ApiError(102, f"pod {ref} not found in the datastore")
            return pod
        return ref

    async def _api_policy_explain(self, params: dict[str, Any]) -> Any:
        from dataclasses import asdict, is_dataclass

        from policy.explain import explain

        inputs = self._policy_inputs()
        result = explain(
            inputs,
            self._pod_or_ip(str(params.get("from", ""))),
            self._pod_or_ip(str(params.get("to", ""))),
            int(params.get("port", 0)),
            str(params.get("protocol", "TCP")).upper(),
        )
        return asdict(result) if is_dataclass(result) else result

    async def _api_policy_show(self, params: dict[str, Any]) -> Any:
        from policy.explain import policies_for

        pod = self._pod_or_ip(str(params.get("pod", "")))
        if isinstance(pod, str):
            raise ApiError(102, "policy show takes NS/POD")
        return policies_for(self._policy_inputs(), pod)


def _log_task_error(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not report an event: %s", task.exception())


def setup_logging(config: AgentConfig) -> None:
    handler: logging.Handler
    if config.log_file:
        os.makedirs(os.path.dirname(config.log_file) or ".", exist_ok=True)
        handler = logging.FileHandler(config.log_file)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{config.node_name}] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())


def run_agent(config: AgentConfig) -> None:
    setup_logging(config)
    asyncio.run(Agent(config).run())
