"""The kube datastore at scale: a real kube-apiserver (scripts/kube-testenv) holding N pods and P policies, one
agent with the kube datastore in a node namespace wired to it. For N = 100 and N = 10,000 (same P, same run):
initial sync (agent start -> ready), the agent's RSS once synced, and event -> ipset latency for a label change
of a remote pod that joins (then leaves) a set the node programs. Prints the figures and the ratios 10k / 100.

    .venv/bin/python bench/kube_scale.py [--pods 10000] [--baseline 100] [--policies 1000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from policy.calc import selector_set  # noqa: E402
from policy.model import Peer  # noqa: E402
from policy.selectors import parse_selector  # noqa: E402
from routed import netns  # noqa: E402
from tests.agent_process import AgentProcess  # noqa: E402
from tests.helpers import run_and_expect  # noqa: E402
from tests.kube.netns_apiserver import NetnsApiserver  # noqa: E402

PREFIX = "rtd-kbs-"
PYTHON = str(REPO / ".venv" / "bin" / "python")
NODE, OTHER = "bench-node", "bench-other"
POD_CIDR = "10.88.0.0/24"
JOIN_APP = "joiner"


def pod_ip(i: int) -> str:
    return f"10.{64 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def load(kubeconfig: str, n_pods: int, n_policies: int) -> None:
    """Runs inside the node namespace: create the cluster objects through the API (8 writers in parallel)."""
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    api = k8s_config.new_client_from_config(config_file=kubeconfig)
    api.configuration.connection_pool_maxsize = 16
    core, net = k8s.CoreV1Api(api), k8s.NetworkingV1Api(api)
    for name, cidr in ((NODE, POD_CIDR), (OTHER, "10.64.0.0/10")):
        core.create_node({"metadata": {"name": name}, "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}})
    core.patch_node_status(NODE, {"status": {"addresses": [{"type": "InternalIP", "address": "10.123.0.2"}]}})
    n_ns = max(2, n_pods // 200)
    for i in range(n_ns):
        core.create_namespace({"metadata": {"name": f"ns{i}", "labels": {"team": f"t{i % 10}"}}})

    def make_pod(i: int) -> None:
        ns = f"ns{i % n_ns}"
        body = {"metadata": {"name": f"pod{i}", "namespace": ns, "labels": {"app": f"app{i % 100}", "tier": "be"}},
                "spec": {"nodeName": OTHER, "containers": [{"name": "c", "image": "x",
                                                            "ports": [{"containerPort": 8080, "name": "http"}]}]}}
        core.create_namespaced_pod(ns, body)
        core.patch_namespaced_pod_status(f"pod{i}", ns, {"status": {"podIP": pod_ip(i), "podIPs": [{"ip": pod_ip(i)}]}})

    def make_policy(j: int) -> None:
        ns = f"ns{j % n_ns}"
        peer = {"podSelector": {"matchLabels": {"app": f"app{(j * 7) % 100}"}}} if j % 2 else {
            "namespaceSelector": {"matchLabels": {"team": f"t{j % 10}"}}, "podSelector": {"matchLabels": {"tier": "fe"}}}
        body = {"metadata": {"name": f"pol{j}", "namespace": ns},
                "spec": {"podSelector": {"matchLabels": {"app": f"app{j % 100}"}},
                         "ingress": [{"from": [peer], "ports": [{"port": 8080}]}]}}
        net.create_namespaced_network_policy(ns, body)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(make_pod, range(n_pods)))
        list(pool.map(make_policy, range(n_policies)))
    # the local pod (wired by a CNI ADD below) and the policy that makes its node program a set of joiners
    core.create_namespaced_pod("ns0", {"metadata": {"name": "local", "namespace": "ns0", "labels": {"app": "web"}},
                                       "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "x"}]}})
    net.create_namespaced_network_policy("ns0", {
        "metadata": {"name": "web-from-joiners", "namespace": "ns0"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": JOIN_APP}}}]}]}})


def relabel(kubeconfig: str, namespace: str, name: str, app: str) -> None:
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    core = k8s.CoreV1Api(k8s_config.new_client_from_config(config_file=kubeconfig))
    core.patch_namespaced_pod(name, namespace, {"metadata": {"labels": {"app": app}}})


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cni_add(env: NetnsApiserver, agent: AgentProcess) -> None:
    pod_ns = f"{env.prefix}local"
    netns.create(pod_ns)
    conf = json.dumps({"cniVersion": "1.0.0", "name": "bench", "type": "routed-cni", "socketPath": agent.socket})
    environ = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "benchlocal", "CNI_NETNS": netns.netns_path(pod_ns),
               "CNI_IFNAME": "eth0", "CNI_ARGS": "K8S_POD_NAMESPACE=ns0;K8S_POD_NAME=local", "CNI_PATH": "/usr/lib/cni"}
    shim = str(REPO / ".venv" / "bin" / "routed-cni")
    out = subprocess.run(netns.ns_cmd(env.node_ns, [shim]), input=conf, env=environ, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"CNI ADD failed: {out.stdout}")


def one_run(n_pods: int, n_policies: int, changes: int) -> dict:
    with NetnsApiserver(PREFIX) as env:
        t0 = time.perf_counter()
        subprocess.run(netns.ns_cmd(env.node_ns, [PYTHON, __file__, "--load", env.kubeconfig, str(n_pods),
                                                  str(n_policies)]), check=True, cwd=REPO)
        load_s = time.perf_counter() - t0
        agent = AgentProcess(env.node_ns, str(Path(env.workdir, "agent")), NODE,
                             {"datastore": "kube", "kubeconfig": env.kubeconfig, "bgp": {"enabled": False}})
        try:
            t0 = time.perf_counter()
            agent.start()
            run_and_expect(agent.status, {"ready": True}, timeout=600, interval=0.05, ignore=(OSError,)).check(
                f"agent ready; log:\n{agent.log()[-3000:]}")
            sync_s = time.perf_counter() - t0
            assert agent.proc is not None
            rss = rss_mib(agent.proc.pid)
            cni_add(env, agent)
            set_name = selector_set("ns0", Peer(pod_selector=parse_selector({"matchLabels": {"app": JOIN_APP}}))).name
            latencies = []
            for k in range(changes):
                i = max(2, n_pods // 200) * (k // 2 + 1)  # a pod of namespace ns0 (pods go round the namespaces)
                name, ip = f"pod{i}", pod_ip(i)
                joining = k % 2 == 0
                subprocess.run(netns.ns_cmd(env.node_ns, [PYTHON, __file__, "--relabel", env.kubeconfig, "ns0", name,
                                                          JOIN_APP if joining else "app-gone"]), check=True, cwd=REPO)
                sent = time.perf_counter()

                def member(ip: str = ip) -> bool:
                    return netns.ns_run(env.node_ns, ["ipset", "test", set_name, ip], check=False).returncode == 0

                run_and_expect(member, joining, timeout=30, interval=0.005).check(f"{ip} in {set_name}: {joining}")
                latencies.append(time.perf_counter() - sent)
            rss_after = rss_mib(agent.proc.pid)
        finally:
            agent.stop()
            netns.delete(f"{env.prefix}local")
    return {"pods": n_pods, "policies": n_policies, "load_s": load_s, "initial_sync_s": sync_s, "rss_mib": rss,
            "rss_after_changes_mib": rss_after, "label_p50_s": statistics.median(latencies),
            "label_max_s": max(latencies), "label_changes": changes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=10000)
    ap.add_argument("--baseline", type=int, default=100)
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--load", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--relabel", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        load(args.load[0], int(args.load[1]), int(args.load[2]))
        return 0
    if args.relabel:
        relabel(*args.relabel)
        return 0
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    subprocess.run(["bash", str(REPO / "scripts" / "kube-testenv"), "build"], check=True)
    results = [one_run(n, args.policies, args.changes) for n in (args.baseline, args.pods)]
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{'pods':>7} {'policies':>8} {'API load':>9} {'sync':>8} {'RSS':>9} {'label p50':>10} {'label max':>10}")
    for r in results:
        print(f"{r['pods']:>7} {r['policies']:>8} {r['load_s']:>8.1f}s {r['initial_sync_s']:>7.2f}s "
              f"{r['rss_mib']:>6.0f} MiB {r['label_p50_s'] * 1000:>7.1f} ms {r['label_max_s'] * 1000:>7.1f} ms")
    base, big = results
    print(f"ratios {big['pods']} / {base['pods']} pods: sync x{big['initial_sync_s'] / base['initial_sync_s']:.2f}, "
          f"RSS x{big['rss_mib'] / base['rss_mib']:.2f}, label change x{big['label_p50_s'] / base['label_p50_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
