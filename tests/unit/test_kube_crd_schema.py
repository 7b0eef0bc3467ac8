"""deploy/crds agree with the pydantic models in routed/bgp/config.py (they are generated from them)."""

from __future__ import annotations

import importlib.util
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from routed.bgp.config import BGPConfigurationSpec, BGPPeerSpec

ROOT = Path(__file__).resolve().parents[2]


def _gen() -> Any:
    spec = importlib.util.spec_from_file_location("kube_crds", ROOT / "scripts" / "kube_crds.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _crd(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "deploy" / "crds" / name).read_text())


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def _field_paths(schema: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, sub in (schema.get("properties") or {}).items():
        out.add(prefix + name)
        out |= _field_paths(sub, f"{prefix}{name}.")
        if "items" in sub:
            out |= _field_paths(sub["items"], f"{prefix}{name}[].")
    return out


def _model_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    def walk(ann: Any, path: str) -> set[str]:
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return _model_paths(ann, path + ".")
        origin = typing.get_origin(ann)
        if origin is list:
            return walk(typing.get_args(ann)[0], path + "[]")
        if origin in (typing.Union, types.UnionType):
            return set().union(*(walk(a, path) for a in typing.get_args(ann) if a is not type(None)))
        return set()

    out: set[str] = set()
    for name, info in model.model_fields.items():
        out.add(prefix + name)
        out |= walk(info.annotation, prefix + name)
    return out


def test_generated_crds_are_current() -> None:
    gen = _gen()
    for name, obj in gen.build().items():
        assert (ROOT / "deploy" / "crds" / name).read_text() == gen.render(obj), (
            f"deploy/crds/{name} is stale: run .venv/bin/python scripts/kube_crds.py"
        )


def test_bgppeer_fields_match_model() -> None:
    spec = _schema(_crd("bgppeers.yaml"))["properties"]["spec"]
    assert _field_paths(spec) == _model_paths(BGPPeerSpec)
    assert set(spec["required"]) == {n for n, f in BGPPeerSpec.model_fields.items() if f.is_required()}


def test_bgpconfiguration_fields_match_model() -> None:
    spec = _schema(_crd("bgpconfigurations.yaml"))["properties"]["spec"]
    assert _field_paths(spec) == _model_paths(BGPConfigurationSpec)
    assert "required" not in spec


def test_spec_fields_from_the_brief_present() -> None:
    cfg = _field_paths(_schema(_crd("bgpconfigurations.yaml"))["properties"]["spec"])
    assert {"asNumber", "nodeASNumbers", "rackLabel", "rackASNumbers", "routerID", "holdTime", "keepaliveTime",
            "gracefulRestartTime", "communities", "acceptDefaultRoute", "nodeToNodeMesh"} <= cfg
    peer = _field_paths(_schema(_crd("bgppeers.yaml"))["properties"]["spec"])
    assert {"peerIP", "asNumber", "node", "nodeSelector", "password.secretKeyRef.name",
            "password.secretKeyRef.key", "ebgpMultihop", "ttlSecurity", "maxPrefixes"} <= peer


def test_crds_are_cluster_scoped_and_structural() -> None:
    for name in ("bgppeers.yaml", "bgpconfigurations.yaml", "routednodestatuses.yaml"):
        crd = _crd(name)
        assert crd["spec"]["scope"] == "Cluster" and crd["spec"]["group"] == "routed.dev"
        (version,) = crd["spec"]["versions"]
        assert version["name"] == "v1alpha1" and version["additionalPrinterColumns"]

        def walk(node: dict[str, Any], path: str) -> None:
            assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
            assert not ("properties" in node and "additionalProperties" in node), path
            for k, sub in (node.get("properties") or {}).items():
                walk(sub, f"{path}.{k}")
            if isinstance(node.get("items"), dict):
                walk(node["items"], f"{path}[]")

        walk(version["schema"]["openAPIV3Schema"], name)
    status = _crd("routednodestatuses.yaml")["spec"]["versions"][0]
    assert status["subresources"] == {"status": {}}
