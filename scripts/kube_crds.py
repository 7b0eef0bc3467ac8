"""Generate deploy/crds/*.yaml: BGPPeer and BGPConfiguration schemas come from the pydantic models in
routed/bgp/config.py (the agent's own validation), RoutedNodeStatus is written here.

    .venv/bin/python scripts/kube_crds.py          # rewrite deploy/crds/
    .venv/bin/python scripts/kube_crds.py --check  # exit 1 if deploy/crds/ is out of date

tests/unit/test_kube_crd_schema.py runs the check, so a model change without regenerating fails CI.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from routed.bgp.config import BGPConfigurationSpec, BGPPeerSpec  # noqa: E402

GROUP = "routed.dev"
VERSION = "v1alpha1"
CRD_DIR = ROOT / "deploy" / "crds"

# OpenAPI keywords a structural CRD schema may carry (pydantic's title/default/additionalProperties:false go).
_KEEP = {
    "type", "properties", "items", "required", "enum", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minLength", "maxLength", "pattern", "minItems", "maxItems", "maxProperties", "format",
    "description", "x-kubernetes-validations",
}

DESCRIPTIONS: dict[str, dict[str, str]] = {
    "BGPConfiguration": {
        "asNumber": "Default AS number of every node (64512 if unset).",
        "nodeASNumbers": "AS number per node name.",
        "asNumberLabel": "Node label whose value is the node's AS number.",
        "rackLabel": "Node label naming the node's rack (key into rackASNumbers).",
        "rackASNumbers": "AS number per rack.",
        "routerID": ("BGP router id (IPv4); default: the node's first IPv4 InternalIP, else (IPv6-only nodes) a "
                     "stable id hashed from the node name."),
        "holdTime": "Hold time in seconds.",
        "keepaliveTime": "Keepalive interval in seconds (at most holdTime/3).",
        "gracefulRestartTime": "Graceful-restart time in seconds; 0 disables graceful restart.",
        "communities": "Communities attached to the pod CIDR announcements ('asn:value' or 'a:b:c').",
        "acceptDefaultRoute": "Install a default route learned over BGP.",
        "nodeToNodeMesh": "Peer every node with every other node (iBGP/eBGP full mesh).",
        "serviceClusterIPs": "Announce these CIDRs from every node, and Service ClusterIPs inside them as /32 "
                             "(internalTrafficPolicy Local: only from nodes with a ready endpoint).",
        "serviceExternalIPs": "Announce these CIDRs from every node, and Service externalIPs inside them as /32 "
                              "(externalTrafficPolicy Local: only from nodes with a ready endpoint).",
        "serviceLoadBalancerIPs": "Announce these CIDRs from every node, and status.loadBalancer.ingress IPs inside "
                                  "them as /32 (externalTrafficPolicy Local: only from nodes with a ready endpoint).",
        "serviceCommunities": "Communities added to Service announcements, per type (clusterIP, externalIP, "
                              "loadBalancerIP).",
    },
    "BGPPeer": {
        "peerIP": "Address of the peer.",
        "asNumber": "AS number of the peer.",
        "node": "Only this node peers (exclusive with nodeSelector).",
        "nodeSelector": "Only nodes matching this label selector peer; neither node nor nodeSelector: all nodes.",
        "password": "TCP MD5 password from a Secret in the agent's namespace.",
        "ebgpMultihop": "TTL of outgoing packets for multihop eBGP (exclusive with ttlSecurity).",
        "ttlSecurity": "GTSM: the peer is at most this many hops away.",
        "maxPrefixes": "Tear the session down when the peer sends more prefixes.",
        "bfd": "BFD (RFC 5880/5881 single hop) for this session: present means enabled unless enabled is false; "
               "BFD Down tears the BGP session down and removes its routes at once.",
    },
}

RULES: dict[str, list[dict[str, str]]] = {
    "BGPConfiguration": [
        {
            "rule": "!has(self.holdTime) || !has(self.keepaliveTime) || self.keepaliveTime * 3 <= self.holdTime",
            "message": "keepaliveTime must be at most holdTime/3",
        },
        {"rule": "!has(self.rackASNumbers) || has(self.rackLabel)", "message": "rackASNumbers needs rackLabel"},
    ],
    "BGPPeer": [
        {
            "rule": "!has(self.node) || self.node == '' || !has(self.nodeSelector)",
            "message": "set either node or nodeSelector, not both",
        },
        {
            "rule": "!has(self.ebgpMultihop) || !has(self.ttlSecurity)",
            "message": "ebgpMultihop and ttlSecurity are mutually exclusive",
        },
    ],
}


def structural(model: type[BaseModel]) -> dict[str, Any]:
    """pydantic JSON schema -> structural OpenAPI v3 schema (refs inlined, Optional -> plain optional)."""
    raw = model.model_json_schema()
    defs = raw.get("$defs", {})

    def conv(node: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in node:
            return conv(copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]]))
        if "anyOf" in node:
            options = [o for o in node["anyOf"] if o.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"cannot express {node} structurally")
            # Not `nullable`: the apiserver then drops explicit nulls, which pydantic reads as None too.
            # The field's own extras (json_schema_extra: rules, bounds) sit next to anyOf: keep them.
            return {**conv(options[0]), **{k: v for k, v in node.items() if k in _KEEP}}
        if "const" in node:
            node = {**node, "enum": [node["const"]]}
        out: dict[str, Any] = {k: v for k, v in node.items() if k in _KEEP}
        if "properties" in node:
            out["properties"] = {k: conv(v) for k, v in node["properties"].items()}
            out["type"] = "object"
        if "items" in node:
            out["items"] = conv(node["items"])
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and "properties" not in node:
            out["additionalProperties"] = conv(extra)
        if "required" in node:
            out["required"] = list(node["required"])
        return out

    return conv(raw)


def crd(
    kind: str, plural: str, spec_schema: dict[str, Any], columns: list[dict[str, Any]],
    status_schema: dict[str, Any] | None = None, short: list[str] | None = None,
    description: str = "",
) -> dict[str, Any]:
    props: dict[str, Any] = {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": spec_schema,
    }
    if status_schema is not None:
        props["status"] = status_schema
    version: dict[str, Any] = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": {"type": "object", "description": description, "properties": props}},
        "additionalPrinterColumns": columns + [
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
        ],
    }
    if status_schema is not None:
        version["subresources"] = {"status": {}}
    names: dict[str, Any] = {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower()}
    if short:
        names["shortNames"] = short
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": names,
            "scope": "Cluster",
            "versions": [version],
        },
    }


def _spec(kind: str, model: type[BaseModel]) -> dict[str, Any]:
    schema = structural(model)
    for field, text in DESCRIPTIONS[kind].items():
        schema["properties"][field]["description"] = text
    schema["x-kubernetes-validations"] = RULES[kind]
    return schema


def node_status_schema() -> dict[str, Any]:
    s = {"type": "string"}
    i = {"type": "integer"}
    peer = {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "name": s, "address": s, "asNumber": i, "state": s, "since": s,
            "prefixesReceived": i, "prefixesSent": i,
            "bfd": {"type": "object", "properties": {
                "state": s, "remoteDiscriminator": i, "txIntervalMs": {"type": "number"},
                "detectionTimeMs": {"type": "number"}, "lastDiag": s, "downs": i}},
        },
    }
    return {
        "type": "object",
        "description": "Written by the node's agent; unknown fields are kept for forward compatibility.",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "ready": {"type": "boolean"},
            "podCIDRs": {"type": "array", "items": s},
            "asNumber": i,
            "routerID": s,
            "peers": {"type": "array", "items": peer},
            "peersEstablished": i,
            "advertised": {"type": "array", "items": s},
            "lastUpdate": {"type": "string", "format": "date-time"},
        },
    }


def build() -> dict[str, dict[str, Any]]:
    return {
        "bgpconfigurations.yaml": crd(
            "BGPConfiguration", "bgpconfigurations", _spec("BGPConfiguration", BGPConfigurationSpec),
            [
                {"name": "AS", "type": "integer", "jsonPath": ".spec.asNumber"},
                {"name": "Mesh", "type": "boolean", "jsonPath": ".spec.nodeToNodeMesh"},
                {"name": "Hold", "type": "integer", "jsonPath": ".spec.holdTime"},
                {"name": "GR", "type": "integer", "jsonPath": ".spec.gracefulRestartTime", "priority": 1},
            ],
            short=["bgpconfig"],
            description="BGP settings: 'default' applies to every node, 'node.<name>' overrides per node.",
        ),
        "bgppeers.yaml": crd(
            "BGPPeer", "bgppeers", _spec("BGPPeer", BGPPeerSpec),
            [
                {"name": "Peer", "type": "string", "jsonPath": ".spec.peerIP"},
                {"name": "AS", "type": "integer", "jsonPath": ".spec.asNumber"},
                {"name": "Node", "type": "string", "jsonPath": ".spec.node"},
                {"name": "Multihop", "type": "integer", "jsonPath": ".spec.ebgpMultihop", "priority": 1},
            ],
            description="A BGP neighbour of all nodes, one node (spec.node) or the nodes matching spec.nodeSelector.",
        ),
        "routednodestatuses.yaml": crd(
            "RoutedNodeStatus", "routednodestatuses",
            {"type": "object", "properties": {"nodeName": {"type": "string"}}},
            [
                {"name": "Ready", "type": "boolean", "jsonPath": ".status.ready"},
                {"name": "AS", "type": "integer", "jsonPath": ".status.asNumber"},
                {"name": "Established", "type": "integer", "jsonPath": ".status.peersEstablished"},
                {"name": "Updated", "type": "date", "jsonPath": ".status.lastUpdate"},
            ],
            status_schema=node_status_schema(),
            short=["rns"],
            description="Status of one node's agent (name = node name), written by that agent only.",
        ),
    }


HEADER = "# Generated by scripts/kube_crds.py from routed/bgp/config.py; do not edit by hand.\n"


def render(obj: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(obj, sort_keys=False, width=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    CRD_DIR.mkdir(parents=True, exist_ok=True)
    for name, obj in build().items():
        path = CRD_DIR / name
        text = render(obj)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
    if stale:
        print("out of date (run scripts/kube_crds.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
