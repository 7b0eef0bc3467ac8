"""The status publisher: writes this node's RoutedNodeStatus (readiness, endpoints, BGP sessions, what was
actually advertised) through the datastore whenever it changes, checking every `interval` seconds.

Restart policy: restart, not required (a status object that cannot be written never stops the node).
A failed write (API server down) is logged once and retried with backoff until it goes through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from routed.backoff import Backoff
from routed.component import ApiHandler
from routed.datastore.base import Datastore
from routed.supervisor import Liveness, Supervisor

log = logging.getLogger(__name__)

StatusSource = Callable[[], dict[str, Any]]


class StatusPublisher:
    name = "status"

    def __init__(self, node_name: str, datastore: Datastore, source: StatusSource, supervisor: Supervisor,
                 interval: float = 10.0) -> None:
        self.node_name = node_name
        self.datastore = datastore
        self.source = source
        self.supervisor = supervisor
        self.interval = interval
        self.published: dict[str, Any] | None = None
        self.last_error = ""
        self._changed = asyncio.Event()

    async def start(self) -> None:
        self.supervisor.spawn("status", self._run, required=False)

    async def stop(self) -> None:
        await self.supervisor.stop_task("status")

    async def _run(self, liveness: Liveness) -> None:
        backoff = Backoff(base=1.0, cap=60.0)
        while True:
            status = self.source()
            if status != self.published:
                try:
                    with liveness.busy("writing the node status"):
                        await self.datastore.write_status(self.node_name, status)
                except Exception as exc:  # the API may be down: keep trying
                    if not self.last_error:
                        log.warning("could not publish the node status (retrying with backoff): %s", exc)
                    self.last_error = str(exc)
                    await backoff.sleep(self._changed)
                    continue
                self.published, self.last_error = status, ""
                backoff.reset()
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), self.interval)
            except TimeoutError:
                pass

    def resync(self) -> None:
        self.published = None  # write it again even if unchanged: someone may have deleted it
        self._changed.set()

    def ready(self) -> tuple[bool, str]:
        return True, self.last_error or "ok"

    def status(self) -> dict[str, Any]:
        return {"published": self.published is not None, "lastError": self.last_error}

    def api_methods(self) -> dict[str, ApiHandler]:
        return {}
