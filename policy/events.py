"""Invalid NetworkPolicies become Kubernetes Warning Events (`kubectl describe networkpolicy` shows them).

One Event per invalid policy and per change of its reasons, sent only by nodes that have pods in its namespace
(those are where it fails closed). Events are posted by a supervised loop (`run`), so a slow or unreachable API
server never holds up a policy apply; a post that fails is retried with the next report.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from routed.api_types import InvalidPolicy
from routed.supervisor import Liveness

log = logging.getLogger(__name__)

REASON = "InvalidNetworkPolicy"
# (involved object, reason, message) -> posted
EventPoster = Callable[[dict[str, str], str, str], Awaitable[None]]


class InvalidPolicyEvents:
    def __init__(self, node_name: str, post: EventPoster) -> None:
        self.node_name = node_name
        self.post = post
        self._reported: dict[str, str] = {}  # policy key -> reasons already posted
        self._queue: asyncio.Queue[tuple[str, str, dict[str, str], str]] = asyncio.Queue()

    def report(self, invalid: Iterable[InvalidPolicy], local_namespaces: set[str]) -> None:
        """Queue an Event for each invalid policy not reported yet with these reasons; forget fixed ones."""
        current: dict[str, InvalidPolicy] = {item["policy"]: item for item in invalid}
        for key, item in current.items():
            reasons = "; ".join(item["reasons"])
            namespace, _, name = key.partition("/")
            if self._reported.get(key) == reasons or namespace not in local_namespaces:
                continue
            closed = ", ".join(item["failClosed"]) or "nothing"
            message = f"{reasons}. Pods it selects on node {self.node_name} fail closed for: {closed}."
            involved = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "namespace": namespace,
                        "name": name}
            self._reported[key] = reasons
            self._queue.put_nowait((key, reasons, involved, message))
        for key in set(self._reported) - set(current):
            del self._reported[key]

    async def run(self, liveness: Liveness) -> None:
        while True:
            key, reasons, involved, message = await self._queue.get()
            try:
                with liveness.busy(f"posting an event for {key}"):
                    await self.post(involved, REASON, message)
            except Exception as exc:
                log.warning("could not report invalid policy %s as an event (will retry): %s", key, exc)
                if self._reported.get(key) == reasons:
                    del self._reported[key]  # the next report queues it again
