"""The lab's EndpointSlice controller: one slice per Service with a selector, from the lab's pods, as
kube-controller-manager's EndpointSlice controller writes them (a lab pod is ready once its server listens,
which `pods.create` waits for). Written after every `lab apply` / `lab delete`, only when a slice changed."""

from __future__ import annotations

from typing import Any

from routed.lab.state import LabState

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "routed-lab"


def slice_name(service_key: str) -> str:
    return service_key.split("/", 1)[1] + "-lab"


def _target_port(port: dict[str, Any]) -> int:
    """A numeric targetPort, else the Service port (the lab's pod servers listen on the declared ports)."""
    target = port.get("targetPort")
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        return int(target)
    return int(port["port"])


def desired_slices(state: LabState) -> dict[str, dict[str, Any]]:
    """Service key -> its EndpointSlice."""
    out: dict[str, dict[str, Any]] = {}
    for key, svc in sorted(state.services.items()):
        selector = (svc.get("spec") or {}).get("selector") or {}
        if not selector:
            continue  # no selector: the user manages its endpoints
        namespace = key.split("/", 1)[0]
        members = [p for p in state.pods.values()
                   if p.namespace == namespace and p.ips and all(p.labels.get(k) == v for k, v in selector.items())]
        ports = [{"name": p.get("name", ""), "protocol": p.get("protocol", "TCP"), "port": _target_port(p)}
                 for p in (svc.get("spec") or {}).get("ports") or []]
        out[key] = {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": slice_name(key), "namespace": namespace,
                         "labels": {SERVICE_NAME_LABEL: key.split("/", 1)[1], MANAGED_BY_LABEL: MANAGED_BY}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": p.ips[:1], "nodeName": p.node, "conditions": {"ready": True},
                           "targetRef": {"kind": "Pod", "namespace": p.namespace, "name": p.name}}
                          for p in sorted(members, key=lambda p: p.key)],
            "ports": ports,
        }
    return out


def sync(state: LabState, store: Any) -> list[str]:
    """Write changed slices, delete those of Services that went; returns what was done."""
    done = []
    wanted = desired_slices(state)
    for key, obj in wanted.items():
        if state.endpoint_slices.get(key) != obj:
            store.write(obj)
            state.endpoint_slices[key] = obj
            done.append(f"endpointslice/{obj['metadata']['name']} configured")
    for key in list(state.endpoint_slices):
        if key not in wanted:
            store.delete(state.endpoint_slices.pop(key))
            done.append(f"endpointslice/{slice_name(key)} deleted")
    return done
