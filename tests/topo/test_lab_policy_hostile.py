"""A hostile NetworkPolicy on real agents (issue 17): 800 ipBlocks x 800 ports in one policy (the issue's 52 KiB
that grew an agent past 512Mi) is enforced exactly, and cheaply: the agents stay up (no restart), their peak RSS
(VmHWM) stays bounded, a policy over its budget is reported by name and fails closed only for its own pods,
and a later deny-all in another namespace is enforced on every node within the usual time. Dual-stack.

Pods: h/target (node1, selected by the 800 x 800 policy), h/b (node2, selected by the over-budget policy),
z/c (node1), z/d (node2). The 800 x 800 policy allows TCP/80 into h/target from node2's pod CIDRs except
z/d's addresses (plus 799 ipBlocks and 799 other ports that match nothing here).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import pytest
import yaml

from routed import api
from routed.lab.lab import Lab
from tests.helpers import holds_for, run_and_expect

pytestmark = [pytest.mark.requires_root, pytest.mark.topo]
PORT = 80
CONVERGE_SECONDS = 20.0
DENY_ALL_SECONDS = 10.0  # the usual time is about a second; the issue saw more than 30 s
PEAK_RSS_LIMIT_MIB = 250  # the DaemonSet's limit is 512Mi; 800 x 800 alone took 339 MiB before
PODS = {"h/target": "node1", "h/b": "node2", "z/c": "node1", "z/d": "node2"}


def pod_doc(key: str, node: str) -> dict[str, Any]:
    ns, name = key.split("/")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "agnhost", "ports": [
                {"name": "http", "containerPort": PORT, "protocol": "TCP"}]}]}}


def policy_doc(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def blocks_x_ports(node2_cidrs: list[str], excepted: list[str]) -> dict[str, Any]:
    peers: list[dict[str, Any]] = [{"ipBlock": {"cidr": f"172.{16 + i // 256}.{i % 256}.0/24"}} for i in range(799)]
    for cidr in node2_cidrs:
        host = "/128" if ":" in cidr else "/32"
        peers.append({"ipBlock": {"cidr": cidr, "except": [ip + host for ip in excepted if (":" in ip) == (":" in cidr)]}})
    ports = [{"port": PORT}] + [{"port": 1000 + 2 * i} for i in range(799)]
    return policy_doc("blocks-x-ports", "h", {"podSelector": {"matchLabels": {"app": "target"}},
                                             "ingress": [{"from": peers, "ports": ports}]})


# 250 distinct selector peers: 250 sets and a list:set, over the default 200 sets per policy
OVER_BUDGET = policy_doc("too-many-sets", "h", {"podSelector": {"matchLabels": {"app": "b"}}, "ingress": [
    {"from": [{"podSelector": {"matchLabels": {"app": "c", "n": str(i)}}} for i in range(250)]}]})
DENY_Z = policy_doc("deny-all", "z", {"podSelector": {}, "policyTypes": ["Ingress"]})


def vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(ln for ln in f if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def agent_pids(lab: Lab) -> dict[str, int]:
    return {node: int(lab.paths.agent_pid(node).read_text()) for node in ("node1", "node2")}


def seen(lab: Lab, family: int) -> dict[tuple[str, str], bool]:
    return {(r["from"], r["to"]): bool(r["allowed"]) for r in lab.matrix(ports=[PORT], protocols=["TCP"],
                                                                          timeout=0.8, family=family)}


def expected(deny_z: bool) -> dict[tuple[str, str], bool]:
    def allowed(src: str, dst: str) -> bool:
        if src == dst:
            return True
        if dst == "h/target":  # from node2's pod CIDRs except z/d: h/b
            return src == "h/b"
        if dst == "h/b":  # its policy is over budget: fail closed
            return False
        return not deny_z
    return {(s, d): allowed(s, d) for s in PODS for d in PODS}


def converge(lab: Lab, want: dict[tuple[str, str], bool], timeout: float) -> None:
    for family in (4, 6):
        ok, last, _ = run_and_expect(functools.partial(seen, lab, family), lambda s: s == want, timeout=timeout,
                                     interval=0.2)
        wrong = sorted(f"{s} -> {d}: expected {'allowed' if v else 'denied'}" for (s, d), v in want.items()
                       if last.get((s, d)) != v)
        assert ok, f"IPv{family}: {len(wrong)} pairs differ:\n" + "\n".join(wrong)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    manifest = tmp_path_factory.mktemp("hostile") / "pods.yaml"
    docs: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}} for ns in "hz"]
    docs += [pod_doc(k, n) for k, n in PODS.items()]
    manifest.write_text(yaml.safe_dump_all(docs))
    lab = Lab("thost")
    lab.up(nodes=2, files=[str(manifest)], ip_family="dual")
    yield lab
    lab.down()


def test_800_ipblocks_x_800_ports_bounded_enforced_and_deny_all_still_in_time(lab):
    state = lab.state()
    pids = agent_pids(lab)
    node2 = next(n for n in state.nodes if n.name == "node2")
    store = lab.store(state)
    store.write(blocks_x_ports(node2.cidrs(), state.pods["z/d"].ips))
    store.write(OVER_BUDGET)
    converge(lab, expected(deny_z=False), CONVERGE_SECONDS)

    for node in ("node1", "node2"):
        report = api.call(lab.paths.node_socket(node), "policy.report", timeout=5)
        assert [p["policy"] for p in report["invalidPolicies"]] == ["h/too-many-sets"], report["invalidPolicies"]
        assert "over the per-policy budget: 251 ipsets (at most 200)" in report["invalidPolicies"][0]["reasons"][0]
        assert report["ready"] and not report["lastError"]
        if node == "node1":  # the 800 x 800 rule: one kernel rule per family, not 640,000
            assert report["rules"] < 200, report["rules"]
    assert agent_pids(lab) == pids  # nobody restarted (no OOM, no crash)
    peaks = {node: vm_hwm_mib(pid) for node, pid in pids.items()}
    print(f"agent peak RSS (VmHWM) with the 800 x 800 policy: {peaks}")
    assert all(peak < PEAK_RSS_LIMIT_MIB for peak in peaks.values()), peaks

    started = time.monotonic()
    store.write(DENY_Z)
    ok, last, _ = run_and_expect(lambda: seen(lab, 4), lambda s: s == expected(deny_z=True),
                                 timeout=DENY_ALL_SECONDS, interval=0.1)
    took = time.monotonic() - started
    print(f"deny-all in z enforced on every node after {took:.2f} s")
    assert ok, f"deny-all not enforced within {DENY_ALL_SECONDS} s: {last}"
    converge(lab, expected(deny_z=True), CONVERGE_SECONDS)  # and on IPv6
    assert holds_for(lambda: agent_pids(lab), pids, 2.0).ok
