"""Small pod manifests for lab tests."""

from __future__ import annotations

import yaml


def one_pod_per_node(nodes: int, namespace: str = "t", ports: tuple[int, ...] = (80,)) -> str:
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}]
    for i in range(1, nodes + 1):
        docs.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"p{i}", "namespace": namespace, "labels": {"app": "p"}},
            "spec": {"nodeName": f"node{i}", "containers": [
                {"name": "c", "ports": [{"containerPort": p, "protocol": proto} for p in ports for proto in ("TCP", "UDP")]}
            ]},
        })
    return yaml.safe_dump_all(docs)
