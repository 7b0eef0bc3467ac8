"""Kubernetes datastore: list + watch every kind the agent reads, one blocking watch thread per kind.

Each watcher thread keeps its own view (key -> trimmed object) and resourceVersion:
- first run and after `410 Gone`: list (paginated), diff the listing against the view and emit the
  difference as ADDED/MODIFIED/DELETED, so consumers converge without flapping unchanged objects;
- then watch from the listing's resourceVersion with bookmarks; a closed watch resumes from the last
  resourceVersion seen (no relist);
- on any other error (API down, 5xx, 403): back off with jitter and retry, emitting nothing, so
  consumers keep their last known state.

Objects are trimmed to what the agent uses (no managedFields, no annotations but `routed.dev/*`, Pod
spec reduced to nodeName/hostNetwork/container ports, ...). A MODIFIED whose trimmed form did not change
(e.g. a Pod's conditions) is dropped. Threads hand events to the asyncio loop with `call_soon_threadsafe`;
`run` batches whatever arrives within `batch_window` seconds into one `sink` call.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from routed.backoff import Backoff
from routed.datastore.base import Datastore, DatastoreUnavailable, Event, EventSink, EventType, object_key

log = logging.getLogger(__name__)

GROUP = "routed.dev"
VERSION = "v1alpha1"
ANNOTATION_PREFIX = "routed.dev/"
LIST_PAGE = 500


class Gone(DatastoreUnavailable):
    """The resourceVersion we asked for is too old (HTTP 410 / watch ERROR 410): relist."""


@dataclass(frozen=True)
class KindSpec:
    kind: str
    # (api, watch: bool, **kwargs) -> raw urllib3 response (called with _preload_content=False)
    call: Callable[..., Any]
    trim: Callable[[dict[str, Any]], dict[str, Any]]
    optional: bool = False  # a 404 (CRD not installed) counts as an empty listing


# ---- trimming -------------------------------------------------------------------------------------


def _meta(obj: dict[str, Any], *, namespaced: bool) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    out: dict[str, Any] = {"name": meta.get("name", "")}
    if namespaced:
        out["namespace"] = meta.get("namespace", "")
    for key in ("uid", "resourceVersion", "generation", "deletionTimestamp"):
        if meta.get(key) is not None:
            out[key] = meta[key]
    if meta.get("labels"):
        out["labels"] = dict(meta["labels"])
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith(ANNOTATION_PREFIX)}
    if annotations:
        out["annotations"] = annotations
    return out


def _shell(kind: str, api_version: str, obj: dict[str, Any], namespaced: bool) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "metadata": _meta(obj, namespaced=namespaced)}


def trim_node(obj: dict[str, Any]) -> dict[str, Any]:
    out = _shell("Node", "v1", obj, False)
    spec = obj.get("spec") or {}
    out["spec"] = {k: spec[k] for k in ("podCIDR", "podCIDRs") if spec.get(k)}
    status = obj.get("status") or {}
    out["status"] = {"addresses": list(status.get("addresses") or [])}
    return out


def trim_namespace(obj: dict[str, Any]) -> dict[str, Any]:
    out = _shell("Namespace", "v1", obj, False)
    out["status"] = {"phase": (obj.get("status") or {}).get("phase", "")}
    return out


def trim_pod(obj: dict[str, Any]) -> dict[str, Any]:
    out = _shell("Pod", "v1", obj, True)
    spec = obj.get("spec") or {}
    containers = []
    for c in spec.get("containers") or []:
        entry: dict[str, Any] = {"name": c.get("name", "")}
        if c.get("ports"):
            entry["ports"] = [
                {k: p[k] for k in ("name", "containerPort", "protocol") if k in p} for p in c["ports"]
            ]
        containers.append(entry)
    out["spec"] = {"nodeName": spec.get("nodeName") or "", "containers": containers}
    if spec.get("hostNetwork"):
        out["spec"]["hostNetwork"] = True
    status = obj.get("status") or {}
    out["status"] = {k: status[k] for k in ("phase", "podIP", "podIPs") if status.get(k)}
    return out


def trim_network_policy(obj: dict[str, Any]) -> dict[str, Any]:
    out = _shell("NetworkPolicy", "networking.k8s.io/v1", obj, True)
    out["spec"] = obj.get("spec") or {}
    return out


def _trim_custom(kind: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def trim(obj: dict[str, Any]) -> dict[str, Any]:
        out = _shell(kind, f"{GROUP}/{VERSION}", obj, False)
        out["spec"] = obj.get("spec") or {}
        return out

    return trim


SERVICE_SPEC_FIELDS = ("type", "clusterIP", "clusterIPs", "externalIPs", "externalTrafficPolicy",
                       "internalTrafficPolicy", "selector", "ports")


def trim_service(obj: dict[str, Any]) -> dict[str, Any]:
    out = _shell("Service", "v1", obj, True)
    spec = obj.get("spec") or {}
    out["spec"] = {k: spec[k] for k in SERVICE_SPEC_FIELDS if spec.get(k) is not None}
    ingress = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    out["status"] = {"loadBalancer": {"ingress": [{"ip": i["ip"]} for i in ingress if i.get("ip")]}}
    return out


def trim_endpoint_slice(obj: dict[str, Any]) -> dict[str, Any]:
    out = _shell("EndpointSlice", "discovery.k8s.io/v1", obj, True)
    out["addressType"] = obj.get("addressType", "")
    out["endpoints"] = [
        {"addresses": list(ep.get("addresses") or []), "nodeName": ep.get("nodeName") or "",
         "conditions": {k: v for k, v in (ep.get("conditions") or {}).items() if v is not None}}
        for ep in obj.get("endpoints") or []
    ]
    return out


def trim_secret(obj: dict[str, Any]) -> dict[str, Any]:
    out = _shell("Secret", "v1", obj, True)
    out["type"] = obj.get("type", "")
    out["data"] = dict(obj.get("data") or {})
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal apart from metadata.resourceVersion."""

    def strip(o: dict[str, Any]) -> dict[str, Any]:
        meta = dict(o.get("metadata") or {})
        meta.pop("resourceVersion", None)
        return {**o, "metadata": meta}

    return strip(a) == strip(b)


def diff_listing(
    kind: str, old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]
) -> list[Event]:
    """Events that turn `old` into `new` (a relist): nothing for unchanged objects."""
    events: list[Event] = []
    for key, obj in new.items():
        prev = old.get(key)
        if prev is None:
            events.append(Event("ADDED", kind, key, obj))
        elif not _same(prev, obj):
            events.append(Event("MODIFIED", kind, key, obj))
    for key, obj in old.items():
        if key not in new:
            events.append(Event("DELETED", kind, key, obj))
    return events


# ---- the datastore --------------------------------------------------------------------------------


class KubeDatastore(Datastore):
    kind = "kube"

    def __init__(
        self,
        kubeconfig: str = "",
        namespace: str = "routed-system",
        node_name: str = "",
        *,
        watch_timeout: int = 300,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        batch_window: float = 0.05,
        request_timeout: float = 30.0,
        all_nodes: bool = True,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.node_name = node_name
        self.watch_timeout = watch_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.batch_window = batch_window
        self.request_timeout = request_timeout
        # All Nodes are needed for the node-to-node mesh; without it, only this node (field selector).
        self.all_nodes = all_nodes or not node_name
        self._api: k8s.ApiClient | None = None
        self._watchers: dict[str, _Watcher] = {}
        self.start_error = ""  # why the client cannot be built (kubeconfig, in-cluster environment)

    # -- clients

    def api_client(self) -> k8s.ApiClient:
        """The API client; raises DatastoreUnavailable naming the kubeconfig (or the in-cluster setup) if unusable."""
        if self._api is None:
            cfg = k8s.Configuration()
            try:
                if self.kubeconfig:
                    if not os.path.exists(self.kubeconfig):
                        raise DatastoreUnavailable(f"kubeconfig {self.kubeconfig} does not exist")
                    k8s_config.load_kube_config(config_file=self.kubeconfig, client_configuration=cfg)
                else:
                    # Re-reads the projected ServiceAccount token when it rotates.
                    k8s_config.load_incluster_config(client_configuration=cfg)
            except DatastoreUnavailable:
                raise
            except Exception as exc:  # ConfigException, OSError, yaml errors: all say the same to the operator
                where = f"kubeconfig {self.kubeconfig}" if self.kubeconfig else "in-cluster configuration"
                raise DatastoreUnavailable(f"{where} is unusable: {exc}") from exc
            cfg.connection_pool_maxsize = 16
            cfg.retries = 0  # we retry ourselves, with backoff
            self._api = k8s.ApiClient(cfg)
        return self._api

    def kinds(self) -> list[KindSpec]:
        api = self.api_client()
        core = k8s.CoreV1Api(api)
        net = k8s.NetworkingV1Api(api)
        custom = k8s.CustomObjectsApi(api)

        def crd(plural: str) -> Callable[..., Any]:
            return lambda **kw: custom.list_cluster_custom_object(GROUP, VERSION, plural, **kw)

        ns = self.namespace
        node_list: Callable[..., Any] = core.list_node
        if not self.all_nodes:
            selector = f"metadata.name={self.node_name}"
            node_list = lambda **kw: core.list_node(field_selector=selector, **kw)  # noqa: E731
        return [
            KindSpec("Node", node_list, trim_node),
            KindSpec("Namespace", core.list_namespace, trim_namespace),
            KindSpec("Pod", core.list_pod_for_all_namespaces, trim_pod),
            KindSpec("NetworkPolicy", net.list_network_policy_for_all_namespaces, trim_network_policy),
            KindSpec("BGPPeer", crd("bgppeers"), _trim_custom("BGPPeer"), optional=True),
            KindSpec("BGPConfiguration", crd("bgpconfigurations"), _trim_custom("BGPConfiguration"), optional=True),
            KindSpec("Secret", lambda **kw: core.list_namespaced_secret(ns, **kw), trim_secret),
            KindSpec("Service", core.list_service_for_all_namespaces, trim_service),
            KindSpec("EndpointSlice", k8s.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces,
                     trim_endpoint_slice),
        ]

    # -- run

    async def _specs(self) -> list[KindSpec]:
        """The kinds to watch, once the API client can be built; until then log, report and retry."""
        backoff = Backoff(base=self.backoff_initial, cap=self.backoff_max)
        while True:
            try:
                specs = await asyncio.to_thread(self.kinds)
            except DatastoreUnavailable as exc:
                self.start_error = str(exc)
                log.error("kube datastore cannot start: %s (retrying with backoff)", exc)
                await backoff.sleep()
                continue
            if self.start_error:
                log.info("kube datastore: API client ready (%s)", self.kubeconfig or "in-cluster")
            self.start_error = ""
            return specs

    async def run(self, sink: EventSink, synced: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, list[Event], bool]] = asyncio.Queue()

        def emit(kind: str, events: list[Event], listed: bool) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed while a thread was finishing
                loop.call_soon_threadsafe(queue.put_nowait, (kind, events, listed))

        specs = await self._specs()
        previous = self._watchers  # a run after a crash: keep the views, so the relist emits what changed
        self._watchers = {
            s.kind: _Watcher(self, s, emit, previous[s.kind].view if s.kind in previous else None) for s in specs
        }
        for w in self._watchers.values():
            w.start()
        listed: set[str] = set()
        pending: list[Event] = []  # held back until every kind has its first listing
        try:
            while True:
                kind, events, was_listing = await queue.get()
                batch = list(events)
                if was_listing:
                    listed.add(kind)
                deadline = loop.time() + self.batch_window
                while (timeout := deadline - loop.time()) > 0:
                    try:
                        kind, events, was_listing = await asyncio.wait_for(queue.get(), timeout)
                    except TimeoutError:
                        break
                    batch.extend(events)
                    if was_listing:
                        listed.add(kind)
                if not synced.is_set():
                    pending.extend(batch)
                    if listed >= set(self._watchers):
                        order = {k: i for i, k in enumerate(self._watchers)}
                        pending.sort(key=lambda e: order[e.kind])  # Namespaces before Pods, etc.
                        if pending:
                            await sink(pending)
                        pending = []
                        synced.set()
                        log.info("kube datastore synced (%s)", ", ".join(sorted(listed)))
                elif batch:
                    await sink(batch)
        finally:
            self.close()

    def close(self) -> None:
        for w in self._watchers.values():
            w.stop.set()
            w.interrupt()

    def errors(self) -> dict[str, str]:
        out = {kind: w.last_error for kind, w in self._watchers.items() if w.last_error}
        if self.start_error:
            out["kubeconfig" if self.kubeconfig else "in-cluster"] = self.start_error
        return out

    def state(self, kind: str) -> dict[str, dict[str, Any]]:
        """A copy of one kind's current view (for tests and debugging)."""
        w = self._watchers.get(kind)
        return w.snapshot() if w else {}

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per kind: objects, resourceVersion, listings done, watch streams opened, watching now."""
        return {
            kind: {
                "objects": len(w.view),
                "resourceVersion": w.resource_version,
                "relists": w.relists,
                "watches": w.watches,
                "watching": w.watching,
            }
            for kind, w in self._watchers.items()
        }

    def interrupt_watch(self, kind: str, resource_version: str | None = None) -> None:
        """Drop one kind's watch connection (tests: optionally resume from a given, e.g. stale, version)."""
        w = self._watchers[kind]
        if resource_version is not None:
            w.resource_version = resource_version
        w.interrupt()

    # -- events

    async def report_event(self, involved: dict[str, str], reason: str, message: str,
                           event_type: str = "Warning") -> None:
        await asyncio.to_thread(self._report_event, involved, reason, message, event_type)

    def _report_event(self, involved: dict[str, str], reason: str, message: str, event_type: str) -> None:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        namespace = involved.get("namespace") or "default"
        body: Any = {  # the client takes a plain dict as well as a V1Event
            "metadata": {"generateName": f"{involved['name']}.", "namespace": namespace},
            "involvedObject": {k: involved[k] for k in ("apiVersion", "kind", "namespace", "name") if involved.get(k)},
            "reason": reason,
            "message": message[:1024],
            "type": event_type,
            "source": {"component": "routed-agent", "host": self.node_name},
            "reportingComponent": "routed.dev/agent",
            "reportingInstance": self.node_name,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        k8s.CoreV1Api(self.api_client()).create_namespaced_event(namespace, body)

    # -- status

    async def write_status(self, node_name: str, status: dict[str, Any]) -> None:
        await asyncio.to_thread(self._write_status, node_name, status)

    def _write_status(self, node_name: str, status: dict[str, Any]) -> None:
        custom = k8s.CustomObjectsApi(self.api_client())
        plural = "routednodestatuses"
        body = dict(status)
        body.setdefault("lastUpdate", dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        # JSON patch "add" on /status replaces the whole status (a merge patch would keep stale keys).
        patch = [{"op": "add", "path": "/status", "value": body}]

        def write() -> None:
            custom.patch_cluster_custom_object_status(
                GROUP, VERSION, plural, node_name, patch, _content_type="application/json-patch+json"
            )

        try:
            write()
            return
        except ApiException as e:
            if e.status != 404:
                raise
        obj = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "RoutedNodeStatus",
            "metadata": {"name": node_name},
            "spec": {"nodeName": node_name},
        }
        try:
            custom.create_cluster_custom_object(GROUP, VERSION, plural, obj)
        except ApiException as e:
            if e.status != 409:
                raise
        write()


class _Watcher:
    """One kind: list, then watch, in a daemon thread."""

    def __init__(
        self, ds: KubeDatastore, spec: KindSpec, emit: Callable[[str, list[Event], bool], None],
        view: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.ds = ds
        self.spec = spec
        self.emit = emit
        self.stop = threading.Event()
        self.view: dict[str, dict[str, Any]] = dict(view or {})
        self.resource_version = ""
        self.need_list = True
        self.listed_once = False
        self.relists = 0  # completed listings (the first one included)
        self.watches = 0  # watch streams opened
        self.watching = False  # a watch stream is open right now
        self.received = 0  # watch events received (bookmarks included)
        self.failures = 0  # consecutive errors; the first is logged (an error before the first listing)
        self.last_error = ""
        self._lock = threading.Lock()
        self._resp: Any = None
        self._thread = threading.Thread(target=self._loop, name=f"kube-watch-{spec.kind}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self.view)

    def interrupt(self) -> None:
        resp = self._resp
        if resp is not None:
            with contextlib.suppress(Exception):
                if hasattr(resp, "shutdown"):
                    resp.shutdown()
                resp.close()

    # -- loop

    def _failed(self, what: str) -> None:
        """Count and report one failed list/watch; the first of a series is logged, as an ERROR while the
        agent has never listed this kind (it cannot start), else as a WARNING (it keeps its last state)."""
        self.failures += 1
        self.last_error = what
        if self.failures == 1:
            level = logging.WARNING if self.listed_once else logging.ERROR
            log.log(level, "%s: %s (keeping the last state, retrying with backoff)", self.spec.kind, what)
        else:
            log.debug("%s: %s (attempt %d)", self.spec.kind, what, self.failures)

    def _loop(self) -> None:
        kind = self.spec.kind
        backoff = Backoff(base=self.ds.backoff_initial, cap=self.ds.backoff_max, jitter=0.5)
        while not self.stop.is_set():
            try:
                if self.need_list:
                    self._relist()
                started, seen = time.monotonic(), self.received
                self._watch()
                if time.monotonic() - started > 1.0 or self.received > seen:
                    backoff.reset()
                    continue
                # A watch that closed at once without any event: do not spin, back off like an error.
            except Gone:
                log.info("%s: resourceVersion %s expired, relisting", kind, self.resource_version)
                self.need_list = True
                continue
            except ApiException as e:
                if e.status == 410:
                    log.info("%s: resourceVersion %s gone (410), relisting", kind, self.resource_version)
                    self.need_list = True
                    continue
                if e.status == 404 and self.spec.optional:
                    self.failures += 1
                    if not self.listed_once:
                        log.warning("%s: not served (CRD missing?); treating as empty, retrying", kind)
                        self.listed_once = True
                        self.emit(kind, [], True)
                else:
                    self._failed(f"API error {e.status} {e.reason}")
            except Exception as e:  # any transport error: keep state, retry
                if self.stop.is_set():
                    break
                self._failed(f"list/watch failed: {e.__class__.__name__}: {str(e)[:200]}")
            if backoff.wait(self.stop):
                break

    def _call(self, **kwargs: Any) -> Any:
        return self.spec.call(_preload_content=False, **kwargs)

    def _relist(self) -> None:
        items: dict[str, dict[str, Any]] = {}
        cont = ""
        while True:
            kw: dict[str, Any] = {"limit": LIST_PAGE, "_request_timeout": self.ds.request_timeout}
            if cont:
                kw["_continue"] = cont
            resp = self._call(**kw)
            try:
                body = orjson.loads(resp.data)
            finally:
                resp.release_conn()
            for raw in body.get("items") or []:
                obj = self.spec.trim(raw)
                items[object_key(self.spec.kind, obj)] = obj
            meta = body.get("metadata") or {}
            cont = meta.get("continue") or ""
            if not cont:
                rv = str(meta.get("resourceVersion") or "")
                break
        with self._lock:
            events = diff_listing(self.spec.kind, self.view, items)
            self.view = items
            self.resource_version = rv
            self.need_list = False
        first = not self.listed_once
        self.listed_once = True
        self.relists += 1
        if events or first:
            self.emit(self.spec.kind, events, first)
        log.debug("%s: listed %d objects at %s (%d changes)", self.spec.kind, len(items), rv, len(events))

    def _watch(self) -> None:
        timeout = self.ds.watch_timeout
        resp = self._call(
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=self.resource_version,
            timeout_seconds=timeout,
            _request_timeout=(10, timeout + 30),
        )
        self._resp = resp
        self.watches += 1
        self.watching = True
        if self.failures:
            log.info("%s: watching again after %d failed attempts", self.spec.kind, self.failures)
            self.failures = 0
            self.last_error = ""
        try:
            for line in _lines(resp):
                if self.stop.is_set():
                    return
                self.received += 1
                self._handle(orjson.loads(line))
        finally:
            self.watching = False
            self._resp = None
            with contextlib.suppress(Exception):
                resp.release_conn()

    def _handle(self, ev: dict[str, Any]) -> None:
        etype = ev.get("type")
        raw = ev.get("object") or {}
        if etype == "ERROR":
            if raw.get("code") == 410:
                raise Gone(raw.get("message", ""))
            raise RuntimeError(f"watch error: {raw.get('code')} {raw.get('message')}")
        rv = str((raw.get("metadata") or {}).get("resourceVersion") or "")
        if etype == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return
        if etype not in ("ADDED", "MODIFIED", "DELETED"):
            return
        obj = self.spec.trim(raw)
        key = object_key(self.spec.kind, obj)
        out: EventType = "ADDED" if etype == "ADDED" else "MODIFIED" if etype == "MODIFIED" else "DELETED"
        with self._lock:
            prev = self.view.get(key)
            if etype == "DELETED":
                if prev is None:
                    self.resource_version = rv or self.resource_version
                    return
                del self.view[key]
            else:
                self.view[key] = obj
                if prev is not None and _same(prev, obj):
                    self.resource_version = rv or self.resource_version
                    return
                out = "ADDED" if prev is None else "MODIFIED"
            if rv:
                self.resource_version = rv
        self.emit(self.spec.kind, [Event(out, self.spec.kind, key, obj)], False)


def _lines(resp: Any) -> Iterator[bytes]:
    """Newline-delimited JSON from a streaming urllib3 response."""
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf

