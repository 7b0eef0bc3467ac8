"""Persisted endpoints: one JSON file per attachment under `<state_dir>/endpoints/`, written atomically.

The agent keeps the same data in memory; the files let a restarted agent know which veths and routes are in use.
Each file is named `<attachment_key>.json` (cni/names.py); a file of an older agent under another name (the
ambiguous `<containerId>_<ifname>.json`) is renamed on load, so a later DEL removes it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

from cni.names import attachment_key
from routed.api_types import EndpointRecord
from routed.model import Endpoint

log = logging.getLogger(__name__)


def endpoint_to_dict(ep: Endpoint) -> EndpointRecord:
    return EndpointRecord(containerId=ep.container_id, ifname=ep.ifname, netns=ep.netns, hostIfname=ep.host_ifname,
                          ips=list(ep.ips), podNamespace=ep.pod_namespace, podName=ep.pod_name)


def endpoint_from_dict(d: dict[str, Any]) -> Endpoint:
    return Endpoint(
        container_id=str(d["containerId"]),
        ifname=str(d["ifname"]),
        netns=str(d.get("netns", "")),
        host_ifname=str(d["hostIfname"]),
        ips=tuple(str(ip) for ip in d.get("ips", [])),
        pod_namespace=str(d.get("podNamespace", "")),
        pod_name=str(d.get("podName", "")),
    )


class EndpointStore:
    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, "endpoints")
        self._lock = threading.Lock()
        self._eps: dict[str, Endpoint] = {}

    def load(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        eps: dict[str, Endpoint] = {}
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            if name.endswith(".tmp"):
                os.unlink(path)
                continue
            if not name.endswith(".json"):
                continue
            try:
                with open(path) as f:
                    ep = endpoint_from_dict(json.load(f))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("ignoring unreadable endpoint file %s: %s", path, exc)
                continue
            key = attachment_key(ep.container_id, ep.ifname)
            if self._migrate(path, key):
                eps[key] = ep
        with self._lock:
            self._eps = eps
        log.info("loaded %d persisted endpoints", len(eps))

    def _migrate(self, path: str, key: str) -> bool:
        """Rename a file of an older naming scheme to its key's name; False if a file there supersedes it (it is
        newer: written by this scheme) and this one was removed."""
        wanted = self._path(key)
        if path == wanted:
            return True
        if os.path.exists(wanted):
            log.info("removing endpoint file %s: %s supersedes it", path, wanted)
            os.unlink(path)
            return False
        log.info("renaming endpoint file %s to %s", path, wanted)
        os.replace(path, wanted)
        return True

    def _path(self, key: str) -> str:
        return os.path.join(self.dir, key + ".json")

    def get(self, container_id: str, ifname: str) -> Endpoint | None:
        with self._lock:
            return self._eps.get(attachment_key(container_id, ifname))

    def all(self) -> list[Endpoint]:
        with self._lock:
            return list(self._eps.values())

    def put(self, ep: Endpoint) -> None:
        key = attachment_key(ep.container_id, ep.ifname)
        path = self._path(key)
        tmp = f"{path}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            json.dump(endpoint_to_dict(ep), f)
        os.replace(tmp, path)
        with self._lock:
            self._eps[key] = ep

    def remove(self, container_id: str, ifname: str) -> None:
        key = attachment_key(container_id, ifname)
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        with self._lock:
            self._eps.pop(key, None)
