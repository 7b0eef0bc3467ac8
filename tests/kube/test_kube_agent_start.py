"""An agent whose kubeconfig does not exist: an ERROR naming the file within 1 s of its start, the cause in
`routed status` and /readyz, retries with backoff; once a working kubeconfig appears at that path the agent
syncs and becomes ready without a restart. The API server (real kube-apiserver + etcd) runs in its own
namespace, the agent in a node namespace wired to it."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from routed import netns
from tests.agent_process import AgentProcess, first_line_time, seconds_between
from tests.helpers import run_and_expect
from tests.kube.kube_env import SCRIPT, _build_or_skip

pytestmark = [pytest.mark.requires_root, pytest.mark.kube]

PREFIX = "rtd-kst-"
CP_ADDR, NODE_ADDR = "10.123.0.1", "10.123.0.2"
API_PORT = 16443


@pytest.fixture
def control_plane() -> Iterator[dict[str, str]]:
    _build_or_skip()
    netns.delete_all(PREFIX)
    run = uuid.uuid4().hex[:6]
    cp, node = f"{PREFIX}{run}-cp", f"{PREFIX}{run}-n1"
    workdir = tempfile.mkdtemp(prefix=f"{PREFIX}{run}-")
    kube_dir = Path(workdir, "kube")
    netns.create(cp)
    netns.create(node)
    try:
        netns.veth(cp, "n1", node, "cp")
        netns.ns_run(cp, ["ip", "addr", "add", f"{CP_ADDR}/30", "dev", "n1"])
        netns.ns_run(node, ["ip", "addr", "add", f"{NODE_ADDR}/30", "dev", "cp"])
        netns.ns_run(node, ["ip", "route", "add", "default", "via", CP_ADDR])
        netns.sysctl(node, "net.ipv4.ip_forward", "1")
        start = subprocess.run(netns.ns_cmd(cp, ["env", f"KUBE_TESTENV_BIND={CP_ADDR}",
                                                 f"KUBE_TESTENV_API_PORT={API_PORT}", "bash", str(SCRIPT), "start",
                                                 "--dir", str(kube_dir)]),
                               capture_output=True, text=True, timeout=300)
        assert start.returncode == 0, start.stderr[-2000:]
        admin = yaml.safe_load((kube_dir / "admin.kubeconfig").read_text())
        admin["clusters"][0]["cluster"]["server"] = f"https://{CP_ADDR}:{API_PORT}"
        working = Path(workdir, "working.kubeconfig")
        working.write_text(yaml.safe_dump(admin))
        node_obj = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "kst-node"},
                    "spec": {"podCIDR": "10.88.5.0/24", "podCIDRs": ["10.88.5.0/24"]}}
        kubectl = Path(subprocess.run(["bash", str(SCRIPT), "bindir"], capture_output=True, text=True,
                                      check=True).stdout.strip(), "kubectl")
        applied = subprocess.run(netns.ns_cmd(node, [str(kubectl), "--kubeconfig", str(working), "apply", "-f", "-"]),
                                 input=yaml.safe_dump(node_obj), capture_output=True, text=True, timeout=60)
        assert applied.returncode == 0, applied.stderr
        yield {"node_ns": node, "workdir": workdir, "working": str(working)}
    finally:
        subprocess.run(netns.ns_cmd(cp, ["bash", str(SCRIPT), "stop", "--dir", str(kube_dir)]),
                       capture_output=True, timeout=120)
        netns.delete(node)
        netns.delete(cp)
        shutil.rmtree(workdir, ignore_errors=True)


def test_missing_kubeconfig_is_reported_at_once_and_picked_up_when_it_appears(control_plane):
    workdir = control_plane["workdir"]
    missing = str(Path(workdir, "agent", "kubeconfig"))
    agent = AgentProcess(control_plane["node_ns"], str(Path(workdir, "agent")), "kst-node",
                         {"datastore": "kube", "kubeconfig": missing, "bgp": {"enabled": False}}).start()
    try:
        log = run_and_expect(agent.log, lambda text: "ERROR" in text and missing in text, timeout=10,
                             interval=0.05).check("an ERROR naming the kubeconfig")
        error = re.search(rf"^(\S+ \S+) ERROR .*kubeconfig {re.escape(missing)} does not exist", log, re.M)
        assert error, log
        assert seconds_between(first_line_time(log), error.group(1)) < 1.0, log
        status = run_and_expect(agent.status, lambda s: missing in s["datastore"]["error"], timeout=5,
                                ignore=(OSError,)).check("status names the kubeconfig")
        assert not status["ready"] and any(missing in r for r in status["reasons"]), status
        code, body = agent.http("/readyz")
        assert code == 503 and missing in body, body
        shown = agent.cli("status")
        assert shown.returncode == 0 and missing in shown.stdout, shown
        run_and_expect(lambda: agent.log().count("kube datastore cannot start"), lambda n: n >= 2, timeout=10).check(
            "it keeps retrying, with backoff")
        pid = agent.proc.pid if agent.proc else 0
        shutil.copy(control_plane["working"], missing)
        status = run_and_expect(agent.status, {"ready": True, "datastore": {"synced": True, "error": ""}},
                                timeout=60, ignore=(OSError,)).check(f"ready; log:\n{agent.log()[-3000:]}")
        assert status["podCIDRs"] == ["10.88.5.0/24"]
        assert agent.proc is not None and agent.proc.pid == pid and agent.returncode() is None
    finally:
        agent.stop()
