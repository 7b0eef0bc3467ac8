"""Cluster cache: the last known state of every watched object, fed by datastore events.

Consumers read typed views and subscribe to changes; listeners run after each batch with the kinds that changed
and the events that changed something (an event repeating what the cache holds is dropped). A listener that
raises is logged and counted (`listener_failures`), its `on_failure` is called (the subscriber's "I may have
missed part of this batch": rebuild from the cache), and the other listeners still get the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from routed.datastore.base import KINDS, Event
from routed.model import Namespace, Node, Pod

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class CacheChange:
    kinds: frozenset[str]
    events: list[Event]  # the effective ones, in order (DELETED carries the object's last state)


Listener = Callable[[CacheChange], Awaitable[None]]
FailureHook = Callable[[], None]


def _parsed(kind: str, objects: dict[str, dict[str, Any]], build: Callable[[dict[str, Any]], Any]) -> Iterator[Any]:
    """The typed objects of one kind; one that does not parse is left out (and named), the others stay."""
    for key, obj in objects.items():
        try:
            yield build(obj)
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            log.warning("invalid %s %s left out: %s", kind, key, exc)


class ClusterCache:
    def __init__(self) -> None:
        self._objects: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in KINDS}
        self._listeners: list[tuple[Listener, FailureHook | None]] = []
        self.listener_failures = 0
        self._typed: dict[str, list[Any]] = {}  # typed views per kind, rebuilt only after that kind changed

    def subscribe(self, listener: Listener, on_failure: FailureHook | None = None) -> None:
        self._listeners.append((listener, on_failure))

    async def apply(self, events: list[Event]) -> None:
        effective: list[Event] = []
        for event in events:
            store = self._objects.setdefault(event.kind, {})
            if event.type == "DELETED":
                if store.pop(event.key, None) is not None:
                    effective.append(event)
            elif store.get(event.key) != event.obj:
                store[event.key] = event.obj
                effective.append(event)
        if not effective:
            return
        change = CacheChange(frozenset(e.kind for e in effective), effective)
        for kind in change.kinds:
            self._typed.pop(kind, None)
        for listener, on_failure in self._listeners:
            try:
                await listener(change)
            except Exception:
                self.listener_failures += 1
                log.exception("cache listener %s failed on a batch of %s", getattr(listener, "__qualname__", listener),
                              ", ".join(sorted(change.kinds)))
                if on_failure is not None:
                    on_failure()

    def raw(self, kind: str) -> list[dict[str, Any]]:
        return list(self._objects.get(kind, {}).values())

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        return self._objects.get(kind, {}).get(key)

    def node(self, name: str) -> Node | None:
        obj = self.get("Node", name)
        return Node.from_k8s(obj) if obj else None

    def _view(self, kind: str, build: Callable[[dict[str, Any]], Any]) -> list[Any]:
        view = self._typed.get(kind)
        if view is None:
            view = self._typed[kind] = list(_parsed(kind, self._objects.get(kind, {}), build))
        return list(view)  # the objects are frozen; the list is the caller's

    def nodes(self) -> list[Node]:
        return self._view("Node", Node.from_k8s)

    def namespaces(self) -> list[Namespace]:
        return self._view("Namespace", Namespace.from_k8s)

    def pods(self) -> list[Pod]:
        return self._view("Pod", Pod.from_k8s)

    def pod(self, namespace: str, name: str) -> Pod | None:
        obj = self.get("Pod", f"{namespace}/{name}")
        return Pod.from_k8s(obj) if obj else None

    def secrets(self) -> dict[str, dict[str, Any]]:
        return dict(self._objects.get("Secret", {}))

    def counts(self) -> dict[str, int]:
        return {kind: len(objs) for kind, objs in self._objects.items()}
