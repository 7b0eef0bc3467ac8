"""A one-node topology for the policy tests, wired like routed's CNI, dual-stack.

node namespace: host veths `rtd` + 11 hex (proxy_arp, /32 route per pod; with an IPv6 pod address also
fe80::1/64 nodad and a /128 route), IPv4 and IPv6 forwarding on, an uplink to an "outside" namespace (remote
pods / ipBlock addresses 10.99.0.1 and 10.99.1.1, fd98::1 and fd98:0:1::1). Pods: eth0 with a /32 and a
default route via 169.254.1.1 onlink and, optionally, an IPv6 /128 (nodad) and the default route
`::/0 via fe80::1 dev eth0`; each runs policy_pod_server.py on all its addresses.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field

from routed import netns
from routed.model import ContainerPort, Endpoint, Namespace, Pod

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = os.path.join(REPO, ".venv", "bin", "python")
TCP_PORTS = (80, 8080, 9000, 9001, 9002, 9003)
UDP_PORTS = (53, 5353)
NODE_IP = "192.168.250.1"
OUTSIDE_LINK_IP = "192.168.250.2"
OUTSIDE_IPS = ("10.99.0.1", "10.99.1.1")
NODE_IP6 = "fd99:250::1"
OUTSIDE_LINK_IP6 = "fd99:250::2"
OUTSIDE_IPS6 = ("fd98::1", "fd98:0:1::1")  # inside fd98::/32; the second also inside fd98:0:1::/48
POD_CIDR6 = "fd00:244::/64"
GATEWAY6 = "fe80::1"


def host_veth(prefix: str, name: str) -> str:
    return "rtd" + hashlib.sha256(f"{prefix}/{name}".encode()).hexdigest()[:11]


@dataclass
class TestPod:
    namespace: str
    name: str
    ip: str
    ns: str  # network namespace
    host_if: str
    labels: dict[str, str] = field(default_factory=dict)
    ports: tuple[ContainerPort, ...] = ()
    ip6: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ips(self) -> tuple[str, ...]:
        return (self.ip,) + ((self.ip6,) if self.ip6 else ())

    def pod(self) -> Pod:
        return Pod(self.namespace, self.name, dict(self.labels), "node", self.ips, self.ports)

    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, "eth0", netns.netns_path(self.ns), self.host_if, self.ips, self.namespace,
                        self.name)


class PolicyTopo:
    def __init__(self, prefix: str) -> None:
        assert prefix.startswith("rtd-pol")
        self.prefix = prefix
        self.node = f"{prefix}-node"
        self.outside = f"{prefix}-out"
        self.pods: dict[str, TestPod] = {}
        self.servers: list[subprocess.Popen[bytes]] = []

    def up(self) -> PolicyTopo:
        netns.delete_all(self.prefix)
        netns.create(self.node)
        netns.create(self.outside)
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
                    "net.ipv6.conf.all.forwarding=1"):
            netns.ns_run(self.node, ["sysctl", "-qw", key])
        for ns in (self.node, self.outside):  # link-local addresses usable at once: no neighbour discovery waits
            netns.ns_run(ns, ["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"])
        netns.veth(self.node, "ext0", self.outside, "eth0")
        netns.ns_run(self.node, ["ip", "addr", "add", f"{NODE_IP}/30", "dev", "ext0"])
        netns.ns_run(self.node, ["ip", "route", "add", "default", "via", OUTSIDE_LINK_IP])
        netns.ns_run(self.node, ["ip", "-6", "addr", "add", f"{NODE_IP6}/64", "dev", "ext0", "nodad"])
        netns.ns_run(self.node, ["ip", "-6", "route", "add", "default", "via", OUTSIDE_LINK_IP6])
        netns.ns_run(self.outside, ["ip", "addr", "add", f"{OUTSIDE_LINK_IP}/30", "dev", "eth0"])
        netns.ns_run(self.outside, ["ip", "-6", "addr", "add", f"{OUTSIDE_LINK_IP6}/64", "dev", "eth0", "nodad"])
        for ip in OUTSIDE_IPS:
            netns.ns_run(self.outside, ["ip", "addr", "add", f"{ip}/32", "dev", "lo"])
        for ip in OUTSIDE_IPS6:
            netns.ns_run(self.outside, ["ip", "-6", "addr", "add", f"{ip}/128", "dev", "lo", "nodad"])
        netns.ns_run(self.outside, ["ip", "route", "add", "10.244.0.0/16", "via", NODE_IP])
        netns.ns_run(self.outside, ["ip", "-6", "route", "add", POD_CIDR6, "via", NODE_IP6])
        self._serve(self.outside, (*OUTSIDE_IPS, OUTSIDE_LINK_IP, *OUTSIDE_IPS6, OUTSIDE_LINK_IP6))
        return self

    def _serve(self, ns: str, addrs: tuple[str, ...]) -> None:
        cmd = netns.ns_cmd(ns, [PYTHON, os.path.join(REPO, "tests/netns/policy_pod_server.py"),
                                ",".join(map(str, TCP_PORTS)), ",".join(map(str, UDP_PORTS)), ",".join(addrs)])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        self.servers.append(proc)

    def add_pod(self, namespace: str, name: str, ip: str, labels: dict[str, str] | None = None,
                ports: tuple[ContainerPort, ...] = (), ip6: str | None = None) -> TestPod:
        ns = f"{self.prefix}-{name}"
        host_if = host_veth(self.prefix, name)
        netns.create(ns)
        # the pod's link-local address usable at once (no DAD): neighbour discovery from it is what the
        # ICMPv6 rules must let through
        netns.ns_run(ns, ["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"])
        netns.veth(self.node, host_if, ns, "eth0")
        netns.ns_run(ns, ["ip", "addr", "add", f"{ip}/32", "dev", "eth0"])
        netns.ns_run(ns, ["ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"])
        netns.ns_run(ns, ["ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0", "onlink"])
        netns.ns_run(self.node, ["sysctl", "-qw", f"net.ipv4.conf.{host_if}.proxy_arp=1"])
        # proxy ARP answers are delayed up to 0.8 s by default (neigh proxy_delay); Calico sets 0 too
        netns.ns_run(self.node, ["sysctl", "-qw", f"net.ipv4.neigh.{host_if}.proxy_delay=0"])
        netns.ns_run(self.node, ["ip", "route", "add", f"{ip}/32", "dev", host_if])
        if ip6:
            self._wire_ip6(ns, host_if, ip6)
        self._serve(ns, (ip, ip6) if ip6 else (ip,))
        pod = TestPod(namespace, name, ip, ns, host_if, dict(labels or {}), ports, ip6)
        self.pods[name] = pod
        return pod

    def _wire_ip6(self, ns: str, host_if: str, ip6: str) -> None:
        """As the CNI wires IPv6: fe80::1/64 on the host veth, the pod's /128 and its default route via fe80::1."""
        netns.ns_run(self.node, ["ip", "-6", "addr", "add", f"{GATEWAY6}/64", "dev", host_if, "nodad"])
        netns.ns_run(ns, ["ip", "-6", "addr", "add", f"{ip6}/128", "dev", "eth0", "nodad"])
        netns.ns_run(ns, ["ip", "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0"])
        netns.ns_run(self.node, ["ip", "-6", "route", "add", f"{ip6}/128", "dev", host_if])

    def neighbour(self, ns: str, addr: str, dev: str) -> str:
        """The NUD state of `addr` in `ns`'s neighbour table ('' when absent)."""
        out = netns.ns_run(ns, ["ip", "-6", "neigh", "show", addr, "dev", dev]).stdout.split()
        return out[-1] if out else ""

    def down(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.servers.clear()
        netns.delete_all(self.prefix)

    # -- probing ------------------------------------------------------------------------------------------
    def probe(self, src_ns: str, targets: list[tuple]) -> list[bool]:
        out = netns.ns_run(src_ns, [PYTHON, os.path.join(REPO, "tests/netns/policy_probe.py"),
                                    json.dumps([list(t) for t in targets])], timeout=30)
        return json.loads(out.stdout)

    def reach(self, src: str, dst_ip: str, port: int, proto: str = "TCP") -> bool:
        """From a pod or "outside" (from the address the kernel picks for the destination)."""
        src_ns = self.outside if src == "outside" else self.pods[src].ns
        return self.probe(src_ns, [(dst_ip, port, proto)])[0]

    def matrix(self, checks: list[tuple[str, str, int, str]]) -> list[bool]:
        """checks: (src pod name | 'outside', dst ip, port, proto); grouped per source, run in parallel."""
        by_src: dict[str, list[int]] = {}
        for i, (src, *_rest) in enumerate(checks):
            by_src.setdefault(src, []).append(i)
        result = [False] * len(checks)
        for src, idxs in by_src.items():
            src_ns = self.outside if src == "outside" else self.pods[src].ns
            got = self.probe(src_ns, [checks[i][1:] for i in idxs])
            for i, ok in zip(idxs, got, strict=True):
                result[i] = ok
        return result

    def namespaces(self, labels: dict[str, dict[str, str]]) -> list[Namespace]:
        names = {p.namespace for p in self.pods.values()} | set(labels)
        return [Namespace(n, dict(labels.get(n, {}))) for n in sorted(names)]
