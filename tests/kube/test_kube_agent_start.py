"""An agent whose kubeconfig does not exist: an ERROR naming the file within 1 s of its start, the cause in
`routed status` and /readyz, retries with backoff; once a working kubeconfig appears at that path the agent
syncs and becomes ready without a restart. The API server (real kube-apiserver + etcd) runs in its own
namespace, the agent in a node namespace wired to it."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.agent_process import AgentProcess, first_line_time, seconds_between
from tests.helpers import run_and_expect
from tests.kube.kube_env import _build_or_skip
from tests.kube.netns_apiserver import NetnsApiserver

pytestmark = [pytest.mark.requires_root, pytest.mark.kube]

@pytest.fixture
def control_plane() -> Iterator[dict[str, str]]:
    _build_or_skip()
    with NetnsApiserver("rtd-kst-") as env:
        node_obj = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "kst-node"},
                    "spec": {"podCIDR": "10.88.5.0/24", "podCIDRs": ["10.88.5.0/24"]}}
        env.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(node_obj))
        yield {"node_ns": env.node_ns, "workdir": env.workdir, "working": env.kubeconfig}


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
