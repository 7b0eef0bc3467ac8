"""The lab's containerd runtime (`routed lab up --runtime containerd`): one real containerd per node namespace
(scripts/containerd-env), the agent running there as a container from the agent image (scripts/build-image)
the way the DaemonSet runs it, and lab pods as CRI sandboxes, so every CNI call comes from containerd's libcni.

Per node, under the node's directory: containerd/ (its root, state, socket; pod netns under its state dir),
cni/bin and cni/net.d (the node's /opt/cni/bin and /etc/cni/net.d, filled by the install-cni init container),
config/ (the agent's ConfigMap: agent.yaml and the conflist), state/, run/ (the agent's socket), log/,
pod-volumes/routed/<name> (the pod's emptyDir volumes: kept across agent container restarts, like a kubelet's).
The agent pod's security settings and volume mounts come from deploy/daemonset.yaml (routed/lab/daemonset.py):
the node directory stands for the node's root (HOST_PATHS), so every hostPath of the DaemonSet needs an entry.
A pod sandbox's network namespace is also attached as `rtd-<lab>-p-…`, so the lab's probes and `lab exec`
reach CRI pods exactly like process-runtime pods.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routed import netns
from routed.lab import daemonset
from routed.lab.errors import LabError
from routed.lab.state import LabPaths

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CONTAINERD_ENV = REPO / "scripts" / "containerd-env"
BUILD_IMAGE = REPO / "scripts" / "build-image"
AGENT_IMAGE = "docker.io/library/routed:latest"
POD_IMAGE = "docker.io/routed-lab/podserver:1"
AGENT_NAMESPACE = "routed-system"
# the DaemonSet's hostPath volumes → the node directory's stand-ins (NETNS_HOST_PATH: containerd's netns dir)
HOST_PATHS = {"/var/lib/routed": "state", "/var/run/routed": "run", "/var/log/routed": "log",
              "/run/xtables.lock": "xtables.lock", "/opt/cni/bin": "cni/bin", "/etc/cni/net.d": "cni/net.d"}
NETNS_HOST_PATH = "/var/run/netns"
# what a kubelet puts in every unprivileged container's security context (crictl does not add them itself)
READONLY_PATHS = ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
MASKED_PATHS = ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"]
NETWORK_NODE = 2  # NamespaceMode NODE: the sandbox shares the node's network namespace (hostNetwork)
HOST_TO_CONTAINER = 1  # MountPropagation PROPAGATION_HOST_TO_CONTAINER (rslave)


class CriError(LabError):
    pass


def _script(script: Path, *args: str, timeout: float = 1800) -> str:
    proc = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise CriError(f"{script.name} {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()


def prepare() -> dict[str, str]:
    """Build (cached) containerd, crictl and the pause image, the agent image and the pod image."""
    _script(CONTAINERD_ENV, "build")
    return {"agent": _script(BUILD_IMAGE).splitlines()[-1], "pod": _script(BUILD_IMAGE, "--pod").splitlines()[-1],
            "bindir": _script(CONTAINERD_ENV, "bindir")}


@dataclass
class NodeRuntime:
    """One node's containerd and the CRI calls the lab makes on it."""

    paths: LabPaths
    node: str

    @property
    def dir(self) -> Path:
        return self.paths.node_dir(self.node) / "containerd"

    @property
    def cni_bin(self) -> Path:
        return self.paths.node_dir(self.node) / "cni" / "bin"

    @property
    def cni_conf(self) -> Path:
        return self.paths.node_dir(self.node) / "cni" / "net.d"

    @property
    def netns_dir(self) -> Path:
        return self.dir / "state" / "io.containerd.grpc.v1.cri" / "netns"

    def start(self, node_netns: str, images: dict[str, str]) -> None:
        self.cni_bin.mkdir(parents=True, exist_ok=True)
        self.cni_conf.mkdir(parents=True, exist_ok=True)
        _script(CONTAINERD_ENV, "start", "--dir", str(self.dir), "--netns", node_netns, "--cni-bin-dir",
                str(self.cni_bin), "--cni-conf-dir", str(self.cni_conf), timeout=120)
        for archive in (images["agent"], images["pod"]):
            _script(CONTAINERD_ENV, "import", "--dir", str(self.dir), archive, timeout=300)

    def stop(self) -> None:
        if (self.dir / "crictl.yaml").exists():
            _script(CONTAINERD_ENV, "stop", "--dir", str(self.dir), timeout=300)

    def crictl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        bindir = _script(CONTAINERD_ENV, "bindir", timeout=30)
        proc = subprocess.run([f"{bindir}/crictl", "--config", str(self.dir / "crictl.yaml"), *args],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise CriError(f"crictl {' '.join(args)} on {self.node}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def _json_file(self, data: dict[str, Any]) -> str:
        fd, path = tempfile.mkstemp(prefix="cri-", suffix=".json", dir=self.dir)
        with open(fd, "w") as f:
            json.dump(data, f)
        return path

    def run_sandbox(self, config: dict[str, Any]) -> str:
        return self.crictl("runp", self._json_file(config)).stdout.strip()

    def run_container(self, sandbox: str, sandbox_config: dict[str, Any], config: dict[str, Any]) -> str:
        cid = self.crictl("create", sandbox, self._json_file(config), self._json_file(sandbox_config)).stdout.strip()
        self.crictl("start", cid)
        return cid

    def inspect(self, what: str, ident: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.crictl(what, "-o", "json", ident).stdout)
        return out

    def remove_sandbox(self, sandbox: str) -> None:
        self.crictl("stopp", sandbox)
        self.crictl("rmp", sandbox)

    def network_ready(self) -> bool:
        info = json.loads(self.crictl("info").stdout)
        return any(c.get("type") == "NetworkReady" and c.get("status") for c in info["status"]["conditions"])

    # -- the agent, as the DaemonSet runs it ----------------------------------------------------------
    def agent_sandbox_config(self) -> dict[str, Any]:
        node_dir = self.paths.node_dir(self.node)
        return {"metadata": {"name": f"routed-{self.node}", "namespace": AGENT_NAMESPACE, "uid": f"routed-{self.node}",
                             "attempt": 0},
                "log_directory": str(node_dir / "pod-logs" / "routed"),  # host network: the node's hostname
                "linux": {"security_context": {"namespace_options": {"network": NETWORK_NODE},
                                               **daemonset.load().sandbox_security_context}}}

    def _mounts(self, container: daemonset.Container) -> list[dict[str, Any]]:
        """The container's volume mounts on this node: hostPaths under the node directory (containerd's netns
        dir for /var/run/netns, at its own path), the ConfigMap as config/, emptyDirs under pod-volumes/."""
        node_dir = self.paths.node_dir(self.node)
        out = []
        for m in container.mounts:
            container_path = m.path
            if m.kind == "configMap":
                host = node_dir / "config"
            elif m.kind == "emptyDir":
                host = node_dir / "pod-volumes" / "routed" / m.volume
                host.mkdir(parents=True, exist_ok=True)
            elif m.host_path == NETNS_HOST_PATH:  # pod netns at the path containerd gives the CNI call
                self.netns_dir.mkdir(parents=True, exist_ok=True)
                host, container_path = self.netns_dir, str(self.netns_dir)
            elif m.host_path in HOST_PATHS:
                host = node_dir / HOST_PATHS[m.host_path]
            else:
                raise CriError(f"the DaemonSet mounts hostPath {m.host_path} into {container.name}, which the lab "
                               "does not provide", "add it to routed.lab.cri.HOST_PATHS")
            mount: dict[str, Any] = {"container_path": container_path, "host_path": str(host),
                                     "readonly": m.read_only}
            if m.propagation == "HostToContainer":
                mount["propagation"] = HOST_TO_CONTAINER
            out.append(mount)
        return out

    @staticmethod
    def _security_context(container: daemonset.Container) -> dict[str, Any]:
        """The DaemonSet's securityContext plus the /proc paths a kubelet masks or makes read-only."""
        return {**container.security_context, "readonly_paths": READONLY_PATHS, "masked_paths": MASKED_PATHS}

    def start_agent(self, shared: list[str]) -> tuple[str, str]:
        """The install-cni init container (run to completion), then the agent container; (sandbox, container).
        `shared`: host paths the agent needs at the same path (the manifest directory, a kubeconfig's)."""
        node_dir = self.paths.node_dir(self.node)
        for sub in ("pod-logs/routed", "state", "run", "log"):
            (node_dir / sub).mkdir(parents=True, exist_ok=True)
        lock = node_dir / "xtables.lock"
        lock.touch()
        sandbox_config = self.agent_sandbox_config()
        sandbox = self.run_sandbox(sandbox_config)
        install_cni = daemonset.load().containers["install-cni"]
        init = self.run_container(sandbox, sandbox_config, {
            "metadata": {"name": "install-cni"}, "image": {"image": AGENT_IMAGE},
            "command": ["/opt/routed/bin/python", "/opt/routed/deploy/install-cni.py"],
            "args": ["--plugin=/opt/routed/bin/routed-cni", "--bin-dir=/host/opt/cni/bin",
                     "--conf-dir=/host/etc/cni/net.d", "--conflist=/etc/routed/10-routed.conflist"],
            "log_path": "install-cni.log", "mounts": self._mounts(install_cni),
            "linux": {"security_context": self._security_context(install_cni)},
        })
        self._wait_exited(init)
        return sandbox, self.start_agent_container(sandbox, shared)

    def start_agent_container(self, sandbox: str, shared: list[str], attempt: int = 0) -> str:
        agent = daemonset.load().containers["agent"]
        mounts = self._mounts(agent) + [{"container_path": p, "host_path": p, "readonly": True} for p in shared]
        return self.run_container(sandbox, self.agent_sandbox_config(), {
            "metadata": {"name": "agent", "attempt": attempt}, "image": {"image": AGENT_IMAGE},
            "command": ["routed", "agent", "--config", "/etc/routed/agent.yaml"],
            "envs": [{"key": "ROUTED_NODE_NAME", "value": self.node}],
            "log_path": f"agent-{attempt}.log", "mounts": mounts,
            "linux": {"security_context": self._security_context(agent)},
        })

    def _wait_exited(self, container: str, timeout: float = 60) -> None:
        from routed.lab.lab import poll  # here: routed.lab.lab imports this module

        def exited() -> dict[str, Any] | None:
            status = self.inspect("inspect", container)["status"]
            return status if status["state"] == "CONTAINER_EXITED" else None

        status = poll(exited, timeout, interval=0.2)
        if not status:
            raise CriError(f"{container} on {self.node} did not finish in {timeout:.0f}s")
        if status.get("exitCode") != 0:
            log_path = status.get("logPath", "")
            tail = Path(log_path).read_text()[-2000:] if log_path and Path(log_path).exists() else ""
            raise CriError(f"install-cni on {self.node} exited with {status.get('exitCode')}: {tail}")

    def container_state(self, container: str) -> tuple[str, int]:
        """(state, pid) of a container ("" if it is gone)."""
        try:
            out = self.inspect("inspect", container)
        except CriError:
            return "", 0
        return out["status"]["state"], int((out.get("info") or {}).get("pid") or 0)

    # -- workload pods -----------------------------------------------------------------------------------
    def run_pod(self, namespace: str, name: str, lab_netns: str, server_args: list[str]) -> tuple[str, list[str]]:
        """A CRI sandbox (CNI ADD by containerd) with the pod server container; its netns attached as
        `lab_netns`. Returns (sandbox id, IPs)."""
        log_dir = self.paths.node_dir(self.node) / "pod-logs" / f"{namespace}_{name}"
        log_dir.mkdir(parents=True, exist_ok=True)
        sandbox_config = {"metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "attempt": 0},
                          "hostname": name, "log_directory": str(log_dir), "linux": {}}
        sandbox = self.run_sandbox(sandbox_config)
        try:
            info = self.inspect("inspectp", sandbox)
            network = info["status"].get("network") or {}
            ips = [network["ip"]] + [a["ip"] for a in network.get("additionalIps") or []] if network.get("ip") else []
            path = next(n["path"] for n in info["info"]["runtimeSpec"]["linux"]["namespaces"] if n["type"] == "network")
            netns.attach(lab_netns, path)
            self.run_container(sandbox, sandbox_config, {
                "metadata": {"name": "server"}, "image": {"image": POD_IMAGE}, "args": server_args,
                "log_path": "server.log"})
        except Exception:
            self.remove_pod(sandbox, lab_netns)
            raise
        return sandbox, ips

    def remove_pod(self, sandbox: str, lab_netns: str) -> None:
        netns.detach(lab_netns)  # our name for it first, so CNI DEL and the sandbox's teardown free the namespace
        self.remove_sandbox(sandbox)
