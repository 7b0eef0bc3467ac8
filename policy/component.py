"""The policy component: keeps the node's ipsets and iptables chains equal to what the cluster's NetworkPolicies
say, programs each new endpoint before its CNI ADD returns, and serves the policy views.

Every cache event goes into the incremental engine (policy/incremental.py) as it arrives; applies write only
what changed (policy/controller.py). Applies are serialised and coalesced: whoever asks while one runs (the
reconciler, many concurrent CNI ADDs) is served by the next one, which covers every request made before it
started, so 50 ADDs at once cost a few applies, not 50.

Tasks (all restart on failure): `policy` (the reconciler: any relevant change and the periodic resync — a full
read-back and repair — mark it dirty; a failed apply is retried with backoff and the last good state stays),
`policy-hooks` (every HOOKS_INTERVAL s: our jumps first in FORWARD and INPUT of each family, put back when
something flushed them or inserted ahead), `policy-events` (Warning Events for invalid policies),
`policy-counters` (per-endpoint drop counters for metrics, read periodically in a thread, never on the CNI path).
`policy` and `policy-hooks` are required.

Nothing is lost on the way from the cache to the kernel: an event the engine fails on is logged, the others of
its batch still go in, and the next apply rebuilds the engine from the cache; the periodic resync also compares
the engine's inputs with the cache (policy/drift.py) and rebuilds it when they differ. A planning failure puts
the engine's changes back (policy/controller.py). Threads get copies, never the engine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from policy.calc import PolicyInputs
from policy.controller import PolicyApplyError, PolicyController, budget_of
from policy.drift import input_differences
from policy.events import EventPoster, InvalidPolicyEvents
from policy.explain import explain, policies_for
from policy.incremental import PolicyEngine
from routed import metrics
from routed.api_types import PolicyExplain, PolicyReport, PolicyShow
from routed.backoff import Backoff
from routed.cache import CacheChange, ClusterCache
from routed.component import ApiHandler
from routed.config import PolicyOptions
from routed.datastore.base import Event
from routed.errors import Code, RoutedError
from routed.model import Endpoint, Namespace, Node, Pod
from routed.reconcile import Reconciler
from routed.supervisor import Liveness, Supervisor

log = logging.getLogger(__name__)

T = TypeVar("T")
POLICY_KINDS = frozenset({"Pod", "Namespace", "NetworkPolicy", "Node"})
COUNTERS_INTERVAL = 10.0
HOOKS_INTERVAL = 5.0  # how often our FORWARD/INPUT jumps are checked (and put back first)
POD_WAIT_SECONDS = 2.0


def disabled_report(node_name: str) -> PolicyReport:
    return PolicyReport(enabled=False, node=node_name, ready=True, writer="", backend="", invalidPolicies=[],
                        rules=0, chains=0, ipsets=0, members=0, endpoints=0, lastApplyTime=None,
                        lastApplySeconds=None, lastError="", failures=0, warnings=[])


def _typed(event: Event, build: Callable[[dict[str, Any]], T]) -> T | None:
    """The event's object, typed; None (and named in the log) when it does not parse: like the cache's views,
    the engine then holds no such object."""
    try:
        return build(event.obj)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        log.warning("invalid %s %s ignored: %s", event.kind, event.key, exc)
        return None


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
    make_controller: Callable[[PolicyOptions, str], PolicyController] = PolicyController  # tests: a fake kernel

    def __post_init__(self) -> None:
        self.controller = self.make_controller(self.options, self.node_name)
        self.events = InvalidPolicyEvents(self.node_name, self.post_event)
        self.reconciler = Reconciler("policy", self._apply, Backoff(base=0.2, cap=30.0))
        self._lock = asyncio.Lock()  # one apply at a time: the reconciler's or CNI ADDs'
        self._requested = 0  # apply requests made
        self._applied_upto = 0  # requests covered by a finished apply
        self._drop_labels: set[str] = set()
        self._rebuild_reason = ""  # set: the engine may differ from the cache; the next apply rebuilds it
        self.rebuilds = 0

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the cache into the engine, then the first (full) apply, before any CNI ADD is served; a failure
        is retried by the `policy` task."""
        self.controller.engine = PolicyEngine.from_inputs(self.inputs())
        self.controller.engine.take_changes()
        self.controller.force_readback()
        self.cache.subscribe(self._on_cache_change, on_failure=self._listener_failed)
        await self.reconciler.run_once()
        self.supervisor.spawn("policy", self.reconciler.run, required=True)
        self.supervisor.spawn("policy-hooks", self._hooks_loop, required=True)
        self.supervisor.spawn("policy-events", self.events.run, required=False)
        self.supervisor.spawn("policy-counters", self._counters_loop, required=False)

    async def stop(self) -> None:
        for task in ("policy-counters", "policy-events", "policy-hooks", "policy"):
            await self.supervisor.stop_task(task)

    async def _on_cache_change(self, change: CacheChange) -> None:
        if change.kinds.isdisjoint(POLICY_KINDS):
            return
        engine = self.controller.engine
        try:
            for event in change.events:
                try:
                    self._feed(engine, event)
                except Exception:
                    log.exception("policy engine failed on %s %s %s: rebuilding it from the cache", event.type,
                                  event.kind, event.key)
                    self._rebuild_reason = f"engine failed on {event.kind} {event.key}"
        finally:
            self.reconciler.mark_dirty()

    def _listener_failed(self) -> None:
        self._rebuild_reason = "the cache listener failed"
        self.reconciler.mark_dirty()

    def _feed(self, engine: PolicyEngine, event: Event) -> None:
        gone = event.type == "DELETED"
        if event.kind == "Pod":
            pod = None if gone else _typed(event, Pod.from_k8s)
            engine.delete_pod(event.key) if pod is None else engine.set_pod(pod)
        elif event.kind == "Namespace":
            ns = None if gone else _typed(event, Namespace.from_k8s)
            engine.delete_namespace(event.key) if ns is None else engine.set_namespace(ns)
        elif event.kind == "NetworkPolicy":
            engine.delete_policy(event.key) if gone else engine.set_policy(event.obj)
        elif event.kind == "Node" and event.key == self.node_name:
            engine.set_node_ips(() if gone else Node.from_k8s(event.obj).addresses)

    def resync(self) -> None:
        differences = input_differences(self.controller.engine, self.inputs())
        if differences:
            log.error("policy engine drifted from the cache (%s): rebuilding it", "; ".join(differences))
            self._rebuild_reason = "; ".join(differences)
        self.controller.force_readback()
        self.reconciler.mark_dirty()

    def _rebuild_engine(self) -> None:
        """A fresh engine from the cache (and this node's endpoints); the next apply is a full one."""
        log.warning("rebuilding the policy engine from the cache: %s", self._rebuild_reason)
        self.controller.engine = PolicyEngine.from_inputs(self.inputs())
        self.controller.force_readback()
        self._rebuild_reason = ""
        self.rebuilds += 1

    # -- applying -----------------------------------------------------------------------------------
    def inputs(self) -> PolicyInputs:
        """The whole snapshot (the engine's first load, and explain/show, which evaluate it in full)."""
        node = self.cache.node(self.node_name)
        return PolicyInputs(namespaces=self.cache.namespaces(), pods=self.cache.pods(),
                            policies=self.cache.raw("NetworkPolicy"), endpoints=list(self.endpoints()),
                            node_ips=list(node.addresses) if node else [],
                            budget=budget_of(self.options))

    async def _apply(self) -> None:
        await self._flush()

    async def _flush(self) -> None:
        """Apply everything the engine holds now; coalesced with the applies of concurrent callers."""
        self._requested += 1
        mine = self._requested
        async with self._lock:
            if self._applied_upto >= mine:
                return  # an apply that started after this request covered it
            upto = self._requested
            started = time.perf_counter()
            try:
                if self._rebuild_reason:
                    self._rebuild_engine()
                plan = self.controller.plan()  # here, on the loop: only the loop touches the engine
                await asyncio.to_thread(self.controller.execute, plan)
            except PolicyApplyError:
                metrics.POLICY_SYNC_FAILURES.inc()
                raise
            finally:
                self._after_apply()
            self._applied_upto = upto
            metrics.POLICY_SYNC_SECONDS.observe(time.perf_counter() - started)

    def _after_apply(self) -> None:
        report = self.controller.report()
        metrics.POLICY_INVALID.set(len(report["invalidPolicies"]))
        metrics.POLICY_RULES.set(report["rules"])
        metrics.POLICY_IPSETS.set(report["ipsets"])
        self.events.report(report["invalidPolicies"], {e.pod_namespace for e in self.endpoints()})

    # EndpointHooks, called by the CNI service
    async def endpoint_added(self, endpoint: Endpoint) -> None:
        """Program the new endpoint's chains, dispatch rule and set memberships before the ADD returns (no
        packet goes unpoliced); a failing apply is retried a few times quickly, then the ADD fails."""
        if self.cache.pod(endpoint.pod_namespace, endpoint.pod_name) is None:
            await self._wait_for_pod(endpoint)
        self.controller.engine.add_endpoint(endpoint)
        backoff = self.controller.endpoint_backoff
        backoff.reset()
        for attempt in range(max(0, self.options.apply_retries) + 1):
            try:
                await self._flush()
                return
            except PolicyApplyError:
                if attempt >= self.options.apply_retries:
                    raise
                await backoff.sleep()

    async def endpoint_removed(self, endpoint: Endpoint) -> None:
        self.controller.engine.remove_endpoint(endpoint)
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

    async def check_hooks(self) -> int:
        """Our jumps first in FORWARD and INPUT (a cheap read of those chains), between applies; a failed check
        makes the next apply a full one. Returns the operations written."""
        async with self._lock:
            try:
                return await asyncio.to_thread(self.controller.check_hooks)
            except PolicyApplyError as exc:
                log.error("%s: the next apply reads the kernel back", exc)
                self.reconciler.mark_dirty()
                return 0

    async def _hooks_loop(self, liveness: Liveness) -> None:
        while True:
            await asyncio.sleep(HOOKS_INTERVAL)
            with liveness.busy("checking the policy hooks"):
                await self.check_hooks()

    async def _counters_loop(self, liveness: Liveness) -> None:
        while True:
            endpoints = self.controller.drop_chains()  # copied here, on the loop
            with liveness.busy("reading drop counters"):
                drops = await asyncio.to_thread(self.controller.drop_counters, endpoints)
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
        """NS/POD (from the datastore) or an IPv4/IPv6 address."""
        if "/" in ref and ":" not in ref:
            namespace, name = ref.split("/", 1)
            pod = self.cache.pod(namespace, name)
            if pod is None:
                raise RoutedError(f"pod {ref} not found in the datastore", code=Code.NOT_FOUND)
            return pod
        try:
            return str(ipaddress.ip_address(ref))
        except ValueError:
            raise RoutedError("want NS/POD or an IP address", f"got {ref!r}", code=Code.MALFORMED_REQUEST) from None

    @staticmethod
    def _family(params: dict[str, Any]) -> int | None:
        """`family`: 4 or 6 (optional; default: that of an address given, else IPv4 if both pods have one)."""
        value = params.get("family")
        if value in (None, "", 0):
            return None
        if str(value) not in ("4", "6"):
            raise RoutedError("family must be 4 or 6", f"got {value!r}", code=Code.MALFORMED_REQUEST)
        return int(value)

    async def _api_explain(self, params: dict[str, Any]) -> PolicyExplain:
        return explain(self.inputs(), self._pod_or_ip(str(params.get("from", ""))),
                       self._pod_or_ip(str(params.get("to", ""))), int(params.get("port", 0)),
                       str(params.get("protocol", "TCP")).upper(), self._family(params))

    async def _api_show(self, params: dict[str, Any]) -> PolicyShow:
        ref = str(params.get("pod", ""))
        pod = self._pod_or_ip(ref) if "/" in ref else ref
        if isinstance(pod, str):
            raise RoutedError("policy show takes NS/POD", f"got {pod!r}", code=Code.MALFORMED_REQUEST)
        return policies_for(self.inputs(), pod)
