"""Where the lab keeps cluster objects: a manifest directory, or a real kube-apiserver.

The lab writes Namespaces, Pods (and their status, as a kubelet would), NetworkPolicies, Nodes and BGP
objects through one interface; the agents read them through the matching datastore.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Protocol

from routed import netns
from routed.datastore.base import NAMESPACED_KINDS
from routed.lab import manifests
from routed.lab.errors import LabError

REPO_ROOT = Path(__file__).resolve().parents[2]
KUBE_TESTENV = REPO_ROOT / "scripts" / "kube-testenv"
DEFAULT_IMAGE = "routed-lab/podserver:1"  # scripts/build-image --pod (the containerd lab runs it)


CUSTOM_RESOURCES = {
    "BGPPeer": "bgppeers.routed.dev",
    "BGPConfiguration": "bgpconfigurations.routed.dev",
    "RoutedNodeStatus": "routednodestatuses.routed.dev",
}


class StoreError(LabError):
    pass


class ClusterStore(Protocol):
    def write(self, obj: dict[str, Any]) -> None: ...
    def read(self, obj: dict[str, Any]) -> dict[str, Any] | None: ...
    def delete(self, obj: dict[str, Any]) -> bool: ...
    def write_status(self, obj: dict[str, Any], status: dict[str, Any]) -> None: ...


class ManifestStore:
    """One YAML file per object in the directory every agent of the lab watches."""

    def __init__(self, cluster_dir: Path) -> None:
        self.cluster_dir = cluster_dir

    def write(self, obj: dict[str, Any]) -> None:
        manifests.write_object(self.cluster_dir, obj)

    def read(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        return manifests.read_object(self.cluster_dir, obj)

    def delete(self, obj: dict[str, Any]) -> bool:
        return manifests.delete_object(self.cluster_dir, obj)

    def write_status(self, obj: dict[str, Any], status: dict[str, Any]) -> None:
        current = self.read(obj) or obj
        manifests.write_object(self.cluster_dir, {**current, "status": status})


def kube_bindir() -> str:
    proc = subprocess.run(["bash", str(KUBE_TESTENV), "bindir"], capture_output=True, text=True, check=True)
    return proc.stdout.strip()


class KubeStore:
    """kubectl against the lab's API server, run inside the control-plane namespace."""

    def __init__(self, ctl_netns: str, kubeconfig: str) -> None:
        self.ctl_netns = ctl_netns
        self.kubeconfig = kubeconfig
        self.kubectl_path = str(Path(kube_bindir()) / "kubectl")

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = netns.ns_cmd(self.ctl_netns, [self.kubectl_path, "--kubeconfig", self.kubeconfig, *args])
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise StoreError(f"kubectl {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    @staticmethod
    def _ref(obj: dict[str, Any]) -> list[str]:
        meta = obj["metadata"]
        kind = CUSTOM_RESOURCES.get(obj["kind"], obj["kind"].lower())
        ref = [kind, meta["name"]]
        if obj["kind"] in NAMESPACED_KINDS:
            ref += ["-n", meta.get("namespace") or "default"]
        return ref

    def write(self, obj: dict[str, Any]) -> None:
        body = json.loads(json.dumps(obj))
        body.pop("status", None)
        if body["kind"] == "Pod":
            for container in (body.get("spec") or {}).get("containers") or []:
                container.setdefault("image", DEFAULT_IMAGE)
        self.kubectl("apply", "-f", "-", stdin=json.dumps(body))
        if obj["kind"] in ("Node", "Service") and obj.get("status"):
            self.write_status(obj, obj["status"])  # a LoadBalancer's IP lives in status, as a controller sets it

    def read(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        proc = self.kubectl("get", *self._ref(obj), "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def delete(self, obj: dict[str, Any]) -> bool:
        extra = ["--grace-period=0", "--force"] if obj["kind"] == "Pod" else []
        proc = self.kubectl("delete", *self._ref(obj), "--ignore-not-found", "--wait=false", *extra, check=False)
        return proc.returncode == 0 and bool(proc.stdout.strip())

    def write_status(self, obj: dict[str, Any], status: dict[str, Any]) -> None:
        self.kubectl("patch", *self._ref(obj), "--subresource=status", "--type=merge", "-p",
                     json.dumps({"status": status}))
