"""The datastore component: runs the configured backend under the supervisor and feeds the cluster cache.

Restart policy: restart (a backend that crashes resumes from what it delivered, so nothing is missed).
Before the first sync the agent is not ready and the cause is shown (bad kubeconfig, API server unreachable,
manifest directory unreadable); after it, an outage is shown in status while the last known state is kept.
"""

from __future__ import annotations

import asyncio
import logging

from routed import metrics
from routed.api_types import DatastoreStatus
from routed.cache import ClusterCache
from routed.component import ApiHandler
from routed.config import AgentConfig
from routed.datastore.base import Datastore
from routed.supervisor import Liveness, Supervisor

log = logging.getLogger(__name__)


def make_datastore(config: AgentConfig) -> Datastore:
    if config.datastore == "kube":
        from routed.datastore.kube import KubeDatastore

        return KubeDatastore(kubeconfig=config.kubeconfig, namespace=config.kube_namespace, node_name=config.node_name)
    from routed.datastore.manifest import ManifestDatastore

    return ManifestDatastore(config.manifest_dir)


class DatastoreComponent:
    name = "datastore"

    def __init__(self, backend: Datastore, cache: ClusterCache, supervisor: Supervisor) -> None:
        self.backend = backend
        self.cache = cache
        self.supervisor = supervisor
        self.synced = asyncio.Event()

    async def start(self) -> None:
        self.supervisor.spawn("datastore", self._run, required=True)

    async def _run(self, liveness: Liveness) -> None:
        await self.backend.run(self.cache.apply, self.synced)

    async def stop(self) -> None:
        await self.supervisor.stop_task("datastore")

    def error(self) -> str:
        return "; ".join(f"{source}: {why}" for source, why in sorted(self.backend.errors().items()))

    def ready(self) -> tuple[bool, str]:
        if self.synced.is_set():
            return True, "synced"
        error = self.error()
        return False, f"waiting for the datastore's first sync: {error}" if error else "waiting for the first sync"

    def status(self) -> DatastoreStatus:
        ready, _ = self.ready()
        metrics.DATASTORE_SYNCED.set(1 if self.synced.is_set() else 0)
        return DatastoreStatus(kind=self.backend.kind, ready=ready, synced=self.synced.is_set(), error=self.error(),
                               errors=self.backend.errors(), objects=self.cache.counts())

    def api_methods(self) -> dict[str, ApiHandler]:
        return {}

    def resync(self) -> None:
        self.backend.resync()
