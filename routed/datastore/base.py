"""The one datastore interface: typed events for the kinds the agent reads, from any backend."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from routed.errors import Code, RoutedError

# Kinds the agent watches. Secrets are read only from the agent's own namespace (BGP passwords);
# Services and EndpointSlices for Service VIP advertisement.
KINDS: tuple[str, ...] = (
    "Node",
    "Namespace",
    "Pod",
    "NetworkPolicy",
    "BGPPeer",
    "BGPConfiguration",
    "Secret",
    "Service",
    "EndpointSlice",
)
NAMESPACED_KINDS: frozenset[str] = frozenset({"Pod", "NetworkPolicy", "Secret", "Service", "EndpointSlice"})

EventType = Literal["ADDED", "MODIFIED", "DELETED"]


class DatastoreUnavailable(RoutedError):
    """The datastore's source cannot be used: a kubeconfig, the API server, the manifest directory."""

    code = Code.DATASTORE_UNAVAILABLE


def object_key(kind: str, obj: dict[str, Any]) -> str:
    """`namespace/name` for namespaced kinds, `name` otherwise."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name") or "")
    if kind in NAMESPACED_KINDS:
        return f"{meta.get('namespace') or 'default'}/{name}"
    return name


@dataclass(frozen=True)
class Event:
    type: EventType
    kind: str
    key: str
    obj: dict[str, Any]  # the full object (for DELETED: its last known state)


EventSink = Callable[[list[Event]], Awaitable[None]]


class Datastore(abc.ABC):
    """A backend lists every kind, then watches; it hands batches of events to `sink`.

    `run` sets `synced` once the first complete listing of every kind has been delivered, and then keeps
    delivering changes until cancelled. When the source is unusable (a kubeconfig that does not exist, an API
    server that does not answer, a manifest directory that cannot be read) it logs an ERROR at once, reports the
    cause in `errors()`, and keeps retrying with backoff, delivering nothing, so consumers keep their last known
    state. `run` may be called again on the same instance after it crashed: it resumes from what it delivered.
    """

    kind: str = ""

    @abc.abstractmethod
    async def run(self, sink: EventSink, synced: asyncio.Event) -> None: ...

    def errors(self) -> dict[str, str]:
        """What is failing right now: source (a kind, a file, "kubeconfig", "directory") -> the last error."""
        return {}

    def refresh_soon(self) -> None:  # noqa: B027
        """Ask for fresh data now (a CNI ADD names a pod the cache has not seen yet); a hint only."""

    def resync(self) -> None:
        """The periodic resync: re-read everything the backend can cheaply re-read (default: refresh_soon)."""
        self.refresh_soon()

    async def write_status(self, node_name: str, status: dict[str, Any]) -> None:  # noqa: B027
        """Publish this node's status object (sessions, advertised prefixes). Optional per backend."""

    async def report_event(self, involved: dict[str, str], reason: str, message: str,  # noqa: B027
                           event_type: str = "Warning") -> None:
        """Tell the object's owners something (`kubectl describe` shows it). `involved`: apiVersion, kind,
        namespace, name. Optional per backend; the manifest directory has nowhere to put it."""
