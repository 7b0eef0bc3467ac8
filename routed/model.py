"""Typed cluster objects as the agent keeps them: only the fields the agent needs.

Pure data, no I/O. Built from Kubernetes-shaped dicts (manifest files or the API) by `from_k8s`.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)
Labels = dict[str, str]


def _valid_ips(ips: list[str], pod: str) -> list[str]:
    """The pod's addresses that are IP addresses, in canonical form (an invalid status.podIPs entry is left
    out with a warning, so it can never break the policy dataplane of every other pod)."""
    out = []
    for ip in ips:
        try:
            out.append(str(ipaddress.ip_address(str(ip).strip())))
        except ValueError:
            log.warning("pod %s: status.podIPs entry %r is not an IP address; ignored", pod, ip)
    return out


@dataclass(frozen=True)
class ContainerPort:
    port: int
    protocol: str = "TCP"  # TCP | UDP | SCTP
    name: str = ""


@dataclass(frozen=True)
class Node:
    name: str
    labels: Labels = field(default_factory=dict)
    pod_cidrs: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()  # InternalIP addresses

    @classmethod
    def from_k8s(cls, obj: dict[str, Any]) -> Node:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        cidrs = list(spec.get("podCIDRs") or [])
        if not cidrs and spec.get("podCIDR"):
            cidrs = [spec["podCIDR"]]
        addrs = [
            a.get("address", "")
            for a in ((obj.get("status") or {}).get("addresses") or [])
            if a.get("type") == "InternalIP"
        ]
        return cls(
            name=meta.get("name", ""),
            labels=dict(meta.get("labels") or {}),
            pod_cidrs=tuple(cidrs),
            addresses=tuple(a for a in addrs if a),
        )


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Labels = field(default_factory=dict)

    @classmethod
    def from_k8s(cls, obj: dict[str, Any]) -> Namespace:
        meta = obj.get("metadata") or {}
        name = meta.get("name", "")
        labels = dict(meta.get("labels") or {})
        # The API server sets this label on every namespace (since 1.21); policies rely on it.
        labels.setdefault("kubernetes.io/metadata.name", name)
        return cls(name=name, labels=labels)


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: Labels = field(default_factory=dict)
    node_name: str = ""
    ips: tuple[str, ...] = ()  # status.podIPs
    ports: tuple[ContainerPort, ...] = ()
    host_network: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @functools.cached_property
    def ipv4(self) -> tuple[str, ...]:
        """The IPv4 addresses (computed once per object: the policy calculation asks for them often)."""
        return tuple(ip for ip in self.ips if ":" not in ip)

    @classmethod
    def from_k8s(cls, obj: dict[str, Any]) -> Pod:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        ports: list[ContainerPort] = []
        for container in spec.get("containers") or []:
            for p in container.get("ports") or []:
                if "containerPort" not in p:
                    continue
                ports.append(
                    ContainerPort(
                        port=int(p["containerPort"]),
                        protocol=str(p.get("protocol") or "TCP").upper(),
                        name=str(p.get("name") or ""),
                    )
                )
        ips = [i.get("ip", "") for i in status.get("podIPs") or [] if i.get("ip")]
        if not ips and status.get("podIP"):
            ips = [status["podIP"]]
        ips = _valid_ips(ips, f"{meta.get('namespace') or 'default'}/{meta.get('name', '')}")
        return cls(
            namespace=meta.get("namespace") or "default",
            name=meta.get("name", ""),
            labels=dict(meta.get("labels") or {}),
            node_name=spec.get("nodeName") or "",
            ips=tuple(ips),
            ports=tuple(ports),
            host_network=bool(spec.get("hostNetwork")),
        )


@dataclass(frozen=True)
class Endpoint:
    """A pod interface wired on this node (what the CNI ADD created)."""

    container_id: str
    ifname: str
    netns: str
    host_ifname: str
    ips: tuple[str, ...]
    pod_namespace: str = ""
    pod_name: str = ""

    @property
    def pod_key(self) -> str:
        return f"{self.pod_namespace}/{self.pod_name}"
