"""The real `routed agent` (manifest datastore) driving BgpManager, against an FRR ToR."""

import os
import shutil
import signal
import subprocess

import pytest
import yaml

from routed import api, netns
from tests.helpers import run_and_expect
from tests.topo.bgp_topo import ROOT, BgpTopo

pytestmark = [pytest.mark.topo, pytest.mark.netns]
ROUTED = os.path.join(ROOT, ".venv", "bin", "routed")


@pytest.fixture
def topo(request):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not os.path.exists(ROUTED) or not shutil.which("vtysh"):
        pytest.skip("routed agent or FRR missing")
    t = BgpTopo("rtd-bgp-agent", nodes=2)
    procs: list[subprocess.Popen] = []
    request.addfinalizer(lambda: _cleanup(t, procs))
    t.build()
    t.start_tor()
    t.agent_procs = procs
    return t


def _cleanup(t, procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
    t.cleanup()


def start_agent(t, i, failpoints=""):
    mdir = os.path.join(t.workdir, "manifests")
    os.makedirs(mdir, exist_ok=True)
    with open(os.path.join(mdir, "bgp.yaml"), "w") as f:
        yaml.safe_dump_all(t.objects(), f)
    state = os.path.join(t.workdir, f"agent{i}")
    os.makedirs(state, exist_ok=True)
    env = dict(os.environ, ROUTED_POLICY__ENABLED="false", ROUTED_FAILPOINTS=failpoints)
    log = open(os.path.join(t.workdir, f"node{i}.log"), "ab")
    cmd = [ROUTED, "agent", "--node", f"node{i}", "--datastore", "manifest", "--manifest-dir", mdir,
           "--state-dir", state, "--socket", os.path.join(state, "agent.sock"), "--http-listen", ""]
    p = subprocess.Popen(netns.ns_cmd(t.node_ns(i), cmd), stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    t.agent_procs.append(p)
    return p


def test_agent_announces_and_learns(topo):
    for i in (1, 2):
        start_agent(topo, i)
    try:
        run_and_expect(lambda: "10.244.1.0/24" in topo.tor_routes() and "10.244.2.0/24" in topo.tor_routes(),
                       bool, 40, ignore=(Exception,)).check("both CIDRs on the ToR")
        run_and_expect(lambda: "10.244.2.0/24" in topo.node_routes(1), bool, 20,
                       ignore=(Exception,)).check("node1 learns node2")
        run_and_expect(lambda: "10.244.1.0/24" in topo.node_routes(2), bool, 20,
                       ignore=(Exception,)).check("node2 learns node1")
    except AssertionError:
        print(topo.logs())
        raise
    # clean agent stop withdraws
    p = topo.agent_procs[1]
    p.send_signal(signal.SIGTERM)
    p.wait(15)
    run_and_expect(lambda: "10.244.2.0/24" not in topo.tor_routes(), bool, 10,
                   ignore=(Exception,)).check("withdraw after agent stop")


def test_failed_bgp_updates_are_retried_until_the_tor_has_the_route(topo):
    """The first three BGP updates of node1 fail (failpoint): the agent retries with backoff, reports the
    failure meanwhile, and the ToR's kernel ends up with node1's pod CIDR via node1."""
    start_agent(topo, 1, failpoints="bgp.update=3")
    sock = os.path.join(topo.workdir, "agent1", "agent.sock")
    failing = run_and_expect(lambda: api.call(sock, "status"), lambda s: s["bgp"]["updateError"] != "", 20,
                             ignore=(OSError,)).check("the failing update is reported")
    assert "failpoint bgp.update fired" in failing["bgp"]["updateError"] and not failing["ready"], failing
    run_and_expect(lambda: "10.244.1.0/24" in topo.tor_routes(), bool, 40, ignore=(Exception,)).check(
        f"node1's CIDR on the ToR; logs:\n{topo.logs()}")
    assert topo.tor_routes()["10.244.1.0/24"] == [topo.node_addr(1)]
    status = api.call(sock, "status")
    assert status["bgp"]["updateError"] == "" and status["bgp"]["ready"], status["bgp"]
    log = open(os.path.join(topo.workdir, "node1.log")).read()
    assert log.count("bgp apply failed") == 3, log[-3000:]
