"""The upstream Kubernetes NetworkPolicy e2e model, built in the lab.

Namespaces x, y, z (label ns=<name>); pods a, b, c in each (label pod=<name>), each serving TCP and UDP
on ports 80 and 81 with named ports serve-<port>-<proto>. Expectations are written from the API's rules,
case by case (as upstream's Reachability tables), never computed by our own code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import yaml

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
PORTS = (80, 81)
PROTOCOLS = ("TCP", "UDP")
# spread across two nodes so same-node and cross-node pairs are both covered
PLACEMENT = {"x/a": "node1", "x/b": "node2", "x/c": "node1", "y/a": "node2", "y/b": "node1", "y/c": "node2",
             "z/a": "node1", "z/b": "node2", "z/c": "node1"}


def model_manifest() -> str:
    docs: list[dict[str, Any]] = []
    for ns in NAMESPACES:
        docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"ns": ns}}})
    for ns in NAMESPACES:
        for pod in POD_NAMES:
            ports = [
                {"name": f"serve-{port}-{proto.lower()}", "containerPort": port, "protocol": proto}
                for port in PORTS for proto in PROTOCOLS
            ]
            docs.append({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": ns, "labels": {"pod": pod}},
                "spec": {"nodeName": PLACEMENT[f"{ns}/{pod}"],
                         "containers": [{"name": "cont", "image": "agnhost", "ports": ports}]},
            })
    return yaml.safe_dump_all(docs)


def all_pods() -> list[str]:
    return [f"{ns}/{pod}" for ns in NAMESPACES for pod in POD_NAMES]


Key = tuple[str, str, int, str]  # from, to, port, protocol
Selector = Callable[[str], bool]


def pods_where(ns: str | None = None, pod: str | None = None) -> Selector:
    def match(key: str) -> bool:
        kns, kpod = key.split("/")
        return (ns is None or kns == ns) and (pod is None or kpod == pod)

    return match


ANY: Selector = pods_where()


@dataclass
class Reachability:
    """Expected truth table: start all-allowed (or all-denied) and carve out, like upstream's Reachability."""

    table: dict[Key, bool]

    @classmethod
    def all(cls, allowed: bool = True) -> Reachability:
        return cls({(f, t, port, proto): allowed for f in all_pods() for t in all_pods()
                    for port in PORTS for proto in PROTOCOLS})

    def set(self, src: Selector, dst: Selector, allowed: bool, ports: Iterable[int] = PORTS,
            protocols: Iterable[str] = PROTOCOLS) -> Reachability:
        ports, protocols = tuple(ports), tuple(protocols)
        for (f, t, port, proto) in self.table:
            if src(f) and dst(t) and port in ports and proto in protocols:
                self.table[(f, t, port, proto)] = allowed
        return self

    def allow_loopback(self) -> Reachability:
        for (f, t, port, proto) in self.table:
            if f == t:
                self.table[(f, t, port, proto)] = True
        return self


def observed(rows: list[dict[str, Any]]) -> dict[Key, bool]:
    return {(r["from"], r["to"], r["port"], r["protocol"]): bool(r["allowed"]) for r in rows}


def diff(expected: dict[Key, bool], seen: dict[Key, bool]) -> list[str]:
    return [
        f"{k[0]} -> {k[1]} {k[3]}/{k[2]}: expected {'allowed' if v else 'denied'}, saw "
        f"{'allowed' if seen.get(k) else 'denied' if k in seen else 'nothing'}"
        for k, v in sorted(expected.items()) if seen.get(k) != v
    ]


def policy(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}
