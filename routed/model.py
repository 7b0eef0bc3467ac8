"""Typed cluster objects as the agent keeps them: only the fields the agent needs.

Pure data, no I/O. Built from Kubernetes-shaped dicts (manifest files or the API) by `from_k8s`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from routed import validation

log = logging.getLogger(__name__)
Labels = dict[str, str]
_WARNED_MAX = 4096
_warned: set[str] = set()  # warnings already logged (the typed views are rebuilt on every change of a kind)


def _warn_once(message: str) -> None:
    if message in _warned:
        return
    if len(_warned) >= _WARNED_MAX:
        _warned.clear()
    _warned.add(message)
    log.warning("%s", message)


def _valid(values: list[Any], parse: Callable[[object, str], str], what: Callable[[], str],
           problems: list[str] | None = None) -> list[str]:
    """The values that pass routed/validation.py, canonical; an invalid one is left out with a warning (and
    named in `problems`), so it can never break the kernel state, BGP or policy of anything else."""
    def refused(message: str) -> None:
        _warn_once(f"{message}; ignored")
        if problems is not None:
            problems.append(f"{message}; ignored")
    return validation.kept(values, parse, lambda i: f"{what()}[{i}]", refused)


def _mapping(value: Any) -> dict[str, Any]:
    """A field that should be a mapping; anything else (a malformed manifest) counts as empty."""
    return value if isinstance(value, dict) else {}


def _sequence(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _valid_ips(ips: list[Any], pod: str) -> list[str]:
    """The pod's addresses that are IP addresses, in canonical form (an invalid status.podIPs entry is left
    out with a warning, so it can never break the policy dataplane of every other pod)."""
    return _valid(ips, validation.parse_ip, lambda: f"pod {validation.display_name(pod)}: status.podIPs")


def _valid_ports(spec: dict[str, Any], pod: str) -> list[ContainerPort]:
    """The pod's container ports as kube-apiserver would accept them (port 1..65535, TCP/UDP/SCTP, an
    IANA service name or none); an invalid one is left out with a warning naming the pod, the others kept."""
    ports: list[ContainerPort] = []
    containers = spec.get("containers") if isinstance(spec, dict) else None
    for c, container in enumerate(containers if isinstance(containers, list) else []):
        entries = container.get("ports") if isinstance(container, dict) else None
        for i, p in enumerate(entries if isinstance(entries, list) else []):
            if not isinstance(p, dict) or "containerPort" not in p:
                continue
            what = f"pod {validation.display_name(pod)}: spec.containers[{c}].ports[{i}]"
            try:
                name = p.get("name") or ""
                if name:
                    validation.check_port_name(name, what + ".name")
                ports.append(ContainerPort(port=validation.parse_port(p["containerPort"], what + ".containerPort"),
                                           protocol=validation.parse_protocol(p.get("protocol"), what + ".protocol"),
                                           name=name))
            except validation.InvalidValue as exc:
                log.warning("%s; left out", exc)
    return ports


@dataclass(frozen=True)
class ContainerPort:
    port: int
    protocol: str = "TCP"  # TCP | UDP | SCTP
    name: str = ""


@dataclass(frozen=True)
class Node:
    name: str
    labels: Labels = field(default_factory=dict)
    pod_cidrs: tuple[str, ...] = ()  # canonical networks
    addresses: tuple[str, ...] = ()  # InternalIP addresses, canonical
    problems: tuple[str, ...] = ()  # what from_k8s left out (an invalid address or pod CIDR), for reports

    @classmethod
    def from_k8s(cls, obj: dict[str, Any]) -> Node:
        """Addresses and pod CIDRs pass routed/validation.py: an invalid one is dropped with a warning (and
        named in `problems`), the others are kept. kube-apiserver does not validate `status.addresses` (any
        kubelet writes its own), the manifest datastore validates nothing."""
        meta = _mapping(obj.get("metadata"))
        spec = _mapping(obj.get("spec"))
        name = str(meta.get("name", ""))
        where = f"Node {validation.display_name(name)}"  # once per Node, not per pod: cheap enough
        cidrs = _sequence(spec.get("podCIDRs"))
        if not cidrs and spec.get("podCIDR"):
            cidrs = [spec["podCIDR"]]
        addrs = [
            a.get("address", "")
            for a in _sequence(_mapping(obj.get("status")).get("addresses"))
            if isinstance(a, dict) and a.get("type") == "InternalIP"
        ]
        problems: list[str] = []
        return cls(
            name=name,
            labels={k: v for k, v in _mapping(meta.get("labels")).items() if isinstance(k, str) and isinstance(v, str)},
            pod_cidrs=tuple(_valid(cidrs, validation.parse_cidr, lambda: f"{where}: spec.podCIDRs", problems)),
            addresses=tuple(_valid([a for a in addrs if a], validation.parse_ip,
                                   lambda: f"{where}: InternalIP address", problems)),
            problems=tuple(problems),
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
        ports = _valid_ports(spec, f"{meta.get('namespace') or 'default'}/{meta.get('name', '')}")
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
