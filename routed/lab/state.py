"""Where a lab keeps its files, and its persisted state (nodes, pods, processes)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LAB_ROOT = "/run/routed-lab"
FAMILIES = {"ipv4": (4,), "ipv6": (6,), "dual": (4, 6)}  # --ip-family → IP versions, the first is primary


class LabPaths:
    def __init__(self, lab: str) -> None:
        self.lab = lab
        self.root = Path(LAB_ROOT) / lab

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def cluster_dir(self) -> Path:
        """The manifest datastore every agent of this lab watches."""
        return self.root / "cluster"

    @property
    def supervisor_pid(self) -> Path:
        return self.root / "supervisor.pid"

    @property
    def supervisor_log(self) -> Path:
        return self.root / "supervisor.log"

    def node_dir(self, node: str) -> Path:
        return self.root / "nodes" / node

    def node_socket(self, node: str) -> str:
        """The agent's local API as the host sees it (the containerd runtime mounts run/ as /var/run/routed)."""
        return str(self.node_dir(node) / "run" / "agent.sock")

    def agent_log(self, node: str) -> Path:
        return self.node_dir(node) / "log" / "agent.log"

    def node_config(self, node: str) -> Path:
        """The agent's config file (the containerd runtime mounts config/ as /etc/routed, like the ConfigMap)."""
        return self.node_dir(node) / "config" / "agent.yaml"

    def agent_pid(self, node: str) -> Path:
        return self.node_dir(node) / "agent.pid"

    @property
    def cni_bin_dir(self) -> Path:
        """Where the lab installs the static `routed-cni`, as a node's /opt/cni/bin."""
        return self.root / "cni-bin"

    @property
    def kube_dir(self) -> Path:
        """The lab's API server and etcd state (datastore kube)."""
        return self.root / "kube"

    def pod_dir(self) -> Path:
        return self.root / "pods"


@dataclass
class NodeState:
    name: str
    netns: str
    address: str  # InternalIP (uplink address) of the lab's first IP family
    pod_cidr: str  # the pod CIDR of the first family (spec.podCIDR)
    asn: int = 0
    rack: str = ""
    # {"ifname", "address", "tor", "tor_ifname", "tor_address", "addresses", "tor_addresses"}: address and
    # tor_address of the first family; the lists hold one per family (IPv4 first in a dual-stack lab)
    uplinks: list[dict[str, Any]] = field(default_factory=list)
    pod_cidrs: list[str] = field(default_factory=list)  # spec.podCIDRs: one per family, the first = pod_cidr

    def cidrs(self) -> list[str]:
        return self.pod_cidrs or [self.pod_cidr]


@dataclass
class PodState:
    namespace: str
    name: str
    node: str
    netns: str
    container_id: str
    ips: list[str] = field(default_factory=list)
    server_pid: int = 0
    ports: list[dict[str, Any]] = field(default_factory=list)  # {"port", "protocol", "name"}
    sandbox_id: str = ""  # the containerd runtime: the pod's CRI sandbox
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class TorState:
    name: str
    netns: str
    asn: int = 0
    kind: str = "static"
    address: str = ""  # router id / loopback


@dataclass
class LabState:
    lab: str
    tor_kind: str = "static"
    topology: str = "as-per-node"
    datastore: str = "manifest"  # manifest | kube
    runtime: str = "process"  # process (agents as processes, pods by executing routed-cni) | containerd
    control_plane: dict[str, Any] = field(default_factory=dict)  # kube: {"netns", "address", "tor", ...}
    external: dict[str, Any] = field(default_factory=dict)  # the client outside the cluster: {"netns", "address", ...}
    ip_family: str = "ipv4"  # ipv4 | ipv6 | dual: how uplinks, ToRs and pods are addressed
    ipv6_over_ipv4: bool = False  # dual: IPv6 unicast rides the IPv4 sessions (explicit next hops), no IPv6 session
    bfd: bool = False  # BFD between every node and its ToRs (FRR bfdd on the ToRs, the agent's BFD on the nodes)
    nodes: list[NodeState] = field(default_factory=list)
    tors: list[TorState] = field(default_factory=list)
    pods: dict[str, PodState] = field(default_factory=dict)
    services: dict[str, dict[str, Any]] = field(default_factory=dict)  # "ns/name" -> the Service as applied
    endpoint_slices: dict[str, dict[str, Any]] = field(default_factory=dict)  # Service key -> slice written

    @property
    def families(self) -> tuple[int, ...]:
        return FAMILIES[self.ip_family]

    def node(self, name: str) -> NodeState:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} in lab {self.lab!r} (nodes: {', '.join(n.name for n in self.nodes)})")

    def save(self, paths: LabPaths) -> None:
        paths.root.mkdir(parents=True, exist_ok=True)
        tmp = paths.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, paths.state_file)

    @classmethod
    def load(cls, paths: LabPaths) -> LabState:
        data = json.loads(paths.state_file.read_text())
        return cls(
            lab=data["lab"],
            tor_kind=data.get("tor_kind", "static"),
            topology=data.get("topology", "as-per-node"),
            datastore=data.get("datastore", "manifest"),
            runtime=data.get("runtime", "process"),
            control_plane=data.get("control_plane", {}),
            external=data.get("external", {}),
            ip_family=data.get("ip_family", "ipv4"),
            ipv6_over_ipv4=bool(data.get("ipv6_over_ipv4", False)),
            bfd=bool(data.get("bfd", False)),
            nodes=[NodeState(**n) for n in data.get("nodes", [])],
            tors=[TorState(**t) for t in data.get("tors", [])],
            pods={k: PodState(**p) for k, p in data.get("pods", {}).items()},
            services=data.get("services", {}),
            endpoint_slices=data.get("endpoint_slices", {}),
        )

    @classmethod
    def exists(cls, paths: LabPaths) -> bool:
        return paths.state_file.exists()
