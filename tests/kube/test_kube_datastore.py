"""KubeDatastore against a real kube-apiserver, authenticated as the deploy/ ServiceAccount (pod-bound token).

Synced at all proves the RBAC in deploy/ covers every list and watch the datastore makes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client as k8s

from routed.datastore.kube import KubeDatastore
from tests.helpers import holds_for, run_and_expect
from tests.kube.kube_env import (
    DatastoreRunner,
    KubeEnv,
    agent_token,
    delete_namespace,
    ensure_namespace,
    ensure_node,
    get_deployed,
)

pytestmark = pytest.mark.kube

NODE = "rtd-kube-node-a"
OTHER_NODE = "rtd-kube-node-b"


@pytest.fixture(scope="module")
def env() -> KubeEnv:
    return get_deployed()


@pytest.fixture(scope="module")
def admin(env: KubeEnv) -> k8s.ApiClient:
    return env.api()


@pytest.fixture(scope="module")
def ns(admin: k8s.ApiClient) -> Iterator[str]:
    name = f"rtd-kube-ds-{uuid.uuid4().hex[:6]}"
    ensure_namespace(admin, name)
    yield name
    delete_namespace(admin, name)


@pytest.fixture(scope="module")
def runner(env: KubeEnv, admin: k8s.ApiClient, ns: str) -> Iterator[DatastoreRunner]:
    ensure_node(admin, NODE, "10.99.0.1", "10.244.1.0/24")
    ensure_node(admin, OTHER_NODE, "10.99.0.2", "10.244.2.0/24")
    kubeconfig = env.write_token_kubeconfig("agent-ds", agent_token(admin, NODE))
    ds = KubeDatastore(kubeconfig=kubeconfig, node_name=NODE, backoff_initial=0.2, backoff_max=2.0)
    r = DatastoreRunner(ds).start()
    run_and_expect(lambda: r.synced or r.error, bool, 60).check("datastore synced")
    assert r.error is None, r.error
    yield r
    r.stop()


def pod_body(name: str, node: str = OTHER_NODE, labels: dict[str, str] | None = None) -> dict:
    return {
        "metadata": {"name": name, "labels": labels or {"app": "web"}},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "c", "image": "nginx", "ports": [{"containerPort": 8080, "name": "http"}]}],
        },
    }


def all_watching(r: DatastoreRunner, after: dict[str, dict] | None = None) -> bool:
    stats = r.ds.stats()
    return all(
        s["watching"] and (after is None or s["watches"] > after[k]["watches"]) for k, s in stats.items()
    )


def test_initial_sync(runner: DatastoreRunner, ns: str) -> None:
    keys = {(e.kind, e.key) for e in runner.snapshot() if e.type == "ADDED"}
    assert ("Node", NODE) in keys and ("Node", OTHER_NODE) in keys
    assert ("Namespace", "routed-system") in keys and ("Namespace", ns) in keys
    assert ("Pod", f"routed-system/routed-{NODE}") in keys
    stats = runner.ds.stats()
    assert set(stats) == {"Node", "Namespace", "Pod", "NetworkPolicy", "BGPPeer", "BGPConfiguration", "Secret",
                          "Service", "EndpointSlice"}
    run_and_expect(lambda: all_watching(runner), bool, 10).check("all watches open")
    # Trimmed: no managedFields, no foreign annotations.
    pod = next(e.obj for e in runner.snapshot() if e.key == f"routed-system/routed-{NODE}")
    assert "managedFields" not in pod["metadata"] and "annotations" not in pod["metadata"]
    assert pod["spec"]["nodeName"] == NODE and pod["spec"]["hostNetwork"] is True


def test_network_policy_events(runner: DatastoreRunner, admin: k8s.ApiClient, ns: str) -> None:
    net = k8s.NetworkingV1Api(admin)
    key = f"{ns}/deny-all"
    mark = runner.mark()
    net.create_namespaced_network_policy(
        ns, {"metadata": {"name": "deny-all"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    )
    ev = runner.wait_event(mark, "ADDED", "NetworkPolicy", key)
    assert ev.obj["spec"]["policyTypes"] == ["Ingress"]
    mark = runner.mark()
    net.patch_namespaced_network_policy(
        "deny-all", ns, {"spec": {"ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "db"}}}]}]}}
    )
    ev = runner.wait_event(mark, "MODIFIED", "NetworkPolicy", key)
    assert ev.obj["spec"]["ingress"][0]["from"][0]["podSelector"] == {"matchLabels": {"app": "db"}}
    mark = runner.mark()
    net.delete_namespaced_network_policy("deny-all", ns)
    ev = runner.wait_event(mark, "DELETED", "NetworkPolicy", key)
    assert ev.obj["metadata"]["name"] == "deny-all"
    assert key not in runner.ds.state("NetworkPolicy")


def test_pod_events(runner: DatastoreRunner, admin: k8s.ApiClient, ns: str) -> None:
    core = k8s.CoreV1Api(admin)
    key = f"{ns}/web-1"
    mark = runner.mark()
    core.create_namespaced_pod(ns, pod_body("web-1"))
    ev = runner.wait_event(mark, "ADDED", "Pod", key)
    assert ev.obj["spec"]["containers"][0]["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]

    # A change the agent does not keep (a foreign annotation) emits nothing; the next real change does.
    mark = runner.mark()
    core.patch_namespaced_pod("web-1", ns, {"metadata": {"annotations": {"example.com/x": "1"}}})
    core.patch_namespaced_pod("web-1", ns, {"metadata": {"labels": {"app": "web", "tier": "front"}}})
    ev = runner.wait_event(mark, "MODIFIED", "Pod", key)
    assert ev.obj["metadata"]["labels"] == {"app": "web", "tier": "front"}
    assert [e.type for e in runner.since(mark) if e.key == key] == ["MODIFIED"]

    mark = runner.mark()
    core.patch_namespaced_pod_status(
        "web-1", ns, {"status": {"phase": "Running", "podIP": "10.244.2.7", "podIPs": [{"ip": "10.244.2.7"}]}}
    )
    ev = runner.wait_event(mark, "MODIFIED", "Pod", key, lambda e: bool(e.obj["status"].get("podIPs")))
    assert ev.obj["status"]["podIPs"] == [{"ip": "10.244.2.7"}]

    mark = runner.mark()
    core.delete_namespaced_pod("web-1", ns, grace_period_seconds=0)
    runner.wait_event(mark, "DELETED", "Pod", key)
    assert key not in runner.ds.state("Pod")


def test_service_and_endpoint_slice_events(runner: DatastoreRunner, admin: k8s.ApiClient, ns: str) -> None:
    core = k8s.CoreV1Api(admin)
    disc = k8s.DiscoveryV1Api(admin)
    mark = runner.mark()
    core.create_namespaced_service(ns, {"metadata": {"name": "lb"}, "spec": {
        "type": "LoadBalancer", "externalTrafficPolicy": "Local", "selector": {"app": "web"},
        "ports": [{"port": 80, "targetPort": 8080}]}})
    ev = runner.wait_event(mark, "ADDED", "Service", f"{ns}/lb")
    assert ev.obj["spec"]["externalTrafficPolicy"] == "Local" and ev.obj["spec"]["clusterIPs"]
    mark = runner.mark()
    core.patch_namespaced_service_status("lb", ns, {"status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}]}}})
    ev = runner.wait_event(mark, "MODIFIED", "Service", f"{ns}/lb")
    assert ev.obj["status"]["loadBalancer"]["ingress"] == [{"ip": "198.51.100.9"}]
    mark = runner.mark()
    disc.create_namespaced_endpoint_slice(ns, {
        "metadata": {"name": "lb-abc", "labels": {"kubernetes.io/service-name": "lb"}}, "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.2.9"], "nodeName": OTHER_NODE, "conditions": {"ready": True}}]})
    ev = runner.wait_event(mark, "ADDED", "EndpointSlice", f"{ns}/lb-abc")
    assert ev.obj["metadata"]["labels"]["kubernetes.io/service-name"] == "lb"
    assert ev.obj["endpoints"] == [{"addresses": ["10.244.2.9"], "nodeName": OTHER_NODE,
                                    "conditions": {"ready": True}}]
    mark = runner.mark()
    core.delete_namespaced_service("lb", ns)
    runner.wait_event(mark, "DELETED", "Service", f"{ns}/lb")


def test_secrets_only_own_namespace(runner: DatastoreRunner, admin: k8s.ApiClient, ns: str) -> None:
    core = k8s.CoreV1Api(admin)
    mark = runner.mark()
    core.create_namespaced_secret(ns, {"metadata": {"name": "elsewhere"}, "stringData": {"k": "v"}})
    core.create_namespaced_secret(
        "routed-system", {"metadata": {"name": f"bgp-{ns}"}, "stringData": {"tor": "s3cret"}}
    )
    ev = runner.wait_event(mark, "ADDED", "Secret", f"routed-system/bgp-{ns}")
    assert ev.obj["data"] == {"tor": "czNjcmV0"}
    assert not [e for e in runner.since(mark) if e.key == f"{ns}/elsewhere"]


def test_custom_objects(runner: DatastoreRunner, env: KubeEnv, admin: k8s.ApiClient) -> None:
    custom = k8s.CustomObjectsApi(admin)
    mark = runner.mark()
    name = f"tor-{uuid.uuid4().hex[:6]}"
    custom.create_cluster_custom_object("routed.dev", "v1alpha1", "bgppeers", {
        "apiVersion": "routed.dev/v1alpha1", "kind": "BGPPeer", "metadata": {"name": name},
        "spec": {"peerIP": "10.99.0.254", "asNumber": 65000, "nodeSelector": {"matchLabels": {"rack": "r1"}},
                 "password": {"secretKeyRef": {"name": "bgp", "key": "tor"}}},
    })
    ev = runner.wait_event(mark, "ADDED", "BGPPeer", name)
    assert ev.obj["spec"]["asNumber"] == 65000 and ev.obj["kind"] == "BGPPeer"
    custom.create_cluster_custom_object("routed.dev", "v1alpha1", "bgpconfigurations", {
        "apiVersion": "routed.dev/v1alpha1", "kind": "BGPConfiguration", "metadata": {"name": "default"},
        "spec": {"asNumber": 64512, "nodeToNodeMesh": True, "holdTime": 9, "keepaliveTime": 3},
    })
    runner.wait_event(mark, "ADDED", "BGPConfiguration", "default")
    # The CRD's validation rules mirror the pydantic models'.
    bad = env.kubectl("apply", "--dry-run=server", "-f", "-", check=False, input=(
        "apiVersion: routed.dev/v1alpha1\nkind: BGPPeer\nmetadata: {name: bad}\n"
        "spec: {peerIP: 10.0.0.1, asNumber: 65000, node: a, nodeSelector: {matchLabels: {rack: r1}}}\n"))
    assert bad.returncode != 0 and "set either node or nodeSelector" in bad.stderr, bad.stderr
    bad = env.kubectl("apply", "--dry-run=server", "-f", "-", check=False, input=(
        "apiVersion: routed.dev/v1alpha1\nkind: BGPConfiguration\nmetadata: {name: bad}\n"
        "spec: {holdTime: 9, keepaliveTime: 5}\n"))
    assert bad.returncode != 0 and "keepaliveTime" in bad.stderr, bad.stderr


def test_apiserver_outage_keeps_state(runner: DatastoreRunner, env: KubeEnv, admin: k8s.ApiClient, ns: str) -> None:
    core = k8s.CoreV1Api(admin)
    core.create_namespaced_pod(ns, pod_body("steady"))
    runner.wait_event(0, "ADDED", "Pod", f"{ns}/steady")
    run_and_expect(lambda: all_watching(runner), bool, 10).check("all watches open")
    before_state = {k: runner.ds.state(k) for k in runner.ds.stats()}
    before = runner.ds.stats()
    mark = runner.mark()

    env.stop("apiserver", kill=True)  # a crash: connections drop without a goodbye
    run_and_expect(lambda: not any(s["watching"] for s in runner.ds.stats().values()), bool,
                   30).check("watches dropped")
    # API down: nothing emitted ...
    holds_for(lambda: runner.since(mark), lambda evs: evs == [], 5.0,
              interval=0.05).check("no events while down")
    assert {k: runner.ds.state(k) for k in before_state} == before_state  # ... and the last state kept

    env.start()
    run_and_expect(lambda: all_watching(runner, before), bool, 60).check("watches re-established")
    # back: no DELETE/ADD flaps
    holds_for(lambda: runner.since(mark), lambda evs: evs == [], 2.0,
              interval=0.05).check("no events once back")

    core.create_namespaced_pod(ns, pod_body("after-outage"))
    runner.wait_event(mark, "ADDED", "Pod", f"{ns}/after-outage")
    assert [(e.type, e.key) for e in runner.since(mark)] == [("ADDED", f"{ns}/after-outage")]


def test_expired_watch_relists_and_converges(
    runner: DatastoreRunner, env: KubeEnv, admin: k8s.ApiClient, ns: str
) -> None:
    core = k8s.CoreV1Api(admin)
    for name in ("keep", "missed-add", "missed-change"):
        core.create_namespaced_pod(ns, pod_body(name))
    for name in ("keep", "missed-add", "missed-change"):
        runner.wait_event(0, "ADDED", "Pod", f"{ns}/{name}")
    run_and_expect(lambda: all_watching(runner), bool, 10).check("all watches open")

    # Make the datastore's view diverge from the API, as if it had missed events: one pod it never saw,
    # one it saw in an older form, one that was deleted without it noticing.
    watcher = runner.ds._watchers["Pod"]
    with watcher._lock:
        watcher.view.pop(f"{ns}/missed-add")
        stale = dict(watcher.view[f"{ns}/missed-change"])
        stale["metadata"] = {**stale["metadata"], "labels": {"app": "old"}}
        watcher.view[f"{ns}/missed-change"] = stale
        ghost = dict(watcher.view[f"{ns}/keep"])
        ghost["metadata"] = {**ghost["metadata"], "name": "ghost"}
        watcher.view[f"{ns}/ghost"] = ghost
    relists = runner.ds.stats()["Pod"]["relists"]
    mark = runner.mark()

    # Compact etcd past everything, then resume the watch from a version long gone (older than the
    # apiserver's watch cache and compacted in etcd): the server answers 410 Gone.
    core.create_namespaced_config_map(ns, {"metadata": {"name": "bump"}})
    env.etcd_compact()
    runner.ds.interrupt_watch("Pod", resource_version="1")
    run_and_expect(lambda: runner.ds.stats()["Pod"]["relists"] > relists, bool, 30).check("relist after 410")
    run_and_expect(lambda: len(runner.since(mark)) >= 3, bool, 10).check("diff events")
    got = sorted((e.type, e.key) for e in runner.since(mark))
    assert got == sorted([
        ("ADDED", f"{ns}/missed-add"),
        ("MODIFIED", f"{ns}/missed-change"),
        ("DELETED", f"{ns}/ghost"),
    ])
    after_diff = runner.mark()
    holds_for(lambda: runner.since(after_diff), lambda evs: evs == [], 1.0,
              interval=0.05).check("no events after the diff")
    run_and_expect(lambda: runner.ds.stats()["Pod"]["watching"], bool, 10).check("Pod watch resumed")
    mark = runner.mark()
    core.delete_namespaced_pod("keep", ns, grace_period_seconds=0)
    runner.wait_event(mark, "DELETED", "Pod", f"{ns}/keep")


def test_own_node_only_with_field_selector(env: KubeEnv, admin: k8s.ApiClient, runner: DatastoreRunner) -> None:
    kubeconfig = env.write_token_kubeconfig("agent-own-node", agent_token(admin, NODE))
    ds = KubeDatastore(kubeconfig=kubeconfig, node_name=NODE, all_nodes=False, backoff_max=2.0)
    r = DatastoreRunner(ds).start()
    try:
        run_and_expect(lambda: r.synced or r.error, bool, 60).check("datastore synced")
        assert {e.key for e in r.snapshot() if e.kind == "Node"} == {NODE}
        mark = r.mark()
        core = k8s.CoreV1Api(admin)
        core.patch_node(OTHER_NODE, {"metadata": {"labels": {"rack": "r2"}}})
        core.patch_node(NODE, {"metadata": {"labels": {"rack": "r1"}}})
        ev = r.wait_event(mark, "MODIFIED", "Node", NODE)
        assert ev.obj["metadata"]["labels"]["rack"] == "r1"
        assert [e.key for e in r.since(mark) if e.kind == "Node"] == [NODE]
    finally:
        r.stop()


def test_agent_reports_events_with_its_own_identity(runner: DatastoreRunner, admin: k8s.ApiClient, ns: str) -> None:
    """The deploy/ RBAC lets the agent (pod-bound token) create Events; `kubectl describe` shows them."""
    involved = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "namespace": ns, "name": "bad-one"}
    asyncio.run(runner.ds.report_event(involved, "InvalidNetworkPolicy", "spec.ingress[0]: broken; fail closed"))
    core = k8s.CoreV1Api(admin)
    items = run_and_expect(
        lambda: core.list_namespaced_event(ns, field_selector="involvedObject.name=bad-one").items, bool, 30
    ).check("event")
    event = items[0]
    assert event.reason == "InvalidNetworkPolicy" and event.type == "Warning"
    assert event.source.host == NODE and event.involved_object.kind == "NetworkPolicy"
