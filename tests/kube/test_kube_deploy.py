"""deploy/ against a real kube-apiserver: apply, RBAC of the agent's ServiceAccount, node-status ownership."""

from __future__ import annotations

import asyncio
import json

import pytest
from kubernetes import client as k8s

from routed.datastore.kube import KubeDatastore
from tests.kube.kube_env import AGENT_SA, ROOT, KubeEnv, agent_token, ensure_node, get_deployed

pytestmark = pytest.mark.kube


@pytest.fixture(scope="module")
def deployed() -> KubeEnv:
    return get_deployed()


def test_apply_kustomize(deployed: KubeEnv) -> None:
    # The fixture applied deploy/ once; a second apply is idempotent and changes nothing.
    proc = deployed.kubectl("apply", "-k", str(ROOT / "deploy"))
    assert "daemonset.apps/routed unchanged" in proc.stdout, proc.stdout
    crds = deployed.kubectl("get", "crd", "-o", "name").stdout.split()
    for name in ("bgppeers.routed.dev", "bgpconfigurations.routed.dev", "routednodestatuses.routed.dev"):
        assert f"customresourcedefinition.apiextensions.k8s.io/{name}" in crds
    ds = deployed.kubectl("get", "daemonset", "-n", "routed-system", "routed", "-o", "jsonpath={.spec.template.spec.hostNetwork}")
    assert ds.stdout == "true"


def test_the_apiserver_accepts_the_hardened_daemonset(deployed: KubeEnv) -> None:
    # allowPrivilegeEscalation: false beside an added SYS_ADMIN passes validation only spelled without "CAP_"
    spec = json.loads(deployed.kubectl("get", "daemonset", "-n", "routed-system", "routed", "-o", "json").stdout)
    pod = spec["spec"]["template"]["spec"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in [*pod["initContainers"], *pod["containers"]]:
        sc = container["securityContext"]
        assert (sc["allowPrivilegeEscalation"], sc["readOnlyRootFilesystem"], sc["privileged"]) == (False, True, False)
    agent = next(c for c in pod["containers"] if c["name"] == "agent")
    assert "SYS_ADMIN" in agent["securityContext"]["capabilities"]["add"]
    assert {"name": "tmp", "mountPath": "/tmp"}.items() <= next(
        m for m in agent["volumeMounts"] if m["name"] == "tmp").items()


CAN = [
    ("list", "pods", "-A"),
    ("watch", "pods", "-A"),
    ("list", "nodes", ""),
    ("watch", "nodes", ""),
    ("list", "namespaces", ""),
    ("list", "networkpolicies.networking.k8s.io", "-A"),
    ("watch", "networkpolicies.networking.k8s.io", "-A"),
    ("list", "bgppeers.routed.dev", ""),
    ("watch", "bgpconfigurations.routed.dev", ""),
    ("list", "secrets", "-n=routed-system"),
    ("watch", "secrets", "-n=routed-system"),
    ("create", "routednodestatuses.routed.dev", ""),
    ("patch", "routednodestatuses.routed.dev/status", ""),
    ("create", "events", "-n=routed-system"),
]
CANNOT = [
    ("get", "secrets", "-n=default"),
    ("list", "secrets", "-A"),
    ("update", "nodes", ""),
    ("patch", "nodes", ""),
    ("delete", "pods", "-n=default"),
    ("create", "pods", "-n=routed-system"),
    ("update", "networkpolicies.networking.k8s.io", "-n=default"),
    ("create", "bgppeers.routed.dev", ""),
    ("delete", "routednodestatuses.routed.dev", ""),
    ("list", "configmaps", "-n=kube-system"),
]


@pytest.mark.parametrize(("verb", "resource", "scope"), CAN)
def test_agent_can(deployed: KubeEnv, verb: str, resource: str, scope: str) -> None:
    args = ["auth", "can-i", verb, resource, f"--as={AGENT_SA}"] + ([scope] if scope else [])
    proc = deployed.kubectl(*args, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "yes", (args, proc.stdout, proc.stderr)


@pytest.mark.parametrize(("verb", "resource", "scope"), CANNOT)
def test_agent_cannot(deployed: KubeEnv, verb: str, resource: str, scope: str) -> None:
    args = ["auth", "can-i", verb, resource, f"--as={AGENT_SA}"] + ([scope] if scope else [])
    proc = deployed.kubectl(*args, check=False)
    assert proc.returncode == 1 and proc.stdout.strip() == "no", (args, proc.stdout, proc.stderr)


def test_node_status_only_own_node(deployed: KubeEnv) -> None:
    admin = deployed.api()
    ensure_node(admin, "rtd-kube-node-a", "10.99.0.1", "10.244.1.0/24")
    ensure_node(admin, "rtd-kube-node-b", "10.99.0.2", "10.244.2.0/24")
    token = agent_token(admin, "rtd-kube-node-a")
    ds = KubeDatastore(kubeconfig=deployed.write_token_kubeconfig("agent-node-a", token), node_name="rtd-kube-node-a")

    status = {"ready": True, "asNumber": 65001, "peersEstablished": 1,
              "peers": [{"name": "tor", "address": "10.99.0.254", "asNumber": 65000, "state": "Established"}]}
    asyncio.run(ds.write_status("rtd-kube-node-a", status))
    asyncio.run(ds.write_status("rtd-kube-node-a", {"ready": False, "asNumber": 65001}))  # update path
    custom = k8s.CustomObjectsApi(admin)
    obj = custom.get_cluster_custom_object("routed.dev", "v1alpha1", "routednodestatuses", "rtd-kube-node-a")
    assert obj["status"]["ready"] is False
    assert "peers" not in obj["status"]  # the whole status is replaced, not merged
    assert obj["status"]["lastUpdate"]
    assert obj["spec"] == {"nodeName": "rtd-kube-node-a"}
    with pytest.raises(k8s.ApiException) as err:
        asyncio.run(ds.write_status("rtd-kube-node-b", {"ready": True}))
    assert err.value.status in (403, 422), err.value
    assert "its own node" in str(err.value.body)
    printed = deployed.kubectl("get", "routednodestatuses").stdout
    assert "rtd-kube-node-a" in printed and "READY" in printed and "rtd-kube-node-b" not in printed
