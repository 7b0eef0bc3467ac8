"""Datapath benchmark: pod-to-pod across nodes through the lab's ToR, with iperf3.

Measures TCP throughput and 64-byte UDP packets per second from a client pod on node1 to a server pod on
node2, in three set-ups measured in the same run, interleaved:
  routed, no policy           — the baseline
  routed, 1,000 policies      — all selecting the server pod (999 that never match, 1 that allows the client)
  kernel VXLAN overlay        — the same nodes, pod traffic routed through a VXLAN device (what Flannel runs)
and prints the ratios: policy / baseline (goal ≥ 0.97) and routed / VXLAN.
`--family 6` runs it all on an IPv6-only lab: IPv6 pods, ip6tables policies (IPv6 ipBlocks), and the VXLAN
overlay over the nodes' IPv6 addresses.

Usage: .venv/bin/python bench/datapath.py [--seconds 4] [--rounds 2] [--policies 1000] [--family 4|6]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from routed import api, netns
from routed.lab.lab import Lab

IPERF_PORT = 5201
VXLAN_NET = {4: ("100.64.0.{}", 24), 6: ("fd00:6464::{}", 64)}  # the overlay's own addresses per family


def noise_cidr(i: int, family: int) -> str:
    """Distinct source networks of the never-matching policies."""
    return f"172.{16 + i // 250 % 16}.{i % 250}.0/24" if family == 4 else f"fd00:172:{i:x}::/64"


def pods_manifest() -> str:
    docs: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}}]
    for name, node in (("client", "node1"), ("server", "node2")):
        docs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": name, "namespace": "bench", "labels": {"app": name}},
                     # no containerPorts: the lab's pod server would take iperf3's port (the policy names the
                     # port by number)
                     "spec": {"nodeName": node, "containers": [{"name": "iperf"}]}})
    return yaml.safe_dump_all(docs)


def policies_manifest(count: int, family: int = 4) -> str:
    docs: list[dict[str, Any]] = []
    for i in range(count - 1):  # never match the benchmark's traffic, but all select the server pod
        docs.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "metadata": {"name": f"noise-{i}", "namespace": "bench"},
                     "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                              "ingress": [{"from": [{"ipBlock": {"cidr": noise_cidr(i, family)}}],
                                           "ports": [{"port": 1000 + i, "protocol": "TCP"}]}]}})
    docs.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                 "metadata": {"name": "allow-client", "namespace": "bench"},
                 "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                          "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                       "ports": [{"port": IPERF_PORT, "protocol": "TCP"},
                                                 {"port": IPERF_PORT, "protocol": "UDP"}]}]}})
    return yaml.safe_dump_all(docs)


def iperf(client_ns: str, server_ip: str, seconds: int, udp: bool) -> float:
    cmd = ["iperf3", "-c", server_ip, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    if udp:
        cmd += ["-u", "-l", "64", "-b", "0"]
    for _attempt in range(3):  # the server answers one test at a time; retry a busy one
        proc = subprocess.run(netns.ns_cmd(client_ns, cmd), capture_output=True, text=True, timeout=seconds + 30)
        data = json.loads(proc.stdout or "{}")
        if "end" in data and not data.get("error"):
            break
        time.sleep(0.5)
    else:
        raise RuntimeError(f"iperf3 failed: {proc.stdout[-500:]} {proc.stderr[-500:]}")
    if udp:
        summary = data["end"]["sum"]
        received = summary["packets"] - summary["lost_packets"]
        return received / summary["seconds"]  # packets per second delivered
    return data["end"]["sum_received"]["bits_per_second"] / 1e9  # Gbit/s


def wait_policy_applied(lab: Lab, expected_invalid: int = 0, minimum_rules: int = 0, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    report: dict = {}
    while time.monotonic() < deadline:
        report = api.call(lab.paths.node_socket("node2"), "policy.report")
        if report.get("rules", 0) >= minimum_rules and len(report.get("invalidPolicies") or []) == expected_invalid:
            return report
        time.sleep(0.5)
    raise RuntimeError(f"policies not applied in time: {report}")


class Vxlan:
    """A VXLAN overlay between node1 and node2 that carries the pod CIDRs instead of the routed fabric."""

    def __init__(self, lab: Lab) -> None:
        self.state = lab.state()
        self.nodes = self.state.nodes[:2]
        self.family = ipaddress.ip_address(self.nodes[0].address).version  # the lab's first family

    def up(self) -> None:
        template, plen = VXLAN_NET[self.family]
        for i, node in enumerate(self.nodes):
            peer = self.nodes[1 - i]
            ns = node.netns
            netns.run(["ip", "-n", ns, "link", "add", "vx0", "type", "vxlan", "id", "42", "local", node.address,
                       "remote", peer.address, "dstport", "4789", "dev", "eth0"])
            netns.run(["ip", "-n", ns, "addr", "add", f"{template.format(i + 1)}/{plen}", "dev", "vx0", "nodad"])
            netns.run(["ip", "-n", ns, "link", "set", "vx0", "up"])
            netns.run(["ip", "-n", ns, "route", "replace", peer.pod_cidr, "via", template.format(2 - i), "dev",
                       "vx0", "onlink"])

    def down(self) -> None:
        for i, node in enumerate(self.nodes):
            netns.run(["ip", "-n", node.netns, "route", "del", self.nodes[1 - i].pod_cidr, "dev", "vx0"], check=False)
            netns.run(["ip", "-n", node.netns, "link", "del", "vx0"], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--policies", type=int, default=1000)
    parser.add_argument("--family", type=int, choices=[4, 6], default=4, help="6: an IPv6-only lab")
    args = parser.parse_args()

    lab = Lab("bdp")
    work = Path(tempfile.mkdtemp(prefix="rtd-bench-"))
    (work / "pods.yaml").write_text(pods_manifest())
    (work / "policies.yaml").write_text(policies_manifest(args.policies, args.family))
    results: dict[str, dict[str, list[float]]] = {}
    try:
        lab.up(nodes=2, files=[str(work / "pods.yaml")], tor="static",  # VXLAN routes stand in for the fabric
               ip_family="ipv4" if args.family == 4 else "ipv6")
        state = lab.state()
        client, server = state.pods["bench/client"], state.pods["bench/server"]
        server_ip = next(ip for ip in server.ips if ipaddress.ip_address(ip).version == args.family)
        iperf_server = subprocess.Popen(netns.ns_cmd(server.netns, ["iperf3", "-s", "-p", str(IPERF_PORT)]),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        vxlan = Vxlan(lab)
        try:
            time.sleep(0.5)  # benchmark only: let iperf3 bind before the first run
            for _round in range(args.rounds):
                for setup in ("routed", "routed+policies", "vxlan"):
                    if setup == "routed+policies":
                        lab.apply(str(work / "policies.yaml"))
                        report = wait_policy_applied(lab, minimum_rules=args.policies)
                    if setup == "vxlan":
                        vxlan.up()
                    try:
                        row = results.setdefault(setup, {"tcp_gbps": [], "udp64_pps": []})
                        row["tcp_gbps"].append(iperf(client.netns, server_ip, args.seconds, udp=False))
                        row["udp64_pps"].append(iperf(client.netns, server_ip, args.seconds, udp=True))
                    finally:
                        if setup == "vxlan":
                            vxlan.down()
                        if setup == "routed+policies":
                            lab.delete(str(work / "policies.yaml"))
                            wait_policy_applied(lab)
        finally:
            iperf_server.kill()
            iperf_server.wait()
    finally:
        lab.down(quiet=True)

    med = {s: {k: statistics.median(v) for k, v in row.items()} for s, row in results.items()}
    print(f"datapath (IPv{args.family}): client pod on node1 -> server pod on node2 through the ToR; {args.rounds} rounds x "
          f"{args.seconds}s, medians; {args.policies} policies selecting the server "
          f"({report.get('rules')} rules, {report.get('ipsets')} ipsets on node2)")
    print(f"{'setup':<18} {'TCP Gbit/s':>11} {'UDP 64B pps':>12}")
    for setup, row in med.items():
        print(f"{setup:<18} {row['tcp_gbps']:>11.2f} {row['udp64_pps']:>12.0f}")
    base, pol, vx = med["routed"], med["routed+policies"], med["vxlan"]
    print(f"ratio policies/no-policy: TCP {pol['tcp_gbps'] / base['tcp_gbps']:.3f}  "
          f"UDP pps {pol['udp64_pps'] / base['udp64_pps']:.3f}  (goal >= 0.97)")
    print(f"ratio routed/vxlan:       TCP {base['tcp_gbps'] / vx['tcp_gbps']:.3f}  "
          f"UDP pps {base['udp64_pps'] / vx['udp64_pps']:.3f}")


if __name__ == "__main__":
    main()
