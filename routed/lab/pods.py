"""Lab pods: a namespace wired by executing `routed-cni` exactly as containerd does, then a pod server in it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from routed import netns
from routed.backoff import Backoff
from routed.constants import cni_shim_path
from routed.lab.errors import LabError
from routed.lab.state import LabPaths, PodState

log = logging.getLogger(__name__)

CNI_NETWORK_NAME = "routed"
CNI_VERSION = "1.1.0"


class PodError(LabError):
    pass


def install_plugin(paths: LabPaths) -> str:
    """Install the static `routed-cni` for the lab's nodes as install-cni does (copy, then rename into place)."""
    source = cni_shim_path()
    if not os.path.exists(source):
        raise PodError(f"{source} does not exist: run scripts/bootstrap (it builds cni/shim/routed-cni.c)")
    dest = paths.cni_bin_dir / "routed-cni"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(".routed-cni.tmp")
    shutil.copyfile(source, tmp)
    tmp.chmod(0o755)
    os.replace(tmp, dest)
    return str(dest)


def cni_path(paths: LabPaths) -> str:
    return os.pathsep.join([str(paths.cni_bin_dir), "/usr/lib/cni", "/opt/cni/bin"])


def netconf(paths: LabPaths, node: str) -> dict[str, Any]:
    """The plugin config a runtime would pass for our single-plugin conflist on this node."""
    return {
        "cniVersion": CNI_VERSION,
        "name": CNI_NETWORK_NAME,
        "type": "routed-cni",
        "socketPath": paths.node_socket(node),
        "logFile": str(paths.node_dir(node) / "log" / "cni.log"),
    }


def pod_netns_name(lab: str, namespace: str, name: str) -> str:
    return f"rtd-{lab}-p-{hashlib.sha1(f'{namespace}/{name}'.encode()).hexdigest()[:10]}"


def exec_cni(
    command: str, paths: LabPaths, node: str, pod: PodState, timeout: float = 60.0
) -> dict[str, Any]:
    """Run the plugin with a runtime's environment and stdin; return its parsed stdout (raise on error)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": pod.container_id,
        "CNI_NETNS": netns.netns_path(pod.netns),
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": (
            f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name};"
            f"K8S_POD_INFRA_CONTAINER_ID={pod.container_id}"
        ),
        "CNI_PATH": cni_path(paths),
    }
    proc = subprocess.run(
        [str(paths.cni_bin_dir / "routed-cni")],
        input=json.dumps(netconf(paths, node)),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    output = json.loads(proc.stdout) if proc.stdout.strip() else {}
    if proc.returncode != 0:
        raise PodError(f"CNI {command} for {pod.key} failed: {output or proc.stderr.strip()}")
    return output


def new_pod(lab: str, namespace: str, name: str, node: str, ports: list[dict[str, Any]]) -> PodState:
    return PodState(
        namespace=namespace,
        name=name,
        node=node,
        netns=pod_netns_name(lab, namespace, name),
        container_id=hashlib.sha256(uuid.uuid4().bytes).hexdigest(),
        ports=ports,
    )


def server_args(pod: PodState) -> list[str]:
    tcp = ",".join(str(p["port"]) for p in pod.ports if p["protocol"] == "TCP")
    udp = ",".join(str(p["port"]) for p in pod.ports if p["protocol"] == "UDP")
    return ["--name", pod.key, "--tcp", tcp, "--udp", udp]


def create(paths: LabPaths, pod: PodState, runtime: str = "process") -> PodState:
    """Sandbox namespace → CNI ADD → pod server. Undone on failure. The containerd runtime: a CRI sandbox
    (containerd runs the CNI ADD) and the pod server as its container."""
    if runtime == "containerd":
        from routed.lab.cri import NodeRuntime

        pod.sandbox_id, pod.ips = NodeRuntime(paths, pod.node).run_pod(pod.namespace, pod.name, pod.netns,
                                                                       server_args(pod))
        try:
            if not pod.ips:
                raise PodError(f"CRI sandbox for {pod.key} has no IP")
            wait_serving(pod)
        except Exception:
            destroy(paths, pod, runtime)
            raise
        return pod
    netns.create(pod.netns)
    try:
        result = exec_cni("ADD", paths, pod.node, pod)
        pod.ips = [ip["address"].split("/")[0] for ip in result.get("ips", [])]
        if not pod.ips:
            raise PodError(f"CNI ADD for {pod.key} returned no IP: {result}")
        pod.server_pid = start_server(paths, pod)
        wait_serving(pod, log_path=paths.pod_dir() / f"{pod.namespace}_{pod.name}.log")
    except Exception:
        destroy(paths, pod)
        raise
    return pod


def start_server(paths: LabPaths, pod: PodState) -> int:
    log_dir = paths.pod_dir()
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{pod.namespace}_{pod.name}.log", "ab") as out:
        proc = subprocess.Popen(
            netns.ns_cmd(pod.netns, [sys.executable, "-m", "routed.lab.podserver", *server_args(pod)]),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    return proc.pid


def listening_ports(pod_netns: str) -> set[tuple[str, int]]:
    """(protocol, port) of every TCP listener and bound UDP socket in a pod's namespace."""
    out = netns.ns_run(pod_netns, ["ss", "-H", "-l", "-n", "-t", "-u"]).stdout
    bound = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0] in ("tcp", "udp"):
            bound.add((fields[0].upper(), int(fields[4].rsplit(":", 1)[1])))
    return bound


def wait_serving(pod: PodState, timeout: float = 30.0, log_path: Path | None = None) -> None:
    """Return once the pod server listens on every TCP and UDP port the pod declares — the lab's readiness
    probe: a pod is not handed to the caller (or the matrix) before it can answer."""
    wanted = {(str(p["protocol"]), int(p["port"])) for p in pod.ports if p["protocol"] in ("TCP", "UDP")}
    deadline = time.monotonic() + timeout
    backoff = Backoff(base=0.01, cap=0.2, jitter=0.0)
    while wanted:
        missing = wanted - listening_ports(pod.netns)
        if not missing:
            return
        if time.monotonic() > deadline:
            tail = read_log_tail(log_path) if log_path else ""
            raise PodError(f"the pod server of {pod.key} does not listen on {sorted(missing)} after "
                           f"{timeout:.0f} s" + (f"; its log ends:\n{tail}" if tail else ""))
        backoff.wait()


def destroy(paths: LabPaths, pod: PodState, runtime: str = "process") -> None:
    """CNI DEL (tolerant), stop the server, remove the namespace. The containerd runtime: stop and remove the
    sandbox (containerd runs the CNI DEL)."""
    if runtime == "containerd":
        from routed.lab.cri import CriError, NodeRuntime

        try:
            NodeRuntime(paths, pod.node).remove_pod(pod.sandbox_id, pod.netns)
        except CriError as exc:
            log.warning("removing sandbox of %s: %s", pod.key, exc)
        pod.sandbox_id = ""
        return
    try:
        exec_cni("DEL", paths, pod.node, pod)
    except (PodError, OSError, subprocess.TimeoutExpired, ValueError) as exc:
        log.warning("CNI DEL for %s: %s", pod.key, exc)
    if netns.exists(pod.netns):
        netns.delete(pod.netns)
    pod.server_pid = 0


def pod_object_with_status(obj: dict[str, Any], pod: PodState) -> dict[str, Any]:
    status = dict(obj.get("status") or {})
    status["phase"] = "Running"
    if pod.ips:
        status["podIP"] = pod.ips[0]
        status["podIPs"] = [{"ip": ip} for ip in pod.ips]
    return {**obj, "status": status}


def read_log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return ""
