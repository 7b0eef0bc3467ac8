"""Dataplane properties on a real kernel, for both families' tables (iptables and ip6tables, one ipset
namespace): writer equivalence, kill -9 atomicity, sweeping, idempotence."""

from __future__ import annotations

import os
import pickle
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from policy.calc import PolicyInputs
from routed import netns
from routed.model import ContainerPort, Endpoint, Namespace, Pod
from tests.helpers import run_and_expect
from tests.netns.policy_harness import RemoteController, once_cmd

pytestmark = [pytest.mark.netns, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

PREFIX = "rtd-pol-dpl"


def synthetic(n_endpoints: int, n_policies: int, seed: int) -> PolicyInputs:
    rnd = random.Random(seed)
    namespaces = [Namespace(f"ns{i}", {"team": f"t{i % 3}"}) for i in range(4)]
    pods, endpoints = [], []
    for i in range(n_endpoints + 40):
        ns = f"ns{i % 4}"
        ip = f"10.244.{i // 250}.{i % 250 + 2}"
        # dual-stack pods, IPv4-only pods and IPv6-only pods
        ips = {0: (ip, f"fd00:244::{i:x}"), 1: (ip,), 2: (f"fd00:244::{i:x}",)}[i % 3 if i % 5 else 0]
        pod = Pod(ns, f"p{i}", {"app": f"a{i % 7}", "tier": rnd.choice(["fe", "be"])}, "node", ips,
                  (ContainerPort(8000 + i % 5, "TCP", "web"),))
        pods.append(pod)
        if i < n_endpoints:
            endpoints.append(Endpoint(f"c{i}", "eth0", "", f"rtd{i:011x}", ips, ns, pod.name))
    policies = []
    for j in range(n_policies):
        x6 = rnd.randrange(256)
        peer = rnd.choice([{"podSelector": {"matchLabels": {"app": f"a{rnd.randrange(7)}"}}},
                           {"namespaceSelector": {"matchLabels": {"team": f"t{rnd.randrange(3)}"}}},
                           {"ipBlock": {"cidr": f"10.{rnd.randrange(256)}.0.0/16", "except": []}},
                           {"ipBlock": {"cidr": f"fd{x6:02x}::/16", "except": [f"fd{x6:02x}:1::/32"]}}])
        port = rnd.choice([{"port": 80}, {"port": "web"}, {"port": 9000, "endPort": 9100, "protocol": "UDP"},
                           {"protocol": "SCTP", "port": 7}])
        spec = {"podSelector": {"matchLabels": {"app": f"a{rnd.randrange(7)}"}},
                "ingress": [{"from": [peer], "ports": [port]}],
                "egress": [{"to": [peer]}] if rnd.random() < 0.5 else []}
        if spec["egress"]:
            spec["policyTypes"] = ["Ingress", "Egress"]
        policies.append({"metadata": {"name": f"pol{j}", "namespace": f"ns{j % 4}"}, "spec": spec})
    return PolicyInputs(namespaces, pods, policies, endpoints, ["192.168.250.1", "fd99:250::1"])


def ruleset(ns: str, backend: str = "nft", counters: bool = False, family: int = 4) -> list[str]:
    tool = "iptables" if family == 4 else "ip6tables"
    cmd = [f"{tool}-{backend}-save", "-t", "filter"] + (["-c"] if counters else [])
    out = netns.ns_run(ns, cmd).stdout
    return [ln for ln in out.splitlines() if ln and not ln.startswith("#")]


def both(ns: str, backend: str = "nft", counters: bool = False) -> dict[int, list[str]]:
    return {family: ruleset(ns, backend, counters, family) for family in (4, 6)}


def sets(ns: str) -> list[str]:
    lines = netns.ns_run(ns, ["ipset", "save"]).stdout.splitlines()
    return sorted(re.sub(r" initval 0x[0-9a-f]+", "", ln) for ln in lines)


@pytest.fixture(scope="module")
def spaces():
    netns.delete_all(PREFIX)
    made: list[str] = []

    def make(tag: str) -> str:
        name = f"{PREFIX}-{tag}"
        netns.create(name)
        made.append(name)
        return name

    try:
        yield make
    finally:
        for name in made:
            netns.delete(name)
        netns.delete_all(PREFIX)


def test_both_writers_same_kernel_state(spaces):
    a, b = spaces("wa"), spaces("wb")
    inputs = synthetic(30, 25, seed=1)
    changed = synthetic(30, 25, seed=2)
    ctl_a = RemoteController(a, iptables_writer="restore", iptables_backend="legacy")
    ctl_b = RemoteController(b, iptables_writer="iptc")
    try:
        for inp in (inputs, changed, inputs):  # cold, then incremental both ways
            ra, rb = ctl_a.call("sync", inp), ctl_b.call("sync", inp)
            assert ra.ok and rb.ok, (ra.error, rb.error)
            assert rb.backend == "legacy" and ra.families == rb.families == (4, 6)
            assert both(a, "legacy") == both(b, "legacy")
            assert sets(a) == sets(b)
            assert len(ruleset(a, "legacy")) > 100 and len(ruleset(a, "legacy", family=6)) > 100
            assert "family inet6" in " ".join(sets(a))
            assert ctl_b.call("sync", inp).iptables_ops == 0  # iptc writer is idempotent too
    finally:
        ctl_a.close()
        ctl_b.close()


def test_sweep_leftovers_and_keep_foreign_rules(spaces):
    ns = spaces("sw")
    netns.ns_run(ns, ["ipset", "create", "rtd-s-stale", "hash:ip"])
    netns.ns_run(ns, ["iptables-nft-restore", "--noflush"], check=True)
    script = ("*filter\n:rtd-stale - [0:0]\n:other - [0:0]\n-A rtd-stale -j DROP\n"
              "-A FORWARD -m comment --comment rtd:old -j rtd-stale\n-A FORWARD -s 1.2.3.4/32 -j other\nCOMMIT\n")
    subprocess.run(netns.ns_cmd(ns, ["iptables-nft-restore", "--noflush"]), input=script, text=True, check=True)
    script6 = script.replace("1.2.3.4/32", "fd12::4/128")
    subprocess.run(netns.ns_cmd(ns, ["ip6tables-nft-restore", "--noflush"]), input=script6, text=True, check=True)
    netns.ns_run(ns, ["ipset", "create", "rtd6-s-stale", "hash:ip", "family", "inet6"])
    ctl = RemoteController(ns)
    try:
        assert ctl.call("sync", synthetic(5, 5, seed=3)).ok
        for family, foreign in ((4, "1.2.3.4/32"), (6, "fd12::4/128")):
            lines = ruleset(ns, family=family)
            assert not any("rtd-stale" in ln for ln in lines), family
            assert f"-A FORWARD -s {foreign} -j other" in lines and ":other - [0:0]" in lines
            assert next(ln for ln in lines if ln.startswith("-A FORWARD")).endswith("-j rtd-FORWARD")  # hook first
        assert not any("stale" in ln for ln in sets(ns))
        ctl.call("remove_all")
        for family, foreign in ((4, "1.2.3.4/32"), (6, "fd12::4/128")):
            lines = ruleset(ns, family=family)
            assert not any("rtd" in ln for ln in lines), lines
            assert f"-A FORWARD -s {foreign} -j other" in lines
        assert sets(ns) == []
    finally:
        ctl.close()


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_hook_check_puts_our_jumps_back_first(spaces, backend):
    """A flushed FORWARD and a rule inserted ahead of our INPUT jump (what kube-proxy, firewalld, Docker do) are
    repaired by the cheap hook check in both families, keeping the foreign rule; all in place: nothing written."""
    ns = spaces(f"hk{backend[0]}")
    ctl = RemoteController(ns, iptables_backend=backend)
    try:
        assert ctl.call("sync", synthetic(3, 3, seed=5)).ok
        assert ctl.call("check_hooks") == 0
        for tool in ("iptables", "ip6tables"):
            netns.ns_run(ns, [f"{tool}-{backend}", "-w", "-F", "FORWARD"])
            netns.ns_run(ns, [f"{tool}-{backend}", "-w", "-I", "INPUT", "1", "-p", "udp", "--dport", "9", "-j",
                              "ACCEPT"])
        assert ctl.call("check_hooks") == 6  # per family: FORWARD insert; INPUT delete + insert
        for family in (4, 6):
            lines = ruleset(ns, backend, family=family)
            for builtin, target in (("FORWARD", "rtd-FORWARD"), ("INPUT", "rtd-INPUT")):
                rules = [ln for ln in lines if ln.startswith(f"-A {builtin} ")]
                assert rules[0].endswith(f"-j {target}"), (family, rules)
                assert sum("rtd:" in ln for ln in rules) == 1, (family, rules)
            assert any("--dport 9 -j ACCEPT" in ln for ln in lines if ln.startswith("-A INPUT"))
        assert ctl.call("check_hooks") == 0
    finally:
        ctl.close()


def test_idempotent_counters_survive(spaces):
    ns = spaces("idem")
    ctl = RemoteController(ns)
    try:
        inputs = synthetic(20, 10, seed=4)
        assert ctl.call("sync", inputs).changed
        before = both(ns, counters=True)
        report = ctl.call("sync", inputs)
        assert report.ok and not report.changed and report.iptables_ops == 0 and report.ipset_ops == 0
        assert report.family_ops == {4: 0, 6: 0}
        assert both(ns, counters=True) == before
        # one policy changes: only its chain's rules are rewritten
        changed = PolicyInputs(inputs.namespaces, inputs.pods,
                               inputs.policies[:-1] + [dict(inputs.policies[-1], spec={"podSelector": {}})],
                               inputs.endpoints, inputs.node_ips)
        report = ctl.call("sync", changed)
        assert 0 < report.iptables_ops < report.rules / 2
    finally:
        ctl.close()


def _write(inputs: PolicyInputs) -> str:
    fd, path = tempfile.mkstemp(prefix="rtd-pol-", suffix=".pickle")
    with os.fdopen(fd, "wb") as f:
        pickle.dump(inputs, f)
    return path


@pytest.mark.parametrize("writer,backend", [("restore", "nft"), ("restore", "legacy"), ("iptc", "legacy")])
def test_kill9_mid_apply_is_old_or_new(spaces, writer, backend):
    ref, ns = spaces(f"kr{writer[0]}{backend[0]}"), spaces(f"kk{writer[0]}{backend[0]}")
    old, new = synthetic(60, 40, seed=5), synthetic(60, 40, seed=6)
    files = [_write(old), _write(new)]
    opts = {"iptables_writer": writer, "iptables_backend": backend}
    try:
        subprocess.run(once_cmd(ref, files[1], **opts), check=True)
        want_new = both(ref, backend)
        want_new_sets = sets(ref)
        subprocess.run(once_cmd(ref, files[0], **opts), check=True)
        want_old = both(ref, backend)
        assert want_old[4] != want_new[4] and want_old[6] != want_new[6]
        t0 = time.monotonic()
        subprocess.run(once_cmd(ns, files[1], **opts), check=True)
        full = time.monotonic() - t0
        rnd = random.Random(7)
        seen = {"old": 0, "new": 0}
        for _ in range(25):
            subprocess.run(once_cmd(ns, files[0], **opts), check=True)
            assert both(ns, backend) == want_old
            proc = subprocess.Popen(once_cmd(ns, files[1], **opts))
            # deliberate, the subject of the test: kill -9 at a random point of the apply (most of `full` is
            # interpreter start-up)
            time.sleep(rnd.uniform(0.3 * full, 1.1 * full))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            # no process left in the namespace (an orphaned iptables-restore finishing)
            run_and_expect(lambda: netns.pids(ns), lambda pids: not pids, 10.0,
                           interval=0.01).check("processes left in namespace")
            got = both(ns, backend)
            for family in (4, 6):  # each family's table is committed atomically: old or new, never half
                assert got[family] in (want_old[family], want_new[family]), f"half-applied IPv{family} ruleset"
            seen["old" if got[4] == want_old[4] else "new"] += 1
        subprocess.run(once_cmd(ns, files[1], **opts), check=True)
        final = both(ns, backend)
        assert final == want_new
        for rules in final.values():
            assert len(rules) == len(set(rules)) + rules.count("COMMIT") - 1
        assert sets(ns) == want_new_sets
        print(f"kill -9 outcomes ({writer}/{backend}): {seen}")
        assert seen["old"] > 0 and seen["new"] > 0, seen  # the kills landed on both sides of the commit
    finally:
        for f in files:
            os.unlink(f)


def incremental_events(inputs: PolicyInputs, seed: int) -> list[tuple[str, tuple]]:
    """Engine events a node sees: label and address changes, pods going and coming, policies added, changed and
    deleted, endpoints added and removed, namespace labels changing."""
    rnd = random.Random(seed)
    events: list[tuple[str, tuple]] = []
    pods = list(inputs.pods)
    for _ in range(60):
        pick = rnd.random()
        pod = rnd.choice(pods)
        if pick < 0.3:
            labels = {**pod.labels, "app": f"a{rnd.randrange(7)}", "tier": rnd.choice(["fe", "be"])}
            events.append(("engine.set_pod", (Pod(pod.namespace, pod.name, labels, pod.node_name, pod.ips, pod.ports),)))
        elif pick < 0.4:
            events.append(("engine.delete_pod", (pod.key,)))
        elif pick < 0.5:
            events.append(("engine.set_pod", (pod,)))
        elif pick < 0.65:
            policy = rnd.choice(synthetic(10, 30, seed=rnd.randrange(1000)).policies)
            events.append(("engine.set_policy", (policy,)))
        elif pick < 0.72:
            events.append(("engine.delete_policy", (f"ns{rnd.randrange(4)}/pol{rnd.randrange(30)}",)))
        elif pick < 0.82:
            i = rnd.randrange(60, 70)
            events.append(("engine.add_endpoint", (Endpoint(f"c{i}", "eth0", "", f"rtd{i:011x}", pod.ips,
                                                            pod.namespace, pod.name),)))
        elif pick < 0.9:
            ep = rnd.choice(inputs.endpoints)
            events.append(("engine.remove_endpoint", (ep,)))
        else:
            events.append(("engine.set_namespace", (Namespace(f"ns{rnd.randrange(4)}", {"team": f"t{rnd.randrange(3)}"}),)))
    return events


@pytest.mark.parametrize("writer,backend", [("restore", "nft"), ("restore", "legacy"), ("iptc", "legacy")])
def test_incremental_applies_leave_exactly_the_full_state(spaces, writer, backend):
    ns = spaces(f"inc{writer[0]}{backend[0]}")
    inputs = synthetic(30, 30, seed=5)
    ctl = RemoteController(ns, iptables_writer=writer, iptables_backend=backend)
    try:
        assert ctl.call("sync", inputs).full
        incremental = 0
        for i, (method, args) in enumerate(incremental_events(inputs, seed=7)):
            ctl.call(method, *args)
            report = ctl.call("apply")
            assert report.ok and not report.full, (i, method, report.error)
            incremental += report.changed
            if i % 10 == 9:  # the kernel holds what a full apply would write: a read-back finds nothing to do
                ctl.call("force_readback")
                check = ctl.call("apply")
                assert check.full and check.iptables_ops == 0 and check.ipset_ops == 0, (i, method, check)
        assert incremental > 20  # the events did change the dataplane
        assert ctl.call("apply").iptables_ops == 0  # nothing pending: nothing written
    finally:
        ctl.close()
