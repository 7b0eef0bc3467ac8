"""The policy component: keeps the node's ipsets and iptables chains equal to what the cluster's NetworkPolicies
say, programs each new endpoint before its CNI ADD returns, and serves the policy views.

Tasks (all restart on failure): `policy` (the reconciler: any change of Pods, Namespaces, NetworkPolicies or
Nodes, an endpoint going, and the periodic resync mark it dirty; a failed apply is retried with backoff and the
last good state stays), `policy-events` (Warning Events for invalid policies), `policy-counters` (per-endpoint
drop counters for metrics, read periodically in a thread, never on the CNI path). Only `policy` is required.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from policy.calc import PolicyInputs
from policy.controller import PolicyApplyError, PolicyController
from policy.events import EventPoster, InvalidPolicyEvents
from policy.explain import explain, policies_for
from routed import metrics
from routed.api_types import PolicyExplain, PolicyReport, PolicyShow
from routed.backoff import Backoff
from routed.cache import ClusterCache
from routed.component import ApiHandler
from routed.config import PolicyOptions
from routed.errors import Code, RoutedError
from routed.model import Endpoint, Pod
from routed.reconcile import Reconciler
from routed.supervisor import Liveness, Supervisor

log = logging.getLogger(__name__)

POLICY_KINDS = frozenset({"Pod", "Namespace", "NetworkPolicy", "Node"})
COUNTERS_INTERVAL = 10.0
POD_WAIT_SECONDS = 2.0


def disabled_report(node_name: str) -> PolicyReport:
    return PolicyReport(enabled=False, node=node_name, ready=True, writer="", backend="", invalidPolicies=[],
                        rules=0, chains=0, ipsets=0, members=0, endpoints=0, lastApplyTime=None,
                        lastApplySeconds=None, lastError="", failures=0, warnings=[])


@dataclass(eq=False)
class PolicyComponent:
    name: ClassVar[str] = "policy"
    METHODS: ClassVar[tuple[str, ...]] = ("policy.report", "policy.explain", "policy.show")

    options: PolicyOptions
    node_name: str
    cache: ClusterCache
    endpoints: Callable[[], list[Endpoint]]  # this node's endpoints (the CNI service's)
    post_event: EventPoster  # the datastore's Event writer
    refresh_datastore: Callable[[], None]
    supervisor: Supervisor

    def __post_init__(self) -> None:
        self.controller = PolicyController(self.options, self.node_name)
        self.events = InvalidPolicyEvents(self.node_name, self.post_event)
        self.reconciler = Reconciler("policy", self._apply, Backoff(base=0.2, cap=30.0))
        self._lock = asyncio.Lock()  # one apply at a time: the reconciler's or a CNI ADD's
        self._drop_labels: set[str] = set()

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """The first apply (before any CNI ADD is served); a failure is retried by the `policy` task."""
        await self.reconciler.run_once()
        self.cache.subscribe(self._on_cache_change)
        self.supervisor.spawn("policy", self.reconciler.run, required=True)
        self.supervisor.spawn("policy-events", self.events.run, required=False)
        self.supervisor.spawn("policy-counters", self._counters_loop, required=False)

    async def stop(self) -> None:
        for task in ("policy-counters", "policy-events", "policy"):
            await self.supervisor.stop_task(task)

    async def _on_cache_change(self, kinds: frozenset[str]) -> None:
        if not kinds.isdisjoint(POLICY_KINDS):
            self.reconciler.mark_dirty()

    def resync(self) -> None:
        self.controller.force_readback()
        self.reconciler.mark_dirty()

    # -- applying -----------------------------------------------------------------------------------
    def inputs(self, extra: Endpoint | None = None) -> PolicyInputs:
        endpoints = list(self.endpoints())
        if extra is not None and all((e.container_id, e.ifname) != (extra.container_id, extra.ifname)
                                     for e in endpoints):
            endpoints.append(extra)
        node = self.cache.node(self.node_name)
        return PolicyInputs(namespaces=self.cache.namespaces(), pods=self.cache.pods(),
                            policies=self.cache.raw("NetworkPolicy"), endpoints=endpoints,
                            node_ips=list(node.addresses) if node else [])

    async def _apply(self) -> None:
        started = time.perf_counter()
        async with self._lock:
            try:
                await asyncio.to_thread(self.controller.sync, self.inputs())
            except PolicyApplyError:
                metrics.POLICY_SYNC_FAILURES.inc()
                raise
            finally:
                self._after_apply()
        metrics.POLICY_SYNC_SECONDS.observe(time.perf_counter() - started)

    def _after_apply(self) -> None:
        report = self.controller.report()
        metrics.POLICY_INVALID.set(len(report["invalidPolicies"]))
        metrics.POLICY_RULES.set(report["rules"])
        metrics.POLICY_IPSETS.set(report["ipsets"])
        self.events.report(report["invalidPolicies"], {e.pod_namespace for e in self.endpoints()})

    # EndpointHooks, called by the CNI service
    async def endpoint_added(self, endpoint: Endpoint) -> None:
        """Program the new endpoint's policy before the ADD returns: no packet goes unpoliced."""
        if self.cache.pod(endpoint.pod_namespace, endpoint.pod_name) is None:
            await self._wait_for_pod(endpoint)
        async with self._lock:
            try:
                await asyncio.to_thread(self.controller.ensure_endpoint, self.inputs(extra=endpoint))
            finally:
                self._after_apply()

    async def endpoint_removed(self, endpoint: Endpoint) -> None:
        self.reconciler.mark_dirty()

    async def _wait_for_pod(self, endpoint: Endpoint) -> None:
        """The Pod object normally precedes the CNI ADD; give a lagging watch a moment to deliver it."""
        deadline = time.monotonic() + POD_WAIT_SECONDS
        while time.monotonic() < deadline:
            self.refresh_datastore()
            if self.cache.pod(endpoint.pod_namespace, endpoint.pod_name) is not None:
                return
            await asyncio.sleep(0.05)
        log.warning("pod %s unknown to the datastore at ADD: its endpoint is policed without labels", endpoint.pod_key)

    async def _counters_loop(self, liveness: Liveness) -> None:
        while True:
            with liveness.busy("reading drop counters"):
                drops = await asyncio.to_thread(self.controller.drop_counters)
            for endpoint, count in drops.items():
                metrics.POLICY_DROPS.labels(endpoint).set(count)
            for gone in self._drop_labels - set(drops):
                metrics.POLICY_DROPS.remove(gone)
            self._drop_labels = set(drops)
            await asyncio.sleep(COUNTERS_INTERVAL)

    # -- views --------------------------------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        report = self.controller.report()
        if report["ready"]:
            return True, "applied"
        return False, f"not applied: {report['lastError'] or self.reconciler.last_error or 'not yet'}"

    def status(self) -> PolicyReport:
        return self.controller.report()

    def api_methods(self) -> dict[str, ApiHandler]:
        return dict(zip(self.METHODS, (self._api_report, self._api_explain, self._api_show), strict=True))

    async def _api_report(self, params: dict[str, Any]) -> PolicyReport:
        return self.controller.report()

    def _pod_or_ip(self, ref: str) -> Pod | str:
        if "/" in ref:
            namespace, name = ref.split("/", 1)
            pod = self.cache.pod(namespace, name)
            if pod is None:
                raise RoutedError(f"pod {ref} not found in the datastore", code=Code.NOT_FOUND)
            return pod
        return ref

    async def _api_explain(self, params: dict[str, Any]) -> PolicyExplain:
        return explain(self.inputs(), self._pod_or_ip(str(params.get("from", ""))),
                       self._pod_or_ip(str(params.get("to", ""))), int(params.get("port", 0)),
                       str(params.get("protocol", "TCP")).upper())

    async def _api_show(self, params: dict[str, Any]) -> PolicyShow:
        pod = self._pod_or_ip(str(params.get("pod", "")))
        if isinstance(pod, str):
            raise RoutedError("policy show takes NS/POD", f"got {pod!r}", code=Code.MALFORMED_REQUEST)
        return policies_for(self.inputs(), pod)
