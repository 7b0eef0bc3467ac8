"""The 2-node lab with static ToR routes: real agents, pods wired by the real CNI, real packets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from routed import api, netns
from routed.lab.lab import Lab
from tests.helpers import run_and_expect

pytestmark = [pytest.mark.requires_root, pytest.mark.topo]
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "lab", "two-nodes.yaml")


@pytest.fixture(scope="module")
def lab():
    lab = Lab("tstatic")
    lab.up(nodes=2, files=[EXAMPLE], tor="static")
    yield lab
    lab.down()
    assert netns.list_ours("rtd-tstatic-") == []


def test_matrix_all_allowed_without_nat(lab):
    rows = lab.matrix()
    assert len(rows) == 4 * 4 * 4  # 4 sources x 4 targets x (80, 81) x (TCP, UDP)
    denied = [r for r in rows if not r["allowed"]]
    assert denied == []
    for row in rows:
        assert row["server"] == row["to"]
        assert row["client_seen"] == row["from_ip"], f"NAT seen on {row}"


def test_pod_ips_come_from_node_cidrs(lab):
    state = lab.state()
    for pod in state.pods.values():
        cidr = state.node(pod.node).pod_cidr
        prefix = cidr.rsplit(".", 1)[0] + "."
        assert pod.ips and pod.ips[0].startswith(prefix), (pod.key, pod.ips, cidr)


def test_tor_link_carries_pod_ips_unencapsulated(lab):
    state = lab.state()
    src = state.pods["demo/client-1"]
    dst = state.pods["demo/web-2"]
    tor = state.tors[0]
    uplink = state.node(src.node).uplinks[0]["tor_ifname"]
    capture = subprocess.Popen(
        netns.ns_cmd(tor.netns, ["tcpdump", "-l", "-n", "-c", "3", "-i", uplink,
                                 f"tcp and src host {src.ips[0]} and dst host {dst.ips[0]} and dst port 80"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # tcpdump prints "listening on" to stderr once it captures
        assert capture.stderr is not None
        ok, banner, _ = run_and_expect(capture.stderr.readline,
                                       lambda line: "listening on" in line or not line, timeout=5)
        assert ok and "listening on" in banner, f"tcpdump not capturing: {banner!r}"
        lines = run_and_expect(lambda: lab.matrix(ports=[80], protocols=["tcp"]),
                               lambda rows: all(r["allowed"] for r in rows),
                               timeout=5).check("TCP 80 allowed between all pods")
        assert lines
        out, _ = capture.communicate(timeout=10)
    finally:
        if capture.poll() is None:
            capture.kill()
    seen = [line for line in out.splitlines() if f"{src.ips[0]}." in line and f"{dst.ips[0]}.80" in line]
    assert seen, f"no pod-to-pod packet seen on the ToR link: {out!r}"
    # no tunnel devices on the nodes
    for node in state.nodes:
        links = json.loads(netns.run(["ip", "-n", node.netns, "-d", "-j", "link", "show"]).stdout)
        kinds = {(link.get("linkinfo") or {}).get("info_kind") for link in links}
        assert not kinds & {"vxlan", "ipip", "gre", "geneve", "wireguard"}, kinds


def test_agent_crash_does_not_disturb_pods(lab):
    state = lab.state()
    node = state.nodes[0]
    pid = int(lab.paths.agent_pid(node.name).read_text())
    before = {p.key: p.ips for p in state.pods.values()}
    os.kill(pid, signal.SIGKILL)
    # the lab restarts it, as kubelet restarts a DaemonSet pod
    run_and_expect(lambda: int(lab.paths.agent_pid(node.name).read_text()), lambda p: p != pid,
                   timeout=10).check("agent restarted (new pid)")
    status = run_and_expect(lambda: lab.agent_status(node.name) or {}, lambda s: s.get("ready"),
                            timeout=30).check("agent ready after the restart")
    assert status["endpoints"] == sum(1 for p in state.pods.values() if p.node == node.name)
    rows = lab.matrix(protocols=["tcp"])
    assert rows and all(r["allowed"] for r in rows)
    assert {p.key: p.ips for p in lab.state().pods.values()} == before


def test_pod_delete_and_recreate(lab, tmp_path):
    manifest = tmp_path / "extra.yaml"
    manifest.write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: extra, namespace: demo, labels: {app: extra}}\n"
        "spec:\n  nodeName: node2\n  containers:\n  - name: c\n    ports: [{containerPort: 8080}]\n"
    )
    lab.apply(str(manifest))
    pod = lab.state().pods["demo/extra"]
    assert netns.exists(pod.netns)
    # endpoint first: the ADD returned only once the pod's policy chains were in the kernel (no polling here)
    endpoint = next(e for e in api.call(lab.paths.node_socket("node2"), "endpoints.list")
                    if e["podName"] == "extra")
    rules = netns.ns_run(lab.state().node("node2").netns, ["iptables-save", "-t", "filter"]).stdout
    assert f"-i {endpoint['hostIfname']} " in rules and f"-o {endpoint['hostIfname']} " in rules
    started = time.monotonic()
    rows = lab.matrix(ports=[8080])
    assert rows and all(r["allowed"] for r in rows if r["to"] == "demo/extra"), rows
    assert time.monotonic() - started < 30
    lab.delete(str(manifest))
    assert "demo/extra" not in lab.state().pods
    assert not netns.exists(pod.netns)
    run_and_expect(lambda: lab.agent_status("node2") or {}, {"endpoints": 2},
                   timeout=10).check("node2 back to 2 endpoints")


def _http_get(node_netns: str, path: str) -> tuple[int, str]:
    script = (
        "import sys, urllib.request, urllib.error\n"
        f"try:\n r = urllib.request.urlopen('http://127.0.0.1:9099{path}', timeout=5); print(r.status); "
        "print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n print(e.code); print(e.read().decode())\n"
    )
    out = netns.ns_run(node_netns, ["python3", "-c", script]).stdout
    code, _, body = out.partition("\n")
    return int(code), body


def test_health_ready_and_metrics(lab):
    node = lab.state().nodes[1]  # node1's agent was restarted above; node2's counters span the whole module
    assert _http_get(node.netns, "/healthz")[0] == 200
    code, body = _http_get(node.netns, "/readyz")
    assert code == 200, body
    code, body = _http_get(node.netns, "/metrics")
    assert code == 200
    assert "routed_ready 1.0" in body
    assert 'routed_cni_requests_total{command="ADD",result="ok"}' in body
    assert "routed_endpoints 2.0" in body
