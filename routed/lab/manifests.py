"""Kubernetes YAML for the lab: read apply/delete files, and keep the lab's manifest datastore directory.

One file per object under `<cluster_dir>/<Kind>/<namespace>_<name>.yaml`, written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from routed.datastore.base import KINDS, NAMESPACED_KINDS

SUPPORTED_KINDS = frozenset(KINDS)


def load_objects(path: str) -> list[dict[str, Any]]:
    """Objects from a YAML file (multi-document, List) or every YAML file of a directory, in order."""
    files = (
        sorted(str(p) for p in Path(path).iterdir() if p.suffix in (".yaml", ".yml"))
        if os.path.isdir(path)
        else [path]
    )
    objects: list[dict[str, Any]] = []
    for file in files:
        for doc in yaml.safe_load_all(Path(file).read_text()):
            if not doc:
                continue
            items = doc.get("items", []) if doc.get("kind") == "List" else [doc]
            for obj in items:
                kind = obj.get("kind")
                if kind not in SUPPORTED_KINDS:
                    raise ValueError(f"{file}: kind {kind!r} is not supported by the lab ({', '.join(sorted(SUPPORTED_KINDS))})")
                if not (obj.get("metadata") or {}).get("name"):
                    raise ValueError(f"{file}: a {kind} has no metadata.name")
                if kind in NAMESPACED_KINDS:
                    obj.setdefault("metadata", {}).setdefault("namespace", "default")
                objects.append(obj)
    return objects


def object_file(cluster_dir: Path, obj: dict[str, Any]) -> Path:
    meta = obj["metadata"]
    ns = meta.get("namespace", "") if obj["kind"] in NAMESPACED_KINDS else ""
    return cluster_dir / obj["kind"] / (f"{ns}_{meta['name']}.yaml" if ns else f"{meta['name']}.yaml")


def write_object(cluster_dir: Path, obj: dict[str, Any]) -> None:
    target = object_file(cluster_dir, obj)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name("." + target.name + ".tmp")
    tmp.write_text(yaml.safe_dump(obj, sort_keys=False))
    os.replace(tmp, target)


def read_object(cluster_dir: Path, obj: dict[str, Any]) -> dict[str, Any] | None:
    target = object_file(cluster_dir, obj)
    if not target.exists():
        return None
    return yaml.safe_load(target.read_text())


def delete_object(cluster_dir: Path, obj: dict[str, Any]) -> bool:
    target = object_file(cluster_dir, obj)
    try:
        target.unlink()
        return True
    except FileNotFoundError:
        return False


def container_ports(pod: dict[str, Any]) -> list[dict[str, Any]]:
    ports = []
    for container in (pod.get("spec") or {}).get("containers") or []:
        for p in container.get("ports") or []:
            ports.append(
                {"port": int(p["containerPort"]), "protocol": str(p.get("protocol", "TCP")).upper(),
                 "name": p.get("name", "")}
            )
    return ports
