"""The lab with `--datastore kube`: a real kube-apiserver + etcd in a control-plane namespace behind ToR 1,
deploy/ applied to it (CRDs, RBAC, admission policy), and each agent given the deploy/ ServiceAccount's
pod-bound token, exactly as the DaemonSet's pod on that node would get it.
"""

from __future__ import annotations

import logging
import subprocess
from typing import Any

import yaml

from routed import netns
from routed.lab.state import LabState
from routed.lab.store import DEFAULT_IMAGE, KUBE_TESTENV, REPO_ROOT, KubeStore

log = logging.getLogger(__name__)

API_PORT = 16443
AGENT_NAMESPACE = "routed-system"
AGENT_SERVICE_ACCOUNT = "routed"
TOKEN_DURATION = "48h"
NODE_KUBECONFIG = "node-components.kubeconfig"


SERVICE_CIDRS = {4: "10.96.0.0/16", 6: "fd00:96::/108"}  # the apiserver's Service ranges per lab family


def _store(lab: Any, state: LabState) -> KubeStore:
    return KubeStore(state.control_plane["netns"], str(lab.paths.kube_dir / "admin.kubeconfig"))


def start_control_plane(lab: Any, state: LabState) -> None:
    ctl = state.control_plane
    lab.paths.kube_dir.mkdir(parents=True, exist_ok=True)
    env = [f"KUBE_TESTENV_BIND={ctl['address']}", f"KUBE_TESTENV_API_PORT={API_PORT}",
           f"KUBE_TESTENV_SERVICE_CIDRS={','.join(SERVICE_CIDRS[f] for f in state.families)}"]
    proc = subprocess.run(
        netns.ns_cmd(ctl["netns"], ["env", *env, "bash", str(KUBE_TESTENV), "start", "--dir", str(lab.paths.kube_dir)]),
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kube-apiserver did not start: {proc.stderr[-2000:]}")
    store = _store(lab, state)
    store.kubectl("apply", "-k", str(REPO_ROOT / "deploy"))
    store.kubectl("wait", "--for=condition=established", "--timeout=60s",
                  "crd/bgppeers.routed.dev", "crd/bgpconfigurations.routed.dev", "crd/routednodestatuses.routed.dev")
    write_node_kubeconfig(lab, state)
    log.info("kube-apiserver up at https://%s:%d", ctl["address"], API_PORT)


def write_node_kubeconfig(lab: Any, state: LabState) -> str:
    """The admin kubeconfig pointed at the control plane's address, as the node components (kube-proxy) reach it
    from the node namespaces (admin.kubeconfig names 127.0.0.1, which is the control plane's own loopback)."""
    config = yaml.safe_load((lab.paths.kube_dir / "admin.kubeconfig").read_text())
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = f"https://{state.control_plane['address']}:{API_PORT}"
    path = lab.paths.kube_dir / NODE_KUBECONFIG
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return str(path)


def agent_kubeconfig(lab: Any, state: LabState, node: str) -> str:
    """A kubeconfig for the agent on `node`: the deploy/ ServiceAccount, token bound to that node's agent pod."""
    store = _store(lab, state)
    pod_name = f"routed-{node}"
    store.write({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": AGENT_NAMESPACE, "labels": {"app.kubernetes.io/name": "routed"}},
        "spec": {"nodeName": node, "hostNetwork": True, "serviceAccountName": AGENT_SERVICE_ACCOUNT,
                 "containers": [{"name": "agent", "image": DEFAULT_IMAGE}]},
    })
    token = store.kubectl("create", "token", AGENT_SERVICE_ACCOUNT, "-n", AGENT_NAMESPACE, "--bound-object-kind",
                          "Pod", "--bound-object-name", pod_name, "--duration", TOKEN_DURATION).stdout.strip()
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "lab", "cluster": {
            "server": f"https://{state.control_plane['address']}:{API_PORT}",
            "certificate-authority": str(lab.paths.kube_dir / "pki" / "ca.crt")}}],
        "users": [{"name": f"routed-{node}", "user": {"token": token}}],
        "contexts": [{"name": "agent", "context": {"cluster": "lab", "user": f"routed-{node}"}}],
        "current-context": "agent",
    }
    path = lab.paths.node_dir(node) / "kubeconfig"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return str(path)
