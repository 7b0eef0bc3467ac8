"""Pure parts of the Kubernetes datastore: trimming, relist diffs, watch event handling (no API server)."""

from __future__ import annotations

from typing import Any

import pytest

from routed.datastore.base import Event
from routed.datastore.kube import (
    Gone,
    KindSpec,
    KubeDatastore,
    _lines,
    _Watcher,
    diff_listing,
    trim_pod,
    trim_secret,
)
from routed.model import Pod

RAW_POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "web",
        "namespace": "shop",
        "uid": "u1",
        "resourceVersion": "10",
        "labels": {"app": "web"},
        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "routed.dev/x": "y"},
        "managedFields": [{"manager": "kubectl"}],
    },
    "spec": {
        "nodeName": "n1",
        "containers": [{"name": "c", "image": "nginx", "env": [{"name": "A", "value": "b"}],
                        "ports": [{"containerPort": 80, "name": "http", "protocol": "TCP"}]}],
        "volumes": [{"name": "v"}],
    },
    "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}], "conditions": [{}]},
}


def test_trim_pod_keeps_what_the_model_needs() -> None:
    t = trim_pod(RAW_POD)
    assert "managedFields" not in t["metadata"]
    assert t["metadata"]["annotations"] == {"routed.dev/x": "y"}
    assert "volumes" not in t["spec"] and "env" not in t["spec"]["containers"][0]
    assert "conditions" not in t["status"]
    assert Pod.from_k8s(t) == Pod.from_k8s(RAW_POD)


def test_trim_secret() -> None:
    t = trim_secret({"metadata": {"name": "s", "namespace": "routed-system"}, "type": "Opaque", "data": {"k": "dg=="}})
    assert t["data"] == {"k": "dg=="} and t["kind"] == "Secret"


def _obj(name: str, rv: str, label: str = "a") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv, "labels": {"l": label}}}


def test_diff_listing_only_real_changes() -> None:
    old = {"ns/a": _obj("a", "1"), "ns/b": _obj("b", "2"), "ns/c": _obj("c", "3")}
    new = {"ns/a": _obj("a", "9"), "ns/b": _obj("b", "10", "changed"), "ns/d": _obj("d", "11")}
    got = sorted((e.type, e.key) for e in diff_listing("Pod", old, new))
    assert got == [("ADDED", "ns/d"), ("DELETED", "ns/c"), ("MODIFIED", "ns/b")]  # a: only its RV moved


def _watcher() -> tuple[_Watcher, list[Event]]:
    out: list[Event] = []
    ds = KubeDatastore(kubeconfig="/nonexistent")
    spec = KindSpec("Pod", lambda **kw: None, trim_pod)
    w = _Watcher(ds, spec, lambda kind, events, listed: out.extend(events))
    return w, out


def test_watch_events_update_view_and_skip_noise() -> None:
    w, out = _watcher()
    w._handle({"type": "ADDED", "object": RAW_POD})
    noisy = {**RAW_POD, "metadata": {**RAW_POD["metadata"], "resourceVersion": "11",
                                     "annotations": {"other/x": "1", "routed.dev/x": "y"}}}
    w._handle({"type": "MODIFIED", "object": noisy})  # nothing the agent keeps changed
    assert [e.type for e in out] == ["ADDED"] and w.resource_version == "11"
    w._handle({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "15"}}})
    assert w.resource_version == "15" and len(out) == 1
    w._handle({"type": "DELETED", "object": noisy})
    assert [e.type for e in out] == ["ADDED", "DELETED"] and w.view == {}
    with pytest.raises(Gone):
        w._handle({"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}})


class _FakeResp:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def stream(self, amt: int | None = None, decode_content: bool = False) -> Any:
        yield from self.chunks


def test_lines_split_across_chunks() -> None:
    resp = _FakeResp([b'{"a":', b'1}\n{"b":2}\n\n{"c"', b":3}"])
    assert list(_lines(resp)) == [b'{"a":1}', b'{"b":2}', b'{"c":3}']
