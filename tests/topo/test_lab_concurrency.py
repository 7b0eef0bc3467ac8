"""Never late, never lost, on real kernels (issue 16): a dual-stack 3-node lab creates pods in parallel while
policies, pod labels and namespace labels change underneath; once the writes stop, every pod pair's
reachability on both families must equal the expectation for the final objects, within the deadline.

The expectation is written from the NetworkPolicy API rules for the final state (not from routed's code):
  x: deny-all ingress + allow TCP/80 from namespaces `team=blue` to pods `role=web`
  y: deny-all ingress to pods `pod=c`
Rounds: ROUTED_CONCURRENCY_ROUNDS (default 2), each with new pods, then everything it made is deleted.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
import yaml

from routed.lab import pods as lab_pods
from routed.lab.lab import Lab
from tests.helpers import run_and_expect

pytestmark = [pytest.mark.requires_root, pytest.mark.topo]
ROUNDS = int(os.environ.get("ROUTED_CONCURRENCY_ROUNDS", "2"))
CONVERGE_SECONDS = 20.0
PORT = 80
FIXED = {"x/a": "node1", "x/b": "node2", "y/a": "node3"}  # there from the start: their labels churn
NEW = ("x/c", "y/b", "y/c", "x/d", "y/d", "x/e")  # created side by side during the churn
NODES = ("node1", "node2", "node3")


def pod_doc(key: str, node: str, labels: dict[str, str]) -> dict[str, Any]:
    ns, name = key.split("/")
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"pod": name[0], **labels}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "agnhost", "ports": [
                {"name": "http", "containerPort": PORT, "protocol": "TCP"}]}]}}


def namespace_doc(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"ns": name, **labels}}}


def policy_doc(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


DENY_X = policy_doc("deny", "x", {"podSelector": {}, "policyTypes": ["Ingress"]})
ALLOW_BLUE = policy_doc("allow-blue", "x", {
    "podSelector": {"matchLabels": {"role": "web"}},
    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}], "ports": [{"port": PORT}]}]})
DENY_YC = policy_doc("deny-c", "y", {"podSelector": {"matchLabels": {"pod": "c"}}, "ingress": []})
POLICIES = (DENY_X, ALLOW_BLUE, DENY_YC)
FINAL_ROLES = {"x/a": "web", "x/b": "db"}


def expected(pods: list[str]) -> dict[tuple[str, str], bool]:
    """From the API rules for the final objects; a pod always reaches itself."""
    def allowed(src: str, dst: str) -> bool:
        if src == dst:
            return True
        if dst.startswith("x/"):  # deny-all, plus the allow for role=web from team=blue (namespace y)
            return FINAL_ROLES.get(dst) == "web" and src.startswith("y/")
        return dst.split("/")[1][0] != "c"  # y: only pod=c is isolated (and has no allow)
    return {(s, d): allowed(s, d) for s in pods for d in pods}


def seen(lab: Lab, family: int) -> dict[tuple[str, str], bool]:
    return {(r["from"], r["to"]): bool(r["allowed"]) for r in lab.matrix(ports=[PORT], protocols=["TCP"],
                                                                          timeout=0.8, family=family)}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    manifest = tmp_path_factory.mktemp("conc") / "start.yaml"
    docs = [namespace_doc("x", {}), namespace_doc("y", {"team": "red"})]
    docs += [pod_doc(k, n, {"role": "db"}) for k, n in FIXED.items()]
    manifest.write_text(yaml.safe_dump_all(docs))
    lab = Lab("tconc")
    lab.up(nodes=3, files=[str(manifest)], ip_family="dual")
    yield lab
    lab.down()


def churn(lab: Lab, errors: list[BaseException]) -> None:
    """Policies, pod labels and namespace labels, written straight into the datastore (as a controller or
    kubectl would), interleaved; the last write of each object is the final state."""
    try:
        state = lab.state()
        store = lab.store(state)

        def relabel(key: str, role: str) -> None:
            doc = pod_doc(key, FIXED[key], {"role": role})
            store.write(lab_pods.pod_object_with_status(doc, state.pods[key]))

        steps: list[Any] = [
            lambda: store.write(DENY_X), lambda: relabel("x/a", "web"), lambda: store.write(namespace_doc(
                "y", {"team": "blue"})), lambda: relabel("x/b", "web"), lambda: store.write(ALLOW_BLUE),
            lambda: store.write(namespace_doc("y", {"team": "red"})), lambda: relabel("x/a", "db"),
            lambda: store.write(DENY_YC), lambda: store.delete(ALLOW_BLUE), lambda: relabel("x/b", "db"),
            lambda: store.write(ALLOW_BLUE), lambda: relabel("x/a", "web"),
            lambda: store.write(namespace_doc("y", {"team": "blue"})),
        ]
        for step in steps:
            step()
    except BaseException as exc:  # reported by the test
        errors.append(exc)


def test_parallel_pods_under_policy_and_label_churn_converge_on_both_families(lab, tmp_path):
    for round_no in range(ROUNDS):
        names = [f"{k}{round_no}" for k in NEW]
        new_file = tmp_path / f"pods-{round_no}.yaml"
        new_file.write_text(yaml.safe_dump_all([pod_doc(k, NODES[i % 3], {}) for i, k in enumerate(names)]))
        errors: list[BaseException] = []
        changer = threading.Thread(target=churn, args=(lab, errors))
        changer.start()
        lab.apply(str(new_file))  # the pods, side by side, while the objects change
        changer.join()
        assert not errors, errors
        pods = sorted(lab.state().pods)
        want = expected(pods)
        for family in (4, 6):
            ok, last, _ = run_and_expect(lambda f=family: seen(lab, f), lambda s, want=want: s == want,
                                         timeout=CONVERGE_SECONDS, interval=0.2)
            wrong = sorted(f"{s} -> {d}: expected {'allowed' if v else 'denied'}" for (s, d), v in want.items()
                           if last.get((s, d)) != v)
            assert ok, f"round {round_no} IPv{family}: {len(wrong)} pairs differ:\n" + "\n".join(wrong[:30])
        lab.delete(str(new_file))
        store = lab.store(lab.state())
        for obj in POLICIES:
            store.delete(obj)
        store.write(namespace_doc("y", {"team": "red"}))
