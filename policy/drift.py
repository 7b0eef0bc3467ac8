"""Has the incremental engine drifted from its inputs? The engine is fed event by event; an event it failed on
(or a bug) would leave it computing from a state the cache does not hold, and only a restart would notice. The
periodic resync compares what the engine holds with a fresh snapshot, per kind, by a digest of each side.

`input_differences(engine, inputs)` -> one line per kind that differs ([]: none). Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from typing import Any

from policy.calc import PolicyInputs, namespace_labels_of
from policy.incremental import PolicyEngine
from policy.model import Policy, parse_policy
from routed.model import Endpoint, Pod


def _digest(items: Iterable[tuple[str, Any]]) -> tuple[int, str]:
    """(how many, a digest) of key -> JSON-able value pairs, independent of their order."""
    pairs = sorted((key, json.dumps(value, sort_keys=True, default=repr)) for key, value in items)
    return len(pairs), hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def _pod(pod: Pod) -> Any:
    return [pod.labels, pod.node_name, list(pod.ips), [repr(p) for p in pod.ports], pod.host_network]


def _policy(policy: Policy) -> str:
    return repr(dataclasses.replace(policy, uid=""))  # the engine keeps an equal policy's first uid


def _endpoint(ep: Endpoint) -> Any:
    return [ep.container_id, ep.ifname, list(ep.ips), ep.pod_namespace, ep.pod_name]


def engine_digests(engine: PolicyEngine) -> dict[str, tuple[int, str]]:
    return {
        "namespaces": _digest(engine.ns_labels.items()),
        "pods": _digest((k, _pod(p)) for k, p in engine.raw_pods.items()),
        "policies": _digest((k, _policy(p)) for k, p in engine.policies.items()),
        "endpoints": _digest((h, _endpoint(ep)) for h, ep in engine.endpoints.items()),
        "node addresses": _digest([("ips", list(engine.node_ips))]),
    }


def input_digests(inputs: PolicyInputs) -> dict[str, tuple[int, str]]:
    policies = (parse_policy(raw) for raw in inputs.policies)
    return {
        "namespaces": _digest((ns.name, namespace_labels_of(ns)) for ns in inputs.namespaces),
        "pods": _digest((p.key, _pod(p)) for p in inputs.pods),
        "policies": _digest((p.key, _policy(p)) for p in policies),
        "endpoints": _digest((ep.host_ifname, _endpoint(ep)) for ep in inputs.endpoints),
        "node addresses": _digest([("ips", list(inputs.node_ips))]),
    }


def input_differences(engine: PolicyEngine, inputs: PolicyInputs) -> list[str]:
    have, want = engine_digests(engine), input_digests(inputs)
    return [f"{kind}: the engine holds {have[kind][0]}, the cache {want[kind][0]}"
            + ("" if have[kind][0] != want[kind][0] else " (contents differ)")
            for kind in want if have[kind] != want[kind]]
