"""The lab with a real containerd per node (`routed lab up --runtime containerd`): the agent runs as a container
of the agent image with the DaemonSet's security settings (its capabilities, not privileged, /proc/sys read-only,
read-only root filesystem, no_new_privs, the runtime's default seccomp filter; ExaBGP under them too), pods are
CRI sandboxes, and every CNI call comes from containerd's libcni through the static routed-cni."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from routed import api, netns
from routed.lab import daemonset
from routed.lab.lab import Lab
from tests.helpers import holds_for, run_and_expect

pytestmark = [pytest.mark.requires_root, pytest.mark.topo]

REPO = Path(__file__).resolve().parents[2]
TWO_NODES = str(REPO / "examples" / "lab" / "two-nodes.yaml")
DENY_ALL = str(REPO / "examples" / "policies" / "deny-all.yaml")


@pytest.fixture(scope="module")
def lab():
    lab = Lab("tctd")
    try:
        lab.up(nodes=2, files=[TWO_NODES], runtime="containerd")
        yield lab
    finally:
        lab.down(quiet=True)


def crictl_json(lab: Lab, node: str, *args: str) -> dict:
    proc = lab.crictl(node, [args[0], "-o", "json", *args[1:]])  # options before operands
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def agent_container(lab: Lab, node: str) -> str:
    return (lab.paths.node_dir(node) / "agent.container").read_text().strip()


def network_ready(lab: Lab, node: str) -> bool:
    conditions = crictl_json(lab, node, "info")["status"]["conditions"]
    return next(c for c in conditions if c["type"] == "NetworkReady")["status"]


def test_pods_are_cri_sandboxes_and_reach_each_other_without_nat(lab):
    for node in ("node1", "node2"):
        sandboxes = crictl_json(lab, node, "pods")["items"]
        assert {s["metadata"]["name"] for s in sandboxes} >= {f"routed-{node}", f"web-{node[-1]}",
                                                              f"client-{node[-1]}"}
        assert all(s["state"] == "SANDBOX_READY" for s in sandboxes)
        containers = crictl_json(lab, node, "ps")["containers"]
        agent = next(c for c in containers if c["metadata"]["name"] == "agent")
        assert agent["state"] == "CONTAINER_RUNNING" and agent["image"]["image"].endswith("routed:latest")
    rows = run_and_expect(lambda: lab.matrix(protocols=["tcp", "udp"]), lambda rs: rs and all(r["allowed"] for r in rs),
                          timeout=30).check("every pod reaches every pod")
    assert all(r["client_seen"] == r["from_ip"] for r in rows)  # no NAT across the fabric


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_the_agent_container_is_not_privileged_and_proc_sys_is_read_only(lab):
    info = crictl_json(lab, "node1", "inspect", agent_container(lab, "node1"))["info"]
    spec = info["runtimeSpec"]
    granted = daemonset.load().containers["agent"].security_context["capabilities"]["add_capabilities"]
    assert sorted(granted) == sorted(["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "NET_BIND_SERVICE"])
    assert sorted(spec["process"]["capabilities"]["effective"]) == sorted(f"CAP_{c}" for c in granted)
    assert "/proc/sys" in spec["linux"].get("readonlyPaths", [])
    shim = lab.paths.node_dir("node1") / "cni" / "bin" / "routed-cni"  # installed by the install-cni container
    out = subprocess.run(["file", str(shim)], capture_output=True, text=True)
    assert out.returncode != 0 or "statically linked" in out.stdout, out.stdout
    assert shim.read_bytes()[:4] == b"\x7fELF"


def test_the_daemonset_hardening_holds_for_the_agent_exabgp_and_install_cni(lab):
    spec = crictl_json(lab, "node1", "inspect", agent_container(lab, "node1"))["info"]["runtimeSpec"]
    assert spec["root"].get("readonly") is True and spec["process"].get("noNewPrivileges") is True
    assert spec["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"  # containerd's default profile
    agent_pid = int(lab.paths.agent_pid("node1").read_text())

    def touch(path: str) -> subprocess.CompletedProcess[str]:  # in the agent's mount namespace
        return subprocess.run(["nsenter", "-t", str(agent_pid), "-m", "touch", path], capture_output=True, text=True)

    out = touch("/usr/probe")
    assert out.returncode != 0 and "Read-only file system" in out.stderr, out
    assert touch("/tmp/probe").returncode == 0  # the emptyDir

    def exabgp() -> list[int]:
        pids = children(agent_pid)
        pids += [g for c in pids for g in children(c)]  # setpriv execs ExaBGP in place
        return [p for p in pids if b"exabgp" in Path(f"/proc/{p}/cmdline").read_bytes()]

    pids = run_and_expect(exabgp, bool, timeout=30).check("ExaBGP runs in the agent container")
    for pid in [agent_pid, *pids]:
        status = proc_status(pid)
        assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2"), (pid, status)
        assert int(status["CapEff"], 16) != 0, status  # the capabilities it was granted, kept across exec
    run_and_expect(lambda: (lab.agent_status("node1") or {}).get("bgp", {}).get("peers", []),
                   lambda peers: peers and all(p.get("state") == "established" for p in peers),
                   timeout=60).check("BGP sessions up under no_new_privs and seccomp")
    listed = crictl_json(lab, "node1", "ps", "-a")["containers"]
    init = next(c for c in listed if c["metadata"]["name"] == "install-cni")
    init_spec = crictl_json(lab, "node1", "inspect", init["id"])["info"]["runtimeSpec"]
    assert init_spec["root"].get("readonly") is True and init_spec["process"].get("noNewPrivileges") is True
    assert not init_spec["process"]["capabilities"].get("effective")
    assert init_spec["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"


def test_policy_applies_and_pod_deletion_releases_the_ip(lab, tmp_path):
    lab.apply(DENY_ALL)
    try:
        run_and_expect(lambda: lab.matrix(protocols=["tcp"]),  # a pod talking to itself never leaves its netns
                       lambda rs: rs and not any(r["allowed"] for r in rs if r["from"] != r["to"]),
                       timeout=30).check("deny-all denies every pod pair")
    finally:
        lab.delete(DENY_ALL)
    run_and_expect(lambda: lab.matrix(protocols=["tcp"]), lambda rs: all(r["allowed"] for r in rs), timeout=30).check(
        "allowed again")
    extra = tmp_path / "extra.yaml"
    extra.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: extra, namespace: demo}\n"
                     "spec: {nodeName: node1, containers: [{name: s, ports: [{containerPort: 80}]}]}\n")
    lab.apply(str(extra))
    ip = lab.state().pods["demo/extra"].ips[0]
    ipam = api.call(lab.paths.node_socket("node1"), "ipam.show")
    assert ip in [a["ip"] for a in ipam["allocations"]]
    lab.delete(str(extra))
    ipam = api.call(lab.paths.node_socket("node1"), "ipam.show")
    assert ip not in [a["ip"] for a in ipam["allocations"]]
    assert "extra" not in {s["metadata"]["name"] for s in crictl_json(lab, "node1", "pods")["items"]}


def test_network_condition_follows_the_agent(lab):
    node_dir = lab.paths.node_dir("node2")
    hold = node_dir / "agent.hold"
    hold.touch()  # the supervisor leaves a stopped agent stopped
    try:
        before = {a["ip"] for a in api.call(lab.paths.node_socket("node2"), "ipam.show")["allocations"]}
        lab.crictl("node2", ["stop", agent_container(lab, "node2")])
        run_and_expect(lambda: network_ready(lab, "node2"), False, timeout=15).check("NetworkReady false")
        pod = {"metadata": {"name": "refused", "namespace": "demo", "uid": str(uuid.uuid4())}, "linux": {}}
        config = node_dir / "containerd" / "refused.json"
        config.write_text(json.dumps(pod))
        out = lab.crictl("node2", ["runp", str(config)])
        assert out.returncode != 0 and "not reachable" in out.stderr, out  # fails cleanly, code 11 from routed-cni
        pods = crictl_json(lab, "node2", "pods")["items"]
        assert not any(p["metadata"]["name"] == "refused" and p["state"] == "SANDBOX_READY" for p in pods)
        for p in pods:  # a failed sandbox may stay listed NOTREADY: remove it as a kubelet would
            if p["metadata"]["name"] == "refused":
                lab.crictl("node2", ["rmp", "-f", p["id"]])
    finally:
        hold.unlink()
    run_and_expect(lambda: network_ready(lab, "node2"), True, timeout=60).check("NetworkReady true again")
    after = {a["ip"] for a in api.call(lab.paths.node_socket("node2"), "ipam.show")["allocations"]}
    assert after == before  # the refused sandbox leaked no address


def test_kill_9_of_the_agent_container_loses_no_pod_connectivity(lab):
    state = lab.state()
    src, dst = state.pods["demo/client-1"], state.pods["demo/web-2"]
    old = agent_container(lab, "node1")
    pid = int(lab.paths.agent_pid("node1").read_text())
    ping = subprocess.Popen(netns.ns_cmd(src.netns, ["ping", "-n", "-q", "-i", "0.02", "-w", "10", dst.ips[0]]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        holds_for(ping.poll, None, 1.0).check("ping running before the kill")
        os.kill(pid, signal.SIGKILL)
        run_and_expect(lambda: agent_container(lab, "node1"), lambda c: c != old, timeout=30).check(
            "a new agent container")
        out, _ = ping.communicate(timeout=30)
    finally:
        if ping.poll() is None:
            ping.kill()
    sent, received = (int(w) for w in [out.split(" packets transmitted, ")[0].split()[-1],
                                       out.split(" packets transmitted, ")[1].split()[0]])
    assert sent > 300 and received == sent, out
    run_and_expect(lambda: lab.agent_status("node1") or {}, {"ready": True}, timeout=60).check("agent ready again")
