"""The lab at cluster scale: a 2-node lab (real agents, manifest datastore) in a cluster that also holds N pods on
other nodes and P policies (objects only). Measured against the same lab with an empty cluster, in one run:
- one pod applied (`lab apply`: object, sandbox, CNI ADD with its policy, pod server; the median of 5, each once
  the agent has settled) — ratio at scale / empty;
- 20 pods applied at once, until every one is wired;
- 50 concurrent CNI ADDs on one node (the static routed-cni, as a runtime runs it), until all are answered;
- an idle agent's CPU over 10 s once everything settled (inotify: an idle agent should cost nothing).

    .venv/bin/python bench/lab_scale.py [--pods 10000] [--policies 1000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from routed import netns  # noqa: E402
from routed.lab import manifests  # noqa: E402
from routed.lab.lab import Lab  # noqa: E402
from tests.helpers import holds_for, run_and_expect  # noqa: E402

LAB = "lscale"
NS = "demo"


def pod_yaml(names: list[str], node: str) -> str:
    return yaml.safe_dump_all([{"apiVersion": "v1", "kind": "Pod",
                                "metadata": {"name": n, "namespace": NS, "labels": {"app": f"app{i % 100}", "tier": "fe"}},
                                "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [
                                    {"containerPort": 80, "name": "http"}]}]}} for i, n in enumerate(names)])


def cluster_objects(n_pods: int, n_policies: int) -> list[dict]:
    """Pods on nodes that are not in the lab, and policies in their namespaces and in the lab's."""
    n_ns = max(2, n_pods // 200)
    objs: list[dict] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"ns{i}", "labels": {"team": f"t{i % 10}"}}}
                        for i in range(n_ns)]
    for i in range(n_pods):
        ip = f"10.{64 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        objs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": f"pod{i}", "namespace": f"ns{i % n_ns}",
                                  "labels": {"app": f"app{i % 100}", "tier": "be" if i % 2 else "fe"}},
                     "spec": {"nodeName": f"remote{i % 50}", "containers": [{"name": "c"}]},
                     "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
    for j in range(n_policies):
        ns = NS if j % 10 == 0 else f"ns{j % n_ns}"  # a tenth select the lab's own pods
        peer = ({"podSelector": {"matchLabels": {"app": f"app{(j * 7) % 100}"}}} if j % 2 else
                {"namespaceSelector": {"matchLabels": {"team": f"t{j % 10}"}}, "podSelector": {"matchLabels": {"tier": "fe"}}})
        objs.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "metadata": {"name": f"pol{j}", "namespace": ns},
                     "spec": {"podSelector": {"matchLabels": {"app": f"app{j % 100}"}},
                              "ingress": [{"from": [peer], "ports": [{"port": 80}]}]}})
    return objs


def timed_apply(lab: Lab, names: list[str], node: str) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(pod_yaml(names, node))
    try:
        t0 = time.perf_counter()
        lab.apply(f.name)
        return time.perf_counter() - t0
    finally:
        os.unlink(f.name)


def delete_pods(lab: Lab, names: list[str], node: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(pod_yaml(names, node))
    try:
        lab.delete(f.name)
    finally:
        os.unlink(f.name)


def concurrent_adds(lab: Lab, node: str, count: int) -> float:
    """`count` CNI ADDs at once on one node, each for a pod whose object is already known; then DELs."""
    from routed.lab import pods

    state = lab.state()
    names = [f"burst{i}" for i in range(count)]
    store = lab.store(state)
    for obj in yaml.safe_load_all(pod_yaml(names, node)):
        store.write(obj)
    expected = len(list((lab.paths.cluster_dir / "Pod").glob("*.yaml")))  # the objects reach the agent first,
    run_and_expect(lambda: (lab.agent_status(node) or {}).get("datastore", {}).get("objects", {}).get("Pod", 0),
                   lambda n: n >= expected, timeout=60).check("burst pods known to the agent")  # as a kubelet's do
    burst = [pods.new_pod(lab.name, NS, n, node, []) for n in names]
    for p in burst:
        netns.create(p.netns)
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(lambda p: pods.exec_cni("ADD", lab.paths, node, p), burst))
        elapsed = time.perf_counter() - t0
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(lambda p: pods.exec_cni("DEL", lab.paths, node, p), burst))
    finally:
        for p in burst:
            netns.delete(p.netns)
        for obj in yaml.safe_load_all(pod_yaml(names, node)):
            store.delete(obj)
    return elapsed


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(lab: Lab, node: str) -> None:
    """Until the agent has applied everything it was told (its last apply stays the last for 2 s)."""
    def last_apply() -> object:
        return ((lab.agent_status(node) or {}).get("policy") or {}).get("lastApplyTime")

    for _ in range(30):
        if holds_for(last_apply, last_apply(), 2.0, interval=0.2).ok:
            return


def measure(lab: Lab, tag: str) -> dict:
    node = "node1"
    settle(lab, node)
    ones = [timed_apply(lab, [f"one-{tag}-{i}"], node) for i in range(5)]
    one = statistics.median(ones)
    settle(lab, node)
    twenty = timed_apply(lab, [f"many-{tag}-{i}" for i in range(20)], node)
    burst = concurrent_adds(lab, node, 50)
    delete_pods(lab, [f"one-{tag}-{i}" for i in range(5)] + [f"many-{tag}-{i}" for i in range(20)], node)
    pid = int(lab.paths.agent_pid(node).read_text())
    run_and_expect(lambda: (lab.agent_status(node) or {}).get("ready"), True, timeout=60).check("agent settled")
    before, t0 = cpu_seconds(pid), time.perf_counter()
    time.sleep(10)  # the idle period is the measurement
    idle = (cpu_seconds(pid) - before) / (time.perf_counter() - t0)
    return {"one_pod_s": one, "one_pod_samples_s": ones, "twenty_pods_s": twenty, "fifty_adds_s": burst, "idle_cpu_fraction": idle}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=10000)
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    lab = Lab(LAB)
    try:
        lab.up(nodes=2, tor="static")
        empty = measure(lab, "e")
        t0 = time.perf_counter()
        for obj in cluster_objects(args.pods, args.policies):
            manifests.write_object(lab.paths.cluster_dir, obj)
        run_and_expect(lambda: [((lab.agent_status(n.name) or {}).get("datastore", {}).get("objects", {}).get("Pod", 0),
                                 (lab.agent_status(n.name) or {}).get("ready")) for n in lab.state().nodes],
                       lambda rows: all(count >= args.pods and ready for count, ready in rows), timeout=900,
                       interval=0.5).check("agents synced the big cluster")
        load = time.perf_counter() - t0
        big = measure(lab, "b")
    finally:
        lab.down(quiet=True)
    result = {"pods": args.pods, "policies": args.policies, "cluster_load_s": load, "empty": empty, "at_scale": big,
              "one_pod_ratio": big["one_pod_s"] / empty["one_pod_s"]}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"lab: 2 nodes; cluster {args.pods} pods / {args.policies} policies on other nodes (load {load:.1f} s)")
    print(f"{'':12} {'1 pod':>9} {'20 pods':>9} {'50 ADDs':>9} {'idle CPU':>9}")
    for name, r in (("empty", empty), ("at scale", big)):
        print(f"{name:12} {r['one_pod_s']:>8.2f}s {r['twenty_pods_s']:>8.2f}s {r['fifty_adds_s']:>8.2f}s "
              f"{r['idle_cpu_fraction'] * 100:>8.2f}%")
    print(f"ratio at scale / empty: one pod x{result['one_pod_ratio']:.2f}, 20 pods "
          f"x{big['twenty_pods_s'] / empty['twenty_pods_s']:.2f}, 50 ADDs x{big['fifty_adds_s'] / empty['fifty_adds_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
