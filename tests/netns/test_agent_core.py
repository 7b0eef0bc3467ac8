"""The agent as a whole, in a node namespace: supervision (a dying task is logged and restarted, or ends the
agent non-zero; /healthz follows), retries of failed applies until the kernel is right, a datastore that cannot
start, and the periodic resync repairing what someone removed by hand."""

from __future__ import annotations

import os
import re
import shlex
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from routed import netns
from tests.agent_process import AgentProcess, first_line_time, manifest, node_object, seconds_between
from tests.helpers import run_and_expect
from tests.netns.cni_support import NODE_IP, NodeEnv, cleanup_leftovers

pytestmark = [pytest.mark.requires_root, pytest.mark.netns]

POD_CIDR = "10.88.0.0/24"
NS = "core"
IPTABLES_SAVE = {"nft": "iptables-nft-save", "legacy": "iptables-legacy-save"}
IPTABLES = {"nft": "iptables-nft", "legacy": "iptables-legacy"}


def cluster(node_name: str) -> str:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p1", "namespace": NS, "labels": {"app": "p1"}},
           "spec": {"nodeName": node_name, "containers": [{"name": "c"}]}}
    deny_ingress = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": "deny-in", "namespace": NS}, "spec": {"podSelector": {}}}
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}
    return manifest(node_object(node_name, POD_CIDR, NODE_IP), namespace, pod, deny_ingress)


@pytest.fixture
def node() -> Iterator[NodeEnv]:
    cleanup_leftovers()
    env = NodeEnv(uuid.uuid4().hex[:6], pod_cidr=POD_CIDR)
    yield env
    env.close()


def agent_for(node: NodeEnv, failpoints: str = "", with_manifests: bool = True, **config: object) -> AgentProcess:
    mdir = Path(node.manifest_dir)
    if with_manifests:
        mdir.mkdir(parents=True, exist_ok=True)
        (mdir / "cluster.yaml").write_text(cluster(node.node_name))
    env = {"ROUTED_FAILPOINTS": failpoints} if failpoints else {}
    agent = AgentProcess(node.host, node.tmp, node.node_name,
                         {"manifest_dir": str(mdir), "bgp": {"enabled": False}, **config}, env=env)
    return agent.start()


def ready(agent: AgentProcess) -> dict:
    return run_and_expect(agent.status, {"ready": True}, timeout=30, ignore=(OSError,)).check(
        f"agent ready; log:\n{agent.log()[-3000:]}")


def our_rules(node: NodeEnv, backend: str, family: int = 4) -> list[str]:
    tool = IPTABLES_SAVE[backend] if family == 4 else IPTABLES_SAVE[backend].replace("iptables", "ip6tables", 1)
    save = netns.ns_run(node.host, [tool, "-t", "filter"]).stdout
    return [line for line in save.splitlines() if line.startswith("-A ") and '--comment "rtd:' in line]


def add_pod(node: NodeEnv) -> str:
    pod_ns = node.pod_ns("p1")
    run = node.cni("ADD", "c" + uuid.uuid4().hex[:12], pod_ns, "1.0.0",
                   args=f"K8S_POD_NAMESPACE={NS};K8S_POD_NAME=p1")
    assert run.rc == 0, run
    return run.json["ips"][0]["address"].split("/")[0]


def test_task_that_dies_is_logged_restarted_and_fails_healthz_meanwhile(node):
    agent = agent_for(node, failpoints="task.policy=4")  # dies at 4 starts in a row: ~7 s of backoff
    ok, seen, _ = run_and_expect(lambda: agent.http("/healthz"), lambda r: r[0] == 503, timeout=20)
    assert ok and "task policy" in seen[1], (seen, agent.log()[-2000:])
    code, body = agent.http("/readyz")
    assert code == 503 and "task policy restarting" in body, body
    status = ready(agent)  # restarted with backoff, then it stays up
    assert agent.http("/healthz") == (200, "ok\n")
    task = next(t for t in status["tasks"] if t["name"] == "policy")
    assert task["state"] == "running" and task["restarts"] == 4
    log = agent.log()
    assert log.count("task policy died: InjectedFault") == 4
    assert "Traceback (most recent call last)" in log and "failpoint task.policy fired" in log
    assert agent.returncode() is None


def test_fatal_task_ends_the_agent_non_zero(node):
    agent = agent_for(node, failpoints="task.api=1")
    ok, code, _ = run_and_expect(agent.returncode, lambda rc: rc is not None, timeout=20)
    assert ok and code == 1, agent.log()[-2000:]
    log = agent.log()
    assert "task api died: InjectedFault" in log and "agent exits non-zero" in log
    assert "Traceback (most recent call last)" in log


def test_failed_policy_applies_are_retried_until_the_kernel_is_right(node):
    agent = agent_for(node, failpoints="policy.apply=5")
    ok, failing, _ = run_and_expect(agent.status, lambda s: s["policy"]["failures"] >= 2, timeout=20,
                                    ignore=(OSError,))
    assert ok and "failpoint policy.apply fired" in failing["policy"]["lastError"], failing
    assert any("policy" in r for r in failing["reasons"])
    status = ready(agent)
    assert status["policy"]["failures"] == 0 and status["policy"]["lastError"] == ""
    backend = status["policy"]["backend"]
    rules = our_rules(node, backend) + our_rules(node, backend, family=6)  # the report counts both tables
    assert len(rules) == status["policy"]["rules"] > 0
    assert our_rules(node, backend) and our_rules(node, backend, family=6)
    assert agent.log().count("policy apply failed") == 5


def test_periodic_resync_restores_a_deleted_rule_and_pod_route(node):
    agent = agent_for(node, resync_interval=1.0)
    backend = ready(agent)["policy"]["backend"]
    ip = add_pod(node)
    route = f"{ip} dev"
    assert route in node.routes()
    rules = run_and_expect(lambda: our_rules(node, backend), lambda r: any(ip in line for line in r), 10).check(
        "the pod's anti-spoofing rule")
    victim = next(line for line in rules if ip in line)
    # someone deletes our rule and the pod's /32 by hand
    netns.ns_run(node.host, [IPTABLES[backend], "-t", "filter", *shlex.split(victim.replace("-A ", "-D ", 1))])
    netns.ns_run(node.host, ["ip", "route", "del", f"{ip}/32"])
    assert victim not in our_rules(node, backend) and route not in node.routes()
    run_and_expect(lambda: (victim in our_rules(node, backend), route in node.routes()), [True, True], 10).check(
        f"resync repairs; log:\n{agent.log()[-2000:]}")
    assert agent.status()["cni"]["repairs"] >= 1
    assert re.search(r"resync restored what someone removed: route " + re.escape(ip), agent.log())


def test_unreadable_manifest_directory_is_an_error_at_once_then_recovers(node):
    agent = agent_for(node, with_manifests=False)
    mdir = node.manifest_dir
    log = run_and_expect(agent.log, lambda text: "ERROR" in text and mdir in text, timeout=10,
                         interval=0.05).check("an error naming the directory")
    error = re.search(rf"^(\S+ \S+) ERROR .*manifest directory {re.escape(mdir)} does not exist", log, re.M)
    assert error, log
    assert seconds_between(first_line_time(log), error.group(1)) < 1.0, log  # within 1 s of the agent's start
    status = run_and_expect(agent.status, lambda s: mdir in s["datastore"]["error"], timeout=5,
                            ignore=(OSError,)).check("status names the directory")
    assert not status["ready"] and any(mdir in r for r in status["reasons"])
    code, body = agent.http("/readyz")
    assert code == 503 and mdir in body, body
    out = agent.cli("status")
    assert out.returncode == 0 and mdir in out.stdout, out
    os.makedirs(mdir)
    Path(mdir, "cluster.yaml").write_text(cluster(node.node_name))
    pid = agent.proc.pid if agent.proc else 0
    ready(agent)
    assert agent.proc is not None and agent.proc.pid == pid and agent.returncode() is None  # no restart needed
